"""Label-consistent attack: the official corner trigger, PGD perturbation, surrogate use."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import AttackContext
from attacks.label_consistent import LabelConsistent, corner_pattern
from attacks.pgd import adversarial_training_hook, pgd_linf
from benchmark.errors import ConfigError
from benchmark.seeding import generator
from tests.conftest import toy_set

SHAPE = (3, 12, 12)


class Linear(nn.Module):
    def __init__(self, k: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 12 * 12, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def context(calls: list) -> AttackContext:
    model = Linear().eval()
    store: dict = {}

    def surrogate(kind: str, adversarial: dict | None) -> nn.Module:
        calls.append(("surrogate", kind, adversarial))
        return model

    def memo(name: str, spec: dict, compute):
        calls.append(("memo", name))
        key = (name, repr(sorted(spec.items())))
        if key not in store:
            store[key] = compute()
        return store[key]

    return AttackContext(torch.device("cpu"), surrogate, memo)


def test_corner_pattern_is_the_official_all_corners_checker() -> None:
    p = corner_pattern(8, 8)
    assert torch.equal(p[:3, :3], torch.tensor([[1.0, -1, -1], [-1, 1, -1], [1, -1, 1]]))
    assert torch.equal(p[-3:, -3:], torch.tensor([[-1.0, -1, 1], [-1, 1, -1], [1, -1, 1]]))
    assert int((p != 0).sum()) == 36
    assert torch.equal(p, p.flip(1))  # survives a horizontal flip
    assert (p[3:5, :] == 0).all() and (p[:, 3:5] == 0).all()


def test_amplitude_one_saturates_and_smaller_amplitudes_add() -> None:
    x = torch.full((1, 3, 8, 8), 0.5)
    full = LabelConsistent(amplitude=1.0).apply_trigger(x)
    assert full[0, :, 0, 0].eq(1).all() and full[0, :, 0, 1].eq(0).all()
    assert full[0, :, 4, 4].eq(0.5).all()
    low = LabelConsistent(amplitude=32 / 255).apply_trigger(x)
    assert torch.allclose(low[0, :, 0, 0], torch.tensor(0.5 + 32 / 255))
    assert torch.allclose(low[0, :, 0, 1], torch.tensor(0.5 - 32 / 255))


def test_poisoned_images_are_pgd_perturbed_within_eps_then_triggered() -> None:
    calls: list = []
    attack = LabelConsistent(poison_rate=0.4, steps=10, eps=8 / 255, step=2 / 255)
    attack.validate(4, SHAPE, 200)
    train = toy_set(200, 4, SHAPE)
    attack.prepare(train, generator(0, "prepare"), context(calls))
    p = attack.poison(train, generator(0, "poison"))
    idx = p.is_poison
    assert p.num_poison == 20 and (train.y[idx] == 0).all() and torch.equal(p.y, train.y)
    trigger_only = attack.trigger_uint8(train.x[idx])
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))  # away from the corners
    diff = (p.x[idx].float() - trigger_only.float())[inner].abs()
    assert diff.max() <= 8 + 1  # eps in 0-255 units, plus rounding
    assert diff.max() >= 7  # the perturbation is there, at the l-inf bound
    assert ("surrogate", "adversarial", attack.adv_train) in calls
    assert torch.equal(p.x[~idx], train.x[~idx])


def test_perturbation_is_memoised_and_clean_surrogate_selectable() -> None:
    calls: list = []
    ctx = context(calls)
    attack = LabelConsistent(steps=3, adv_model="clean")
    attack.validate(4, SHAPE, 200)
    train = toy_set(200, 4, SHAPE)
    attack.prepare(train, generator(0, "prepare"), ctx)
    a = attack.poison(train, generator(0, "poison"))
    b = attack.poison(train, generator(0, "poison"))
    assert torch.equal(a.x, b.x)
    assert [c[1] for c in calls if c[0] == "surrogate"] == ["clean"]  # computed once
    assert [c for c in calls if c[0] == "memo"] == [("memo", "label_consistent_pgd")] * 2


def test_adv_model_none_is_the_trigger_only_ablation() -> None:
    attack = LabelConsistent(adv_model="none")
    attack.validate(4, SHAPE, 200)
    train = toy_set(200, 4, SHAPE)
    attack.prepare(train, generator(0, "prepare"))  # no context needed
    p = attack.poison(train, generator(0, "poison"))
    assert torch.equal(p.x[p.is_poison], attack.trigger_uint8(train.x[p.is_poison]))


def test_needs_the_runner_context_to_perturb() -> None:
    attack = LabelConsistent()
    attack.validate(4, SHAPE, 200)
    with pytest.raises(RuntimeError, match="AttackContext"):
        attack.prepare(toy_set(200, 4, SHAPE), generator(0, "prepare"))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"amplitude": 0.0}, "amplitude"),
        ({"adv_model": "robust"}, "adv_model"),
        ({"steps": -1}, "steps"),
        ({"adv_train": {"eps": 0.1, "iters": 3}}, "adv_train"),
        ({"mode": "all2all"}, "mode"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"attack\.{key}"):
        LabelConsistent(**kwargs)


def test_too_small_images_and_too_large_share_are_errors() -> None:
    with pytest.raises(ConfigError, match="at least 6x6"):
        LabelConsistent().validate(4, (3, 5, 5), 200)
    attack = LabelConsistent(poison_rate=0.3, rate_of="train_set", adv_model="none")
    attack.validate(4, SHAPE, 200)
    with pytest.raises(ConfigError, match="only 50"):
        attack.prepare(toy_set(200, 4, SHAPE), generator(0, "prepare"))


def test_pgd_stays_in_the_ball_raises_the_loss_and_leaves_the_model_alone() -> None:
    model = Linear().train()
    x = torch.rand(16, *SHAPE)
    y = torch.randint(0, 4, (16,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adv = pgd_linf(model, x, y, eps=4 / 255, step=1 / 255, steps=10)
    assert (adv - x).abs().max() <= 4 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_adversarial_training_hook_returns_examples_in_the_ball() -> None:
    model = Linear()
    hook = adversarial_training_hook(model, eps=8 / 255, step=2 / 255, steps=3)
    x, y = torch.rand(8, *SHAPE), torch.randint(0, 4, (8,))
    xa, ya = hook(x, y, generator(0, "aug"))
    assert torch.equal(ya, y) and 0 < (xa - x).abs().max() <= 8 / 255 + 1e-6
