"""scripts/bench_frontier.py trains and evaluates a point on an image folder and adds it to
its JSON (accuracy and times are recorded, not checked: no timed tests)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location(
        "bench_frontier", ROOT / "scripts/bench_frontier.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def test_points_are_added_to_the_json(tmp_path: Path, monkeypatch) -> None:
    script, out = _script(), tmp_path / "frontier.json"
    base = ["bench_frontier.py", "--root", str(folder(tmp_path / "data")), "--out", str(out)]
    monkeypatch.chdir(tmp_path)  # the dataset cache (paths.cache_dir) stays in tmp_path
    for points in (["4,8,8:1"], ["4,8,8:1", "4,8,8:2"]):  # the first point is replaced
        monkeypatch.setattr(sys, "argv", [*base, "--device", "cpu", "--points", *points])
        script.main()
    rows = json.loads(out.read_text())["points"]
    assert [(r["widths"], r["epochs"]) for r in rows] == [([4, 8, 8], 1), ([4, 8, 8], 2)]
    assert all(r["train_images"] == 12 and r["test_images"] == 4 for r in rows)
    assert all(0.0 <= r["clean_acc"] <= 1.0 and r["total_s"] >= r["train_s"] for r in rows)


def test_a_malformed_point_stops_before_training(tmp_path: Path, monkeypatch) -> None:
    script = _script()
    argv = ["bench_frontier.py", "--root", str(tmp_path), "--points", "32,128:10"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="not <w1>,<w2>,<w3>:<epochs>"):
        script.main()
