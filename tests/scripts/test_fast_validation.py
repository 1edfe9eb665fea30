"""scripts/fast_validation.py writes the validation table of a two-track sweep, and refuses
one it cannot pair with one line and exit 2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

from tests.benchmark.records import write_record

ROOT = Path(__file__).resolve().parents[2]


def _script_main():
    spec = importlib.util.spec_from_file_location(
        "fast_validation", ROOT / "scripts/fast_validation.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_script_writes_the_paired_table(tmp_path: Path, capsys) -> None:
    for track, asr in (("standard_cpu", 0.9), ("fast_cpu", 0.75)):
        write_record(tmp_path / "runs" / track, (f"track={track}",), asr=asr,
                     choices={"track": track})  # fmt: skip
    out = tmp_path / "table"
    assert _script_main()([str(tmp_path / "runs"), "--out-dir", str(out)]) == 0
    table = pd.read_csv(out / "validation.csv")
    assert abs(table["d_asr"].iloc[0] + 0.15) < 1e-9 and not table["agrees"].iloc[0]
    assert "90.0 / 75.0 (-15.0)" in (out / "validation.md").read_text()


def test_script_refuses_a_single_track(tmp_path: Path, capsys) -> None:
    write_record(tmp_path / "runs" / "a", ("track=fast_cpu",), choices={"track": "fast_cpu"})
    assert _script_main()([str(tmp_path / "runs"), "--out-dir", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compares two tracks" in err
    assert not (tmp_path / "t").exists()


def test_script_update_keeps_the_earlier_cells(tmp_path: Path) -> None:
    out = tmp_path / "table"
    for name, defense in (("first", "nc"), ("second", "clp")):
        for track in ("standard_cpu", "fast_cpu"):
            write_record(tmp_path / name / track, (f"track={track}", f"defense={defense}"),
                         choices={"track": track})  # fmt: skip
        args = [str(tmp_path / name), "--out-dir", str(out)]
        assert _script_main()([*args, "--update"]) == 0
    assert sorted(pd.read_csv(out / "validation.csv")["defense"]) == ["clp", "nc"]
    assert _script_main()([str(tmp_path / "second"), "--out-dir", str(out)]) == 0
    assert list(pd.read_csv(out / "validation.csv")["defense"]) == ["clp"]  # without --update
