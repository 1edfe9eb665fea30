"""The fast-track validation table: two tracks per cell, their differences, never unlike
settings averaged."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from benchmark.collect import load_records
from benchmark.tracks import compare_tracks, markdown, update
from tests.benchmark.records import write_record


def track_record(folder: Path, track: str, defense: str, seed: int = 0, **metrics) -> None:
    overrides = (f"track={track}", f"defense={defense}")
    write_record(folder, overrides, seed, choices={"track": track}, **metrics)


def test_the_tracks_side_by_side_with_differences_and_defense_effects(tmp_path: Path) -> None:
    # backdoored (records.py): CA 0.97, ASR 0.99 on both tracks
    for seed, asr in ((0, 0.10), (1, 0.20)):
        track_record(tmp_path / f"s{seed}", "standard_cpu", "ulrl", seed, asr=asr, clean_acc=0.9)
    track_record(tmp_path / "f0", "fast_cpu", "ulrl", 0, asr=0.45, clean_acc=0.92)
    track_record(tmp_path / "f1", "fast_cpu", "ulrl", 1, asr=0.55, clean_acc=0.92)
    track_record(tmp_path / "su", "standard_cpu", "undefended", asr=0.99, clean_acc=0.97)
    track_record(tmp_path / "fu", "fast_cpu", "undefended", asr=0.95, clean_acc=0.97)
    compared = compare_tracks(load_records([tmp_path]))
    table = compared.set_index("defense")
    assert table.attrs["reference"] == "standard_cpu" and table.attrs["fast"] == "fast_cpu"
    ulrl = table.loc["ulrl"]
    assert ulrl["asr_standard_cpu"] == pytest.approx(0.15) and ulrl["asr_fast_cpu"] == 0.5
    assert ulrl["d_asr"] == pytest.approx(0.35) and ulrl["d_clean_acc"] == pytest.approx(0.02)
    assert ulrl["effect_asr_standard_cpu"] == pytest.approx(0.15 - 0.99)
    assert ulrl["d_effect_asr"] == pytest.approx(0.35)
    assert ulrl["n_seeds_fast_cpu"] == 2 and not ulrl["agrees"]  # 35 points apart
    undefended = table.loc["undefended"]
    assert undefended["d_asr"] == pytest.approx(-0.04) and undefended["agrees"]
    text = markdown(compared)
    assert "15.0 / 50.0 (+35.0)" in text and "-84.0 / -49.0" in text


def test_a_looser_tolerance_and_an_explicit_reference(tmp_path: Path) -> None:
    track_record(tmp_path / "a", "standard_cpu", "ulrl", asr=0.1)
    track_record(tmp_path / "b", "fast_cpu", "ulrl", asr=0.4)
    frame = load_records([tmp_path])
    assert compare_tracks(frame, tolerance=0.5)["agrees"].all()
    swapped = compare_tracks(frame, reference="fast_cpu")
    assert swapped["d_asr"].iloc[0] == pytest.approx(-0.3)


def test_a_cell_on_one_track_only_is_shown_but_not_compared(tmp_path: Path) -> None:
    track_record(tmp_path / "a", "standard_cpu", "undefended")
    track_record(tmp_path / "b", "fast_cpu", "undefended")
    track_record(tmp_path / "c", "fast_cpu", "ulrl", asr=0.3)  # standard_cpu's still running
    table = compare_tracks(load_records([tmp_path]))
    by = table.set_index("defense")["agrees"]
    assert by["undefended"] is True and by["ulrl"] is None
    line = next(row for row in markdown(table).splitlines() if "| ulrl" in row)
    assert "- / 30.0 (-)" in line and line.replace(" ", "").endswith("|-|")


def test_unlike_settings_in_one_cell_are_refused(tmp_path: Path) -> None:
    track_record(tmp_path / "a", "standard_cpu", "ulrl")
    track_record(tmp_path / "b", "fast_cpu", "ulrl")
    write_record(
        tmp_path / "c",
        ("track=fast_cpu", "defense=ulrl", "debug=smoke"),
        choices={"track": "fast_cpu"},
    )
    with pytest.raises(ValueError, match="unlike settings in one cell"):
        compare_tracks(load_records([tmp_path]))


def test_one_track_or_no_standard_track_is_refused(tmp_path: Path) -> None:
    track_record(tmp_path / "a", "fast_cpu", "ulrl")
    with pytest.raises(ValueError, match="compares two tracks"):
        compare_tracks(load_records([tmp_path]))
    track_record(tmp_path / "b", "fast", "ulrl")
    with pytest.raises(ValueError, match="no single standard"):
        compare_tracks(load_records([tmp_path]))


def test_update_keeps_the_earlier_cells_and_replaces_the_rerun_ones(tmp_path: Path) -> None:
    for track, asr in (("standard_cpu", 0.2), ("fast_cpu", 0.5)):  # an earlier session
        track_record(tmp_path / "old" / track, track, "undefended", asr=asr)
        track_record(tmp_path / "old" / f"{track}_nc", track, "nc", asr=asr)
    earlier = tmp_path / "validation.csv"
    compare_tracks(load_records([tmp_path / "old"])).to_csv(earlier, index=False)
    assert not pd.read_csv(earlier)["agrees"].any()  # 30 points apart at the default 0.10
    track_record(tmp_path / "new" / "s", "standard_cpu", "undefended", asr=0.9)
    track_record(tmp_path / "new" / "f", "fast_cpu", "undefended", asr=0.85)  # a rerun
    track_record(tmp_path / "new" / "c", "fast_cpu", "clp", asr=0.1)  # standard not run yet
    new = compare_tracks(load_records([tmp_path / "new"]), tolerance=0.4)
    merged = update(new, pd.read_csv(earlier))
    by = merged.set_index("defense")
    assert list(by.index) == ["clp", "nc", "undefended"]
    assert by.loc["undefended", "asr_fast_cpu"] == 0.85  # the rerun replaces the earlier cell
    assert by.loc["nc", "asr_standard_cpu"] == 0.2  # the earlier cell is kept
    # agrees is recomputed at the new table's tolerance: the kept 30-point gap agrees at 0.4
    assert by.loc["clp", "agrees"] is None and by.loc["nc", "agrees"] is True
    assert merged.attrs["tolerance"] == 0.4 and "| clp" in markdown(merged)
    strict = update(compare_tracks(load_records([tmp_path / "new"])), pd.read_csv(earlier))
    assert strict.set_index("defense").loc["nc", "agrees"] is False


def test_update_fills_a_track_the_new_sweep_did_not_rerun(tmp_path: Path) -> None:
    track_record(tmp_path / "old" / "s", "standard_cpu", "clp", asr=0.7)
    track_record(tmp_path / "old" / "f", "fast_cpu", "clp", asr=0.6)
    earlier = compare_tracks(load_records([tmp_path / "old"]))
    track_record(tmp_path / "new" / "s", "standard_cpu", "undefended")
    track_record(tmp_path / "new" / "f", "fast_cpu", "undefended")
    track_record(tmp_path / "new" / "c", "fast_cpu", "clp", asr=0.1)  # only fast rerun
    new = compare_tracks(load_records([tmp_path / "new"]))
    assert new.set_index("defense").loc["clp", "agrees"] is None
    clp = update(new, earlier).set_index("defense").loc["clp"]
    assert clp["asr_standard_cpu"] == 0.7 and clp["asr_fast_cpu"] == 0.1
    assert clp["d_asr"] == pytest.approx(-0.6) and clp["agrees"] is False


def test_update_refuses_a_table_of_other_tracks(tmp_path: Path) -> None:
    track_record(tmp_path / "a", "standard_cpu", "ulrl")
    track_record(tmp_path / "b", "fast_cpu", "ulrl")
    table = compare_tracks(load_records([tmp_path]))
    other = table.rename(columns=lambda c: c.replace("fast_cpu", "fast"))
    with pytest.raises(ValueError, match="compares other tracks"):
        update(table, other)
