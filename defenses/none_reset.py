"""What a NONE reset touches: the monitored convs, their norms and their consumers.

Consumers (the "next layer's input slice" of the official ``none/reset_neurons.py``): found by
tracing one forward pass with pre- and post-forward hooks that record each module call's input
and output tensors and their version counters. From a conv's output the trace follows
channel-preserving modules (norms, activations, pooling, dropout, identity, ``nn.Flatten``)
whose input is that very tensor, not modified in place since (same version), or a contiguous
flattening view of it (the functional ``x.flatten(1)`` before a head); it stops at the first
``nn.Conv2d`` (input channel ``j``, group-aware) or ``nn.Linear`` (input columns of channel
``j``: one column after a global pool, ``H * W`` after flattening a map), and at anything else:
residual additions, concatenations, permutations and other functional operations end a path
without a consumer. So:

- small_cnn, vgg16_bn, nin: the next conv in the chain; the last conv's channel is the head's
  input column (the official VGG/NiN reset of the classifier's columns).
- resnet18: ``conv1`` -> the same block's ``conv2``; ``conv2`` and the shortcut conv feed the
  residual addition and have no consumer (filter and BN are reset, the shortcut keeps carrying
  the stream's channel).
- preact_resnet18: ``conv1`` -> ``bn2`` (its norm) and ``conv2``; ``conv2`` and the shortcut conv
  have neither a norm nor a consumer (they feed the addition).
- timm models: whatever the trace finds; ``extras["layers_without_consumer"]`` counts the rest.

Each site resets its own channels only (``reset_channels``); the official ResNet-18 code's
un-cleared layer4 lists are not copied (see ``defenses/none.py``, pinned in
``tests/defenses/test_none_fidelity.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from benchmark.errors import ConfigError
from benchmark.models.base import ACTIVATION_TYPES, NORM_TYPES, ImageClassifier

# Modules a traced channel passes through with its index unchanged (elementwise or per channel).
PASS_THROUGH: tuple[type[nn.Module], ...] = (
    *NORM_TYPES,
    *ACTIVATION_TYPES,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.Flatten,
)


@dataclass(frozen=True, eq=False)
class InputSlice:
    """A layer that consumes a conv's channels.

    Attributes:
        name: the consumer's module name.
        module: an ``nn.Conv2d`` (input channel ``j``) or ``nn.Linear``.
        block: for a linear consumer, the input columns per channel (channel ``j`` is columns
            ``[j * block, (j + 1) * block)``); 1 for a conv.
    """

    name: str
    module: nn.Module
    block: int = 1


@dataclass(frozen=True, eq=False)
class ResetSite:
    """A monitored conv, the norm fed by its output, and the layers consuming its channels."""

    name: str
    conv: nn.Conv2d
    norm_name: str | None
    norm: nn.Module | None
    consumers: tuple[InputSlice, ...] = field(default_factory=tuple)

    @property
    def channels(self) -> int:
        return int(self.conv.out_channels)


@dataclass(eq=False)
class _Call:
    """One module call: its first tensor input and output, with their version counters."""

    name: str
    module: nn.Module
    input: Tensor | None
    in_version: int
    output: Tensor | None = None
    out_version: int = -1


def _trace(model: nn.Module) -> list[_Call]:
    """One eval-mode forward pass recording every leaf (and norm) module call."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[_Call] = []
    open_calls: dict[nn.Module, list[_Call]] = {}

    def pre(module: nn.Module, args: tuple) -> None:
        x = next((a for a in args if isinstance(a, Tensor)), None)
        call = _Call(names[module], module, x, x._version if x is not None else -1)
        calls.append(call)
        open_calls.setdefault(module, []).append(call)

    def post(module: nn.Module, args: tuple, output: object) -> None:
        call = open_calls[module].pop()
        if isinstance(output, Tensor):
            call.output, call.out_version = output, output._version

    handles = []
    for module in names:
        if isinstance(module, NORM_TYPES) or not any(True for _ in module.children()):
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


def _same_data(src: Tensor, src_version: int, t: Tensor, t_version: int) -> int | None:
    """How ``t`` (a call's input) holds ``src`` (a traced tensor in NCHW or flat layout):
    0 = the same tensor/layout, ``H * W`` = ``src`` (N, C, H, W) flattened to (N, C * H * W);
    None = not the same data (or modified in place in between)."""
    if t_version != src_version:
        return None
    if t is src:
        return 0
    if not (t.is_contiguous() and src.is_contiguous()) or t.numel() != src.numel():
        return None
    if (
        t.untyped_storage().data_ptr() != src.untyped_storage().data_ptr()
        or t.storage_offset() != src.storage_offset()
    ):
        return None
    if t.shape == src.shape:
        return 0
    if src.dim() == 4 and t.dim() == 2 and t.shape[0] == src.shape[0]:
        return int(src.shape[2] * src.shape[3])
    return None


def _consumers(calls: list[_Call], start: int) -> list[InputSlice]:
    """The layers consuming the channels of ``calls[start]``'s output (a conv)."""
    conv = calls[start].module
    out = calls[start].output
    if out is None:
        return []
    channels = int(out.shape[1])
    # Frontier of (tensor, its version, block): block 0 = NCHW, b > 0 = flat, b columns/channel.
    frontier: list[tuple[Tensor, int, int]] = [(out, calls[start].out_version, 0)]
    seen_calls = {start}
    found: dict[tuple[int, int], InputSlice] = {}
    while frontier:
        src, version, block = frontier.pop()
        for i, call in enumerate(calls):
            if i in seen_calls or call.input is None or call.module is conv:
                continue
            how = _same_data(src, version, call.input, call.in_version)
            if how is None:
                continue
            b = block if how == 0 else how
            if block and how:  # a flat tensor flattened again: not a layout we follow
                continue
            seen_calls.add(i)
            m = call.module
            if isinstance(m, nn.Conv2d):
                if b == 0 and m.in_channels == channels:
                    found.setdefault((id(m), 1), InputSlice(call.name, m, 1))
                continue
            if isinstance(m, nn.Linear):
                if b > 0 and m.in_features == channels * b:
                    found.setdefault((id(m), b), InputSlice(call.name, m, b))
                continue
            if not isinstance(m, PASS_THROUGH) or call.output is None:
                continue
            y = call.output
            if isinstance(m, nn.Flatten):
                if b == 0 and call.input.dim() == 4 and y.dim() == 2 and m.start_dim == 1:
                    hw = int(call.input.shape[2] * call.input.shape[3])
                    frontier.append((y, call.out_version, hw))
                continue
            if b == 0 and y.dim() == 4 and y.shape[:2] == call.input.shape[:2]:
                frontier.append((y, call.out_version, 0))
            elif b > 0 and y.shape == call.input.shape:
                frontier.append((y, call.out_version, b))
    return list(found.values())


def reset_sites(model: nn.Module) -> list[ResetSite]:
    """The monitored convs of ``model`` with their norms and traced consumers.

    Raises ``ConfigError`` (key ``model``) when NONE cannot run on the model (see the module
    docstring).
    """
    kind = type(model).__name__
    if not isinstance(model, ImageClassifier):
        raise ConfigError(
            "model",
            f"NONE needs a harness ImageClassifier (conv_layers(), monitored_prefixes); got {kind}",
        )
    model.to(memory_format=torch.contiguous_format)  # flatten views are matched by layout
    convs = model.monitored_conv_layers()
    if not convs:
        raise ConfigError(
            "model",
            f"{kind} has no monitored nn.Conv2d (monitored_prefixes="
            f"{model.monitored_prefixes}): NONE scores and resets conv channels",
        )
    calls = _trace(model)
    sites = []
    for site in convs:
        at = [i for i, c in enumerate(calls) if c.module is site.conv]
        if len(at) != 1:
            raise ConfigError(
                "model",
                f"{kind}.{site.name} is called {len(at)} times per forward pass; NONE needs one "
                "call per monitored conv (one spatial maximum per channel and sample)",
            )
        norm = site.norm
        if norm is not None:
            for p_name in ("weight", "bias"):
                p = getattr(norm, p_name, None)
                if isinstance(p, Tensor) and p.numel() != site.conv.out_channels:
                    raise ConfigError(
                        "model",
                        f"{kind}.{site.norm_name} (the norm of {site.name}) has a {p_name} of "
                        f"{p.numel()} values for {site.conv.out_channels} channels; NONE resets "
                        "the norm's per-channel weight and bias",
                    )
        sites.append(
            ResetSite(site.name, site.conv, site.norm_name, norm, tuple(_consumers(calls, at[0])))
        )
    return sites


@torch.no_grad()
def reset_channels(site: ResetSite, channels: Tensor) -> None:
    """Zero ``channels`` of ``site`` in place: the conv's filters and biases, the norm's weight
    and bias, and each consumer's input slice. Everything else is untouched."""
    idx = channels.to(torch.long).flatten().cpu()
    if idx.numel() == 0:
        return
    conv = site.conv
    conv.weight[idx.to(conv.weight.device)] = 0.0
    if conv.bias is not None:
        conv.bias[idx.to(conv.bias.device)] = 0.0
    if site.norm is not None:
        for p_name in ("weight", "bias"):
            p = getattr(site.norm, p_name, None)
            if isinstance(p, Tensor):
                p[idx.to(p.device)] = 0.0
    for cons in site.consumers:
        m = cons.module
        if isinstance(m, nn.Conv2d):
            per_in = m.in_channels // m.groups
            per_out = m.out_channels // m.groups
            for j in idx.tolist():
                g = j // per_in  # the group that reads input channel j
                m.weight[g * per_out : (g + 1) * per_out, j % per_in] = 0.0
        elif isinstance(m, nn.Linear):
            cols = (idx[:, None] * cons.block + torch.arange(cons.block)).flatten()
            m.weight[:, cols.to(m.weight.device)] = 0.0
