"""Activation clipping shared by ``defense=mmac`` and ``defense=mmbm``.

Both defenses keep the backdoored weights frozen and learn one upper bound per channel after
some activation sites; the clipped activation is ``min(h, Z)``, broadcast over the spatial (or
token) dimensions. This module holds the pieces they share:

- ``clip_points(model)``: every call of every activation module (``model.activation_sites()``),
  with its channel count and channel axis, found by one traced forward pass;
- ``ClippedModel``: the frozen base model plus the bounds, registered as parameters (so they are
  in its ``state_dict``), applied by forward hooks that exist only during the wrapper's forward;
- ``margins``: a class's logit minus the largest other logit;
- ``synthesize_max_margin``: per-class maximum-margin inputs found by gradient ascent from noise;
- ``CController``: the rule that adapts the penalty weight ``c`` to hold clean agreement;
- ``fit_bounds``: the batched bound-training loop (MSE to the original logits + ``c`` x penalty);
- ``prepare_clean``: the seeded per-class draw from the defender's clean reserve, filtered to the
  images the model classifies correctly (the official code's filter), with the original logits;
- ``bound_extras``, ``controller_from``, ``check_positive``: the extras and config checks both
  defenses share.

Channel axis of an activation output: dim 1 for 4-D and larger maps (N, C, H, W) and for 2-D
features (N, D); the last dim when the activation's input comes straight from an ``nn.Linear``
(e.g. a channels-last MLP in timm's ConvNeXt) or the output is 3-D (tokens, (N, T, D)).
A module called several times in one forward (``ActivationSite.calls`` > 1) gets one bound
vector per call, in call order.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.data import to_float
from benchmark.errors import ConfigError
from benchmark.types import ImageSet
from defenses.base import DefenseContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipPoint:
    """One call of an activation module, clipped per channel.

    Attributes:
        site: the activation module's name in the model.
        call: index of the call within one forward pass (0 unless the module is shared).
        channels: number of bound values (size of the channel axis).
        axis: the channel axis of the output, 1 or -1.
        shape: the output's shape without the batch dimension (from the tracing probe).
    """

    site: str
    call: int
    channels: int
    axis: int
    shape: tuple[int, ...]

    @property
    def spatial(self) -> tuple[int, ...]:
        """The output shape without the channel axis (e.g. ``(H, W)``)."""
        dims = list(self.shape)
        del dims[self.axis - 1 if self.axis > 0 else self.axis]
        return tuple(dims)


def clip_points(model: nn.Module) -> list[ClipPoint]:
    """Every call of every activation site of ``model``, in execution order.

    Raises:
        TypeError: ``model`` is not a harness ``ImageClassifier`` (no ``activation_sites``).
        ConfigError: the model has no activation modules to clip.
    """
    if not hasattr(model, "activation_sites") or not hasattr(model, "example_input"):
        raise TypeError(
            f"activation clipping needs a harness ImageClassifier (activation_sites()), got "
            f"{type(model).__name__}"
        )
    sites = model.activation_sites()
    if not sites:
        raise ConfigError(
            "model",
            f"{type(model).__name__} has no activation modules (nn.ReLU etc.) to clip; "
            "activation clipping needs activations as modules, not functional calls",
        )
    names = {s.module: s.name for s in sites}
    calls: list[tuple[str, Tensor, Tensor]] = []  # (site, input, output) in execution order
    linear_outputs: list[Tensor] = []

    def site_hook(module: nn.Module, inputs: tuple, output: object) -> None:
        if not isinstance(output, Tensor):
            raise TypeError(f"activation {names[module]} returns {type(output).__name__}")
        first = next((t for t in inputs if isinstance(t, Tensor)), None)
        calls.append((names[module], first, output))

    def linear_hook(module: nn.Module, inputs: tuple, output: object) -> None:
        linear_outputs.append(output)

    handles = [s.module.register_forward_hook(site_hook) for s in sites]
    handles += [
        m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(model.example_input())
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    points, seen = [], {}
    for site, inp, out in calls:
        from_linear = inp is not None and any(inp is t for t in linear_outputs)
        axis = -1 if from_linear or out.dim() == 3 else 1
        if out.dim() < 2:
            raise TypeError(f"activation {site} has a {out.dim()}-D output; need (N, C, ...)")
        k = seen.get(site, 0)
        seen[site] = k + 1
        points.append(ClipPoint(site, k, int(out.shape[axis]), axis, tuple(out.shape[1:])))
    return points


class ClippedModel(nn.Module):
    """A frozen model with learnable per-channel upper bounds on some activation outputs.

    The base model's parameters are frozen and it stays in eval mode (BatchNorm uses its running
    statistics) whatever ``train()`` is called with. The bounds are ``bounds.<i>`` in the
    state dict, one ``(channels,)`` vector per clip point (``points[i]``).

    Args:
        base: the model to clip (owned by the wrapper: pass a copy).
        points: the activation calls to clip (from ``clip_points``).
        init: the initial value of every bound.
    """

    def __init__(self, base: nn.Module, points: Sequence[ClipPoint], init: float) -> None:
        super().__init__()
        if not points:
            raise ValueError("no clip points")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.base.eval()
        self.points = tuple(points)
        device = next(itertools.chain(base.parameters(), base.buffers()), torch.empty(0)).device
        self.bounds = nn.ParameterList(
            nn.Parameter(torch.full((p.channels,), float(init), device=device)) for p in points
        )
        self._index = {(p.site, p.call): i for i, p in enumerate(self.points)}
        self._sites = tuple(dict.fromkeys(p.site for p in self.points))

    def train(self, mode: bool = True) -> ClippedModel:
        super().train(mode)
        self.base.eval()
        return self

    def original(self, x: Tensor) -> Tensor:
        """The base model's logits, unclipped."""
        return self.base(x)

    def forward(self, x: Tensor) -> Tensor:
        """The clipped model's logits for float pixels ``x``."""
        counts: dict[str, int] = {}
        handles = [
            self.base.get_submodule(site).register_forward_hook(
                functools.partial(self._clip, site, counts)
            )
            for site in self._sites
        ]
        try:
            return self.base(x)
        finally:
            for h in handles:
                h.remove()

    def _clip(
        self, site: str, counts: dict[str, int], module: nn.Module, inputs: tuple, output: Tensor
    ) -> Tensor | None:
        k = counts.get(site, 0)
        counts[site] = k + 1
        i = self._index.get((site, k))
        if i is None:
            return None
        point, bound = self.points[i], self.bounds[i]
        if output.shape[point.axis] != point.channels:
            raise RuntimeError(
                f"activation {site} (call {k}) has {output.shape[point.axis]} channels on "
                f"axis {point.axis}, its bound has {point.channels}"
            )
        shape = [1] * output.dim()
        shape[point.axis] = point.channels
        return torch.minimum(output, bound.to(output.dtype).view(shape))

    def bound_values(self) -> Tensor:
        """Every bound value, concatenated (detached)."""
        return torch.cat([b.detach().flatten() for b in self.bounds])


def margins(logits: Tensor, labels: Tensor) -> Tensor:
    """``(N,)`` margin of class ``labels``: its logit minus the largest other logit."""
    own = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return own - others.amax(1)


def synthesize_max_margin(
    net: Callable[[Tensor], Tensor],
    num_classes: int,
    per_class: int,
    shape: Sequence[int],
    *,
    steps: int,
    lr: float,
    gen: torch.Generator,
    device: torch.device,
    chunk: int = 500,
) -> tuple[Tensor, Tensor]:
    """Maximum-margin inputs: ``per_class`` images per class by gradient ascent on the margin.

    Each image starts as U[0, 1] noise and takes ``steps`` plain SGD steps of size ``lr`` on
    ``-margin_k(net(clamp(u, 0, 1)))`` (the official code re-creates its SGD optimiser every
    step, so its momentum never acts). ``net`` must be in eval mode, so every image's gradient
    depends on that image alone and chunking changes nothing.

    Returns:
        ``(K * per_class, *shape)`` float images in [0, 1] and their ``(K * per_class,)`` labels,
        on ``device``, class-major.
    """
    labels = torch.arange(num_classes).repeat_interleave(per_class).to(device)
    noise = torch.rand((num_classes * per_class, *shape), generator=gen).to(device)
    out = []
    for i in range(0, len(noise), chunk):
        u, y = noise[i : i + chunk].clone().requires_grad_(True), labels[i : i + chunk]
        for _ in range(steps):
            loss = -margins(net(u.clamp(0.0, 1.0)), y).sum()
            (grad,) = torch.autograd.grad(loss, u)
            with torch.no_grad():
                u -= lr * grad
        out.append(u.detach().clamp(0.0, 1.0))
    return torch.cat(out), labels


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
    for epoch in range(epochs):
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
    model: ClippedModel, fit: BoundFit, clean: CleanData, num_classes: int
) -> dict[str, Any]:
    """The extras both defenses report (plain scalars)."""
    agree = batched(model, clean.x).argmax(1) == clean.y
    bounds = model.bound_values()
    counts = torch.bincount(clean.drawn.y.cpu(), minlength=num_classes)
    return {
        "c_final": fit.c,
        "clean_agreement": float(agree.float().mean()),
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
    check_positive("c0", c0, integer=False)
    check_positive("c_factor", c_factor, integer=False)
    check_positive("c_every", c_every, integer=True)
    if isinstance(c_start_after, bool) or not isinstance(c_start_after, int):
        raise ConfigError("defense.c_start_after", f"must be an integer, got {c_start_after!r}")
    if isinstance(target_acc, bool) or not isinstance(target_acc, int | float):
        raise ConfigError("defense.target_acc", f"must be a number in [0, 1], got {target_acc!r}")
    if not 0.0 <= target_acc <= 1.0:
        raise ConfigError("defense.target_acc", f"must be in [0, 1], got {target_acc!r}")
    return CController(float(c0), float(c_factor), float(target_acc), c_start_after, c_every)


def check_positive(key: str, value: object, *, integer: bool) -> None:
    """Raise ``ConfigError(defense.<key>)`` unless ``value`` is a positive int (or number)."""
    kinds = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"defense.{key}", f"must be {kind} > 0, got {value!r}")


def check_floor(value: object) -> float | None:
    """``defense.bound_floor``: null or a number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError("defense.bound_floor", f"must be null or a number, got {value!r}")
    return float(value)
