"""The sweep callback: folder naming, tables at the end, W&B logging, the failure report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import pytest
from omegaconf import OmegaConf

from benchmark.callbacks import (
    MAX_DIRNAME,
    SweepCallback,
    cell_dirname,
    failed_cells,
    sweep_name,
)
from benchmark.tracking import Tracker
from tests.benchmark.records import write_record


class RecordingTracker(Tracker):
    """A tracker that remembers what it was given (``logger._target_`` in the tests)."""

    calls: ClassVar[list[tuple[str, Any]]] = []

    def start(self, config, run_dir, name, group=None, job_type=None) -> None:
        self.calls.append(("start", {"name": name, "group": group, "job_type": job_type}))

    def log_table(self, key: str, frame: pd.DataFrame) -> None:
        self.calls.append(("table", key))

    def log_image(self, key: str, path: Path, caption: str = "") -> None:
        self.calls.append(("image", key))

    def finish(self, failed: bool = False) -> None:
        self.calls.append(("finish", failed))


def _master(sweep: Path, experiment: str | None = "smoke_all", **extra: Any):
    return OmegaConf.create(
        {
            "hydra": {
                "sweep": {"dir": str(sweep)},
                "runtime": {"choices": {"experiment": experiment}},
                "overrides": {"task": ["seed=0,1"], "hydra": []},
            },
            "paths": {"log_dir": str(sweep.parent)},
            **extra,
        }
    )


def test_sweep_name_is_the_command_in_any_order() -> None:
    assert sweep_name("smoke_all", []) == "smoke_all"
    assert sweep_name("smoke_all", ["experiment=smoke_all", "logger=none"]) == "smoke_all"
    a = sweep_name("smoke_all", ["seed=0,1,2", "train.epochs=3"])
    assert a == sweep_name("smoke_all", ["train.epochs=3", "seed=0,1,2"])
    assert a.startswith("smoke_all-seed_0_1_2_train.epochs_3-")
    assert a != sweep_name("smoke_all", ["seed=0,1", "train.epochs=3"])
    # The same values in another order are the same cells.
    assert sweep_name(None, ["defense=ulrl,mmac"]) == sweep_name(None, ["defense=mmac,ulrl"])
    assert sweep_name(None, ["attack=badnets,blend"]).startswith("sweep-attack_badnets_blend-")
    assert "/" not in sweep_name(None, ["dataset.root=/data/cifar"])


def test_cell_dirname_has_no_slash_and_stays_short_and_unique() -> None:
    assert cell_dirname("attack=badnets,seed=0") == "attack=badnets,seed=0"
    assert cell_dirname("") == "default"
    assert "/" not in cell_dirname("dataset.root=/a/b")
    long_a, long_b = "x=" + "a" * 300 + "1", "x=" + "a" * 300 + "2"
    assert len(cell_dirname(long_a)) == MAX_DIRNAME
    assert cell_dirname(long_a) != cell_dirname(long_b)


def test_start_names_the_folder_and_passes_it_to_the_jobs(tmp_path: Path) -> None:
    config = _master(tmp_path / "old")
    SweepCallback().on_multirun_start(config=config)
    expected = str(tmp_path / "sweeps" / sweep_name("smoke_all", ["seed=0,1"]))
    assert config.hydra.sweep.dir == expected
    assert config.hydra.overrides.hydra == [f"hydra.sweep.dir='{expected}'"]


def test_start_keeps_a_folder_given_on_the_command_line(tmp_path: Path) -> None:
    config = _master(tmp_path / "mine")
    config.hydra.overrides.hydra = [f"hydra.sweep.dir={tmp_path / 'mine'}"]
    SweepCallback().on_multirun_start(config=config)
    assert config.hydra.sweep.dir == str(tmp_path / "mine")
    assert len(config.hydra.overrides.hydra) == 1


def test_end_writes_tables_and_reports_failed_cells(tmp_path: Path, caplog) -> None:
    sweep = tmp_path / "sweep"
    write_record(sweep / "attack=badnets")
    write_record(sweep / "attack=blend", ("attack=blend",), status="failed")
    with pytest.raises(SystemExit) as exit_info:
        SweepCallback().on_multirun_end(config=_master(sweep))
    assert exit_info.value.code == 1
    assert "1 cell(s)" in caplog.text and "attack=blend" in caplog.text
    tables = sweep / "tables"
    assert {"tidy.csv", "ca.tex", "asr.md", "heatmap_ca.png", "reference_comparison.csv"} <= {
        p.name for p in tables.iterdir()
    }
    assert "failed" in (tables / "asr.csv").read_text()
    # Running again must not count the tables folder as runs.
    SweepCallback(exit_on_failure=False).on_multirun_end(config=_master(sweep))
    assert [p.name for p, _ in failed_cells(sweep)] == ["attack=blend"]


def test_end_without_runs_never_raises(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    SweepCallback().on_multirun_end(config=_master(empty))
    assert not (empty / "tables").exists()


def test_end_logs_the_tables_once_to_the_tracker(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    write_record(sweep / "attack=badnets")
    logger = {"_target_": f"{__name__}.RecordingTracker"}
    RecordingTracker.calls.clear()
    SweepCallback().on_multirun_end(config=_master(sweep, logger=logger))
    calls = RecordingTracker.calls
    assert calls[0] == ("start", {"name": "smoke_all-tables", "group": "smoke_all",
                                  "job_type": "tables"})  # fmt: skip
    assert {("table", "table/asr"), ("table", "table/ca"), ("image", "heatmap/asr")} <= set(
        calls[1:-1]
    )
    assert calls[-1] == ("finish", False)
    assert sum(c[0] == "start" for c in calls) == 1


def test_rerun_with_unchanged_tables_logs_no_second_tables_run(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    write_record(sweep / "attack=badnets")
    logger = {"_target_": f"{__name__}.RecordingTracker"}
    RecordingTracker.calls.clear()
    for _ in range(2):  # the second: every cell was skipped as complete
        SweepCallback().on_multirun_end(config=_master(sweep, logger=logger))
    assert sum(c[0] == "start" for c in RecordingTracker.calls) == 1
    assert (sweep / "tables" / "wandb_logged.sha256").is_file()
    write_record(sweep / "attack=blend", ("attack=blend",))  # a new cell: new tables
    SweepCallback().on_multirun_end(config=_master(sweep, logger=logger))
    assert sum(c[0] == "start" for c in RecordingTracker.calls) == 2
