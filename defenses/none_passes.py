"""NONE's passes over the training set (statistics, summed activation) and the frozen norms.

Eval mode, fp32, the channels_last layout; the hooked tensor is each monitored conv's output
(before its norm and activation), reduced to its spatial maximum per channel, as the official
``analyze_neuros`` (``.max(-1).values.max(-1).values`` of the conv output).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from benchmark import progress
from benchmark.data import to_float
from benchmark.models.base import NORM_TYPES
from benchmark.types import ImageSet
from defenses.none_reset import ResetSite
from defenses.none_scores import HyperplaneStats

# Norm layers frozen while fine-tuning (the official code freezes every BatchNorm).
FROZEN_NORMS: tuple[type[nn.Module], ...] = (*NORM_TYPES, nn.BatchNorm1d, nn.BatchNorm3d)


@contextmanager
def _conv_outputs(sites: list[ResetSite], fn: Callable[[int, Tensor], None]) -> Iterator[None]:
    """Call ``fn(site_index, output)`` with every monitored conv's output while active."""
    handles = [
        s.conv.register_forward_hook(lambda m, i, o, k=k: fn(k, o)) for k, s in enumerate(sites)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _batches(
    data: ImageSet, device: torch.device, batch_size: int, desc: str
) -> Iterator[tuple[int, Tensor]]:
    """``(start, float pixels)`` batches in the channels_last layout, with a progress bar."""
    with progress.bar(range(0, len(data), batch_size), desc=desc, unit="batch") as starts:
        for i in starts:
            x = to_float(data.x[i : i + batch_size].to(device))
            yield i, x.contiguous(memory_format=torch.channels_last)


@contextmanager
def _analysis_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and the channels_last layout (NHWC convolutions are faster on CPU and CUDA,
    as in ``benchmark.train.predict_logits``); restores both afterwards."""
    was_training = model.training
    model.eval()
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)
        model.train(was_training)


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    sites: list[ResetSite],
    data: ImageSet,
    *,
    num_classes: int,
    lambda_low: float,
    lambda_high: float,
    device: torch.device,
    batch_size: int = 256,
) -> list[HyperplaneStats]:
    """One eval-mode fp32 pass over ``data``: the hyperplane statistics of every site from the
    spatial maximum of each channel of its conv output and the model's softmax outputs."""
    stats = [
        HyperplaneStats(s.channels, num_classes, lambda_low=lambda_low, lambda_high=lambda_high)
        for s in sites
    ]
    acts: dict[int, Tensor] = {}

    def grab(k: int, out: Tensor) -> None:
        acts[k] = out.float().amax(dim=(2, 3))

    with _analysis_mode(model), _conv_outputs(sites, grab):
        for _, x in _batches(data, device, batch_size, "NONE hyperplane statistics"):
            acts.clear()
            probs = torch.softmax(model(x).float(), dim=1)
            for k, st in enumerate(stats):
                st.update(acts[k], probs)
    return stats


@torch.no_grad()
def summed_activation(
    model: nn.Module,
    sites: list[ResetSite],
    channels: list[Tensor],
    data: ImageSet,
    *,
    device: torch.device,
    batch_size: int = 256,
) -> Tensor:
    """``(N,)`` float64 on the CPU: per sample, the sum over sites of the spatial maxima of the
    given ``channels`` of each site's conv output (eval mode, fp32)."""
    u = torch.zeros(len(data), dtype=torch.float64)
    picks = [c.to(torch.long).to(device) for c in channels]
    part: list[Tensor] = []

    def grab(k: int, out: Tensor) -> None:
        part.append(out.float()[:, picks[k]].amax(dim=(2, 3)).double().sum(1))

    with _analysis_mode(model), _conv_outputs(sites, grab):
        for i, x in _batches(data, device, batch_size, "NONE summed activations"):
            part.clear()
            model(x)
            u[i : i + x.shape[0]] = torch.stack(part).sum(0).cpu()
    return u


# -- frozen norm layers -----------------------------------------------------------------------
@contextmanager
def frozen_norms(model: nn.Module, *, affine: bool) -> Iterator[Callable[[nn.Module], None]]:
    """While active: the norm layers' affine parameters do not require grad (with ``affine``);
    yields the ``train_mode`` for ``fit``: train mode with every norm layer in eval mode, so
    the running statistics stay fixed. ``requires_grad`` is restored on exit."""
    norms = [m for m in model.modules() if isinstance(m, FROZEN_NORMS)]
    params = [p for m in norms for p in m.parameters(recurse=False)] if affine else []
    before = [p.requires_grad for p in params]

    def train_mode(m: nn.Module) -> None:
        m.train()
        for norm in norms:
            norm.eval()

    for p in params:
        p.requires_grad_(False)
    try:
        yield train_mode
    finally:
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)
