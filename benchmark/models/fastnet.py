"""``model=fastnet``: airbench94's network, written for the harness (1.97M parameters).

Jordan. "94% on CIFAR-10 in 3.29 Seconds on a Single GPU". arXiv:2404.00498, 2024.
Read from KellerJordan/cifar10-airbench at f1c599c: ``airbench/lib_airbench94.py`` (``make_net94``
and its ``Conv``/``BatchNorm``/``ConvGroup``), ``legacy/airbench94.py`` (the same net as a
script) and ``airbench94_muon.py`` (``CifarNet.init_whiten``); the recipe is
``conf/train/fast.yaml``. Our own code, not theirs.

Layout (airbench94's, ``widths`` 64/256/256):

- ``whiten``: a 2x2 conv, no padding, ``2 * in_chans * 4`` filters with bias. Its weights are
  set from the training images (``init_from_data``, called by ``fit`` once before the first
  epoch; airbench: the first 5,000 normalised training images): the eigenvectors ``v_i`` of the
  (uncentred) covariance of all 2x2 patches, scaled by ``1 / sqrt(lambda_i + 5e-4)``, in
  descending eigenvalue order, then the same filters negated. The weights are frozen
  (``requires_grad`` off, as in airbench); the bias starts at 0 and trains (``train=fast``
  freezes it after 3 epochs, airbench's ``whiten_bias_epochs``). ``data_initialised``, a buffer
  in the state_dict, records that it was done, so a trained model (a cached one, a defense's
  copy, a resumed checkpoint) is never whitened again; a fresh model is, on the data it trains
  on.
- ``act0`` GELU, then three ``ConvGroup``s: ``conv1`` 3x3 -> ``pool`` 2x2 max ->
  ``norm1`` BN -> ``act1`` GELU -> ``conv2`` 3x3 -> ``norm2`` BN -> ``act2`` GELU.
  Convs have no bias and start as PyTorch's default with the first ``in_channels`` filters set to
  the identity (``dirac_``, airbench's ``Conv.reset_parameters``). BatchNorm: eps 1e-12, momentum
  0.4 (airbench's "0.6" is ``1 - momentum``), weight frozen at 1, bias trained.
- Global max pool, ``Scale(1/9)``, then ``head``, a bias-free linear layer (PyTorch's default
  init). airbench multiplies the logits by 1/9 (``scaling_factor``) after the head; with no bias
  that is the same map and the same gradients as scaling the features before it, which keeps
  ``head`` the layer that produces the logits (``last_linear()``, as ULRL and the contract need).

Differences from airbench94: (1) the final ``MaxPool2d(3)`` is a global max pool, the same at
32x32 (the last map is 3x3) and defined for other sizes; a 2x2 pool is skipped on maps under 2x2
(``MaxPoolIfLarge``), so 8x8 inputs work. (2) One GELU module per site (7), not one shared per
group, so defenses can hook each. (3) ``in_chans`` and ``num_classes`` are free; normalisation
(the dataset's mean/std, airbench's CIFAR-10 values on cifar10) happens inside ``forward``.
(4) No fp16 weights: the harness trains in fp32 with bf16 autocast where native. (5) No test-time
augmentation: airbench reports its 94.01% with TTA level 2 (each image also mirrored and shifted
by one pixel, 6 views averaged); a trigger is a pattern at a place, and mirrored or shifted
views change what it does, so the harness measures clean accuracy and ASR on the images as they
are, for every model. Compare our clean accuracy with airbench's non-TTA accuracy, not 94.01.

NONE monitors the six group convs (``monitored_prefixes``), not the frozen whitening layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from benchmark.data import to_float
from benchmark.models.base import ImageClassifier, check_width
from benchmark.models.layers import Scale
from benchmark.models.vgg16_bn import MaxPoolIfLarge

WHITEN_KERNEL = 2
WHITEN_EPS = 5e-4  # airbench's eps in init_whitening_conv
WHITEN_SAMPLES = 5000  # airbench whitens on the first 5,000 training images
CHUNK = 500  # images per step of the covariance sum (bounded memory on CPU)


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, padding="same", bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(cin, cout)])
    return conv


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=1 - 0.6)
    norm.weight.requires_grad_(False)
    return norm


class ConvGroup(nn.Module):
    """conv3x3 -> max-pool -> BN -> GELU -> conv3x3 -> BN -> GELU (airbench's ``ConvGroup``)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout)
        self.pool = MaxPoolIfLarge()
        self.norm1 = _batch_norm(cout)
        self.act1 = nn.GELU()
        self.conv2 = _conv3x3(cout, cout)
        self.norm2 = _batch_norm(cout)
        self.act2 = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.norm1(self.pool(self.conv1(x))))
        return self.act2(self.norm2(self.conv2(x)))


class FastNet(ImageClassifier):
    """airbench94's network for any ``in_chans``, ``num_classes`` and inputs of 8x8 and up."""

    head_name = "head"
    monitored_prefixes = ("block1", "block2", "block3")

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        image_size: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        widths: Sequence[int] = (64, 256, 256),
        logit_scale: float = 1 / 9,
        whiten_samples: int = WHITEN_SAMPLES,
    ) -> None:
        widths = tuple(widths)
        if len(widths) != 3:
            raise ValueError(f"model.widths needs three channel counts, got {list(widths)}")
        for i, width in enumerate(widths):
            check_width(width, f"widths[{i}]")
        super().__init__(num_classes, in_chans, image_size, mean, std)
        self.whiten_samples = int(whiten_samples)
        whiten_width = 2 * in_chans * WHITEN_KERNEL**2
        self.whiten = nn.Conv2d(in_chans, whiten_width, WHITEN_KERNEL, padding=0, bias=True)
        with torch.no_grad():  # airbench's Conv: zero bias, identity first filters
            self.whiten.bias.zero_()
            nn.init.dirac_(self.whiten.weight[:in_chans])
        self.whiten.weight.requires_grad_(False)
        self.act0 = nn.GELU()
        self.block1 = ConvGroup(whiten_width, widths[0])
        self.block2 = ConvGroup(widths[0], widths[1])
        self.block3 = ConvGroup(widths[1], widths[2])
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten()
        self.scale = Scale(logit_scale)
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.register_buffer("data_initialised", torch.zeros((), dtype=torch.bool))

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.act0(self.whiten(self.normalize(x)))
        x = self.block3(self.block2(self.block1(x)))
        return self.scale(self.flatten(self.pool(x)))

    # -- data-dependent initialisation (called by fit) ----------------------------------------
    def needs_data_init(self) -> bool:
        return not bool(self.data_initialised)

    @torch.no_grad()
    def init_from_data(self, x: Tensor, gen: torch.Generator) -> None:
        """Whiten the first layer on ``whiten_samples`` images of ``x`` (uint8, or float
        pixels in [0, 1]; ``(N, C, H, W)``) drawn with ``gen``: see the module docstring.

        The covariance is summed in float64 over chunks (deterministic, bounded memory) and
        decomposed on the CPU, so the result does not depend on the device."""
        pick = torch.randperm(len(x), generator=gen)[: self.whiten_samples]
        k, dim = WHITEN_KERNEL, self.in_chans * WHITEN_KERNEL**2
        cov = torch.zeros(dim, dim, dtype=torch.float64, device=self.mean.device)
        count = 0
        for part in pick.split(CHUNK):
            xb = x[part.to(x.device)].to(self.mean.device)
            xb = to_float(xb) if xb.dtype == torch.uint8 else xb.float()
            xb = self.normalize(xb.contiguous())
            # (N, C, H', W', k, k) -> one row per patch, ordered (C, k, k) like conv weights
            patches = xb.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5)
            flat = patches.reshape(-1, dim).double()
            cov += flat.T @ flat
            count += flat.shape[0]
        eigenvalues, eigenvectors = torch.linalg.eigh(cov.cpu() / count)
        order = eigenvalues.argsort(descending=True)
        filters = eigenvectors.T[order] / (eigenvalues[order, None] + WHITEN_EPS).sqrt()
        filters = filters.reshape(dim, self.in_chans, k, k).to(self.whiten.weight)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        self.data_initialised.fill_(True)
