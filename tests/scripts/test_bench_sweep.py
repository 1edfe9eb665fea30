"""scripts/bench_sweep.py: the summary's counting on hand-written records, and a real (tiny)
cold sweep end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_sweep", ROOT / "scripts/bench_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(
    attack: str,
    defense: str,
    key: str | None,
    hit: bool = False,
    status: str = "complete",
    train_s: float = 0.0,
    defense_s: float = 1.0,
    artifacts: list[dict] | None = None,
) -> dict:
    timing = {
        "validate_s": 0.1,
        "data_s": 0.5,
        "train_s": train_s,
        "eval_backdoored_s": 0.2,
        "defense_s": defense_s,
        "eval_defended_s": 0.2,
    }
    timing["total_s"] = round(sum(timing.values()), 3)
    rec = {
        "status": status,
        "choices": {"attack": attack, "defense": defense, "dataset": "mnist5k", "model": "m"},
        "seed": 0,
        "cache": {"key": key, "hit": hit, "enabled": True} if key else {},
        "timing": timing if status == "complete" else {},
        "defended": {"clean_acc": 0.9, "asr": 0.1},
    }
    if artifacts is not None:
        rec["attack_artifacts"] = artifacts
    return rec


def test_summarise_counts_trainings_hits_and_failures() -> None:
    bs = _script()
    records = [
        _record("badnets", "undefended", "k1", hit=False, train_s=10.0, defense_s=0.0),
        _record("badnets", "mmac", "k1", hit=True, train_s=0.5, defense_s=4.0),
        _record("blend", "undefended", "k2", hit=False, train_s=12.0, defense_s=0.0),
        _record(
            "blend",
            "mmac",
            "k2",
            hit=True,
            train_s=0.5,
            defense_s=6.0,
            artifacts=[
                {"name": "surrogate_clean", "key": "s1", "hit": False, "train_s": 3.0},
                {"name": "lc_poisons", "key": "p1", "hit": True},
            ],
        ),
        _record("sig", "mmac", None, status="failed"),  # failed before the model stage
    ]
    s = bs.summarise(records, wall_s=42.0)
    assert s["cells"] == 5 and s["ran"] == 5 and s["skipped"] == 0
    assert s["complete"] == 4 and s["failed"] == 1
    assert s["cache_hits"] == 2
    assert s["trainings"] == 2  # k1 and k2; the failed cell trained nothing
    assert s["trainings_avoided"] == 3
    assert s["artifact_hits"] == 1 and s["artifact_computed"] == 1
    assert s["per_attack_train_s"] == {"badnets": 10.0, "blend": 12.0}
    assert s["per_defense_s"] == {"mmac": 5.0, "undefended": 0.0}
    assert s["stage_s"]["train_s"] == pytest.approx(23.0)
    assert s["stage_s"]["defense_s"] == pytest.approx(10.0)
    totals = [r["timing"]["total_s"] for r in records[:4]]
    assert s["stage_s"]["total_s"] == pytest.approx(sum(totals))
    assert s["mean_cell_s"] == pytest.approx(sum(totals) / 4, abs=1e-3)
    assert s["wall_s"] == 42.0

    cost = bs.cost_model(s, records)
    per_cell = sum(r["timing"]["total_s"] - r["timing"]["train_s"] for r in records[:4])
    assert cost["estimate_s"] == pytest.approx(22.0 + per_cell, abs=1e-3)
    assert cost["measured_wall_s"] == 42.0


def test_summarise_skipped_cells_count_only_as_cells() -> None:
    bs = _script()
    done = [_record("badnets", "undefended", "k1", train_s=10.0)]
    s = bs.summarise([], wall_s=3.0, skipped=done)
    assert s["cells"] == 1 and s["complete"] == 1 and s["skipped"] == 1 and s["ran"] == 0
    assert s["trainings"] == 0 and s["cache_hits"] == 0
    assert s["stage_s"]["total_s"] == 0 and s["mean_cell_s"] is None


def test_summarise_without_cache_counts_every_cell_as_a_training() -> None:
    bs = _script()
    records = [_record("badnets", d, "k1", train_s=5.0) for d in ("undefended", "mmac")]
    for r in records:
        r["cache"]["enabled"] = False
    s = bs.summarise(records, wall_s=1.0)
    assert s["trainings"] == 2 and s["trainings_avoided"] == 0
    assert s["per_attack_train_s"] == {"badnets": 10.0}


def test_unknown_pass_is_rejected() -> None:
    bs = _script()
    with pytest.raises(SystemExit):
        bs.main(["--passes", "cold,lukewarm"])


@pytest.mark.slow
@pytest.mark.sweep
def test_cold_pass_of_a_small_sweep(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    overrides = [
        "attack=badnets,blend",
        "defense=undefended,linf_prune",
        "dataset.max_train=600",
        "dataset.max_test=200",
        "train.epochs=1",
    ]
    args = ["--passes", "cold", "--experiment", "smoke_full", "--out", str(out)]
    work = tmp_path / "work"
    assert _script().main([*args, "--work-dir", str(work), *overrides]) == 0
    result = json.loads(out.read_text())
    cold = result["passes"]["cold"]
    assert cold["cells"] == 4
    assert cold["complete"] == 4 and cold["failed"] == 0
    assert cold["trainings"] == 2  # one backdoored model per attack ...
    assert cold["cache_hits"] == 2  # ... reused by the second defense
    assert cold["trainings_avoided"] == 2
    assert cold["wall_s"] > 0
    assert set(cold["per_attack_train_s"]) == {"badnets", "blend"}
    assert set(cold["per_defense_s"]) == {"undefended", "linf_prune"}
    assert result["experiment"] == "smoke_full" and result["overrides"] == overrides
    assert result["cost_model"]["estimate_s"] > 0
    assert (work / "cache").is_dir()  # the sweep used the work folder's own cache
