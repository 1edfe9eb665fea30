"""The fast-track benchmark runs end to end and writes the documented keys (no timing checks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.sweep
def test_bench_fast_writes_the_documented_keys(tmp_path: Path) -> None:
    out = tmp_path / "fast.json"
    args = ["--devices", "cpu", "--images", "64", "--epochs", "2", "--out", str(out)]
    args += ["train.batch_size=32", "model.widths=[8,16,16]"]
    cmd = [sys.executable, "scripts/bench_fast.py", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout, not an installed copy
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(out.read_text())["cpu"]
    assert row["images"] == 64 and len(row["epoch_s"]) == 2
    assert row["steady_images_per_s"] > 0 and row["whiten_init_s"] >= 0
