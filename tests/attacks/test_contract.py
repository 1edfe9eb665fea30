"""Contract tests over every attack config in conf/attack/ (timm-style registry-wide tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from attacks.base import Attack, AttackContext
from benchmark.models.small_cnn import SmallCNN
from benchmark.pipeline import instantiate_entry
from benchmark.seeding import generator
from tests.conftest import toy_set
from tests.registry import assert_registered, base_entry, load_entry

ATTACK_DIR = Path(__file__).resolve().parents[2] / "conf" / "attack"
NAMES = sorted(p.stem for p in ATTACK_DIR.glob("*.yaml"))
# The natural backdoor (and any variant of it) poisons nothing: it has its own tests
# (test_natural.py).
POISONING = [n for n in NAMES if base_entry("attack", n) != "natural"]
N, K, SHAPE = 300, 5, (3, 16, 16)


def toy_context() -> AttackContext:
    """The runner's services, shrunk: an untrained seeded surrogate, no cache."""

    def surrogate(kind: str, adversarial: dict | None) -> torch.nn.Module:
        torch.manual_seed(0)
        return SmallCNN(K, SHAPE[0], SHAPE[1:], [0.5] * 3, [0.25] * 3).eval()

    return AttackContext(torch.device("cpu"), surrogate, lambda name, spec, compute: compute())


def make_attack(name: str, **overrides: object) -> Attack:
    cfg = OmegaConf.merge(load_entry("attack", name), overrides)
    if base_entry("attack", name) == "label_consistent":  # keep the PGD short in the tests
        cfg.steps = overrides.get("steps", 3)
    attack = instantiate_entry(cfg, "attack")
    attack.validate(K, SHAPE, N)
    return attack


def prepared(name: str, data, seed: int = 0, **overrides: object) -> Attack:
    """An attack ready to trigger: prepared on ``data``; the natural backdoor gets a fixed
    trigger as if inverted from a model."""
    attack = make_attack(name, **overrides)
    attack.prepare(data, generator(seed, "attack", "prepare"), toy_context())
    if base_entry("attack", name) == "natural":
        mask = torch.zeros(1, *SHAPE[1:])
        mask[:, :3, :3] = 1.0
        attack.load_state_dict({"mask": mask, "pattern": torch.ones(SHAPE), "target": 1})
    return attack


def poisoned(name: str, seed: int = 0, **overrides: object):
    train = toy_set(N, K, SHAPE)
    attack = prepared(name, train, seed, **overrides)
    return attack, train, attack.poison(train, generator(seed, "poison"))


@pytest.mark.parametrize("name", NAMES)
def test_module_and_class_match_the_config_name(name: str) -> None:
    attack = make_attack(name)
    assert_registered(attack, name, "attacks", NAMES)


@pytest.mark.parametrize("name", POISONING)
def test_poison_count_labels_and_untouched_images(name: str) -> None:
    attack, train, p = poisoned(name)
    idx = torch.nonzero(p.is_poison).flatten()
    assert torch.equal(p.y_orig, train.y) and torch.equal(p.src_index, torch.arange(N))
    if attack.kind == "clean_label":
        # A share of the target class; only target-class images, labels never change.
        n_target = int((train.y == attack.target_class).sum())
        assert p.num_poison == attack.num_poison(N) == round(attack.poison_rate * n_target)
        assert (train.y[idx] == attack.target_class).all()
        assert torch.equal(p.y, train.y)
    else:
        assert p.num_poison == attack.num_poison(N) == round(attack.poison_rate * N)
        assert torch.equal(p.y[idx], attack.target_labels(train.y[idx]))
    clean = ~p.is_poison
    cover = getattr(attack, "cover_index", None)  # WaNet's noise-warped samples (labels kept)
    if cover is not None:
        assert not p.is_poison[cover].any() and torch.equal(p.y[cover], train.y[cover])
        clean[cover] = False
    assert torch.equal(p.x[clean], train.x[clean])  # byte-identical
    assert torch.equal(p.y[clean], train.y[clean])
    assert not torch.equal(p.x[idx], train.x[idx])


@pytest.mark.parametrize("name", POISONING)
def test_same_seed_same_indices_other_seed_other_indices(name: str) -> None:
    _, _, a = poisoned(name, seed=0)
    _, _, b = poisoned(name, seed=0)
    _, _, c = poisoned(name, seed=1)
    assert torch.equal(a.is_poison, b.is_poison) and torch.equal(a.x, b.x)
    assert not torch.equal(a.is_poison, c.is_poison)


@pytest.mark.parametrize("name", NAMES)
def test_poison_does_not_mutate_its_input(name: str) -> None:
    train = toy_set(N, K, SHAPE)
    x0, y0 = train.x.clone(), train.y.clone()
    attack = prepared(name, train)
    attack.poison(train, generator(0, "poison"))
    attack.backdoor_test_set(train)
    assert torch.equal(train.x, x0) and torch.equal(train.y, y0)


@pytest.mark.parametrize("name", NAMES)
def test_trigger_keeps_shape_dtype_and_range(name: str) -> None:
    attack = prepared(name, toy_set(N, K, SHAPE))
    x = torch.rand(7, *SHAPE)
    index = torch.arange(7)  # sample-specific triggers need it; the others ignore it
    out = attack.apply_trigger(x, index)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(x, x.clone())  # input untouched
    u = attack.trigger_uint8((x * 255).to(torch.uint8), index)
    assert u.dtype == torch.uint8 and u.shape == x.shape


@pytest.mark.parametrize("name", NAMES)
def test_trigger_is_per_sample_and_chunk_invariant(name: str, monkeypatch) -> None:
    """Each sample's trigger depends on its image and its index only: the same whether the
    set is triggered in chunks or at once, and in any order (sample-specific triggers too)."""
    attack = prepared(name, toy_set(N, K, SHAPE))
    x = toy_set(40, K, SHAPE, seed=5).x
    index = torch.arange(100, 140)
    whole = attack.trigger_uint8(x, index)
    monkeypatch.setattr("attacks.base._CHUNK", 7)
    assert torch.equal(attack.trigger_uint8(x, index), whole)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    assert torch.equal(attack.trigger_uint8(x[perm], index[perm]), whole[perm])


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_rebuilds_the_trigger(name: str) -> None:
    """What a cached backdoored model restores (``state_dict`` -> ``load_state_dict`` on an
    attack that never saw the data) gives the same trigger as the attack that was prepared."""
    attack = prepared(name, toy_set(N, K, SHAPE), seed=3)
    fresh = make_attack(name)
    fresh.load_state_dict(attack.state_dict())
    x, index = toy_set(20, K, SHAPE, seed=4).x, torch.arange(20) + 7
    assert torch.equal(fresh.trigger_uint8(x, index), attack.trigger_uint8(x, index))


@pytest.mark.parametrize("name", NAMES)
def test_backdoor_test_set_excludes_the_target_class(name: str) -> None:
    test = toy_set(100, K, SHAPE, seed=3)
    attack = prepared(name, test)
    bd = attack.backdoor_test_set(test)
    assert (bd.y_orig != attack.target_class).all()
    assert len(bd) == int((test.y != attack.target_class).sum())
    assert (bd.y == attack.target_class).all() and bd.is_poison.all()
    assert torch.equal(bd.y_orig, test.y[bd.src_index])


@pytest.mark.parametrize("name", NAMES)
def test_bad_values_name_the_key(name: str) -> None:
    from benchmark.errors import ConfigError

    if name in POISONING:
        with pytest.raises(ConfigError, match=r"attack\.poison_rate"):
            make_attack(name, poison_rate=1.5)
        with pytest.raises(ConfigError, match=r"attack\.poison_rate"):
            make_attack(name, poison_rate=0.0)
    with pytest.raises(ConfigError, match=r"attack\.target_class"):
        make_attack(name, target_class=K)


@pytest.mark.parametrize("name", POISONING)
def test_all_to_all_where_the_attack_allows_it(name: str) -> None:
    from benchmark.errors import ConfigError

    if "all2all" not in make_attack(name).modes:
        with pytest.raises(ConfigError, match=r"attack\.mode"):
            make_attack(name, mode="all2all")
        return
    attack, train, p = poisoned(name, mode="all2all")
    idx = p.is_poison
    assert torch.equal(p.y[idx], (train.y[idx] + 1) % K)
    bd = attack.backdoor_test_set(train)
    assert len(bd) == N and torch.equal(bd.y, (train.y + 1) % K)
