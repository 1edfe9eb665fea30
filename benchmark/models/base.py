"""The model interface every attack and defense relies on.

An ``ImageClassifier`` takes float pixels in [0, 1] and normalises them inside ``forward``, so
triggers and defenses never deal with normalisation. It offers what defenses need:

- ``forward_features(x) -> (N, D)`` pooled penultimate features, and ``forward_head(f)`` the
  logits from them (the feature/head split, timm's naming);
- ``last_linear()``: the final ``nn.Linear`` (ULRL re-initialises its rows);
- ``conv_layers()``: every ``nn.Conv2d`` in execution order with the norm layer that consumes its
  output (directly or through pooling; NONE resets filters and their norm parameters; pruning
  masks channels);
- ``activation_sites()``: every activation module in execution order (MMAC clips there).

The last two are found by tracing one forward pass with hooks (``benchmark/models/trace.py``, the
one tracer of the harness), so they work for any architecture, timm's included, without
per-architecture code in the defenses. Activations must
be modules (``nn.ReLU``), never functional calls, or they are invisible here.

A model may also have a data-dependent initialisation: ``needs_data_init()`` (default False)
and ``init_from_data(x, gen)``, which ``fit`` calls once, before the first epoch of a fresh
training (not a resumed one), with the training images (uint8 ``(N, C, H, W)``, where ``fit``
placed them) and a CPU generator seeded from the fit's seed. The model keeps the "done" flag
in its own state (fastnet: the ``data_initialised`` buffer), so a trained model, a copy a
defense fine-tunes, or one loaded from the cache is never re-initialised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from benchmark.checks import Checks
from benchmark.models import trace
from benchmark.models.trace import (  # re-exported
    NORM_TYPES,
    ActivationSite,
    ConvSite,
)

__all__ = [
    "NORM_TYPES",
    "ActivationSite",
    "ConvSite",
    "ImageClassifier",
    "check_width",
]


def check_width(width: object, key: str = "width") -> None:
    """A channel-width setting ``model.<key>``: an integer >= 1 (0 builds empty layers that fail
    at step 1)."""
    Checks("model").integer(width, key)


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

    # -- data-dependent initialisation (fit calls it; see the module docstring) ---------------
    def needs_data_init(self) -> bool:
        """Whether ``init_from_data`` should run before training (never, unless overridden)."""
        return False

    def init_from_data(self, x: Tensor, gen: torch.Generator) -> None:
        """Initialise from training images ``x`` (uint8 or float pixels, ``(N, C, H, W)``),
        drawing any subset from ``gen``; afterwards ``needs_data_init()`` is False."""
        raise NotImplementedError(f"{type(self).__name__} has no data-dependent initialisation")

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

    def conv_layers(self) -> list[ConvSite]:
        """Every ``nn.Conv2d`` in execution order, each with the norm layer fed by its output."""
        return trace.conv_layers(self)

    def monitored_conv_layers(self) -> list[ConvSite]:
        """The conv layers selected by ``monitored_prefixes`` (all when it is None)."""
        sites = self.conv_layers()
        if self.monitored_prefixes is None:
            return sites
        return [s for s in sites if s.name.startswith(self.monitored_prefixes)]

    def activation_sites(self) -> list[ActivationSite]:
        """Every activation module in the order of its first call."""
        return trace.activation_sites(self)
