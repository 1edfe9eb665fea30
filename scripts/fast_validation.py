"""The fast-track validation table from an ``experiment=fast_validation`` sweep.

    python scripts/fast_validation.py outputs/sweeps/fast_validation*
    python scripts/fast_validation.py <folders> --out-dir results/fast_validation --tolerance 0.05

Pairs every (attack, defense) cell's two tracks (``benchmark.tracks``): CA, ASR and RA on the
reference (``standard*``) and the fast track, fast - reference, each defense's effect
(defended - backdoored) per track, and whether every difference is within ``--tolerance``.
Writes ``validation.csv`` (fractions) and ``validation.md`` (percent) into ``--out-dir``. With
``--update`` an earlier ``validation.csv`` there fills in what this sweep lacks, whole cells or
one track of a cell (a study run over several sessions); the sweep's own values replace theirs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from benchmark.collect import load_records
from benchmark.io import atomic_write_text
from benchmark.tracks import TOLERANCE, compare_tracks, markdown, update


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="sweep/run folders or metrics.json files")
    parser.add_argument("--out-dir", default="results/fast_validation", help="output folder")
    parser.add_argument("--reference", default=None, help="reference track (default standard*)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="agreement, fraction")
    parser.add_argument(
        "--update", action="store_true", help="fill in from --out-dir's earlier table"
    )
    args = parser.parse_args(argv)
    frame = load_records(args.paths)
    if frame.empty:
        print(f"no metrics.json found under {args.paths}", file=sys.stderr)
        return 1
    try:
        table = compare_tracks(frame, args.reference, args.tolerance)
        out = Path(args.out_dir)
        if args.update and (out / "validation.csv").exists():
            table = update(table, pd.read_csv(out / "validation.csv"))
    except ValueError as err:
        print(f"fast_validation: {err}", file=sys.stderr)
        return 2
    text = markdown(table)
    atomic_write_text(out / "validation.csv", table.to_csv(index=False))
    atomic_write_text(out / "validation.md", text)
    print(text)
    print(f"wrote {out / 'validation.csv'} and {out / 'validation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
