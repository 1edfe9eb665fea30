"""The model interface every attack and defense relies on.

An ``ImageClassifier`` takes float pixels in [0, 1] and normalises them inside ``forward``, so
triggers and defenses never deal with normalisation. It offers what defenses need:

- ``forward_features(x) -> (N, D)`` pooled penultimate features, and ``forward_head(f)`` the
  logits from them (the feature/head split, timm's naming);
- ``last_linear()``: the final ``nn.Linear`` (ULRL re-initialises its rows);
- ``conv_layers()``: every ``nn.Conv2d`` in execution order with the norm layer that consumes its
  output directly (NONE resets filters and their norm parameters; pruning masks channels);
- ``activation_sites()``: every activation module in execution order (MMAC clips there).

The last two are found by tracing one forward pass with hooks, so they work for any
architecture, timm's included, without per-architecture code in the defenses. Activations must
be modules (``nn.ReLU``), never functional calls, or they are invisible here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import timm.layers.activations as timm_act
import torch
from torch import Tensor, nn

from benchmark.errors import ConfigError

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm2d,
    nn.GroupNorm,
    nn.InstanceNorm2d,
    nn.LayerNorm,
)
# Activation sites (where MMAC clips). Sigmoid-type gates (squeeze-excite) are not sites: they
# scale other activations rather than produce features. timm's own classes count too.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
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
    timm_act.GELU,
    timm_act.GELUTanh,
    timm_act.QuickGELU,
    timm_act.Swish,
    timm_act.Mish,
    timm_act.HardSwish,
    timm_act.HardMish,
    timm_act.PReLU,
    timm_act.Tanh,
)


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


def check_width(width: object, key: str = "model.width") -> None:
    """A channel-width setting: an integer >= 1 (0 builds empty layers that fail at step 1)."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(key, f"must be an integer >= 1, got {width!r}")


@dataclass(frozen=True, eq=False)
class _Call:
    name: str
    module: nn.Module
    inputs: tuple[Tensor, ...]
    output: object


class ImageClassifier(nn.Module):
    """Base class of the harness's models.

    Args:
        num_classes: number of output classes.
        in_chans: input channels.
        image_size: input ``(H, W)`` (used for the tracing probe and by size-aware models).
        mean, std: per-channel normalisation statistics applied inside ``forward``.

    Subclasses implement ``forward_features`` (normalised input -> ``(N, D)``) and name their
    final linear layer in ``head_name``.
    """

    head_name: str = "fc"
    # Prefixes of ``conv_layers()`` names a defense that monitors channels should look at
    # (NONE's official code: layer2-4 of ResNet-18, all of VGG, the inner convs of NiN).
    # None means all of them.
    monitored_prefixes: tuple[str, ...] | None = None

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        image_size: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"mean/std need {in_chans} values, got {len(mean)}/{len(std)}")
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    # -- forward ------------------------------------------------------------------------------
    def normalize(self, x: Tensor) -> Tensor:
        """Pixels in [0, 1] -> normalised input."""
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pixels in [0, 1], ``(N, C, H, W)`` -> pooled features ``(N, D)``."""
        raise NotImplementedError

    def forward_head(self, features: Tensor) -> Tensor:
        """Features ``(N, D)`` -> logits ``(N, num_classes)``."""
        return self.last_linear()(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # -- what defenses need -------------------------------------------------------------------
    def last_linear(self) -> nn.Linear:
        """The final linear layer (rows = classes)."""
        head = self.get_submodule(self.head_name)
        if not isinstance(head, nn.Linear):
            raise TypeError(f"{type(self).__name__}.{self.head_name} is not nn.Linear")
        return head

    def example_input(self, n: int = 2) -> Tensor:
        """A probe batch of the model's input shape, on its device."""
        return torch.rand(n, self.in_chans, *self.image_size, device=self.mean.device)

    def _trace(self) -> list[_Call]:
        """Run one forward pass, recording each leaf module call with its input and output."""
        calls: list[_Call] = []
        handles = []
        names = {m: n for n, m in self.named_modules()}

        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            tensors = tuple(t for t in inputs if isinstance(t, Tensor))
            calls.append(_Call(names[module], module, tensors, output))

        for module in names:
            # Leaves, plus norm layers with children (timm's BatchNormAct2d is a BatchNorm2d
            # that owns its activation).
            if isinstance(module, NORM_TYPES) or not any(True for _ in module.children()):
                handles.append(module.register_forward_hook(hook))
        was_training = self.training
        try:
            self.eval()
            with torch.no_grad():
                self(self.example_input())
        finally:
            self.train(was_training)
            for h in handles:
                h.remove()
        return calls

    def conv_layers(self) -> list[ConvSite]:
        """Every ``nn.Conv2d`` in execution order, each with the norm layer fed by its output."""
        calls = self._trace()
        sites, seen = [], set()
        for i, call in enumerate(calls):
            if not isinstance(call.module, nn.Conv2d) or call.module in seen:
                continue
            seen.add(call.module)
            norm = next(
                (
                    c
                    for c in calls[i + 1 :]
                    if isinstance(c.module, NORM_TYPES) and c.inputs and c.inputs[0] is call.output
                ),
                None,
            )
            sites.append(
                ConvSite(
                    call.name,
                    call.module,
                    norm.name if norm else None,
                    norm.module if norm else None,
                )
            )
        return sites

    def monitored_conv_layers(self) -> list[ConvSite]:
        """The conv layers selected by ``monitored_prefixes`` (all when it is None)."""
        sites = self.conv_layers()
        if self.monitored_prefixes is None:
            return sites
        return [s for s in sites if s.name.startswith(self.monitored_prefixes)]

    def activation_sites(self) -> list[ActivationSite]:
        """Every activation module in the order of its first call."""
        order: dict[nn.Module, tuple[str, int]] = {}
        for call in self._trace():
            if isinstance(call.module, ACTIVATION_TYPES):
                name, count = order.get(call.module, (call.name, 0))
                order[call.module] = (name, count + 1)
        return [ActivationSite(name, m, count) for m, (name, count) in order.items()]
