"""scripts/fidelity.py (make fidelity): every reference row with ours, and why the rest is not
comparable, printed and written as CSV and Markdown."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from tests.benchmark.records import write_record

ROOT = Path(__file__).resolve().parents[2]
CIFAR = ("dataset=cifar10", "model=preact_resnet18")


def _script_main():
    spec = importlib.util.spec_from_file_location("fidelity", ROOT / "scripts/fidelity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_fidelity_lists_reference_rows_and_reasons(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    write_record(runs / "a", (*CIFAR, "attack_setting=backdoorbench/badnets"), 0, clean_acc=0.91,
                 asr=0.95, ra=0.05)  # fmt: skip
    write_record(runs / "b", (*CIFAR, "attack_setting=backdoorbench/badnets", "debug=smoke"))
    write_record(runs / "c", (*CIFAR, "attack_setting=backdoorbench/badnets", "defense=NONE"))
    out = tmp_path / "fidelity"
    assert _script_main()([str(runs), "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pass" in printed and "epochs: 1, the reference used 100" in printed
    assert "defense NONE: no reference row" in printed
    cells = pd.read_csv(out / "cells.csv")
    assert sorted(cells["status"]) == ["not comparable", "not comparable", "pass"]
    rows = pd.read_csv(out / "backdoorbench_cifar10.csv")
    # Only rows of implemented attacks and defenses are listed (the rest are counted): the
    # leaderboard's defenses that conf/defense/ has (ft, fp, anp, ... as they are added).
    published = set(pd.read_csv(ROOT / "results/reference/backdoorbench_cifar10.csv")["defense"])
    implemented = {p.stem for p in (ROOT / "conf/defense").glob("*.yaml")}
    assert set(rows["defense"]) == published & implemented and "undefended" in set(rows["defense"])
    assert set(rows["attack"]) == {"badnets", "blend", "label_consistent", "sig", "wanet"}
    hit = rows[(rows["attack"] == "badnets") & (rows["poison_rate"] == 0.1)].iloc[0]
    assert hit["verdict"] == "pass" and hit["clean_acc_diff"] == pytest.approx(91.0 - 91.32)
    assert "more rows name attacks or defenses the harness does not implement" in printed
    assert (out / "cells.md").read_text().startswith("# Run cells")


def test_fidelity_fails_without_runs(tmp_path: Path) -> None:
    assert _script_main()([str(tmp_path), "--out-dir", str(tmp_path / "out")]) == 1
