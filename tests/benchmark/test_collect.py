"""Collecting run directories: one row per (setting, seed), labelled by setting, never mixed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from benchmark.collect import load_records, pivot, settings_of
from benchmark.results import empty_record
from tests.benchmark.records import write_record

ROW = ("mnist5k", "small_cnn", "badnets")


def test_tidy_table_and_pivot(tmp_path: Path) -> None:
    write_record(tmp_path / "a", seed=0, asr=0.9, det_tpr=0.8)
    write_record(tmp_path / "b", seed=1, asr=0.7, det_tpr=0.8)
    write_record(tmp_path / "c", ("defense=ulrl",), seed=0, status="failed")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "metrics.json").write_text("{half")  # unreadable: skipped
    frame = load_records([tmp_path])
    assert len(frame) == 3 and set(frame["seed"]) == {0, 1}
    table = pivot(frame)
    assert table.loc[ROW, "undefended"] == "95.0 / 80.0 / 80.0 (n=2)"
    assert table.loc[ROW, "ulrl"] == "failed"


def test_smoke_and_full_runs_of_one_cell_are_never_averaged_and_repeats_count_once(
    tmp_path: Path,
) -> None:
    """The README's commands in one folder: `make run` twice, `debug=smoke` twice, the same
    seeds once more from a sweep. Before, these were one cell of n=11; now a smoke row and a
    full row, each (setting, seed) counted once."""
    full, smoke = (), ("debug=smoke",)
    for i, seed in enumerate([0, 0, 0, 1, 2, 1, 2]):  # seed 0 three times, 1 and 2 twice
        write_record(tmp_path / f"full{i}", full, seed, clean_acc=0.96 + 0.01 * seed)
    for i in range(2):
        write_record(tmp_path / f"smoke{i}", smoke, 0, clean_acc=0.2, asr=0.8)
    frame = load_records([tmp_path])
    assert len(frame) == 4  # (full, 0), (full, 1), (full, 2), (smoke, 0)
    assert len(load_records([tmp_path], keep_duplicates=True)) == 9
    table = pivot(frame)
    labels = sorted(r[2] for r in table.index)
    assert len(labels) == 2 and all(lab.startswith("badnets [") for lab in labels)
    full_label = next(lab for lab in labels if "dataset.max_train=None" in lab)
    smoke_label = next(lab for lab in labels if "dataset.max_train=600" in lab)
    # The label names what differs (debug=smoke's sizes), nothing shared.
    assert "train.epochs=1" in smoke_label and "train.epochs=10" in full_label
    assert "attack.poison_rate" not in full_label
    assert table.loc[("mnist5k", "small_cnn", full_label), "undefended"] == (
        "97.0 / 90.0 / - (n=3)"
    )
    assert table.loc[("mnist5k", "small_cnn", smoke_label), "undefended"] == "20.0 / 80.0 / -"


def test_repeats_that_disagree_are_named_and_the_newest_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_record(tmp_path / "old", seed=0, asr=0.5, timestamp="2026-01-01T00:00:00+00:00")
    write_record(tmp_path / "new", seed=0, asr=0.9, timestamp="2026-02-01T00:00:00+00:00")
    with caplog.at_level(logging.WARNING):
        frame = load_records([tmp_path])
    assert len(frame) == 1 and frame["asr"].item() == 0.9
    assert "disagree" in caplog.text and "old" in caplog.text


def test_a_complete_rerun_replaces_a_failed_run(tmp_path: Path) -> None:
    write_record(tmp_path / "a", seed=0, status="failed", timestamp="2026-03-01T00:00:00+00:00")
    write_record(tmp_path / "b", seed=0, timestamp="2026-01-01T00:00:00+00:00")
    frame = load_records([tmp_path])
    assert list(frame["status"]) == ["complete"]


def test_defense_settings_make_their_own_column(tmp_path: Path) -> None:
    write_record(tmp_path / "a", ("defense=mmac",), asr=0.4)
    write_record(tmp_path / "b", ("defense=mmac", "defense.bound_floor=0.0"), asr=0.2)
    frame = load_records([tmp_path])
    assert sorted(frame["defense_args"]) == ["", "defense.bound_floor=0.0"]
    table = pivot(frame)
    assert list(table.columns) == [
        "mmac [defense.bound_floor=0.0]",
        "mmac [defense.bound_floor=None]",
    ]
    assert table.iloc[0]["mmac [defense.bound_floor=None]"] == "95.0 / 40.0 / -"
    # One backdoored model: the row is shared.
    assert len(table) == 1


def test_settings_every_run_shares_stay_out_of_the_labels(tmp_path: Path) -> None:
    shared = ("dataset.max_train=2000",)
    write_record(tmp_path / "a", shared, 0, asr=0.9)
    write_record(tmp_path / "b", shared, 1, asr=0.7)
    write_record(tmp_path / "c", (*shared, "attack.poison_rate=0.01"), 0, asr=0.3)
    table = pivot(load_records([tmp_path]))
    rows = sorted(r[2] for r in table.index)
    assert rows == ["badnets [attack.poison_rate=0.01]", "badnets [attack.poison_rate=0.1]"]
    assert table.loc[(*ROW[:2], rows[1]), "undefended"] == "95.0 / 80.0 / - (n=2)"


def test_a_key_is_its_content_not_its_path(tmp_path: Path) -> None:
    """Two paths to the same key file are one setting; another file is another setting."""
    facts = {"poison_rate": 0.1, "poison_rate_of_train": 0.1, "key": "k"}
    for name, path, sha in (
        ("a", "/x/k.png", "aa"),
        ("b", "/y/k.png", "aa"),
        ("c", "/x/j.png", "bb"),
    ):
        write_record(
            tmp_path / name,
            ("attack=blend", f"attack.key_path={path}"),
            facts={**facts, "key_sha256": sha},
        )
    frame = load_records([tmp_path])
    assert len(frame) == 2
    assert sorted(frame["row_label"]) == [
        "blend [attack.key_sha256=aa]",
        "blend [attack.key_sha256=bb]",
    ]


def test_records_without_a_config_fall_back_to_their_overrides(tmp_path: Path) -> None:
    """Older records: the overrides (debug and experiment included) tell settings apart."""
    choices = {"dataset": "mnist5k", "model": "small_cnn", "attack": "badnets"}
    choices |= {"defense": "undefended", "train": "small", "debug": None}
    for name, overrides in (("a", []), ("b", ["debug=smoke"]), ("c", [])):
        record = empty_record(choices, 0)
        record.update(status="complete", provenance={"overrides": overrides})
        record["defended"].update(clean_acc=0.9, asr=0.9)
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(record))
    frame = load_records([tmp_path])
    assert len(frame) == 2
    assert sorted(frame["row_label"]) == ["badnets", "badnets [override.debug=smoke]"]
    assert (
        settings_of(json.loads((tmp_path / "b" / "metrics.json").read_text()))["override.debug"]
        == "smoke"
    )
