"""Contract tests over every attack config in conf/attack/ (timm-style registry-wide tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from attacks.base import Attack
from benchmark.pipeline import instantiate_entry
from benchmark.seeding import generator
from tests.conftest import toy_set

ATTACK_DIR = Path(__file__).resolve().parents[2] / "conf" / "attack"
NAMES = sorted(p.stem for p in ATTACK_DIR.glob("*.yaml"))
N, K, SHAPE = 300, 5, (3, 16, 16)


def make_attack(name: str, **overrides: object) -> Attack:
    cfg = OmegaConf.merge(OmegaConf.load(ATTACK_DIR / f"{name}.yaml"), overrides)
    attack = instantiate_entry(cfg, "attack")
    attack.validate(K, SHAPE, N)
    return attack


def poisoned(name: str, seed: int = 0, **overrides: object):
    attack = make_attack(name, **overrides)
    train = toy_set(N, K, SHAPE)
    attack.prepare(train, generator(seed, "attack", "prepare"))
    return attack, train, attack.poison(train, generator(seed, "poison"))


@pytest.mark.parametrize("name", NAMES)
def test_module_and_class_match_the_config_name(name: str) -> None:
    attack = make_attack(name)
    assert attack.name == name
    assert type(attack).__module__ == f"attacks.{name}"


@pytest.mark.parametrize("name", NAMES)
def test_poison_count_labels_and_untouched_images(name: str) -> None:
    attack, train, p = poisoned(name)
    idx = torch.nonzero(p.is_poison).flatten()
    assert p.num_poison == attack.num_poison(N) == round(attack.poison_rate * N)
    assert torch.equal(p.y_orig, train.y) and torch.equal(p.src_index, torch.arange(N))
    if attack.kind == "clean_label":
        assert torch.equal(p.y, train.y)
    else:
        assert torch.equal(p.y[idx], attack.target_labels(train.y[idx]))
    clean = ~p.is_poison
    assert torch.equal(p.x[clean], train.x[clean])  # byte-identical
    assert torch.equal(p.y[clean], train.y[clean])
    assert not torch.equal(p.x[idx], train.x[idx])


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_indices_other_seed_other_indices(name: str) -> None:
    _, _, a = poisoned(name, seed=0)
    _, _, b = poisoned(name, seed=0)
    _, _, c = poisoned(name, seed=1)
    assert torch.equal(a.is_poison, b.is_poison) and torch.equal(a.x, b.x)
    assert not torch.equal(a.is_poison, c.is_poison)


@pytest.mark.parametrize("name", NAMES)
def test_poison_does_not_mutate_its_input(name: str) -> None:
    attack = make_attack(name)
    train = toy_set(N, K, SHAPE)
    x0, y0 = train.x.clone(), train.y.clone()
    attack.prepare(train, generator(0, "prepare"))
    attack.poison(train, generator(0, "poison"))
    attack.backdoor_test_set(train)
    assert torch.equal(train.x, x0) and torch.equal(train.y, y0)


@pytest.mark.parametrize("name", NAMES)
def test_trigger_keeps_shape_dtype_and_range(name: str) -> None:
    attack = make_attack(name)
    attack.prepare(toy_set(N, K, SHAPE), generator(0, "prepare"))
    x = torch.rand(7, *SHAPE)
    out = attack.apply_trigger(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(x, x.clone())  # input untouched
    u = attack.trigger_uint8((x * 255).to(torch.uint8))
    assert u.dtype == torch.uint8 and u.shape == x.shape


@pytest.mark.parametrize("name", NAMES)
def test_backdoor_test_set_excludes_the_target_class(name: str) -> None:
    attack = make_attack(name)
    test = toy_set(100, K, SHAPE, seed=3)
    attack.prepare(test, generator(0, "prepare"))
    bd = attack.backdoor_test_set(test)
    assert (bd.y_orig != attack.target_class).all()
    assert len(bd) == int((test.y != attack.target_class).sum())
    assert (bd.y == attack.target_class).all() and bd.is_poison.all()
    assert torch.equal(bd.y_orig, test.y[bd.src_index])


@pytest.mark.parametrize("name", NAMES)
def test_bad_values_name_the_key(name: str) -> None:
    from benchmark.errors import ConfigError

    with pytest.raises(ConfigError, match=r"attack\.poison_rate"):
        make_attack(name, poison_rate=1.5)
    with pytest.raises(ConfigError, match=r"attack\.poison_rate"):
        make_attack(name, poison_rate=0.0)
    with pytest.raises(ConfigError, match=r"attack\.target_class"):
        make_attack(name, target_class=K)
