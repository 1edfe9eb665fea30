"""Contract tests over every defense config in conf/defense/, on the smoke setting."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from benchmark import pipeline
from benchmark.types import ImageSet, PoisonedSet
from defenses.base import DefenseContext, DefenseResult, Stage
from tests.registry import assert_registered

DEFENSE_DIR = Path(__file__).resolve().parents[2] / "conf" / "defense"
NAMES = sorted(p.stem for p in DEFENSE_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", NAMES)
def test_defense_contract(name: str, make_cfg, tmp_path: Path, monkeypatch) -> None:
    cfg = make_cfg(f"defense={name}")
    comp = pipeline.build(cfg)
    assert_registered(comp.defense, name, "defenses", NAMES)
    assert isinstance(comp.defense.stage, Stage)
    data = pipeline.load_data(cfg, comp)
    model = pipeline.backdoored_model(cfg, comp, data, tmp_path).model
    state = copy.deepcopy(model.state_dict())
    x0, y0, reserve0 = data.train.x.clone(), data.train.y.clone(), data.reserve.x.clone()

    seen: dict[str, DefenseContext] = {}
    original_run = type(comp.defense).run

    def spy(self, ctx: DefenseContext) -> DefenseResult:
        seen["ctx"] = ctx
        return original_run(self, ctx)

    monkeypatch.setattr(type(comp.defense), "run", spy)
    # Its wall time on the smoke setting is reported by --durations, not asserted: a clock
    # fails on a loaded machine (scripts/bench_sweep.py measures the smoke sweep).
    result = pipeline.defend(cfg, comp, data, model, tmp_path)

    ctx = seen["ctx"]
    # The threat model: no poison marks, no test data.
    assert type(ctx.train_set) is ImageSet and not isinstance(ctx.train_set, PoisonedSet)
    assert type(ctx.clean_set) is ImageSet
    assert not any(isinstance(v, PoisonedSet) for v in vars(ctx).values())
    assert all(v is not data.test for v in vars(ctx).values())
    assert (ctx.model is None) == (comp.defense.stage == Stage.PRE_TRAINING)
    # Inputs are not mutated.
    assert torch.equal(data.train.x, x0) and torch.equal(data.train.y, y0)
    assert torch.equal(data.reserve.x, reserve0)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # The result has the right shapes.
    probe = torch.rand(3, *comp.dataset.image_shape)
    assert result.model(probe).shape == (3, comp.dataset.num_classes)
    if result.train_flags is not None:
        assert result.train_flags.dtype == torch.bool
        assert result.train_flags.shape == (len(data.train),)
    if result.train_scores is not None:
        assert result.train_scores.shape == (len(data.train),)
    assert all(isinstance(v, int | float | str | bool | None) for v in result.extras.values())
