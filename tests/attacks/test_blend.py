"""Blend: the blend arithmetic, train vs test alpha, the noise key and key files."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from attacks.blend import Blend
from benchmark.errors import ConfigError
from benchmark.seeding import generator
from tests.conftest import toy_set


def ready(**kwargs: object) -> Blend:
    attack = Blend(**kwargs)
    attack.validate(4, (3, 12, 12), 200)
    attack.prepare(toy_set(200, 4), generator(0, "prepare"))
    return attack


def test_blend_is_a_convex_combination_with_the_key() -> None:
    attack = ready(alpha=0.2)
    x = torch.rand(5, 3, 12, 12)
    expected = 0.8 * x + 0.2 * attack.key
    assert torch.allclose(attack.apply_trigger(x), expected, atol=1e-6)


def test_training_and_test_alpha_are_separate() -> None:
    attack = ready(alpha=0.1, test_alpha=0.3)
    train = toy_set(200, 4)
    p = attack.poison(train, generator(0, "poison"))
    i = int(torch.nonzero(p.is_poison)[0])
    xf = train.x[i].float() / 255
    train_blend = ((0.9 * xf + 0.1 * attack.key) * 255).round()
    assert torch.allclose(p.x[i].float(), train_blend, atol=1.0)
    assert torch.allclose(attack.apply_trigger(xf[None])[0], 0.7 * xf + 0.3 * attack.key)


def test_noise_key_is_seeded_and_saved_with_the_state() -> None:
    a, b = ready(), ready()
    assert torch.equal(a.key, b.key)
    c = Blend()
    c.validate(4, (3, 12, 12), 200)
    c.prepare(toy_set(200, 4), generator(1, "prepare"))
    assert not torch.equal(a.key, c.key)
    c.load_state_dict(a.state_dict())
    x = torch.rand(2, 3, 12, 12)
    assert torch.equal(c.apply_trigger(x), a.apply_trigger(x))


def test_key_file_is_resized_and_converted(tmp_path) -> None:
    arr = np.zeros((40, 60, 3), dtype=np.uint8)
    arr[:, :30] = 255  # left half white
    Image.fromarray(arr).save(tmp_path / "key.png")
    attack = Blend(key_path=str(tmp_path / "key.png"))
    attack.validate(4, (1, 12, 12), 200)  # grayscale data: the key becomes one channel
    attack.prepare(toy_set(200, 4, (1, 12, 12)), generator(0, "prepare"))
    assert attack.key.shape == (1, 12, 12)
    assert attack.key[0, :, :5].min() > 0.9 and attack.key[0, :, 7:].max() < 0.1


def test_missing_or_unreadable_key_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"attack\.key_path.*not a file"):
        Blend(key_path=str(tmp_path / "nope.png")).validate(4, (3, 12, 12), 200)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ConfigError, match=r"attack\.key_path.*not a readable image"):
        Blend(key_path=str(tmp_path / "bad.png")).validate(4, (3, 12, 12), 200)


@pytest.mark.parametrize("key", ["alpha", "test_alpha"])
def test_alpha_out_of_range(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"attack\.{key}"):
        Blend(**{key: 1.5})


def test_additive_formula_is_ultracleans_clipped_sum() -> None:
    """UltraClean's blended_generation.py: clip(x + 0.2 * key, 0, 1); the default stays convex."""
    assert Blend().formula == "convex"
    attack = ready(formula="additive", alpha=0.2)
    x = torch.rand(5, 3, 12, 12)
    expected = (x + 0.2 * attack.key).clamp(0, 1)
    assert torch.allclose(attack.apply_trigger(x), expected, atol=1e-6)
    assert (attack.apply_trigger(x) >= x - 1e-6).all()  # additive only brightens
    with pytest.raises(ConfigError, match=r"attack\.formula"):
        Blend(formula="multiply")  # type: ignore[arg-type]


def test_describe_records_the_trigger_identity(tmp_path) -> None:
    noise = ready().describe(200)
    assert (noise["key"], noise["key_sha256"], noise["formula"]) == ("noise", None, "convex")
    Image.fromarray(np.full((20, 20, 3), 7, dtype=np.uint8)).save(tmp_path / "kitty.png")
    attack = Blend(key_path=str(tmp_path / "kitty.png"), formula="additive")
    attack.validate(4, (3, 12, 12), 200)
    described = attack.describe(200)
    digest = hashlib.sha256((tmp_path / "kitty.png").read_bytes()).hexdigest()
    assert (described["key"], described["key_sha256"]) == ("kitty", digest)
    assert described["formula"] == "additive"


def test_bad_key_file_fails_in_one_line_before_any_data(make_cfg, tmp_path) -> None:
    """``pipeline.build`` (config and metadata only) already reads the key file."""
    from benchmark import pipeline

    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken\n\nfile")
    for path in (tmp_path / "missing.png", tmp_path / "bad.png"):
        cfg = make_cfg("attack=blend", f"attack.key_path={path}")
        with pytest.raises(ConfigError) as err:
            pipeline.build(cfg)
        assert err.value.key == "attack.key_path" and "\n" not in str(err.value)
