"""Architecture details of our own models that the shared contract tests do not pin."""

from __future__ import annotations

import torch
from torch import nn

from benchmark.models.vgg16_bn import MaxPoolIfLarge

from .helpers import build_model


def test_preact_keeps_backdoorbench_parameter_names() -> None:
    """BackdoorBench checkpoints load with ``strict=False`` (only mean/std are ours)."""
    keys = set(build_model("preact_resnet18").state_dict())
    assert {
        "conv1.weight",
        "layer1.0.bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer2.0.shortcut.0.weight",
        "layer4.1.conv2.weight",
        "linear.weight",
        "linear.bias",
    } <= keys
    assert not any(k.startswith(("bn1.", "layer1.0.shortcut")) for k in keys)


def test_preact_has_no_final_norm() -> None:
    """Like BackdoorBench (unlike He et al.), the last block's sum is pooled directly."""
    model = build_model("preact_resnet18")
    assert model.conv_layers()[-1].name == "layer4.1.conv2"
    assert model.activation_sites()[-1].name == "layer4.1.relu2"
    assert len([m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]) == 16


def test_resnet18_has_mmac_sites() -> None:
    """The stem ReLU and, per block, the inner and the post-add ReLU: 17 sites."""
    names = [s.name for s in build_model("resnet18").activation_sites()]
    assert names[:3] == ["relu", "layer1.0.relu1", "layer1.0.relu2"]
    assert names[-1] == "layer4.1.relu2"


def test_vgg_pool_skips_maps_below_2x2() -> None:
    pool = MaxPoolIfLarge()
    assert pool(torch.rand(1, 2, 3, 3)).shape == (1, 2, 1, 1)
    one = torch.rand(1, 2, 1, 1)
    assert pool(one) is one
    assert pool(torch.rand(1, 2, 1, 5)).shape == (1, 2, 1, 5)


def test_vgg_features_are_the_last_conv_unit_at_32x32() -> None:
    """At 32x32 the last map is 1x1 (kuangliu's flatten), so the final average is a no-op."""
    model = build_model("vgg16_bn")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        maps = model.features[:-2](model.normalize(x))  # up to the last ReLU, before pool
    assert maps.shape == (2, 512, 2, 2)
    torch.testing.assert_close(model.forward_features(x), maps.amax(dim=(2, 3)))


def test_nin_head_equals_a_1x1_class_conv() -> None:
    """GAP then ``fc`` == NONE's 1x1 class conv then GAP (minus its ReLU on the class maps)."""
    model = build_model("nin")
    x = torch.rand(2, 3, 32, 32)
    fc = model.fc
    with torch.no_grad():
        maps = model.features(model.normalize(x))
        class_maps = nn.functional.conv2d(maps, fc.weight[:, :, None, None], fc.bias)
        torch.testing.assert_close(model(x), class_maps.mean(dim=(2, 3)), rtol=1e-4, atol=1e-5)


def test_nin_monitors_nones_inner_convs() -> None:
    names = [s.name for s in build_model("nin").monitored_conv_layers()]
    assert names == [f"features.{i}" for i in (0, 2, 4, 8, 10, 12, 16, 18)]


def test_nin_dropout_only_in_training() -> None:
    model = build_model("nin")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        torch.manual_seed(0)
        a = model(x)
        assert not torch.equal(a, model(x))


def test_preact_width_scales_every_stage() -> None:
    """``model.width=16``: the small ResNet of the CPU real-data runs."""
    model = build_model("preact_resnet18", width=16)
    assert sum(p.numel() for p in model.parameters()) == 700_762
    assert [s.conv.out_channels for s in model.conv_layers()][-1] == 128
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
