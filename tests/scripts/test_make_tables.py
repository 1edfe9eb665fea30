"""scripts/make_tables.py and the sweep callback write the tables of a run folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from omegaconf import OmegaConf

from benchmark.callbacks import TablesCallback
from tests.benchmark.test_tables import write_run

ROOT = Path(__file__).resolve().parents[2]


def _script_main():
    spec = importlib.util.spec_from_file_location("make_tables", ROOT / "scripts/make_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_script_writes_tables(tmp_path: Path) -> None:
    write_run(tmp_path / "runs" / "a", "badnets", "undefended", 0, clean_acc=0.94)
    write_run(tmp_path / "runs" / "b", "badnets", "undefended", 1, clean_acc=0.96)
    out = tmp_path / "tables"
    args = [str(tmp_path / "runs"), "--out-dir", str(out)]
    assert _script_main()([*args, "--reference-dir", str(ROOT / "results/reference")]) == 0
    assert "95.0 ± 1.4" in (out / "ca.md").read_text()
    assert (out / "reference_comparison.md").exists()
    assert (out / "heatmap_asr.png").stat().st_size > 0


def test_script_fails_without_runs(tmp_path: Path) -> None:
    assert _script_main()([str(tmp_path), "--out-dir", str(tmp_path / "out")]) == 1


def test_callback_writes_sweep_tables(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    write_run(sweep / "0_attack=badnets", "badnets", "undefended", 0)
    write_run(sweep / "1_attack=blend", "blend", "undefended", 0, status="failed")
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    TablesCallback().on_multirun_end(config=config)
    tables = sweep / "tables"
    assert {"tidy.csv", "ca.tex", "asr.md", "heatmap_ca.png", "reference_comparison.csv"} <= {
        p.name for p in tables.iterdir()
    }
    assert "failed" in (tables / "asr.csv").read_text()
    # Running again must not count the tables folder as runs.
    TablesCallback().on_multirun_end(config=config)
    assert "failed" in (tables / "asr.csv").read_text()


def test_callback_never_raises(tmp_path: Path, caplog) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    TablesCallback().on_multirun_end(
        config=OmegaConf.create({"hydra": {"sweep": {"dir": str(empty)}}})
    )
    assert not (empty / "tables").exists()
    # A config without a sweep dir is an error inside the callback; it is logged, not raised.
    TablesCallback().on_multirun_end(config=OmegaConf.create({"hydra": {}}))
    assert "making the sweep's tables failed" in caplog.text
