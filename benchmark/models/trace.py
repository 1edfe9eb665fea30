"""The model tracer: what defenses find by running one forward pass with hooks.

One probe pass (``trace``: eval mode, no grad, ``model.example_input(2)``) records every call of
the hooked modules (leaves and norm layers by default) with its inputs and output. From it:

- ``conv_layers``: every ``nn.Conv2d`` in execution order with the norm layer that consumes its
  output directly, or through pooling layers only (airbench's conv -> max-pool -> BatchNorm in
  fastnet) (``ConvSite``);
- ``activation_sites``: every activation module in the order of its first call
  (``ActivationSite``, ``calls`` > 1 for a shared module);
- ``consumers`` (``benchmark/models/consumers.py``): the layers reading a conv's channels
  (``InputSlice``: the next conv's input channel, or a linear layer's input columns), followed
  through channel-preserving modules;
- ``last_linear``: the final ``nn.Linear`` (rows = classes) and its name.

Used by the models (``ImageClassifier.conv_layers`` etc.), NONE (``defenses/none_reset.py``),
l-inf pruning (``defenses/prune_sites.py``), activation clipping (``defenses/clipping.py``) and
ULRL (``defenses/ulrl_parts.py``). No per-architecture code: activations must be modules
(``nn.ReLU``), never functional calls, or they are invisible here.

timm's activation classes count only once timm is loaded (``activation_types``): a model cannot
hold them otherwise, and importing timm (with torchvision, ~4 s) at every start would make each
CLI call, including one that only reports a bad setting, that much slower.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from benchmark.models.layers import Scale

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm2d,
    nn.GroupNorm,
    nn.InstanceNorm2d,
    nn.LayerNorm,
)
# Activation sites (where MMAC clips). Sigmoid-type gates (squeeze-excite) are not sites: they
# scale other activations rather than produce features. timm's own classes count too
# (``activation_types``).
TORCH_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Softplus,
    nn.Tanh,
    nn.Tanhshrink,
)
# timm.layers.activations' classes, by name (``activation_types``).
TIMM_ACTIVATIONS = (
    "GELU", "GELUTanh", "QuickGELU", "Swish", "Mish", "HardSwish", "HardMish", "PReLU", "Tanh",
)  # fmt: skip
# Spatial pooling: per channel. A norm after it still normalises the conv's channels (in eval
# mode a BatchNorm with positive scale commutes with a max-pool).
POOL_TYPES: tuple[type[nn.Module], ...] = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
# Modules a traced channel passes through with its index unchanged (elementwise or per channel),
# besides the activations.
CHANNEL_PRESERVING: tuple[type[nn.Module], ...] = (
    *NORM_TYPES,
    *POOL_TYPES,
    Scale,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.Flatten,
)


def activation_types() -> tuple[type[nn.Module], ...]:
    """The activation classes: torch's, and timm's once timm is loaded."""
    return _activation_types("timm" in sys.modules)


def pass_through_types() -> tuple[type[nn.Module], ...]:
    """Modules a traced channel passes through with its index unchanged."""
    return CHANNEL_PRESERVING + activation_types()


@functools.cache
def _activation_types(with_timm: bool) -> tuple[type[nn.Module], ...]:
    if not with_timm:
        return TORCH_ACTIVATIONS
    import timm.layers.activations as timm_act

    return TORCH_ACTIVATIONS + tuple(getattr(timm_act, name) for name in TIMM_ACTIVATIONS)


# -- the probe pass -----------------------------------------------------------------------------
@dataclass(eq=False)
class Call:
    """One module call of the probe pass.

    Attributes:
        name, module: the module and its name in the model.
        inputs: its tensor arguments; ``input`` the first (or None), ``in_version`` its version
            counter at the call (to tell an in-place change since).
        output: its output when a tensor (else None), ``out_version`` its version counter.
        end: the call's rank in completion order (the list is in start order).
    """

    name: str
    module: nn.Module
    inputs: tuple[Tensor, ...]
    in_version: int
    output: Tensor | None = None
    out_version: int = -1
    end: int = -1

    @property
    def input(self) -> Tensor | None:
        return self.inputs[0] if self.inputs else None


def _default_modules(model: nn.Module) -> list[nn.Module]:
    # Leaves, plus norm layers with children (timm's BatchNormAct2d is a BatchNorm2d that owns
    # its activation).
    return [
        m
        for m in model.modules()
        if isinstance(m, NORM_TYPES) or not any(True for _ in m.children())
    ]


def trace(model: nn.Module, modules: Iterable[nn.Module] | None = None) -> list[Call]:
    """One eval-mode, no-grad forward pass of ``model.example_input(2)``, recording every call
    of ``modules`` (default: leaves and norm layers) in start order. The model's mode is
    restored; the probe draws from the global RNG (``torch.rand``)."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[Call] = []
    open_calls: dict[nn.Module, list[Call]] = {}
    ended = [0]

    def pre(module: nn.Module, args: tuple) -> None:
        tensors = tuple(a for a in args if isinstance(a, Tensor))
        call = Call(names[module], module, tensors, tensors[0]._version if tensors else -1)
        calls.append(call)
        open_calls.setdefault(module, []).append(call)

    def post(module: nn.Module, args: tuple, output: object) -> None:
        call = open_calls[module].pop()
        if isinstance(output, Tensor):
            call.output, call.out_version = output, output._version
        call.end = ended[0]
        ended[0] += 1

    handles = []
    for module in _default_modules(model) if modules is None else modules:
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(model.example_input(2))  # type: ignore[operator]
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return calls


def completion_order(calls: list[Call]) -> list[Call]:
    """``calls`` sorted by completion (a container after everything it calls)."""
    return sorted(calls, key=lambda c: c.end)


# -- convs, norms, activations ----------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ConvSite:
    """A convolution and the normalisation layer applied directly to its output (or None)."""

    name: str
    conv: nn.Conv2d
    norm_name: str | None
    norm: nn.Module | None


@dataclass(frozen=True, eq=False)
class ActivationSite:
    """An activation module; ``calls`` > 1 means the module is shared by several places."""

    name: str
    module: nn.Module
    calls: int


def conv_layers(model: nn.Module, calls: list[Call] | None = None) -> list[ConvSite]:
    """Every ``nn.Conv2d`` in execution order, each with the norm layer fed by its output
    (directly, or through pooling layers only)."""
    calls = completion_order(trace(model) if calls is None else calls)
    sites, seen = [], set()
    for i, call in enumerate(calls):
        if not isinstance(call.module, nn.Conv2d) or call.module in seen:
            continue
        seen.add(call.module)
        norm = _norm_of(calls, i)
        sites.append(
            ConvSite(
                call.name, call.module, norm.name if norm else None, norm.module if norm else None
            )
        )
    return sites


def _norm_of(calls: list[Call], i: int) -> Call | None:
    """The first norm call (completion order) whose input is ``calls[i]``'s output, or the
    output of a chain of pooling calls starting there."""
    outputs = [calls[i].output]
    for c in calls[i + 1 :]:
        if not c.inputs or not any(c.inputs[0] is o for o in outputs if o is not None):
            continue
        if isinstance(c.module, NORM_TYPES):
            return c
        if isinstance(c.module, POOL_TYPES):
            outputs.append(c.output)
    return None


def activation_sites(model: nn.Module, calls: list[Call] | None = None) -> list[ActivationSite]:
    """Every activation module in the order of its first call."""
    order: dict[nn.Module, tuple[str, int]] = {}
    kinds = activation_types()
    for call in completion_order(trace(model) if calls is None else calls):
        if isinstance(call.module, kinds):
            name, count = order.get(call.module, (call.name, 0))
            order[call.module] = (name, count + 1)
    return [ActivationSite(name, m, count) for m, (name, count) in order.items()]


# -- the classifier layer -----------------------------------------------------------------------
def last_linear(model: nn.Module) -> tuple[str, nn.Module]:
    """The final linear layer and its name: ``model.last_linear()`` (a harness model; its
    ``TypeError`` propagates), else the last ``nn.Linear`` registered (``LookupError`` if
    none). The caller checks the type and the rows."""
    if hasattr(model, "last_linear"):
        layer = model.last_linear()
    else:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise LookupError("no nn.Linear layer")
        layer = linears[-1]
    name = next((n for n, m in model.named_modules() if m is layer), "")
    return name, layer
