"""The throughput benchmark runs end to end and writes the documented keys (no timing checks)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.sweep
def test_bench_train_writes_the_documented_keys(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = shlex.split("--models small_cnn --images 256 --epochs 1 --rounds 1 --workers 0")
    cmd = [sys.executable, "scripts/bench_train.py", *args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(out.read_text())["small_cnn"]
    for key in ("fit_images_per_s", "reference_images_per_s", "bare_images_per_s"):
        assert row[key] > 0
    assert row["n_images"] == 256
