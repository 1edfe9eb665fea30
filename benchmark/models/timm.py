"""``model=timm``: any timm architecture, ``model=timm model.name=<arch>``.

Wightman. "PyTorch Image Models" (timm), github.com/huggingface/pytorch-image-models, 2019.
``timm.create_model(name, pretrained=False, num_classes=..., in_chans=..., **kwargs)``; the
network lives under ``net.`` (so its parameter names are timm's behind a ``net.`` prefix).
Weights are never downloaded (no hub access in CI); ``kwargs`` passes anything else timm takes,
e.g. ``+model.kwargs.img_size=32`` for a ViT on 32x32 images (the ``+``: the key is new to the
config).

The feature/head split is timm's own: ``forward_features`` returns
``net.forward_head(net.forward_features(x), pre_logits=True)`` flattened, and ``forward_head``
applies ``net.get_classifier()``. Construction checks on a probe batch that this split reproduces
``net``'s logits, so an architecture whose head is more than one module after the pre-logits
(a distilled two-head DeiT/LeViT, a 1x1-conv classifier such as DLA's) fails early with a
``TypeError`` instead of giving defenses a wrong split. ``monitored_prefixes`` is None (all convs).

What defenses can see in timm models (timm 1.0.31, 32x32; pinned in
tests/benchmark/models/test_timm.py):

- resnet18 (ImageNet stem: 11,181,642 parameters for 10 classes): 17 ``nn.ReLU`` sites (in place),
  each called once; every conv paired with its BN (``downsample.0`` with ``downsample.1``).
- mobilenetv3_small_050 (19 Hardswish + 14 ReLU sites), efficientnet_b0 (49 SiLU),
  regnetx_002 (40 ReLU), densenet121 (121 ReLU): each activation module is called once; their
  norms are timm's ``BatchNormAct2d`` (a BatchNorm2d with child modules), which the base tracer
  hooks too, so convs are paired with them (34 of 53 in mobilenetv3, 49 of 81 in efficientnet).
  Squeeze-excite gates (``nn.Sigmoid``, ``nn.Hardsigmoid``) are not activation sites.
- vit_tiny_patch16_224 (``img_size=32``): 12 ``nn.GELU`` sites, one per MLP; attention softmax is
  functional; the only conv is the patch embedding, with no norm on its output.
- convnext_atto: 12 sites of timm's own ``GELU`` class (counted as activations); 13 of 40 convs
  are followed directly by a norm.
- vgg11_bn: 128.8M parameters (timm keeps a 4096-wide conv-MLP pre-logits head); slow on CPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from benchmark.errors import ConfigError
from benchmark.models.base import ImageClassifier
from benchmark.validate import close_matches

# Set by the runner or fixed here; passing them in ``kwargs`` too would be ambiguous.
_RESERVED = frozenset({"pretrained", "num_classes", "in_chans", "pretrained_cfg_overlay"})


class TimmClassifier(ImageClassifier):
    """A timm model behind the harness interface.

    Args:
        name: timm architecture name (``timm.list_models()``).
        kwargs: extra keyword arguments for ``timm.create_model``.
    """

    monitored_prefixes = None

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        image_size: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        name: str = "resnet18",
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(num_classes, in_chans, image_size, mean, std)
        extra = dict(
            OmegaConf.to_container(kwargs, resolve=True)
            if isinstance(kwargs, DictConfig)
            else kwargs or {}
        )
        clash = sorted(_RESERVED & extra.keys())
        if clash:
            raise ConfigError(
                "model.kwargs",
                f"may not set {clash}: num_classes/in_chans come from "
                "the dataset and pretrained weights are not supported",
            )
        if not isinstance(name, str) or not timm.is_model(name):
            raise ConfigError(
                "model.name",
                f"{name!r} is not a timm architecture; pick one of timm.list_models()"
                + close_matches(str(name), timm.list_models()),
            )
        self.name = name
        self.net = timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **extra
        )
        self._check_split()

    def forward_features(self, x: Tensor) -> Tensor:
        features = self.net.forward_features(self.normalize(x))
        return self.net.forward_head(features, pre_logits=True).flatten(1)

    def forward_head(self, features: Tensor) -> Tensor:
        return self._classifier()(features)

    def last_linear(self) -> nn.Linear:
        """``net.get_classifier()`` if it is an ``nn.Linear``, else the model's last one."""
        head = self.net.get_classifier()
        if isinstance(head, nn.Linear):
            return head
        linears = [m for m in self.net.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise TypeError(f"timm model {self.name!r} has no nn.Linear layer")
        return linears[-1]

    def _classifier(self) -> nn.Module:
        head = self.net.get_classifier()
        if not isinstance(head, nn.Module):
            raise TypeError(
                f"timm model {self.name!r} has classifier {type(head).__name__} "
                "(e.g. a distilled two-head model); one classifier module is needed"
            )
        return head

    def _check_split(self) -> None:
        """Fail early if ``forward_head(forward_features(x))`` is not ``net``'s forward."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                x = self.example_input(2)
                try:
                    split = self.forward_head(self.forward_features(x))
                except RuntimeError as err:
                    raise TypeError(
                        f"timm model {self.name!r}: its classifier "
                        f"{type(self._classifier()).__name__} does not take "
                        f"pooled (N, D) features: {err}"
                    ) from err
                full = self.net(self.normalize(x))
        finally:
            self.train(was_training)
        if split.shape != full.shape or not torch.allclose(split, full, rtol=1e-4, atol=1e-5):
            raise TypeError(
                f"timm model {self.name!r}: get_classifier() applied to the "
                "pre-logits features does not reproduce the model's logits"
            )
