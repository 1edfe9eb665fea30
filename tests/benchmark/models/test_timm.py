"""``model=timm`` beyond its default resnet18: what defenses can see in other architectures.

The counts below are facts of timm 1.0.31 at 32x32, pinned so that a timm upgrade which changes
what MMAC (activation sites) or NONE (conv/norm pairs) see shows up here. See the module
docstring of ``benchmark.models.timm`` for what they mean.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from hydra.errors import InstantiationException

from benchmark.models.timm import TimmClassifier

from .helpers import build_model

# name -> (kwargs, activation sites by type, convs, convs paired with a norm)
ARCHS: dict[str, tuple[dict[str, Any], dict[str, int], int, int]] = {
    # BatchNormAct2d is not a leaf, so the tracer pairs no conv with it; the Hardsigmoid
    # squeeze-excite gates are not an activation type.
    # BatchNormAct2d (a BatchNorm2d with children) is paired with its conv.
    "mobilenetv3_small_050": ({}, {"Hardswish": 19, "ReLU": 14}, 53, 34),
    # The squeeze-excite gates (nn.Sigmoid) are not activation sites.
    "efficientnet_b0": ({}, {"SiLU": 49}, 81, 49),
    # One GELU per MLP; the patch embedding is the only conv.
    "vit_tiny_patch16_224": ({"img_size": [32, 32]}, {"GELU": 12}, 1, 0),
    # timm's own GELU class counts as an activation site.
    "convnext_atto": ({}, {"GELU": 12}, 40, 13),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_timm_architecture(arch: str) -> None:
    kwargs, acts, convs, paired = ARCHS[arch]
    model = build_model("timm", name=arch, kwargs=kwargs)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), logits)
        assert logits.shape == (2, 10)
    sites = model.activation_sites()
    assert Counter(type(s.module).__name__ for s in sites) == Counter(acts)
    assert all(s.calls == 1 for s in sites)
    conv_sites = model.conv_layers()
    assert len(conv_sites) == convs
    assert sum(s.norm is not None for s in conv_sites) == paired
    assert all(name.startswith("net.") for name, _ in model.named_parameters())
    with torch.no_grad():
        model.last_linear().weight.zero_()
        model.last_linear().bias.zero_()
        assert model(x).abs().max() == 0


@pytest.mark.slow
def test_timm_vgg11_bn() -> None:
    """128.8M parameters: timm keeps VGG's 4096-wide head (as 7x7 and 1x1 convs, no norm)."""
    model = build_model("timm", name="vgg11_bn")
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert len(model.activation_sites()) == 10
    assert sum(s.norm is not None for s in model.conv_layers()) == 8


def test_timm_one_channel_digits() -> None:
    model = build_model("timm", in_chans=1, size=(28, 28), name="mobilenetv3_small_050")
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "match"),
    [
        ("resnet18", {"pretrained": True}, ValueError, "pretrained"),
        ("resnet18", {"num_classes": 5}, ValueError, "num_classes"),
        # two classifier heads (class and distillation token)
        ("deit_tiny_distilled_patch16_224", {"img_size": 32}, TypeError, "tuple"),
        # the classifier is a 1x1 conv applied before flattening
        ("dla34", {}, TypeError, "Conv2d"),
        # a ViT built for 224x224 fails at construction, not in the middle of a run
        ("vit_tiny_patch16_224", {}, AssertionError, "224"),
    ],
)
def test_timm_unsupported(
    name: str, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        TimmClassifier(10, 3, (32, 32), [0.5] * 3, [0.25] * 3, name=name, kwargs=kwargs)


def test_timm_errors_reach_the_cli() -> None:
    with pytest.raises(InstantiationException, match="pretrained"):
        build_model("timm", kwargs={"pretrained": True})
