"""The runner with each kind of attack: clean-label surrogates and caching, training-controlled
poisoning through the batch hook, and the natural backdoor's per-stage inversion."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from attacks.wanet import WaNet
from benchmark import backdoored, pipeline
from defenses.base import DefenseResult


def test_label_consistent_trains_and_caches_its_surrogate(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("attack=label_consistent", "attack.steps=5", "attack.adv_train.steps=2")
    first = pipeline.run(cfg, run_dir=tmp_path / "a")
    artifacts = {a["name"]: a for a in first["attack_artifacts"]}
    assert set(artifacts) == {"surrogate_adversarial", "label_consistent_pgd"}
    assert not any(a["hit"] for a in artifacts.values())
    att = first["attack"]
    # smoke: 570 training images, 57 of class 0; half of them poisoned (28.5 rounds up)
    assert att["n_target_class"] == 57 and att["n_poison"] == 29
    assert att["poison_rate_of_target"] == 29 / 57 and att["poison_rate_of_train"] == 29 / 570
    assert (tmp_path / "a" / "poison_grid.png").exists()
    second = pipeline.run(cfg, run_dir=tmp_path / "b")
    assert all(a["hit"] for a in second["attack_artifacts"])
    assert second["cache"]["hit"] and second["backdoored"] == first["backdoored"]
    idx_a = torch.load(tmp_path / "a" / "indices.pt")["poison_index"]
    assert torch.equal(idx_a, torch.load(tmp_path / "b" / "indices.pt")["poison_index"])


def test_wanet_poisons_each_batch_of_the_benign_set(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = {}
    real_fit = backdoored.fit

    def spy(model, data, recipe, **kw):
        seen["data"], seen["hook"] = data, kw.get("batch_hook")
        return real_fit(model, data, recipe, **kw)

    monkeypatch.setattr(backdoored, "fit", spy)
    cfg = make_cfg("attack=wanet")
    record = pipeline.run(cfg, run_dir=tmp_path / "run")
    assert seen["hook"] is not None and seen["hook"].__self__.name == "wanet"
    data = pipeline.load_data(cfg, pipeline.build(cfg))
    assert torch.equal(seen["data"].x, data.benign.x)  # not the static poisoned view
    assert record["attack"]["n_cover"] == 2 * record["attack"]["n_poison"]
    # the grids travel with the cached model and are restored on a cache hit
    entry = Path(cfg.paths.cache_dir) / "attacked" / record["cache"]["key"] / "entry.pt"
    state = torch.load(entry, weights_only=True)["attack_state"]
    assert {"identity_grid", "noise_grid"} <= set(state)
    # ... before the backdoor test set is built from them
    order = []
    for method in ("load_state_dict", "stage_backdoor_test"):
        real = getattr(WaNet, method)

        def spy_method(self, *args, _real=real, _name=method, **kw):
            order.append(_name)
            return _real(self, *args, **kw)

        monkeypatch.setattr(WaNet, method, spy_method)
    again = pipeline.run(cfg, run_dir=tmp_path / "again")
    assert again["cache"]["hit"] and again["backdoored"] == record["backdoored"]
    assert order == ["load_state_dict", "stage_backdoor_test"]


def test_natural_backdoor_is_inverted_per_stage_on_a_disjoint_split(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_cfg("attack=natural", "attack.steps=5", "attack.batch_size=8")
    record = pipeline.run(cfg, run_dir=tmp_path / "run")
    nat = record["natural"]["backdoored"]
    assert list(nat["budgets"]) == ["0.02", "0.04", "0.06", "0.08", "0.1", "0.12"]
    assert nat["n_inversion"] == nat["n_evaluation"] == 100  # the 200 smoke test images
    assert record["backdoored"]["asr"] == pytest.approx(nat["budgets"]["0.06"]["asr"])
    assert record["attack"]["n_poison"] == 0
    # the backdoor test set: evaluation-half images whose label is not the chosen target
    assert record["data"]["n_backdoor_test"] == nat["budgets"]["0.06"]["n_eval"]
    for name in ("natural_triggers_backdoored.pt", "natural_triggers_backdoored.png"):
        assert (tmp_path / "run" / name).exists()
    assert not (tmp_path / "run" / "poison_grid.png").exists()
    assert record["natural"]["defended"] == nat  # undefended: the same model

    # A defense that returns another model gets its own inversion.
    calls = []

    def changed(cfg_, comp, data, model, run_dir):
        calls.append(1)
        other = copy.deepcopy(model)
        with torch.no_grad():
            head = other.last_linear()
            head.bias.add_(torch.linspace(-3, 3, head.bias.numel()))
        return DefenseResult(model=other)

    monkeypatch.setattr(pipeline, "defend", changed)
    record = pipeline.run(cfg, run_dir=tmp_path / "defended")
    assert calls and (tmp_path / "defended" / "natural_triggers_defended.pt").exists()
    # the backdoored model's inversion comes from the cache; the defended model's is new
    assert not nat["from_cache"] and record["natural"]["backdoored"]["from_cache"]
    assert record["natural"]["backdoored"]["budgets"] == nat["budgets"]
    assert not record["natural"]["defended"]["from_cache"]
    saved = json.loads((tmp_path / "defended" / "metrics.json").read_text())
    assert saved["defended"]["asr"] == pytest.approx(
        saved["natural"]["defended"]["budgets"]["0.06"]["asr"]
    )


def test_every_attack_runs_through_the_runner(make_cfg, tmp_path: Path) -> None:
    for name, extra in (("blend", []), ("sig", [])):
        record = pipeline.run(make_cfg(f"attack={name}", *extra), run_dir=tmp_path / name)
        assert record["status"] == "complete"
        assert (tmp_path / name / "poison_grid.png").exists()
