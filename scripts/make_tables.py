"""Paper-style tables, heatmaps and reference comparisons from run directories.

    python scripts/make_tables.py outputs --out-dir results/tables

Writes into ``--out-dir``: ``tidy.csv`` (one row per setting and seed),
``{ca,asr,detection}.{csv,md,tex}`` (attack rows x defense columns, "mean ± std [95% CI] n=seeds"
in percent; unlike settings get their own labelled row or column), ``summary.csv`` (the same
statistics as numbers), ``paired.{csv,md}`` (two defenses on the same backdoored models),
``heatmap_{asr,ca}.png`` and ``reference_comparison.{csv,md}`` (every cell next to the published
number of ``--reference-dir``, or why it cannot be compared; ``make fidelity`` shows more).
"""

from __future__ import annotations

import argparse
import logging
import sys

from benchmark.tables import make_tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="run/sweep directories or metrics.json files")
    parser.add_argument("--out-dir", default="results/tables", help="folder for the outputs")
    parser.add_argument(
        "--reference-dir", default="results/reference", help="folder of reference CSVs"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    written = make_tables(args.paths, args.out_dir, args.reference_dir)
    if not written:
        print(f"no metrics.json found under {args.paths}", file=sys.stderr)
        return 1
    print("\n".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
