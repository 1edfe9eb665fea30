"""``defense=clp``: Channel Lipschitzness-based Pruning, a data-free post-training defense.

Zheng, Tang, Li, Liu. "Data-free Backdoor Removal based on Channel Lipschitzness". ECCV 2022,
arXiv:2208.03111. Official code: github.com/rkteddy/channel-Lipschitzness-based-pruning
(``defense.py``, ``CLP``, commit 5209c83); BackdoorBench's ``defense/clp.py`` (``CLP_prune``,
commit f02e353) is a copy of it. Uses the model only: no data, no fine-tuning.

Method: for every conv whose output feeds a BatchNorm2d, channel k's upper bound of the
channel Lipschitz constant (UCLC) is the largest singular value of the conv's kernel ``W_k``
reshaped to ``(C_in / groups, kh * kw)`` times ``|gamma_k / sqrt(running_var_k)|`` (BN's eps
ignored, as in the code). Within each layer the channels with UCLC > mean + ``u`` * std
(unbiased std, ``torch.std``) are pruned. With one outlier among n channels the largest z-score
is (n - 1) / sqrt(n), so at ``u = 3`` a layer of 10 channels or fewer is never pruned.

Default ``u = 3``: the paper, the official ``test.py:73`` and BackdoorBench's
``config/defense/clp/cifar10.yaml:27`` agree. BackdoorBench's sweep of u on test data is
logging only and not done here.

Deviations:
- conv -> BN pairs come from the model tracer (``benchmark/models/trace.py``: the norm fed by
  the conv's output, directly or through pooling), not from module registration order (the
  code pairs each BN with the last conv registered before it). On plain conv-BN nets the two
  agree. On PreAct-ResNet-18 the tracer pairs the stem conv with ``layer1.0.bn1`` and each
  block's ``conv1`` with ``bn2``: 9 BN layers, paired as BackdoorBench pairs them. BackdoorBench
  also scores the other 7 ``bn1`` layers, each with the conv registered just before it
  (``conv2`` or a shortcut conv); those BNs normalise a residual sum, not a conv's output, so
  they are not scored here (the official README asks to adapt the code for PreAct nets).
- a pruned channel is masked at the BN output with ``defenses/masking.py`` (a persistent
  ``channel_mask``) instead of zeroing BN's weight and bias: the same output in eval mode, and
  fine-tuning cannot revive it.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from benchmark.checks import Checks
from benchmark.models.trace import conv_layers
from defenses.base import Defense, DefenseContext, DefenseResult, Stage
from defenses.masking import install_mask, set_pruned

log = logging.getLogger(__name__)
checks = Checks("defense")


def channel_bounds(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tensor:
    """``(C_out,)`` UCLC of each channel: the spectral norm of the conv kernel of that channel,
    ``(C_in / groups, kh * kw)``, scaled by ``|gamma / sqrt(running_var)|`` (fp64 on the CPU)."""
    w = conv.weight.detach().double().cpu()
    w = w.reshape(w.shape[0], w.shape[1], -1)
    var = bn.running_var.detach().double().cpu()  # type: ignore[union-attr]
    gamma = torch.ones_like(var) if bn.weight is None else bn.weight.detach().double().cpu()
    scale = (gamma / var.sqrt()).abs()
    return torch.linalg.matrix_norm(w, ord=2) * scale


def outlier_channels(bounds: Tensor, u: float) -> Tensor:
    """int64 indices of the channels whose bound exceeds mean + ``u`` * (unbiased) std."""
    if bounds.numel() < 2:
        return torch.empty(0, dtype=torch.int64)
    return torch.nonzero(bounds > bounds.mean() + u * bounds.std()).flatten()


@dataclass(frozen=True, eq=False)
class ScoredLayer:
    """A scored conv -> BN pair: its names, bounds and the pruned channels."""

    conv_name: str
    norm_name: str
    bounds: Tensor
    pruned: Tensor


def score_layers(model: nn.Module, u: float) -> list[ScoredLayer]:
    """Every traced conv -> BatchNorm2d pair of ``model`` (a norm counted once, for the first
    conv feeding it) with its channel bounds and the channels above the threshold."""
    out, seen = [], set()
    for site in conv_layers(model):
        bn = site.norm
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_var is None or bn in seen:
            continue
        if bn.num_features != site.conv.out_channels:
            continue
        seen.add(bn)
        bounds = channel_bounds(site.conv, bn)
        out.append(ScoredLayer(site.name, str(site.norm_name), bounds, outlier_channels(bounds, u)))
    return out


def prune(model: nn.Module, layers: list[ScoredLayer]) -> int:
    """Mask the pruned channels of each layer's BN output in ``model``; the number masked."""
    total = 0
    for layer in layers:
        if len(layer.pruned) == 0:
            continue
        bn = model.get_submodule(layer.norm_name)
        set_pruned(install_mask(bn, len(layer.bounds)), layer.pruned)
        total += len(layer.pruned)
    return total


class CLP(Defense):
    """Channel Lipschitzness-based Pruning (see the module docstring).

    Args:
        u: the threshold's multiple of each layer's bound standard deviation.
    """

    name: ClassVar[str] = "clp"
    stage: ClassVar[Stage] = Stage.POST_TRAINING

    def __init__(self, u: float = 3.0) -> None:
        checks.number(u, "u")
        self.u = float(u)

    def run(self, ctx: DefenseContext) -> DefenseResult:
        assert ctx.model is not None, "post-training defenses receive the trained model"
        t0 = time.perf_counter()
        model = copy.deepcopy(ctx.model).eval()
        with torch.no_grad():
            layers = score_layers(model, self.u)
            n_pruned = prune(model, layers)
        channels = sum(len(layer.bounds) for layer in layers)
        extras: dict[str, Any] = {
            "u": self.u,
            "layers_scored": len(layers),
            "layers_pruned": sum(len(layer.pruned) > 0 for layer in layers),
            "channels_scored": channels,
            "channels_pruned": n_pruned,
            "pruned_fraction": n_pruned / channels if channels else 0.0,
            "pruned": ";".join(
                f"{layer.norm_name}:{','.join(str(int(i)) for i in layer.pruned)}"
                for layer in layers
                if len(layer.pruned)
            ),
            "time_s": round(time.perf_counter() - t0, 3),
        }
        log.info(
            "clp: %d of %d channels pruned in %d of %d BN layers (u = %g)",
            n_pruned,
            channels,
            extras["layers_pruned"],
            len(layers),
            self.u,
        )
        return DefenseResult(model=model, extras=extras)
