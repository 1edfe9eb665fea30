"""Natural backdoor: no poisoning, the per-budget report, target choice, disjoint scoring."""

from __future__ import annotations

import pytest
import torch

from attacks.base import StageContext
from attacks.natural import Natural
from benchmark.errors import ConfigError
from benchmark.seeding import generator
from benchmark.types import ImageSet
from tests.attacks.test_inversion import StripeModel, toy_data
from tests.conftest import toy_set


def as_set(x: torch.Tensor, y: torch.Tensor) -> ImageSet:
    return ImageSet((x * 255).round().to(torch.uint8), y, ("a", "b", "c"))


def test_poisons_nothing_and_keeps_the_training_set() -> None:
    attack = Natural()
    attack.validate(4, (3, 12, 12), 200)
    train = toy_set(200, 4)
    attack.prepare(train, generator(0, "prepare"))
    p = attack.poison(train, generator(0, "poison"))
    assert p.num_poison == 0 and torch.equal(p.x, train.x) and torch.equal(p.y, train.y)
    assert attack.describe(200)["n_poison"] == 0


def test_trigger_is_unknown_before_inversion() -> None:
    with pytest.raises(RuntimeError, match="invert"):
        Natural().apply_trigger(torch.rand(1, 3, 8, 8))


def test_invert_reports_every_budget_and_sets_the_chosen_trigger() -> None:
    model = StripeModel()  # class 2 fires on a white bottom-right patch
    attack = Natural(budget=0.05, budgets=[0.1], steps=60, batch_size=24)
    attack.validate(3, (1, 16, 16), 100)
    inversion, evaluation = as_set(*toy_data(96, seed=0)), as_set(*toy_data(150, seed=1))
    report, inverted = attack.invert(
        model, inversion, evaluation, device=torch.device("cpu"), seed=0
    )
    assert list(report) == ["0.05", "0.1"]  # the configured budget joins the sweep
    assert inverted.mask.shape[:2] == (3, 2)
    for r in report.values():
        assert r["target"] == 2 and r["asr"] >= 0.9 and r["n_eval"] == 100
        assert r["mask_area"] <= 0.1 + 1e-6
    assert attack.target_class == 2 and attack.mask is not None
    bd = attack.backdoor_test_set(evaluation)
    assert (bd.y == 2).all() and (bd.y_orig != 2).all() and len(bd) == 100
    state = attack.state_dict()
    other = Natural()
    other.load_state_dict(state)
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(other.apply_trigger(x), attack.apply_trigger(x))


def test_stage_backdoor_test_triggers_the_evaluation_half(tmp_path) -> None:
    attack = Natural(target_class=2, budgets=[0.05], budget=0.05, steps=5, batch_size=8)
    attack.validate(3, (1, 16, 16), 100)
    test = as_set(*toy_data(60, seed=0))
    calls = []

    def memo(compute):
        calls.append(1)
        return compute(), False

    ctx = StageContext("backdoored", 0, torch.device("cpu"), tmp_path, memo)
    out = attack.stage_backdoor_test(test, StripeModel(), ctx)
    inv_idx, eval_idx = attack.split(test, 0)
    bd = out.backdoor_test
    # ``src_index`` points into the whole test set, at evaluation-half images only
    assert set(bd.src_index.tolist()) <= set(eval_idx.tolist())
    assert torch.equal(bd.y_orig, test.y[bd.src_index]) and (bd.y_orig != 2).all()
    assert calls == [1] and out.report["n_evaluation"] == len(eval_idx)
    assert out.report["n_inversion"] == len(inv_idx) and not out.report["from_cache"]
    assert set(out.scalars) == {"natural_asr@0.05"}
    assert (tmp_path / "natural_triggers_backdoored.pt").exists()


def test_fixed_target_inverts_only_that_target() -> None:
    attack = Natural(target_class=1, budgets=[0.05], budget=0.05, steps=5, batch_size=8)
    attack.validate(3, (1, 16, 16), 100)
    data = as_set(*toy_data(30, seed=0))
    report, inverted = attack.invert(StripeModel(), data, data, device=torch.device("cpu"), seed=0)
    assert inverted.targets.tolist() == [1] and report["0.05"]["target"] == 1


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"budgets": [0.0, 0.1]}, "budgets"),
        ({"budget": 1.5}, "budgets"),
        ({"budgets": [True]}, "budgets"),
        ({"steps": 0}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"penalty": -1.0}, "penalty"),
        ({"inversion_fraction": 1.0}, "inversion_fraction"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"attack\.{key}"):
        Natural(**kwargs)


def test_target_outside_the_dataset_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"attack\.target_class"):
        Natural(target_class=7).validate(3, (1, 16, 16), 100)
