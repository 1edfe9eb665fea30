"""BadNets: the patch, its placement, its patterns, all-to-all labels, and bad sizes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from attacks.badnets import BadNets
from benchmark.data import to_uint8
from benchmark.errors import ConfigError
from benchmark.seeding import generator
from tests.conftest import toy_set


def test_default_is_a_white_3x3_square_at_the_bottom_right() -> None:
    attack = BadNets()
    attack.validate(10, (3, 32, 32), 1000)
    out = attack.apply_trigger(torch.zeros(2, 3, 32, 32))
    assert (out[..., 29:, 29:] == 1.0).all()
    assert out.sum() == 2 * 3 * 9


@pytest.mark.parametrize(
    ("position", "corner"),
    [("top_left", (0, 0)), ("top_right", (0, 6)), ("bottom_left", (6, 0)), ([2, 3], (2, 3))],
)
def test_positions(position: object, corner: tuple[int, int]) -> None:
    attack = BadNets(size=2, position=position, value=0.5)
    attack.validate(10, (1, 8, 8), 100)
    out = attack.apply_trigger(torch.zeros(1, 1, 8, 8))
    r, c = corner
    assert (out[0, 0, r : r + 2, c : c + 2] == 0.5).all() and out.sum() == 4 * 0.5


def test_margin_moves_the_corner_square_inwards() -> None:
    attack = BadNets(size=3, margin=1)
    attack.validate(10, (1, 10, 10), 100)
    out = attack.apply_trigger(torch.zeros(1, 1, 10, 10))
    assert (out[0, 0, 6:9, 6:9] == 1).all() and out.sum() == 9


def test_all_to_all_shifts_labels_and_keeps_every_test_image() -> None:
    attack = BadNets(mode="all2all", poison_rate=0.5)
    attack.validate(4, (3, 12, 12), 200)
    train = toy_set(200, 4)
    p = attack.poison(train, generator(0, "poison"))
    idx = p.is_poison
    assert torch.equal(p.y[idx], (train.y[idx] + 1) % 4)
    bd = attack.backdoor_test_set(train)
    assert len(bd) == len(train) and torch.equal(bd.y, (train.y + 1) % 4)


def test_dirty_label_draws_from_every_class() -> None:
    attack = BadNets(poison_rate=0.5)
    attack.validate(4, (3, 12, 12), 200)
    p = attack.poison(toy_set(200, 4), generator(0, "poison"))
    assert set(p.y_orig[p.is_poison].tolist()) == {0, 1, 2, 3}


def test_square_that_does_not_fit_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"attack\.size"):
        BadNets(size=9).validate(10, (1, 8, 8), 100)
    with pytest.raises(ConfigError, match=r"attack\.position"):
        BadNets(position="middle")
    with pytest.raises(ConfigError, match=r"attack\.mode"):
        BadNets(mode="one2one")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"attack\.poison_rate"):
        BadNets(poison_rate=0.001).validate(10, (1, 8, 8), 100)  # rounds to no sample


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"size": 0}, "attack.size: must be an integer >= 1, got 0"),
        ({"size": True}, "attack.size: must be an integer >= 1, got True"),
        ({"margin": -1}, "attack.margin: must be an integer >= 0, got -1"),
        ({"value": 1.5}, "attack.value: must be a number in [0, 1], got 1.5"),
        ({"value": "1"}, "attack.value: must be a number in [0, 1], got '1'"),
        ({"position": [0, -1]}, "attack.position: must be [row, col] of two integers >= 0"),
        ({"position": [0]}, "attack.position: must be [row, col] of two integers >= 0"),
        ({"pattern": ""}, "attack.pattern: must be square | checker | an image path, got ''"),
        ({"target_class": -1}, "attack.target_class: must be an integer >= 0, got -1"),
        ({"poison_rate": True}, "attack.poison_rate: must be a number in (0, 1], got True"),
    ],
)
def test_bad_values_get_the_shared_checks_wording(kwargs: dict, expected: str) -> None:
    """Numbers are ints or floats, never bools or text (``benchmark.checks``)."""
    with pytest.raises(ConfigError) as err:
        BadNets(**kwargs)
    assert str(err.value).startswith(expected)


# -- attack.pattern -------------------------------------------------------------------------------
def _old_square(x: torch.Tensor, row: int, col: int, size: int, value: float) -> torch.Tensor:
    """The trigger before ``pattern`` existed: every pixel of the square set to ``value``."""
    out = x.clone()
    out[..., row : row + size, col : col + size] = value
    return out


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_square_pattern_is_pixel_identical_to_the_old_trigger(shape: tuple[int, int, int]) -> None:
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(0))
    attack = BadNets()
    attack.validate(10, shape, 1000)
    h, w = shape[1:]
    assert torch.equal(attack.apply_trigger(x), _old_square(x, h - 3, w - 3, 3, 1.0))
    assert attack.pattern == "square" and BadNets(pattern="square").pattern == "square"


def test_checker_is_ultracleans_official_layout_at_rows_and_cols_29_to_31() -> None:
    """UltraClean (bxz9200/UltraClean eec1612) ``dirty-label attacks/badNets_generation.py``
    sets, in every channel, [31][30], [30][31], [30][29], [29][30] to 1 and [29][31], [31][31],
    [31][29], [30][30], [29][29] to 0 (pixel [row][col] of a 32x32 image)."""
    x = torch.full((2, 3, 32, 32), 0.5)
    attack = BadNets(pattern="checker")
    attack.validate(10, (3, 32, 32), 1000)
    out = attack.apply_trigger(x)
    ones = [(31, 30), (30, 31), (30, 29), (29, 30)]
    zeros = [(29, 31), (31, 31), (31, 29), (30, 30), (29, 29)]
    for r, c in ones:
        assert (out[:, :, r, c] == 1.0).all()
    for r, c in zeros:
        assert (out[:, :, r, c] == 0.0).all()
    rest = torch.ones(32, 32, dtype=torch.bool)
    rest[29:, 29:] = False
    assert (out[..., rest] == 0.5).all()


def test_checker_follows_size_position_and_value() -> None:
    attack = BadNets(pattern="checker", size=4, position=[1, 2], value=0.8)
    attack.validate(10, (1, 8, 8), 100)
    out = attack.apply_trigger(torch.full((1, 1, 8, 8), 0.3))
    expect = torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0]]) * 0.8
    assert torch.allclose(out[0, 0, 1:5, 2:6], expect.float())
    assert (out[0, 0, 0] == 0.3).all()


def _png(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)
    return path


def test_image_pattern_of_backdoorbenchs_png_equals_the_square(tmp_path: Path) -> None:
    """BackdoorBench's trigger_image.png is black with a white 3x3 square at rows/cols 29-31;
    applied where it is non-zero it is the default square."""
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[29:, 29:] = 255
    attack = BadNets(pattern=str(_png(tmp_path / "trigger_image.png", arr)))
    attack.validate(10, (3, 32, 32), 1000)
    square = BadNets()
    square.validate(10, (3, 32, 32), 1000)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(attack.apply_trigger(x), square.apply_trigger(x))
    assert torch.equal(attack.trigger_uint8(to_uint8(x)), square.trigger_uint8(to_uint8(x)))


def test_image_pattern_replaces_only_nonzero_values_per_channel(tmp_path: Path) -> None:
    arr = np.zeros((4, 4, 3), dtype=np.uint8)
    arr[0, 0] = (255, 0, 51)  # a zero channel keeps the input there
    attack = BadNets(pattern=str(_png(tmp_path / "t.png", arr)))
    attack.validate(10, (3, 4, 4), 100)
    x = torch.full((1, 3, 4, 4), 0.5)
    out = attack.apply_trigger(x)
    assert out[0, :, 0, 0].tolist() == pytest.approx([1.0, 0.5, 0.2])
    assert (out[..., 1:, :] == 0.5).all() and (out[..., 0, 1:] == 0.5).all()
    gray = BadNets(pattern=str(tmp_path / "t.png"))
    gray.validate(10, (1, 4, 4), 100)  # one channel: the image's first (red) channel
    assert gray.apply_trigger(torch.full((1, 1, 4, 4), 0.5))[0, 0, 0, 0] == 1.0


def test_image_pattern_is_resized_with_pils_bilinear_filter(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    path = _png(tmp_path / "big.png", arr)
    attack = BadNets(pattern=str(path))
    attack.validate(10, (3, 8, 8), 100)
    ref = np.asarray(Image.fromarray(arr).resize((8, 8), Image.BILINEAR))
    t = attack.apply_trigger(torch.zeros(1, 3, 8, 8))[0]
    assert torch.equal(t, torch.from_numpy(ref.copy()).permute(2, 0, 1).float() / 255.0)


@pytest.mark.parametrize("bad", ["checkers", "", 3, None, "no/such/file.png"])
def test_bad_pattern_is_a_config_error_naming_attack_pattern(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"attack\.pattern"):
        BadNets(pattern=bad)  # type: ignore[arg-type]


def test_a_file_that_is_not_an_image_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ConfigError, match=r"attack\.pattern"):
        BadNets(pattern=str(tmp_path / "notes.txt"))


def test_describe_records_the_pattern(tmp_path: Path) -> None:
    assert BadNets().describe(100)["pattern"] == "square"
    assert BadNets(pattern="checker").describe(100)["pattern"] == "checker"
    assert BadNets().describe(100)["pattern_sha256"] is None
    arr = np.zeros((8, 8, 3), dtype=np.uint8)
    path = _png(tmp_path / "trigger_image.png", arr)
    d = BadNets(pattern=str(path)).describe(100)
    assert d["pattern"] == "trigger_image"
    assert d["pattern_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_config_default_is_the_square() -> None:
    cfg = OmegaConf.load(Path(__file__).parents[2] / "conf" / "attack" / "badnets.yaml")
    assert cfg.pattern == "square"
