"""Paper-style pivots, writers, heatmaps and the reference comparison (benchmark.tables)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from benchmark.collect import load_records
from benchmark.results import empty_record
from benchmark.tables import (
    load_reference,
    make_tables,
    mean_std,
    metric_pivot,
    reference_comparison,
)

ROOT = Path(__file__).resolve().parents[2]
ROW = ("cifar10", "preact_resnet18", "badnets")


def write_run(
    folder: Path,
    attack: str,
    defense: str,
    seed: int,
    status: str = "complete",
    clean_acc: float = 0.95,
    asr: float = 0.9,
    det_tpr: float | None = None,
    overrides: tuple[str, ...] = (),
) -> None:
    """A fake ``metrics.json`` in the layout ``benchmark.results`` writes."""
    record = empty_record(
        {
            "dataset": "cifar10",
            "model": "preact_resnet18",
            "attack": attack,
            "defense": defense,
            "train": "cifar",
        },
        seed,
    )
    record["status"] = status
    record["attack"] = {"poison_rate": 0.1, "target_class": 0}
    record["provenance"] = {"overrides": [f"attack={attack}", *overrides]}
    if status == "complete":
        record["defended"].update(
            {"clean_acc": clean_acc, "asr": asr, "ra": 0.05, "det_tpr": det_tpr}
        )
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(record))


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Two seeds of badnets/undefended, a failed mmac cell, a partly failed one, an ablation."""
    sweep = tmp_path / "sweep"
    write_run(sweep / "0", "badnets", "undefended", 0, clean_acc=0.94, asr=0.9503)
    write_run(sweep / "1", "badnets", "undefended", 1, clean_acc=0.96, asr=0.9503)
    write_run(sweep / "2", "badnets", "mmac", 0, status="failed")
    write_run(sweep / "3", "blend", "mmac", 0, clean_acc=0.9, asr=0.1, det_tpr=0.75)
    write_run(sweep / "4", "blend", "mmac", 1, status="failed")
    write_run(sweep / "5", "blend", "mmac", 0, asr=0.2, overrides=("defense.bound_floor=0.0",))
    return sweep


def test_mean_std_strings() -> None:
    assert mean_std(pd.Series([0.94, 0.96])) == "95.0 ± 1.4"  # sample std (ddof=1)
    assert mean_std(pd.Series([0.93, 0.95, 0.97])) == "95.0 ± 2.0"
    assert mean_std(pd.Series([0.5])) == "50.0"
    assert mean_std(pd.Series([None, None], dtype=float)) == "-"


def test_pivots_show_mean_std_failed_and_missing(runs: Path) -> None:
    frame = load_records([runs])
    ca = metric_pivot(frame, "clean_acc")
    # The baseline comes first; an ablation is its own column, as in collect.pivot.
    assert list(ca.columns) == ["undefended", "mmac", "mmac [defense.bound_floor=0.0]"]
    assert ca.loc[ROW, "undefended"] == "95.0 ± 1.4"
    assert ca.loc[ROW, "mmac"] == "failed"
    blend = ("cifar10", "preact_resnet18", "blend")
    assert ca.loc[blend, "mmac"] == "90.0 [1 failed]"
    assert ca.loc[blend, "undefended"] == "-"  # never run
    asr = metric_pivot(frame, "asr")
    assert asr.loc[ROW, "undefended"] == "95.0 ± 0.0"
    assert asr.loc[blend, "mmac [defense.bound_floor=0.0]"] == "20.0"
    detection = metric_pivot(frame, "det_tpr")
    assert detection.loc[ROW, "undefended"] == "-"  # no detection: no value, not "failed"
    assert detection.loc[blend, "mmac"] == "75.0 [1 failed]"


def test_make_tables_writes_every_format(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "tables"
    written = make_tables([runs], out, ROOT / "results" / "reference")
    names = {p.name for p in written}
    for stem in ("ca", "asr", "detection"):
        assert {f"{stem}.csv", f"{stem}.md", f"{stem}.tex"} <= names
    assert {"tidy.csv", "heatmap_asr.png", "heatmap_ca.png"} <= names
    assert all(p.exists() for p in written)
    assert len(pd.read_csv(out / "tidy.csv")) == 6
    md = (out / "ca.md").read_text()
    assert "| 95.0 ± 1.4" in md and "| failed" in md
    tex = (out / "ca.tex").read_text()
    assert r"\begin{tabular}" in tex and r"95.0 $\pm$ 1.4" in tex
    assert r"preact\_resnet18" in tex and r"(CA, \%)" in tex  # escaped for LaTeX
    assert "±" not in tex
    csv = pd.read_csv(out / "ca.csv")
    assert csv.loc[csv["attack"] == "badnets", "mmac"].item() == "failed"
    for name in ("heatmap_asr.png", "heatmap_ca.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_reference_comparison_matches_harness_names(runs: Path, tmp_path: Path) -> None:
    reference = load_reference(ROOT / "results" / "reference")
    assert {"source", "clean_acc", "asr", "ra", "poison_rate"} <= set(reference.columns)
    assert reference["source"].str.contains("BackdoorBench").all()
    comparison = reference_comparison(load_records([runs]), reference)
    # Only badnets/undefended at 10% matches: failed runs and the ablation never do, and
    # no reference row exists for mmac.
    assert len(comparison) == 1
    row = comparison.iloc[0]
    assert (row["attack"], row["defense"], row["poison_rate"]) == ("badnets", "undefended", 0.1)
    assert row["n_seeds"] == 2
    assert row["clean_acc_ref"] == pytest.approx(91.32)
    assert row["asr_ref"] == pytest.approx(95.03)
    assert row["ra_ref"] == pytest.approx(4.67)
    assert row["clean_acc_ours"] == pytest.approx(95.0)
    assert row["asr_diff"] == pytest.approx(0.0)
    assert "BackdoorBench" in row["source"]
    out = tmp_path / "tables"
    make_tables([runs], out, ROOT / "results" / "reference")
    md = (out / "reference_comparison.md").read_text()
    assert "91.32" in md and "95.0 ± 1.4" in md and "BackdoorBench" in md
    assert "source" in pd.read_csv(out / "reference_comparison.csv").columns


def test_poison_rate_must_agree_and_no_match_writes_no_comparison(tmp_path: Path) -> None:
    reference = pd.DataFrame(
        {
            "source": ["paper"],
            "dataset": ["cifar10"],
            "model": ["preact_resnet18"],
            "attack": ["badnets"],
            "defense": ["undefended"],
            "poison_rate": [0.05],
            "clean_acc": [92.0],
            "asr": [88.0],
            "ra": [None],
        }
    )
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    reference.to_csv(ref_dir / "paper.csv", index=False)
    write_run(tmp_path / "runs" / "0", "badnets", "undefended", 0)  # poison rate 0.1
    assert reference_comparison(load_records([tmp_path / "runs"]), reference).empty
    written = make_tables([tmp_path / "runs"], tmp_path / "out", ref_dir)
    assert written and not (tmp_path / "out" / "reference_comparison.csv").exists()


def test_no_runs_write_nothing(tmp_path: Path) -> None:
    assert make_tables([tmp_path], tmp_path / "out") == []
    assert not (tmp_path / "out").exists()
