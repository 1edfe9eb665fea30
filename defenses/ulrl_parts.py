"""The pieces of ULRL (``defenses/ulrl.py``) as functions: on the final layer's rows (the
row-change score, the robust z-score and the MAD selection rule, the re-initialisation, the
cosine term, finding the final linear layer), the clean-set size, and the phases' recipes.
Each follows the official code (github.com/NayMyatMin/ULRL, commit 094debf, ``defense/ulrl.py``
and ``RelearningTrainer`` in ``utils/trainer_cls.py``); see ``defenses/ulrl.py`` for the method
and its deviations.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from benchmark.data import stratified_indices
from benchmark.errors import ConfigError
from benchmark.io import atomic_torch_save
from benchmark.models.trace import last_linear
from benchmark.types import ImageSet

if TYPE_CHECKING:
    from defenses.base import DefenseContext

log = logging.getLogger(__name__)

Order = Literal["index", "score"]
ORDERS: tuple[str, ...] = ("index", "score")
SOURCES: tuple[str, ...] = ("reserve", "train")  # where the clean set is drawn from


def row_change_scores(before: Tensor, after: Tensor) -> Tensor:
    """``(C, D)`` weights before and after unlearning -> ``(C,)`` L1 norm of each row's change."""
    return (after.float() - before.float()).abs().sum(dim=1)


def robust_z(scores: Tensor, scale: float = 1.4826) -> tuple[Tensor, float, float]:
    """Robust z-scores ``|s - median| / (scale * MAD)`` of ``(C,)`` scores.

    The median is torch's (the lower middle value for an even count, as in the official code),
    and so is the MAD's. With MAD = 0 there is no division: a score that differs from the
    median gets z = +inf, a score equal to it z = 0.

    Returns:
        ``(z, median, mad)``: ``(C,)`` float z-scores, and the median and MAD as floats.
    """
    scores = scores.float()
    median = scores.median()
    dev = (scores - median).abs()
    mad = dev.median()
    if mad > 0:
        z = dev / (scale * mad)
    else:
        z = torch.where(dev > 0, torch.full_like(dev, math.inf), torch.zeros_like(dev))
    return z, float(median), float(mad)


@dataclass(frozen=True, eq=False)
class Selection:
    """The rows flagged by the MAD rule.

    Attributes:
        rows: ``(k,)`` int64 flagged rows, ascending, ``k <= max_flagged``.
        candidates: ``(m,)`` int64 every row that passed the rule before the cap, ascending.
        z: ``(C,)`` float robust z-scores.
        median: the scores' median.
        mad: their median absolute deviation (unscaled).
    """

    rows: Tensor
    candidates: Tensor
    z: Tensor
    median: float
    mad: float


def select_rows(
    scores: Tensor,
    *,
    z_threshold: float = 3.5,
    scale: float = 1.4826,
    max_flagged: int = 2,
    order: Order = "index",
) -> Selection:
    """Flag rows with ``z > z_threshold`` and ``score > median``, at most ``max_flagged``.

    ``order="index"`` keeps the first candidates by row index (the official code's truncation);
    ``order="score"`` keeps the highest scores (ties to the lower index).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    scores = scores.float().cpu()
    z, median, mad = robust_z(scores, scale)
    candidates = torch.nonzero((z > z_threshold) & (scores > median)).flatten()
    if order == "score":
        ranked = torch.sort(-scores[candidates], stable=True).indices
        kept = candidates[ranked[:max_flagged]]
    else:
        kept = candidates[:max_flagged]
    return Selection(torch.sort(kept).values, candidates, z, median, mad)


@torch.no_grad()
def reinit_rows(layer: nn.Linear, rows: Tensor, gen: torch.Generator) -> None:
    """Re-initialise the weight rows ``rows`` of ``layer`` in place, uniform in
    ``+-sqrt(2 / in_features)``, and set their biases to 0 (the official "He" initialisation).
    Other rows are untouched. Random values come from ``gen`` (a CPU generator)."""
    rows = rows.to(torch.long).cpu()
    if rows.numel() == 0:
        return
    bound = math.sqrt(2.0 / layer.in_features)
    fresh = (torch.rand(rows.numel(), layer.in_features, generator=gen) * 2.0 - 1.0) * bound
    w = layer.weight
    w[rows.to(w.device)] = fresh.to(device=w.device, dtype=w.dtype)
    if layer.bias is not None:
        layer.bias[rows.to(layer.bias.device)] = 0.0


def cosine_penalty(weight: Tensor, rows: Tensor, original: Tensor) -> Tensor:
    """``sum_j cos(weight[j], original_j)`` over the rows ``rows`` (0 for no rows), in fp32.

    ``original``: ``(len(rows), D)`` the rows before re-initialisation. Minimising it drives
    each row away from the direction of its original (cos -> -1).
    """
    if rows.numel() == 0:
        return weight.new_zeros((), dtype=torch.float32)
    current = weight[rows.to(weight.device)].float()
    return F.cosine_similarity(current, original.to(current.device).float(), dim=1).sum()


def find_last_linear(model: nn.Module, num_classes: int) -> tuple[str, nn.Linear]:
    """The model's final linear layer (rows = classes) and its module name.

    ``benchmark.models.trace.last_linear``: ``model.last_linear()`` (every harness model has it,
    timm's included), else the last ``nn.Linear`` registered in the model. Raises
    ``ConfigError`` (key ``model``) when there is none or its rows are not the classes.
    """
    why = "ULRL scores and re-initialises the rows of the final nn.Linear layer (one row per class)"
    kind = type(model).__name__
    try:
        name, layer = last_linear(model)
    except TypeError as err:
        raise ConfigError("model", f"{why}; {kind} has none: {err}") from None
    except LookupError:
        raise ConfigError("model", f"{why}; {kind} has no nn.Linear layer") from None
    if not isinstance(layer, nn.Linear):
        raise ConfigError("model", f"{why}; {kind}'s last layer is {type(layer).__name__}")
    if layer.out_features != num_classes:
        raise ConfigError(
            "model",
            f"{why}; {kind}'s last nn.Linear has {layer.out_features} outputs for "
            f"{num_classes} classes, so it is not the classifier",
        )
    return name, layer


def clean_subset_size(fraction: float, n_training_split: int) -> int:
    """``floor(fraction * n)`` (the official ``int(len * ratio)``), robust to float error."""
    return math.floor(fraction * n_training_split + 1e-9)


def phase_recipe(
    base: DictConfig,
    *,
    batch_size: int,
    augment: bool,
    epochs: int,
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    grad_clip: float | None,
) -> DictConfig:
    """A whole recipe for ``fit``: the official optimiser settings, the run's hardware
    settings. Built fresh rather than merged into the run's recipe, so nothing of the
    attack-training optimiser (e.g. ``nesterov`` of ``train=small``) leaks in."""
    return OmegaConf.create(
        {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": optimizer["lr"],
            "optimizer": optimizer,
            "scheduler": scheduler,
            "grad_clip": grad_clip,
            "augment": augment,
            "amp": base.get("amp", "auto"),
            "channels_last": base.get("channels_last", "auto"),
        }
    )


def sgd(lr: float, momentum: float, weight_decay: float) -> dict[str, Any]:
    """A Hydra ``_partial_`` SGD config."""
    return {
        "_target_": "torch.optim.SGD",
        "_partial_": True,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
    }


def draw_clean_subset(
    ctx: DefenseContext, source: str, fraction: float
) -> tuple[ImageSet, dict[str, Any]]:
    """A seeded stratified subset of the ``source`` pool (``reserve``: ``ctx.clean_set``;
    ``train``: ``ctx.train_set``) of ``floor(fraction * N)`` images, ``N`` the whole training
    split; the whole pool when it is smaller. Returns it with the ``clean_*`` extras."""
    pool = ctx.clean_set if source == "reserve" else ctx.train_set
    n_split = len(ctx.train_set) + len(ctx.clean_set)
    wanted = clean_subset_size(fraction, n_split)
    info: dict[str, Any] = {
        "clean_source": source,
        "n_clean_wanted": wanted,
        "clean_reserve_too_small": wanted > len(pool),
    }
    if wanted >= len(pool):
        if wanted > len(pool):
            log.warning(
                "ULRL wants %d clean images (%.3g of the training split) but the %s "
                "holds %d; using all of it",
                wanted,
                fraction,
                source,
                len(pool),
            )
        info["n_clean_used"] = len(pool)
        return pool, info
    index = stratified_indices(pool.y, wanted, ctx.num_classes, ctx.generator("ulrl", "clean"))
    info["n_clean_used"] = wanted
    return pool.subset(index), info


def report(
    path: Path,
    *,
    layer_name: str,
    scores: Tensor,
    sel: Selection,
    unlearn: Any,
    relearn: Any,
    subset_info: dict[str, Any],
    final_cos: float,
) -> dict[str, Any]:
    """Save the scores, the selection and both phases' histories to ``path``; return the
    ``extras`` (plain scalars)."""
    rows = sel.rows
    atomic_torch_save(
        {
            "layer": layer_name,
            "scores": scores,
            "z": sel.z,
            "median": sel.median,
            "mad": sel.mad,
            "candidates": sel.candidates,
            "flagged": rows,
            "unlearn_history": unlearn.history,
            "relearn_history": relearn.history,
        },
        path,
    )
    finite_z = sel.z[torch.isfinite(sel.z)]
    all_finite = bool(finite_z.numel() == sel.z.numel())
    last = unlearn.history[-1] if unlearn.history else {}
    extras: dict[str, Any] = {
        **subset_info,
        "layer": layer_name,
        "flagged_rows": ",".join(str(r) for r in rows.tolist()),
        "n_flagged": int(rows.numel()),
        "n_candidates": int(sel.candidates.numel()),
        "candidate_rows": ",".join(str(r) for r in sel.candidates.tolist()),
        "nothing_flagged": bool(rows.numel() == 0),
        "top_score_row": int(scores.argmax()),
        "unlearn_epochs": len(unlearn.history),
        "unlearn_final_acc": last.get("acc"),
        "unlearn_reached_stop_acc": bool(unlearn.stopped_early),
        "median": sel.median,
        "mad": sel.mad,
        "mad_zero": bool(sel.mad == 0.0),
        "max_z": float(sel.z.max()) if all_finite else None,
        "relearn_final_acc": relearn.history[-1]["acc"] if relearn.history else None,
        # mean cosine of the flagged rows to their originals after relearning
        "relearn_mean_cos": final_cos / rows.numel() if rows.numel() else None,
    }
    return extras
