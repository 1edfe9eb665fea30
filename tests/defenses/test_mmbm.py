"""MM-BM (defenses/mmbm.py): which sites it clips, its penalty, and a run on a hand-made model."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from benchmark.errors import ConfigError
from benchmark.models.resnet18 import ResNet18
from benchmark.models.small_cnn import SmallCNN
from benchmark.models.vgg16_bn import VGG16BN
from defenses.clipping import ClippedModel, ClipPoint, clip_points
from defenses.mmbm import MMBM, l2_penalty, select_points, stage_end_points
from tests.defenses.test_mmac import Toy, toy_context
from tests.defenses.toys import KW


def ends(model: torch.nn.Module) -> list[str]:
    return [p.site for p in stage_end_points(clip_points(model), 3)]


def test_stage_ends_are_the_official_sites_on_resnet18() -> None:
    # univ_bm.py: after the stem ReLU, after layer1's output, after layer2's output.
    assert ends(ResNet18(**KW)) == ["relu", "layer1.1.relu2", "layer2.1.relu2"]


def test_stage_ends_on_other_models() -> None:
    assert ends(SmallCNN(**KW)) == ["block1.2", "block2.2", "block3.2"]
    # the last ReLU before each of the first three max-pools
    assert ends(VGG16BN(**KW)) == ["features.5", "features.12", "features.22"]


def point(site: str, spatial: tuple[int, ...], channels: int = 4) -> ClipPoint:
    return ClipPoint(site, 0, channels, 1, (channels, *spatial))


def test_squeeze_gates_are_skipped_and_few_stages_fall_back_to_the_first_sites() -> None:
    points = [
        point("net.stem", (16, 16)),
        point("net.blocks.0.a", (16, 16)),
        point("net.blocks.0.se", (1, 1)),  # a gate between two 16x16 sites: skipped
        point("net.blocks.1.a", (16, 16)),
        point("net.blocks.1.b", (8, 8)),
        point("net.blocks.2.a", (4, 4)),
        point("net.blocks.2.b", (4, 4)),
        point("net.head", (1, 1)),
    ]
    assert [p.site for p in stage_end_points(points, 3)] == [
        "net.blocks.1.a",
        "net.blocks.1.b",
        "net.blocks.2.b",
    ]
    tokens = [ClipPoint(f"net.blocks.{i}.act", 0, 8, -1, (5, 8)) for i in range(4)]
    assert stage_end_points(tokens, 3) == tokens[:3]  # one stage only: the first three sites


def test_explicit_sites_clip_every_call_and_unknown_names_are_config_errors() -> None:
    points = clip_points(Toy())
    assert [(p.site, p.call) for p in select_points(points, 3, ["act"])] == [
        ("act", 0),
        ("act", 1),
    ]
    with pytest.raises(ConfigError, match=r"defense\.sites.*nope"):
        select_points(points, 3, ["act", "nope"])


def test_penalty_is_the_sum_of_the_bounds_l2_norms() -> None:
    net = Toy().eval()
    model = ClippedModel(net, clip_points(net), init=8.0)
    # bounds of 2, 2 and 3 values, all 8
    assert float(l2_penalty(model).detach()) == pytest.approx(8 * (2 * math.sqrt(2) + math.sqrt(3)))


def test_run_shrinks_the_bounds_and_leaves_the_model_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = Toy().eval()
    before = copy.deepcopy(net.state_dict())
    defense = MMBM(per_class=4, epochs=12, c_start_after=1, c_every=2)
    result = defense.run(toy_context(tmp_path, net))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert isinstance(result.model, ClippedModel) and result.input_detector is None
    assert result.model(torch.rand(2, 1, 4, 4)).shape == (2, 3)
    ex = result.extras
    assert all(isinstance(v, int | float | str | bool | None) for v in ex.values())
    # Toy's stages: act on the 4x4 maps, act_cl, act again on the hidden layer.
    assert ex["sites"] == "act,act_cl" and ex["n_clip_points"] == 3
    assert ex["bound_max"] < 8.0  # the L2 penalty pulls every bound down from 8
    assert set(result.model.state_dict()) >= {"bounds.0", "bounds.1", "bounds.2"}


@pytest.mark.parametrize(
    ("key", "value"),
    [("epochs", 0), ("n_sites", 0), ("c_factor", "x"), ("sites", "relu"), ("init_bound", None)],
)
def test_bad_settings_are_config_errors(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"defense.{key}"):
        MMBM(**{key: value})
