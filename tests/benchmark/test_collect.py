"""Collecting run directories into the tidy table and the pivot."""

from __future__ import annotations

import json
from pathlib import Path

from benchmark.collect import load_records, pivot
from benchmark.results import empty_record


def _write(
    folder: Path,
    attack: str,
    defense: str,
    seed: int,
    status: str = "complete",
    asr: float = 0.9,
    overrides: tuple[str, ...] = (),
) -> None:
    record = empty_record(
        {
            "dataset": "mnist5k",
            "model": "small_cnn",
            "attack": attack,
            "defense": defense,
            "train": "small",
        },
        seed,
    )
    record["status"] = status
    record["provenance"] = {"overrides": [f"attack={attack}", *overrides]}
    if status == "complete":
        record["backdoored"] = {"clean_acc": 0.97, "asr": 0.99, "ra": 0.01}
        record["defended"].update({"clean_acc": 0.95, "asr": asr, "ra": 0.1, "det_tpr": 0.8})
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(record))


def test_tidy_table_and_pivot(tmp_path: Path) -> None:
    _write(tmp_path / "a", "badnets", "undefended", 0, asr=0.9)
    _write(tmp_path / "b", "badnets", "undefended", 1, asr=0.7)
    _write(tmp_path / "c", "badnets", "other", 0, status="failed")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "metrics.json").write_text("{half")  # unreadable: skipped
    frame = load_records([tmp_path])
    assert len(frame) == 3
    assert set(frame["seed"]) == {0, 1}
    table = pivot(frame)
    row = ("mnist5k", "small_cnn", "badnets")
    assert table.loc[row, "undefended"] == "95.0 / 80.0 / 80.0 (n=2)"
    assert table.loc[row, "other"] == "failed"


def test_defense_settings_make_their_own_column(tmp_path: Path) -> None:
    _write(tmp_path / "a", "badnets", "mmac", 0, asr=0.4)
    _write(tmp_path / "b", "badnets", "mmac", 0, asr=0.2, overrides=("defense.bound_floor=0.0",))
    frame = load_records([tmp_path])
    assert sorted(frame["defense_args"]) == ["", "defense.bound_floor=0.0"]
    table = pivot(frame)
    assert list(table.columns) == ["mmac", "mmac [defense.bound_floor=0.0]"]
    assert table.iloc[0]["mmac"] == "95.0 / 40.0 / 80.0"
    assert table.iloc[0]["mmac [defense.bound_floor=0.0]"] == "95.0 / 20.0 / 80.0"


def test_other_settings_make_their_own_row_and_shared_ones_are_not_shown(tmp_path: Path) -> None:
    shared = ("dataset.max_train=2000", "dataset.root=/data", "seed=0", "logger=none")
    _write(tmp_path / "a", "badnets", "undefended", 0, asr=0.9, overrides=shared)
    _write(tmp_path / "b", "badnets", "undefended", 1, asr=0.7, overrides=shared)
    _write(
        tmp_path / "c",
        "badnets",
        "undefended",
        0,
        asr=0.3,
        overrides=(*shared, "attack.poison_rate=0.01", "defense.x=1"),
    )
    frame = load_records([tmp_path])
    assert sorted(frame["run_args"]) == [
        "attack.poison_rate=0.01,dataset.max_train=2000",
        "dataset.max_train=2000",
        "dataset.max_train=2000",
    ]
    table = pivot(frame)
    rows = [r[2] for r in table.index]
    assert rows == ["badnets", "badnets [attack.poison_rate=0.01]"]
    # The two seeds of the default setting are averaged; the 1% run is not mixed in.
    assert table.loc[("mnist5k", "small_cnn", "badnets"), "undefended"] == (
        "95.0 / 80.0 / 80.0 (n=2)"
    )
