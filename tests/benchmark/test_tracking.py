"""Tracking: the active tracker and per-epoch curves, W&B's staging folder and sync."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from benchmark import tracking
from benchmark.staging import STAGING, remove_stale_staging
from benchmark.tracking import Tracker, WandbTracker
from benchmark.train import fit
from tests.benchmark.test_train import RECIPE, _model
from tests.conftest import toy_set


class CurveTracker(Tracker):
    """Remembers the curves it is given."""

    def __init__(self) -> None:
        self.points: list[tuple[str, dict[str, float]]] = []

    def start(self, config, run_dir, name, group=None, job_type=None) -> None:
        self._activate(True)

    def log_curve(self, prefix: str, stats: Mapping[str, float]) -> None:
        self.points.append((prefix, dict(stats)))

    def finish(self, failed: bool = False) -> None:
        self._activate(False)


def test_curves_need_an_active_tracker_and_get_distinct_prefixes(tmp_path: Path) -> None:
    assert tracking.active() is None
    tracking.curve("backdoored").log({"epoch": 1, "loss": 1.0})  # no tracker: nothing happens
    tracker = CurveTracker()
    tracker.start({}, tmp_path, "run")
    assert tracking.active() is tracker
    names = [tracking.curve(d).prefix for d in ("backdoored", "NONE round 1", "mmac", "mmac")]
    assert names == ["train/backdoored", "train/NONE_round_1", "train/mmac", "train/mmac_2"]
    tracker.finish()
    assert tracking.active() is None
    tracker.start({}, tmp_path, "next run")  # a new run names its curves afresh
    assert tracking.curve("mmac").prefix == "train/mmac"
    tracker.finish()


def test_fit_logs_every_epoch_also_the_resumed_ones(tmp_path: Path) -> None:
    data = toy_set(64)
    tracker = CurveTracker()
    tracker.start({}, tmp_path, "run")
    try:
        ckpt = tmp_path / "ckpt.pt"
        fit(_model(), data, RECIPE, epochs=2, checkpoint=ckpt, progress=False, desc="backdoored")
        fit(_model(), data, RECIPE, epochs=3, checkpoint=ckpt, progress=False, desc="backdoored")
    finally:
        tracker.finish()
    first = [s["epoch"] for p, s in tracker.points if p == "train/backdoored"]
    resumed = [s["epoch"] for p, s in tracker.points if p == "train/backdoored_2"]
    assert first == [1, 2] and resumed == [1, 2, 3]
    assert set(tracker.points[0][1]) >= {"epoch", "loss", "acc", "lr"}
    # The scheduler (milestone 2, gamma 0.1) shows in the lr curve.
    lrs = [s["lr"] for p, s in tracker.points if p == "train/backdoored_2"]
    assert lrs[:2] == [0.05, 0.05] and lrs[2] == pytest.approx(0.005)


def test_stale_staging_of_a_dead_process_is_removed(tmp_path: Path) -> None:
    host = socket.gethostname()
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    dead, alive = int(proc.stdout), os.getpid()
    for name in (f"{host}-{dead}-aaaa", f"{host}-{alive}-bbbb", f"other-host-{dead}-cccc"):
        (tmp_path / STAGING / name / "wandb").mkdir(parents=True)
    removed = remove_stale_staging(tmp_path)
    assert [p.name for p in removed] == [f"{host}-{dead}-aaaa"]
    left = {p.name for p in (tmp_path / STAGING).iterdir()}
    assert left == {f"{host}-{alive}-bbbb", f"other-host-{dead}-cccc"}


def _sync_dry_run(runs: list[Path]) -> str:
    wandb_cli = Path(sys.executable).parent / "wandb"
    out = subprocess.run(
        [str(wandb_cli), "sync", "--dry-run", *map(str, runs)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def test_wandb_run_is_staged_then_published_and_syncs(tmp_path: Path) -> None:
    run_dir = tmp_path / "cell"
    (run_dir / STAGING / f"{socket.gethostname()}-999999999-dead").mkdir(parents=True)
    tracker = WandbTracker(mode="offline")
    tracker.start(OmegaConf.to_container(OmegaConf.create({"a": 1})), run_dir, name="cell")
    live = list(run_dir.glob(f"{STAGING}/*/wandb/offline-run-*"))
    assert len(live) == 1 and not (run_dir / "wandb").exists()  # the stale one is gone
    tracking.curve("backdoored").log({"epoch": 1, "loss": 0.5, "acc": 0.9, "lr": 0.1})
    tracker.log_metrics({"backdoored/asr": 0.968})
    tracker.finish()
    assert tracking.active() is None and not (run_dir / STAGING).exists()
    (run,) = run_dir.glob("wandb/offline-run-*")
    assert run.name == live[0].name
    data = next(run.glob("run-*.wandb")).read_bytes()
    assert b"train/backdoored/loss" in data and b"train/backdoored/epoch" in data
    assert "Would sync 1 run(s)" in _sync_dry_run([run])

    failed = WandbTracker(mode="offline")
    failed.start({}, run_dir, name="cell")
    failed.finish(failed=True)  # a failed cell that closed cleanly is kept, marked failed
    runs = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(runs) == 2
    assert "Would sync 2 run(s)" in _sync_dry_run(runs)
