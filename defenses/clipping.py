"""Activation clipping shared by ``defense=mmac`` and ``defense=mmbm``.

Both defenses keep the backdoored weights frozen and learn one upper bound per channel after
some activation sites; the clipped activation is ``min(h, Z)``, broadcast over the spatial (or
token) dimensions. This module holds the pieces they share:

- ``clip_points(model)``: every call of every activation module (``model.activation_sites()``),
  with its channel count and channel axis, found by one traced forward pass;
- ``ClippedModel``: the frozen base model plus the bounds, registered as parameters (so they are
  in its ``state_dict``), applied by forward hooks that exist only during the wrapper's forward;
- ``margins``: a class's logit minus the largest other logit;
- ``synthesize_max_margin``: per-class maximum-margin inputs found by gradient ascent from noise.

How the bounds are trained (the ``c`` rule, the loop, the clean data, the extras) is in
``defenses/bound_fit.py``.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark import progress
from benchmark.errors import ConfigError
from benchmark.models.trace import completion_order, trace

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
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    traced = completion_order(trace(model, [*names, *linears]))
    linear_outputs = [c.output for c in traced if c.module in linears]
    calls: list[tuple[str, Tensor | None, Tensor]] = []  # (site, input, output), in order
    for c in traced:
        if c.module in names:
            if c.output is None:
                raise TypeError(f"activation {names[c.module]} returns a non-tensor")
            calls.append((names[c.module], c.input, c.output))

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
    n_chunks = -(-len(noise) // chunk)
    steps_bar = progress.bar(
        total=n_chunks * steps, desc=f"max-margin synthesis ({len(noise)} images)", unit="step"
    )
    for i in range(0, len(noise), chunk):
        u, y = noise[i : i + chunk].clone().requires_grad_(True), labels[i : i + chunk]
        for _ in range(steps):
            loss = -margins(net(u.clamp(0.0, 1.0)), y).sum()
            (grad,) = torch.autograd.grad(loss, u)
            with torch.no_grad():
                u.add_(grad, alpha=-lr)  # as torch.optim.SGD steps (bit for bit)
            steps_bar.update()
        out.append(u.detach().clamp(0.0, 1.0))
    steps_bar.close()
    return torch.cat(out), labels
