"""Training the bounds of a ``ClippedModel`` (``defenses/clipping.py``), shared by
``defense=mmac`` and ``defense=mmbm``.

- ``CController``: the rule of the official code (MMAC ``mmac.py``, MM-BD ``univ_bm.py``) that
  adapts the penalty weight ``c`` to hold the clipped model's clean accuracy at ``target``;
- ``fit_bounds``: the batched bound-training loop (MSE to the original logits + ``c`` x penalty);
- ``prepare_clean``: the seeded per-class draw from the defender's clean reserve, filtered to the
  images the model classifies correctly (the official code's filter), with the original logits;
- ``bound_extras``, ``controller_from``, ``check_floor``: the extras and the config checks both
  defenses share (with ``benchmark/checks.py``). ``bound_extras`` flags a run whose final clean
  agreement is below the controller's target (``controller_failed``), and warns: such a
  clipped model is not the method's intended trade-off, so its CA cost should not be read as
  the method's.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmark import progress
from benchmark.checks import Checks
from benchmark.data import to_float
from benchmark.types import ImageSet
from defenses.base import DefenseContext
from defenses.clipping import ClippedModel

log = logging.getLogger(__name__)
checks = Checks("defense")


@dataclass(frozen=True)
class CController:
    """The penalty-weight rule of the official code.

    After epoch ``epoch`` (0-based), if ``epoch > start_after`` and ``epoch % every == 0``:
    ``c *= factor`` when the epoch's clean accuracy of the clipped model is at least ``target``,
    else ``c /= factor``.
    """

    c0: float
    factor: float
    target: float
    start_after: int
    every: int

    def update(self, c: float, acc: float, epoch: int) -> float:
        if epoch > self.start_after and epoch % self.every == 0:
            return c * self.factor if acc >= self.target else c / self.factor
        return c


@dataclass
class BoundFit:
    """What ``fit_bounds`` returns: the final ``c`` and per-epoch statistics."""

    c: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def fit_bounds(
    model: ClippedModel,
    x: Tensor,
    y: Tensor,
    ref: Tensor,
    penalty: Callable[[int], Tensor],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    controller: CController,
    gen: torch.Generator,
    on_epoch_start: Callable[[int], None] | None = None,
    channels_last: bool = False,
    bound_floor: float | None = None,
    desc: str = "bounds",
) -> BoundFit:
    """Train the bounds: Adam on ``MSE(clipped logits, ref) + c * penalty(step)`` per batch.

    Args:
        model: the clipped model; only its bounds are optimised.
        x: ``(N, C, H, W)`` uint8 clean images on the model's device.
        y: ``(N,)`` their labels; the epoch accuracy against them drives ``controller``.
        ref: ``(N, K)`` the original model's logits on ``x``.
        penalty: ``step -> scalar``, the regulariser of the epoch's ``step``-th batch.
        epochs, lr, batch_size: Adam learning rate, passes over ``x``, clean batch size.
        controller: the ``c`` rule (``c`` starts at ``controller.c0``).
        gen: the batch order.
        on_epoch_start: called with the epoch index before its first batch.
        channels_last: feed NHWC batches (faster convolutions on CPU and CUDA).
        bound_floor: None = unconstrained bounds (the official code); a number = the bounds
            are projected onto ``>= bound_floor`` after every step.
    """
    optimizer = torch.optim.Adam(model.bounds.parameters(), lr=lr)
    result = BoundFit(c=float(controller.c0))
    n = len(x)
    t0 = time.perf_counter()
    for epoch in progress.bar(range(epochs), desc=f"{desc} bound fitting", unit="epoch"):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        order = torch.randperm(n, generator=gen).to(x.device)
        correct, loss_sum = 0, 0.0
        for step, i in enumerate(range(0, n, batch_size)):
            idx = order[i : i + batch_size]
            xb = to_float(x[idx])
            if channels_last and xb.dim() == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            out = model(xb)
            loss = F.mse_loss(out, ref[idx]) + result.c * penalty(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if bound_floor is not None:
                with torch.no_grad():
                    for b in model.bounds:
                        b.clamp_(min=bound_floor)
            correct += int((out.detach().argmax(1) == y[idx]).sum())
            loss_sum += float(loss.detach()) * len(idx)
        acc = correct / n
        result.history.append({"epoch": epoch + 1, "loss": loss_sum / n, "acc": acc, "c": result.c})
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"{desc}: the loss became {loss_sum} in epoch {epoch + 1}")
        result.c = controller.update(result.c, acc, epoch)
        if epoch % 10 == 0 or epoch == epochs - 1:
            log.info(
                "%s epoch %d/%d: loss %.4f acc %.4f c %.4g",
                desc,
                epoch + 1,
                epochs,
                loss_sum / n,
                acc,
                result.c,
            )
    result.seconds = time.perf_counter() - t0
    return result


@torch.no_grad()
def batched(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int = 512) -> Tensor:
    """``fn`` over ``x`` in batches (uint8 images become float pixels), concatenated; fp32."""
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        out.append(fn(to_float(xb) if xb.dtype == torch.uint8 else xb).float())
    return torch.cat(out)


def clean_subset(y: Tensor, per_class: int, num_classes: int, gen: torch.Generator) -> Tensor:
    """Sorted indices of up to ``per_class`` random samples of each class of labels ``y``."""
    y = y.cpu()
    picked = []
    for c in range(num_classes):
        members = torch.nonzero(y == c).flatten()
        picked.append(members[torch.randperm(members.numel(), generator=gen)[:per_class]])
    return torch.sort(torch.cat(picked)).values


@dataclass(frozen=True)
class CleanData:
    """The defense's clean data, on the device.

    Attributes:
        drawn: the per-class draw from the reserve (MMDF calibrates on it).
        x: ``(n, C, H, W)`` uint8, the drawn images the original model classifies correctly.
        y: ``(n,)`` their labels.
        ref: ``(n, K)`` the original model's logits on ``x``.
    """

    drawn: ImageSet
    x: Tensor
    y: Tensor
    ref: Tensor


def prepare_clean(ctx: DefenseContext, model: ClippedModel, per_class: int, name: str) -> CleanData:
    """``per_class`` seeded random reserve images per class (fewer where the reserve has
    fewer), kept where the original model is right (the official code's filter)."""
    picked = clean_subset(ctx.clean_set.y, per_class, ctx.num_classes, ctx.generator(name, "clean"))
    drawn = ctx.clean_set.subset(picked).to(ctx.device)
    ref = batched(model.original, drawn.x)
    keep = ref.argmax(1) == drawn.y
    if not keep.any():
        raise RuntimeError(f"{name}: the model classifies none of the clean images correctly")
    return CleanData(drawn, drawn.x[keep], drawn.y[keep], ref[keep])


def bound_extras(
    model: ClippedModel,
    fit: BoundFit,
    clean: CleanData,
    num_classes: int,
    target: float,
    name: str,
) -> dict[str, Any]:
    """The extras both defenses report (plain scalars). ``controller_failed``: the clipped
    model's final agreement on the clean data is below ``target`` (with a warning)."""
    # a Python ratio of counts, as the controller's (a float32 mean puts 95/100 below 0.95)
    agree = int((batched(model, clean.x).argmax(1) == clean.y).sum()) / len(clean.x)
    bounds = model.bound_values()
    counts = torch.bincount(clean.drawn.y.cpu(), minlength=num_classes)
    failed = agree < target
    if failed:
        log.warning(
            "%s: controller failed: clean agreement %.4f < target %.4g (c %.4g); the clipped "
            "model is not at the method's accuracy target",
            name,
            agree,
            target,
            fit.c,
        )
    return {
        "c_final": fit.c,
        "clean_agreement": agree,
        "controller_failed": failed,
        "last_epoch_acc": fit.history[-1]["acc"] if fit.history else None,
        "n_sites": len({p.site for p in model.points}),
        "n_clip_points": len(model.points),
        "n_bound_params": int(bounds.numel()),
        "bound_mean": float(bounds.mean()),
        "bound_min": float(bounds.min()),
        "n_bounds_negative": int((bounds < 0).sum()),
        "bound_max": float(bounds.max()),
        "n_clean_selected": len(clean.drawn),
        "clean_per_class_min": int(counts.min()),
        "n_clean": len(clean.x),
        "epochs": len(fit.history),
        "fit_s": round(fit.seconds, 3),
    }


def controller_from(
    c0: object, c_factor: object, target_acc: object, c_start_after: object, c_every: object
) -> CController:
    """A validated ``CController`` from config values (errors name ``defense.<key>``)."""
    checks.number(c0, "c0", 0.0, low_open=True)
    checks.number(c_factor, "c_factor", 0.0, low_open=True)
    checks.integer(c_every, "c_every")
    checks.require(checks.is_int(c_start_after), "c_start_after", "an integer", c_start_after)
    checks.number(target_acc, "target_acc", 0.0, 1.0)
    return CController(float(c0), float(c_factor), float(target_acc), c_start_after, c_every)


def check_floor(value: object) -> float | None:
    """``defense.bound_floor``: null or a number."""
    ok = value is None or math.isfinite(checks.as_number(value))
    checks.require(ok, "bound_floor", "null or a number", value)
    return None if value is None else float(value)  # type: ignore[arg-type]
