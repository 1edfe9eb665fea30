"""Sweeps end to end with real processes: failures, kill and resume, parallel launchers."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmark.cache import ModelCache
from benchmark.io import sha256_file
from tests.benchmark.test_run import ROOT, _env, cli

pytestmark = [pytest.mark.sweep, pytest.mark.slow]

SMALL = ["debug=smoke", "logger=none", "progress=false"]
DIVERGES = "train.lr=1000000000.0"


def sweep_records(out: Path) -> dict[str, dict]:
    """Cell folder name -> its metrics.json, for every cell of every sweep under ``out``."""
    return {
        p.parent.name: json.loads(p.read_text())
        for p in sorted((out / "outputs" / "sweeps").rglob("metrics.json"))
    }


def sweep_dir(out: Path) -> Path:
    (folder,) = (out / "outputs" / "sweeps").iterdir()
    return folder


def assert_nothing_looks_complete_that_is_not(out: Path) -> None:
    """Every result or cache entry on disk is either whole or visibly not complete."""
    for name, record in sweep_records(out).items():
        if record["status"] == "complete":
            assert record["defended"]["clean_acc"] is not None, name
            assert record["backdoored"]["asr"] is not None, name
    # A cache entry is complete only when entry.pt matches entry.sha256 (the checksum is
    # written just before the entry is renamed into place, so a kill between the two leaves a
    # checksum without its entry, or beside an older one: both read as incomplete).
    for digest in (out / "cache").rglob("entry.sha256"):
        entry = digest.parent / "entry.pt"
        if entry.exists() and sha256_file(entry) == digest.read_text().strip():
            assert ModelCache(out / "cache").load(digest.parent.name) is not None, digest


def test_failed_cell_is_recorded_the_sweep_goes_on_and_a_rerun_retries_it(
    tmp_path: Path,
) -> None:
    # train.lr=1e9 makes the loss NaN in the first epoch (Hydra writes it 1000000000.0).
    args = ["-m", *SMALL, "train.lr=0.01,1e9"]
    proc = cli(args, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # the sweep reports its failure...
    records = sweep_records(tmp_path)
    assert records["train.lr=0.01"]["status"] == "complete"  # ...after finishing the others
    failed = records[DIVERGES]
    assert failed["status"] == "failed"
    assert "TrainingDiverged" in failed["error"] and "loss became nan" in failed["error"]
    assert "1 cell(s)" in out and DIVERGES in out
    tables = sweep_dir(tmp_path) / "tables"
    assert "failed" in (tables / "asr.csv").read_text()

    # The same command again: the complete cell is skipped, the failed one runs again.
    again = cli(args, tmp_path)
    log = again.stdout + again.stderr
    assert again.returncode == 1
    assert "train.lr=0.01 is already complete; skipping it" in log
    assert "loss became nan" in log
    assert len(list((tmp_path / "outputs" / "sweeps").iterdir())) == 1  # the same folder


def test_fail_fast_stops_the_sweep_at_the_first_failure(tmp_path: Path) -> None:
    proc = cli(["-m", *SMALL, "train.lr=1e9,0.01", "fail_fast=true"], tmp_path)
    assert proc.returncode != 0
    records = sweep_records(tmp_path)
    assert list(records) == [DIVERGES] and records[DIVERGES]["status"] == "failed"


KILL_ARGS = [
    "-m",
    *SMALL,
    "attack=badnets,blend",
    "defense=linf_prune,ulrl",
    "dataset.max_train=1000",
    "dataset.max_test=300",
    "train.epochs=3",
]


# Kill points, read from the sweep's log: each attempt runs until its event appears, is
# killed, and the next resumes. Inside the backdoored training, inside each defense, between
# cells; a last attempt runs to the end.
KILL_EVENTS = (
    r"backdoored epoch 1/3",  # the first model, after its first epoch's checkpoint
    r"linf_prune: \d+ channels",  # inside l-inf pruning (no checkpoints: it starts again)
    r"#1 : ",  # between cells: cell 0 is complete, cell 1 announced
    r"ulrl unlearn epoch 2/",  # inside ULRL's unlearning (resumes from its checkpoint)
    r"ulrl relearn epoch 1/",  # inside ULRL's relearning
    r"#2 : ",  # between cells
    r"backdoored epoch 2/3",  # the Blend model's training
)


def run_until(cmd: list[str], env: dict[str, str], log_path: Path, event: str | None) -> bool:
    """Run ``cmd`` with its output in ``log_path``; SIGKILL it when ``event`` (a regex) shows
    in the log. True if it was killed, False if it ended first. The deadline is a hang guard."""
    pattern = re.compile(event) if event else None
    log_path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + 1800
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        while proc.poll() is None and time.time() < deadline:
            if pattern and pattern.search(log_path.read_text(errors="replace")):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
            pytest.fail(f"hang guard: {cmd} still running after 1800 s")
    return False


def test_sweep_killed_at_progress_events_resumes_to_the_same_table(tmp_path: Path) -> None:
    """SIGKILL the sweep at each of :data:`KILL_EVENTS` in turn, then let it finish.

    ULRL's unlearn and relearn trainings resume from the defense checkpoints, the backdoored
    models from the cache's; cells already complete are skipped.
    """
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "benchmark.run", *KILL_ARGS]
    kills, logs = 0, []
    for attempt, event in enumerate([*KILL_EVENTS, None]):
        log_path = killed / f"attempt{attempt}.log"
        was_killed = run_until(cmd, _env(killed), log_path, event)
        logs.append(log_path.read_text())
        assert_nothing_looks_complete_that_is_not(killed)
        if not was_killed:
            break  # it ended: the last attempt, or an event that had nothing left to happen
        kills += 1
    assert "wrote" in logs[-1] and "Traceback" not in logs[-1], logs[-1]
    assert kills >= 5, f"only {kills} kill events happened"
    text = "\n".join(logs)
    assert "resuming" in text and "already complete; skipping" in text

    fresh = tmp_path / "fresh"
    done = cli(KILL_ARGS, fresh)
    assert done.returncode == 0, done.stdout + done.stderr
    a, b = sweep_records(killed), sweep_records(fresh)
    assert set(a) == set(b) and len(a) == 4
    assert all(r["status"] == "complete" for r in a.values())
    for name in ("ca.csv", "asr.csv", "detection.csv"):
        assert (sweep_dir(killed) / "tables" / name).read_text() == (
            sweep_dir(fresh) / "tables" / name
        ).read_text(), name
    # The per-defense training checkpoints are gone once a cell is complete.
    assert not list((killed / "outputs").rglob("fit*-*.pt"))


def test_the_same_sweep_launched_twice_at_once_loses_no_cell(tmp_path: Path) -> None:
    """Two processes run the same sweep in the same folder at the same time: each cell runs
    once (the other process waits on the cell's lock, then skips it), every cell ends complete
    and equal to a single run's, and no temporary file is left."""
    args = ["-m", *SMALL, "defense=undefended,linf_prune", "train.epochs=2"]
    cmd = [sys.executable, "-m", "benchmark.run", *args]
    twice = tmp_path / "twice"
    procs = [
        subprocess.Popen(
            cmd, cwd=ROOT, env=_env(twice), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for _ in range(2)
    ]
    logs = [p.communicate(timeout=1800)[0].decode() for p in procs]  # a hang guard only
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    # Each cell ran in one process and was skipped by the other (after waiting for it, or
    # after it was complete).
    assert sum(log.count("already complete; skipping") for log in logs) == 2, logs
    assert sum(log.count("][INFO] - results") for log in logs) == 2, logs
    single = tmp_path / "single"
    done = cli(args, single)
    assert done.returncode == 0, done.stdout + done.stderr
    a, b = sweep_records(twice), sweep_records(single)
    assert set(a) == set(b) and len(a) == 2
    for name in a:
        assert a[name]["status"] == "complete", name
        for key in ("backdoored", "defended", "train_history", "counts"):
            assert a[name][key] == b[name][key], (name, key)
    leftovers = [p for p in twice.rglob("*") if ".tmp" in p.name or p.name.startswith(".tmp")]
    assert not leftovers, leftovers


@pytest.mark.parametrize(
    "launcher",
    [
        pytest.param(
            ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"],
            id="submitit_local",
        ),
        pytest.param(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], id="joblib"),
    ],
)  # fmt: skip
def test_parallel_sweep_trains_the_shared_model_once(tmp_path: Path, launcher: list[str]) -> None:
    args = [
        "-m",
        *SMALL,
        "defense=undefended,linf_prune,mmac",
        "dataset.max_train=1500",
        "train.epochs=3",
        *launcher,
    ]
    t0 = time.perf_counter()
    proc = cli(args, tmp_path)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = sweep_records(tmp_path)
    assert len(records) == 3 and all(r["status"] == "complete" for r in records.values())
    caches = [r["cache"] for r in records.values()]
    assert len({c["key"] for c in caches}) == 1  # the three cells share one backdoored model
    assert sum(not c["hit"] for c in caches) == 1, caches  # trained once, loaded twice
    assert (sweep_dir(tmp_path) / "tables" / "asr.md").exists()
    print(f"{launcher[0]}: {wall:.1f} s, lock waits {[c['wait_s'] for c in caches]}")


def test_wandb_runs_of_a_sweep_share_the_experiment_group_and_sync(tmp_path: Path) -> None:
    """Offline W&B: one run per cell and one with the tables, all in the experiment's group,
    all accepted by ``wandb sync`` (``--dry-run``: no network here)."""
    args = ["experiment=smoke_full", "logger=wandb", "attack=badnets", "defense=undefended,mmac"]
    proc = cli(args, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    folder = sweep_dir(tmp_path)
    cell_runs = sorted(folder.glob("*/wandb/offline-run-*/run-*.wandb"))
    (tables_run,) = folder.glob("wandb/offline-run-*/run-*.wandb")  # once per sweep
    assert len(cell_runs) == 2
    # RunRecord.run_group as W&B's protobuf stores it; paths that merely contain the name
    # do not match (wandb_internal_pb2.RunRecord(run_group="smoke_full").SerializeToString()).
    group = b"2\nsmoke_full"
    for run in [*cell_runs, tables_run]:
        assert group in run.read_bytes(), run
    data = tables_run.read_bytes()
    assert b"heatmap/asr" in data and b"table/asr" in data
    wandb_cli = Path(sys.executable).parent / "wandb"
    sync = subprocess.run(
        [str(wandb_cli), "sync", "--dry-run", *(str(p.parent) for p in [*cell_runs, tables_run])],
        capture_output=True,
        text=True,
        timeout=900,
        env=_env(tmp_path),
    )
    assert sync.returncode == 0, sync.stdout + sync.stderr
    assert "Would sync 3 run(s)" in sync.stdout + sync.stderr
