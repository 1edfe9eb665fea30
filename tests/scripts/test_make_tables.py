"""scripts/make_tables.py writes the tables of a run folder (the sweep callback that calls
it: tests/benchmark/test_callbacks.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.benchmark.records import write_record

ROOT = Path(__file__).resolve().parents[2]


def _script_main():
    spec = importlib.util.spec_from_file_location("make_tables", ROOT / "scripts/make_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_script_writes_tables(tmp_path: Path) -> None:
    write_record(tmp_path / "runs" / "a", (), 0, clean_acc=0.94)
    write_record(tmp_path / "runs" / "b", (), 1, clean_acc=0.96)
    out = tmp_path / "tables"
    args = [str(tmp_path / "runs"), "--out-dir", str(out)]
    assert _script_main()([*args, "--reference-dir", str(ROOT / "results/reference")]) == 0
    assert "95.0 ± 1.4" in (out / "ca.md").read_text()
    assert (out / "reference_comparison.md").exists()
    assert (out / "heatmap_asr.png").stat().st_size > 0


def test_script_fails_without_runs(tmp_path: Path) -> None:
    assert _script_main()([str(tmp_path), "--out-dir", str(tmp_path / "out")]) == 1
