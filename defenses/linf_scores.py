"""``defense=linf_prune``'s channel statistics, pruning order and stop rule.

Per image, the norm of each channel's spatial map at the site (l-inf = max of ``|A|``), averaged
over images by the caller; channels sorted stably (ties: lower index first); the
Fine-Pruning-style stop rule on the clean-reserve accuracy. The inverted-trigger order is
checked against an independent numpy computation in ``tests/defenses/test_linf_prune_fidelity.py``
(no official code exists).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attacks.inversion import trigger_asr
from benchmark import progress
from benchmark.data import to_float
from benchmark.train import predict, resolve_device
from benchmark.types import ImageSet

NORMS = ("linf", "l1", "l2")
_ORD = {"linf": math.inf, "l1": 1.0, "l2": 2.0}


# -- channel scores and ranking ---------------------------------------------------------------
def channel_norms(maps: Tensor, norm: str = "linf") -> Tensor:
    """Per-image, per-channel norm of the spatial maps: ``(N, C, H, W)`` -> ``(N, C)``.

    ``linf`` = max over positions of ``|A|``, ``l1`` = sum of ``|A|``, ``l2`` = Euclidean norm.
    """
    if norm not in _ORD:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return torch.linalg.vector_norm(maps.float().flatten(2), ord=_ORD[norm], dim=2)


@torch.no_grad()
def site_scores(
    model: nn.Module,
    site: nn.Module,
    x: Tensor,
    *,
    norm: str = "linf",
    transform: Callable[[Tensor], Tensor] | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    desc: str = "channel scores",
) -> Tensor:
    """``channel_norms`` of ``site``'s output for every image of ``x`` (uint8 or float
    ``(N, C, H, W)``), optionally transformed (e.g. stamped) first; ``(N, channels)`` on the CPU.
    Eval mode, fp32."""
    device = resolve_device(device)
    out: list[Tensor] = []

    def grab(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        out.append(channel_norms(output, norm).cpu())

    handle = site.register_forward_hook(grab)
    was_training = model.training
    model.eval()
    model.to(device)
    try:
        starts = range(0, x.shape[0], batch_size)
        for i in progress.bar(starts, desc=desc, unit="batch"):
            xb = x[i : i + batch_size].to(device)
            xb = to_float(xb) if xb.dtype == torch.uint8 else xb.float()
            model(transform(xb) if transform is not None else xb)
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


def rank_channels(scores: Tensor, descending: bool) -> Tensor:
    """Channel indices in pruning order (stable: ties keep the lower index first)."""
    return torch.sort(scores, descending=descending, stable=True).indices


# -- the stop rule ------------------------------------------------------------------------------
def prune_count(
    acc_at: Callable[[int], float],
    acc0: float,
    n_max: int,
    max_acc_drop: float,
    asr_at: Callable[[int], float] | None = None,
    stop_asr: float | None = None,
    desc: str = "pruning",
) -> tuple[int, str]:
    """How many channels to prune, trying ``k = 1, 2, ..., n_max`` in turn.

    Args:
        acc_at: clean accuracy with the first ``k`` ranked channels pruned.
        acc0: clean accuracy of the unpruned model.
        n_max: the fraction cap in channels.
        max_acc_drop: the step whose accuracy drop from ``acc0`` exceeds this is not taken.
        asr_at: the inverted trigger's ASR with ``k`` channels pruned (only with ``stop_asr``).
        stop_asr: stop once ``asr_at(k) <= stop_asr`` (that step is kept); None = never.
        desc: the progress bar's label.

    Returns:
        ``(k, reason)`` with ``reason`` in ``acc_budget``, ``asr``, ``max_fraction``.
    """
    with progress.bar(range(1, n_max + 1), desc=desc, unit="channel") as ks:
        for k in ks:
            if acc0 - acc_at(k) > max_acc_drop + 1e-9:
                return k - 1, "acc_budget"
            if stop_asr is not None and asr_at is not None and asr_at(k) <= stop_asr:
                return k, "asr"
    return n_max, "max_fraction"


def accuracy(model: nn.Module, data: ImageSet, device: torch.device, batch_size: int) -> float:
    """Accuracy of ``model`` on ``data`` (``benchmark.train.predict``)."""
    pred = predict(model, data.x, device=device, batch_size=batch_size)
    return int((pred == data.y.cpu()).sum()) / len(data)


@dataclass(frozen=True, eq=False)
class Ranking:
    """A pruning order and how it was obtained.

    Attributes:
        order: ``(C,)`` channel indices in pruning order.
        scores: ``(C,)`` the scores it sorts.
        target: the inversion's chosen target (None for ``clean_asc``).
        mask, pattern: the inverted trigger (None for ``clean_asc``).
        fit_asr: the chosen trigger's fit ASR on the reserve.
    """

    order: Tensor
    scores: Tensor
    target: int | None = None
    mask: Tensor | None = None
    pattern: Tensor | None = None
    fit_asr: float | None = None


def inverted_asr(
    model: nn.Module, data: ImageSet, ranking: Ranking, device: torch.device, batch_size: int
) -> float | None:
    """The inverted trigger's ASR on ``data`` (None without an inverted trigger)."""
    if ranking.mask is None or ranking.pattern is None or ranking.target is None:
        return None
    asr, _, _ = trigger_asr(
        model,
        data.x,
        data.y,
        ranking.mask,
        ranking.pattern,
        ranking.target,
        device=device,
        batch_size=batch_size,
    )
    return asr
