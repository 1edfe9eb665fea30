"""The command line end to end, in subprocesses: single runs, sweeps, bad input, kill + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.sweep
ROOT = Path(__file__).resolve().parents[2]


def _env(tmp: Path, cache: str = "cache") -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "BENCH_OUTPUT_DIR": str(tmp / "outputs"),
            "BENCH_CACHE_DIR": str(tmp / cache),
            "BENCH_DATA_DIR": str(tmp / "data"),
            "WANDB_MODE": "offline",
            "WANDB_DIR": str(tmp / "wandb"),
            "WANDB_CONFIG_DIR": str(tmp / "wandb-config"),
            "WANDB_CACHE_DIR": str(tmp / "wandb-cache"),
            "WANDB_DATA_DIR": str(tmp / "wandb-data"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def cli(
    args: list[str], tmp: Path, cache: str = "cache", timeout: float = 1800
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmark.run", *args],
        cwd=ROOT,
        env=_env(tmp, cache),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def records(tmp: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp / "outputs").rglob("metrics.json"))]


def test_single_run_prints_the_table_and_writes_metrics(tmp_path: Path) -> None:
    proc = cli(["debug=smoke", "logger=wandb"], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "clean_acc" in out and "backdoored" in out and "defended" in out
    (record,) = records(tmp_path)
    assert record["status"] == "complete"
    assert record["choices"]["attack"] == "badnets" and record["choices"]["dataset"] == "mnist5k"
    assert "debug=smoke" in record["provenance"]["overrides"]
    run_dir = next((tmp_path / "outputs").rglob("metrics.json")).parent
    assert list(run_dir.glob("wandb/offline-run-*")), "W&B offline run not written"


def test_multirun_sweeps_seeds_and_collects(tmp_path: Path) -> None:
    proc = cli(["-m", "debug=smoke", "logger=none", "seed=0,1"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = records(tmp_path)
    assert sorted(r["seed"] for r in recs) == [0, 1]
    assert all(r["status"] == "complete" for r in recs)
    out = tmp_path / "tables" / "results.csv"
    collect = subprocess.run(
        [
            sys.executable,
            "scripts/collect_results.py",
            str(tmp_path / "outputs"),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert collect.returncode == 0, collect.stderr
    assert len(out.read_text().strip().splitlines()) == 3  # header + two runs
    assert "(n=2)" in out.with_suffix(".md").read_text()


def test_bad_value_gives_one_clear_error_and_a_failed_record(tmp_path: Path) -> None:
    proc = cli(["debug=smoke", "logger=none", "attack.poison_rate=1.5"], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2
    assert "attack.poison_rate: must be a number in (0, 1], got 1.5" in out
    assert "Traceback" not in out
    (record,) = records(tmp_path)
    assert record["status"] == "failed" and "attack.poison_rate" in record["error"]


def test_a_run_that_uses_neither_loads_no_timm_or_torchvision(tmp_path: Path) -> None:
    """Their import costs ~4 s of every start (each bad-setting report, each sweep job)."""
    code = (
        "import sys; sys.argv = ['run', 'debug=smoke', 'logger=none', 'train.grad_clip=-1']\n"
        "import runpy\n"
        "try:\n    runpy.run_module('benchmark.run', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'timm', 'torchvision'}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "train.grad_clip" in proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr


def test_unknown_name_lists_the_options(tmp_path: Path) -> None:
    proc = cli(["attack=badnet"], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "attack=badnet: no such option" in out and "close: badnets" in out, out
    assert not records(tmp_path)


@pytest.mark.slow
def test_killed_run_resumes_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    args = [
        "logger=none",
        "device=cpu",
        "progress=false",
        "dataset.max_train=1500",
        "dataset.max_test=300",
        "train.epochs=4",
    ]
    cmd = [sys.executable, "-m", "benchmark.run", *args]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # Killed at an event (the first per-epoch checkpoint), not at a time; the deadline is a
    # hang guard only.
    deadline = time.time() + 1800
    ckpts: list[Path] = []
    while time.time() < deadline and not ckpts and proc.poll() is None:
        ckpts = list((tmp_path / "cache").rglob("train_ckpt.pt"))
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpts, "no per-epoch checkpoint appeared before the run ended"
    # Nothing looks complete after the kill.
    assert not list((tmp_path / "cache").rglob("entry.sha256"))
    assert all(r["status"] != "complete" for r in records(tmp_path))

    resumed = cli(args, tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout + resumed.stderr
    fresh_tmp = tmp_path / "fresh"
    fresh = cli(args, fresh_tmp)
    assert fresh.returncode == 0
    (a,) = [r for r in records(tmp_path) if r["status"] == "complete"]
    (b,) = records(fresh_tmp)
    assert a["backdoored"] == b["backdoored"]
    assert a["train_history"] == b["train_history"]
