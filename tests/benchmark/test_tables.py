"""Paper-style pivots with n / mean / std / CI, writers, heatmaps, summary and paired tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from benchmark.collect import load_records
from benchmark.tables import make_tables, mean_std, metric_pivot, summary_table
from tests.benchmark.records import write_record

ROOT = Path(__file__).resolve().parents[2]
ROW = ("mnist5k", "small_cnn", "badnets")
BLEND = ("mnist5k", "small_cnn", "blend")


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Two seeds of badnets/undefended, a failed mmac cell, a partly failed one, an ablation."""
    sweep = tmp_path / "sweep"
    write_record(sweep / "0", (), 0, clean_acc=0.94, asr=0.9503)
    write_record(sweep / "1", (), 1, clean_acc=0.96, asr=0.9503)
    write_record(sweep / "2", ("defense=mmac",), 0, status="failed")
    write_record(
        sweep / "3", ("attack=blend", "defense=mmac"), 0, clean_acc=0.9, asr=0.1, det_tpr=0.75
    )
    write_record(sweep / "4", ("attack=blend", "defense=mmac"), 1, status="failed")
    write_record(
        sweep / "5", ("attack=blend", "defense=mmac", "defense.bound_floor=0.0"), 0, asr=0.2
    )
    return sweep


def test_mean_std_strings_carry_the_interval_and_n() -> None:
    assert mean_std(pd.Series([0.94, 0.96])) == "95.0 ± 1.4 [82.3, 107.7] n=2"
    assert mean_std(pd.Series([0.93, 0.95, 0.97])) == "95.0 ± 2.0 [90.0, 100.0] n=3"
    assert mean_std(pd.Series([0.5])) == "50.0 n=1"
    assert mean_std(pd.Series([None, None], dtype=float)) == "-"


def test_pivots_show_statistics_failed_and_missing(runs: Path) -> None:
    frame = load_records([runs])
    ca = metric_pivot(frame, "clean_acc")
    assert list(ca.columns) == [
        "undefended", "mmac [defense.bound_floor=0.0]", "mmac [defense.bound_floor=None]"
    ]  # fmt: skip
    assert ca.loc[ROW, "undefended"] == "95.0 ± 1.4 [82.3, 107.7] n=2"
    assert ca.loc[ROW, "mmac [defense.bound_floor=None]"] == "failed"
    assert ca.loc[BLEND, "mmac [defense.bound_floor=None]"] == "90.0 n=1 [1 failed]"
    assert ca.loc[BLEND, "undefended"] == "-"  # never run
    detection = metric_pivot(frame, "det_tpr")
    assert detection.loc[ROW, "undefended"] == "-"  # no detection: no value, not "failed"


def test_summary_table_has_numbers_per_cell_and_metric(runs: Path) -> None:
    summary = summary_table(load_records([runs]))
    row = summary[(summary["attack"] == "badnets") & (summary["defense"] == "undefended")]
    ca = row[row["metric"] == "clean_acc"].iloc[0]
    assert (ca["n"], ca["mean"], ca["n_failed"]) == (2, pytest.approx(95.0), 0)
    assert ca["ci_low"] == pytest.approx(82.29, abs=0.01)


def test_make_tables_writes_every_format(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "tables"
    written = make_tables([runs], out, ROOT / "results" / "reference")
    names = {p.name for p in written}
    for stem in ("ca", "asr", "detection"):
        assert {f"{stem}.csv", f"{stem}.md", f"{stem}.tex"} <= names
    assert {"tidy.csv", "heatmap_asr.png", "heatmap_ca.png", "summary.csv"} <= names
    assert {"reference_comparison.csv", "reference_comparison.md"} <= names
    assert all(p.exists() for p in written)
    tidy = pd.read_csv(out / "tidy.csv")
    assert len(tidy) == 6 and "settings" not in tidy.columns and "setting" in tidy.columns
    md = (out / "ca.md").read_text()
    assert "95.0 ± 1.4 [82.3, 107.7] n=2" in md and "| failed" in md and "95% CI" in md
    tex = (out / "ca.tex").read_text()
    assert r"\begin{tabular}" in tex and r"95.0 $\pm$ 1.4" in tex
    assert r"small\_cnn" in tex and r"(CA, \%)" in tex and r"95\% CI" in tex
    assert "±" not in tex
    for name in ("heatmap_asr.png", "heatmap_ca.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
    # Every run cell gets a comparison row; mnist5k cells are never matched to CIFAR numbers.
    comparison = pd.read_csv(out / "reference_comparison.csv")
    assert set(comparison["status"]) <= {"not comparable", "failed"}
    assert comparison["reasons"].str.contains("dataset mnist5k: not in the reference").any()


def test_paired_table_is_written_for_defenses_sharing_models(tmp_path: Path) -> None:
    for seed in range(2):
        for defense, asr in (("ulrl", 0.1), ("NONE", 0.3)):
            write_record(tmp_path / f"{defense}{seed}", (f"defense={defense}",), seed, asr=asr)
    make_tables([tmp_path], tmp_path / "out")
    paired = pd.read_csv(tmp_path / "out" / "paired.csv")
    asr = paired[paired["metric"] == "asr"].iloc[0]
    assert asr["n_pairs"] == 2 and asr["mean_diff"] == pytest.approx(20.0)
    assert "+20.0" in (tmp_path / "out" / "paired.md").read_text()


def test_no_runs_write_nothing(tmp_path: Path) -> None:
    assert make_tables([tmp_path], tmp_path / "out") == []
    assert not (tmp_path / "out").exists()


def test_heatmap_title_is_wrapped_inside_the_figure() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from benchmark.tables import heatmap_figure, heatmap_png

    means = pd.DataFrame({"undefended": [99.0]}, index=[("mnist5k", "small_cnn", "badnets")])
    title = "Attack success rate (ASR, %), mean over seeds, of a rather long experiment name " * 2
    fig = heatmap_figure(means, title)
    FigureCanvasAgg(fig).draw()
    text = fig._suptitle  # the title, centred on the figure
    box = text.get_window_extent()
    assert "\n" in text.get_text()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height
    assert heatmap_png(means, title).startswith(b"\x89PNG")
