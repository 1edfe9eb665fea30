"""What a NONE reset touches: the monitored convs, their norms and their consumers.

Consumers (the "next layer's input slice" of the official ``none/reset_neurons.py``): found in
the model tracer's records (``benchmark.models.consumers``): each module call's input
and output tensors and their version counters in one forward pass. From a conv's output it follows
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
from benchmark.models.base import ImageClassifier
from benchmark.models.consumers import InputSlice, consumers
from benchmark.models.trace import trace

__all__ = ["InputSlice", "ResetSite", "reset_channels", "reset_sites"]


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
    calls = trace(model)
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
            ResetSite(site.name, site.conv, site.norm_name, norm, tuple(consumers(calls, at[0])))
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
