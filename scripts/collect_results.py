"""Collect run directories into a tidy CSV and a Markdown pivot (attack x defense).

    python scripts/collect_results.py outputs --out results/tables/results.csv

Writes ``<out>`` (one row per setting and seed) and ``<out stem>.md`` (cells "CA / ASR / DR" in
percent, means over seeds of one setting; DR = detection rate, "-" where the defense detects
nothing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmark.collect import load_records, pivot, tidy_csv
from benchmark.io import atomic_write_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="run/sweep directories or metrics.json files")
    parser.add_argument("--out", default="results/tables/results.csv", help="tidy CSV path")
    args = parser.parse_args(argv)
    frame = load_records(args.paths)
    if frame.empty:
        print(f"no metrics.json found under {args.paths}", file=sys.stderr)
        return 1
    out = Path(args.out)
    atomic_write_text(out, tidy_csv(frame))
    table = pivot(frame)
    md = "CA / ASR / DR (%), mean over seeds\n\n" + table.to_markdown() + "\n"
    atomic_write_text(out.with_suffix(".md"), md)
    print(md)
    print(f"wrote {out} ({len(frame)} runs) and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
