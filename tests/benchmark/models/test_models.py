"""The model contract, checked on every ``conf/model/*.yaml`` (timm with its default resnet18).

What defenses rely on: normalisation inside ``forward``, the feature/head split, ``last_linear``
producing the logits, and the traced conv/norm pairs and activation sites. Each architecture's
expected structure is written out below, so a change to it shows up here.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from benchmark.models.base import ImageClassifier
from benchmark.models.trace import activation_types

from .helpers import MODEL_CONF, MODEL_NAMES, build_model


@dataclass(frozen=True)
class Expect:
    params: int  # for 3 input channels and 10 classes
    convs: int
    activations: int
    monitored: int
    # conv name -> name of the norm that consumes its output (None: no norm does)
    norm_of: Callable[[str], str | None]
    own: bool = True  # ours: registration order is execution order


def _small_cnn_norm(conv: str) -> str | None:
    return re.sub(r"\.0$", ".1", conv)


def _resnet_norm(conv: str) -> str | None:
    # conv1 -> bn1, layerX.Y.convK -> layerX.Y.bnK, shortcut/downsample conv -> its BN sibling.
    return re.sub(r"conv(\d)$", r"bn\1", re.sub(r"(shortcut|downsample)\.0$", r"\1.1", conv))


def _preact_norm(conv: str) -> str | None:
    if conv == "conv1":  # the stem's output enters layer1.0 through its bn1
        return "layer1.0.bn1"
    if conv.endswith(".conv1"):  # pre-activation: conv1 feeds the block's bn2
        return conv[: -len("conv1")] + "bn2"
    return None  # conv2 and the shortcut conv end in the residual add


def _vgg_norm(conv: str) -> str | None:
    i = int(conv.rsplit(".", 1)[1])
    return f"features.{i + 1}"


def _fastnet_norm(conv: str) -> str | None:
    # blockN.convK -> blockN.normK (conv1 through the max-pool); the whitening conv has none.
    return None if conv == "whiten" else re.sub(r"conv(\d)$", r"norm\1", conv)


EXPECTED: dict[str, Expect] = {
    "small_cnn": Expect(94_762, 3, 3, 3, _small_cnn_norm),
    # 20 convs = stem + 16 block convs + 3 shortcut convs; NONE monitors layer2-4 (15 convs).
    "preact_resnet18": Expect(11_171_146, 20, 16, 15, _preact_norm),
    "resnet18": Expect(11_173_962, 20, 17, 15, _resnet_norm),
    "vgg16_bn": Expect(14_728_266, 13, 13, 13, _vgg_norm),
    "nin": Expect(966_986, 8, 8, 8, lambda conv: None),
    # whitening conv + 3 groups of 2 convs; NONE monitors the 6 group convs.
    "fastnet": Expect(1_972_792, 7, 7, 6, _fastnet_norm),
    # timm's resnet18 keeps the ImageNet stem (7x7 conv), hence +7,680 over ours.
    "timm": Expect(
        11_181_642,
        20,
        17,
        20,
        lambda conv: "net." + str(_resnet_norm(conv.removeprefix("net."))),
        own=False,
    ),
}

SHAPES = [(3, 32, 32), (1, 28, 28), (3, 8, 8), (3, 48, 40)]
# The other tests run at 16x16 to keep the suite fast on two cores; nothing they check depends on
# the size (test_output_shape covers the real ones, test_architectures the size-specific details).
SIZE = (16, 16)


def test_every_config_is_expected() -> None:
    assert sorted(EXPECTED) == MODEL_NAMES


def test_config_names_its_module(model_name: str) -> None:
    """``model=<name>`` -> ``conf/model/<name>.yaml`` -> ``benchmark/models/<name>.py``."""
    target = OmegaConf.load(MODEL_CONF / f"{model_name}.yaml")._target_
    module, cls = target.rsplit(".", 1)
    assert module == f"benchmark.models.{model_name}"
    assert issubclass(getattr(importlib.import_module(module), cls), ImageClassifier)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_output_shape(model_name: str, shape: tuple[int, int, int]) -> None:
    c, h, w = shape
    model = build_model(model_name, in_chans=c, size=(h, w), num_classes=7)
    x = torch.rand(3, c, h, w)
    assert model(x).shape == (3, 7)
    feats = model.forward_features(x)
    assert feats.ndim == 2
    assert feats.shape == (3, model.last_linear().in_features)


def test_normalisation_inside_forward(model_name: str) -> None:
    model = build_model(model_name, size=SIZE)
    x = torch.rand(2, 3, *SIZE)
    with torch.no_grad():
        logits, feats = model(x), model.forward_features(x)
        prenormed = (x - model.mean) / model.std
        model.mean.zero_()
        model.std.fill_(1.0)
        # With identity statistics, feeding the normalised input reproduces both outputs ...
        torch.testing.assert_close(model(prenormed), logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.forward_features(prenormed), feats, rtol=1e-4, atol=1e-5)
        # ... and the raw pixels now give something else: the statistics are used in forward.
        assert not torch.allclose(model(x), logits, rtol=1e-3, atol=1e-4)


def test_forward_is_head_of_features(model_name: str) -> None:
    model = build_model(model_name, size=SIZE)
    x = torch.rand(2, 3, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x))


def test_last_linear_produces_the_logits(model_name: str) -> None:
    model = build_model(model_name, size=SIZE)
    head = model.last_linear()
    assert isinstance(head, nn.Linear)
    assert head.out_features == 10
    x = torch.rand(2, 3, *SIZE)
    with torch.no_grad():
        assert model(x).abs().sum() > 0
        head.weight.zero_()
        if head.bias is None:  # fastnet's head has no bias, as airbench's
            torch.testing.assert_close(model(x), torch.zeros(2, 10))
            return
        head.bias.fill_(0.5)
        torch.testing.assert_close(model(x), torch.full((2, 10), 0.5))


def test_conv_layers(model_name: str) -> None:
    model, expect = build_model(model_name, size=SIZE), EXPECTED[model_name]
    sites = model.conv_layers()
    all_convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(sites) == len(all_convs) == expect.convs
    assert {id(s.conv) for s in sites} == {id(m) for _, m in all_convs}
    if expect.own:  # ours register modules in execution order
        assert [s.name for s in sites] == [n for n, _ in all_convs]
    modules = dict(model.named_modules())
    for site in sites:
        assert site.norm_name == expect.norm_of(site.name), site.name
        assert site.norm is (modules[site.norm_name] if site.norm_name else None)
        if site.norm is not None:
            assert site.norm.num_features == site.conv.out_channels


def test_monitored_conv_layers(model_name: str) -> None:
    model, expect = build_model(model_name, size=SIZE), EXPECTED[model_name]
    monitored = model.monitored_conv_layers()
    assert len(monitored) == expect.monitored
    if model_name in {"resnet18", "preact_resnet18"}:
        # NONE: layer2-layer4, i.e. 4 convs + 1 shortcut in the first block of each stage.
        assert {s.name.split(".")[0] for s in monitored} == {"layer2", "layer3", "layer4"}
        assert sum("shortcut" in s.name for s in monitored) == 3


def test_activation_sites(model_name: str) -> None:
    model, expect = build_model(model_name, size=SIZE), EXPECTED[model_name]
    sites = model.activation_sites()
    assert len(sites) == expect.activations
    assert len({id(s.module) for s in sites}) == len(sites)
    assert all(s.calls == 1 for s in sites)
    every = [(n, m) for n, m in model.named_modules() if isinstance(m, activation_types())]
    assert {id(s.module) for s in sites} == {id(m) for _, m in every}
    if expect.own:
        assert [s.name for s in sites] == [n for n, _ in every]
        # In place would overwrite the tensor that hooks (and NONE's statistics) just saw.
        assert all(not getattr(s.module, "inplace", False) for s in sites)


def test_channels_last(model_name: str) -> None:
    model = build_model(model_name, size=SIZE)
    x = torch.rand(2, 3, *SIZE)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_gradients_reach_the_first_conv(model_name: str) -> None:
    model = build_model(model_name, size=SIZE).train()
    first = model.conv_layers()[0].conv
    loss = nn.functional.cross_entropy(model(torch.rand(2, 3, *SIZE)), torch.arange(2))
    loss.backward()
    # fastnet's whitening weights are frozen (set from data); its bias still learns.
    trainable = [p for p in first.parameters() if p.requires_grad]
    assert trainable
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_state_dict_round_trip(model_name: str) -> None:
    model = build_model(model_name, size=SIZE, seed=0)
    other = build_model(model_name, size=SIZE, seed=1)
    x = torch.rand(2, 3, *SIZE)
    with torch.no_grad():
        assert not torch.equal(other(x), model(x))
        other.load_state_dict(model.state_dict())
        assert torch.equal(other(x), model(x))


def test_parameter_count(model_name: str) -> None:
    model = build_model(model_name, size=SIZE)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED[model_name].params
