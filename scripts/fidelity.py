"""Our numbers next to the published ones, row by row, and why the rest cannot be compared.

    python scripts/fidelity.py outputs                     # make fidelity
    python scripts/fidelity.py outputs/sweeps/backdoorbench_cifar10 --all-rows

Reads every ``metrics.json`` under the paths and every reference of ``--reference-dir``
(``results/reference/<name>.{csv,yaml}``, see :mod:`benchmark.fidelity`). Prints and writes
into ``--out-dir`` (CSV and Markdown):

- ``cells``: every run cell (one setting, its seeds) with the matched reference row, ours,
  published, the delta and pass/fail at the reference's tolerance (2 points), or
  ``not comparable: <reasons>``;
- ``<reference>``: every reference row of the attacks and defenses the harness implements
  (``--all-rows``: every row) with our comparable numbers where a cell matched.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from benchmark.collect import load_records
from benchmark.fidelity import (
    compare,
    comparison_markdown,
    load_references,
    reference_markdown,
    reference_rows,
)
from benchmark.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def implemented(group: str) -> set[str]:
    """The harness's options of a config group (``attack``, ``defense``)."""
    return {p.stem for p in (ROOT / "conf" / group).glob("*.yaml")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="run/sweep directories or metrics.json files")
    parser.add_argument("--reference-dir", default=str(ROOT / "results" / "reference"))
    parser.add_argument("--out-dir", default="results/fidelity", help="folder for the outputs")
    parser.add_argument(
        "--all-rows", action="store_true", help="list reference rows of methods we lack too"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    references = load_references(args.reference_dir)
    if not references:
        print(f"no reference (*.yaml + *.csv) in {args.reference_dir}", file=sys.stderr)
        return 2
    frame = load_records(args.paths)
    if frame.empty:
        print(f"no metrics.json found under {args.paths}", file=sys.stderr)
        return 1
    out = Path(args.out_dir)
    comparison = compare(frame, references)
    cells_md = "# Run cells\n\n" + comparison_markdown(comparison)
    atomic_write_text(out / "cells.csv", comparison.to_csv(index=False))
    atomic_write_text(out / "cells.md", cells_md)
    print(cells_md)
    attacks, defenses = implemented("attack"), implemented("defense")
    for reference in references:
        rows = reference_rows(comparison, reference)
        if not args.all_rows:
            ours = rows["attack"].isin(attacks) & rows["defense"].isin(defenses)
            left_out = rows[~ours]
            rows = rows[ours]
        text = f"# {reference.name}: every row\n\n" + reference_markdown(rows, reference)
        if not args.all_rows and len(left_out):
            text += (
                f"\n{len(left_out)} more rows name attacks or defenses the harness does not "
                f"implement yet ({', '.join(sorted(set(left_out['attack']) - attacks))}; "
                f"{', '.join(sorted(set(left_out['defense']) - defenses))}); --all-rows "
                "lists them.\n"
            )
        counts = rows["verdict"].value_counts().to_dict()
        text += "\nverdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + "\n"
        name = reference.stem
        atomic_write_text(out / f"{name}.csv", rows.to_csv(index=False))
        atomic_write_text(out / f"{name}.md", text)
        print(text)
    print(f"wrote {out}/cells.{{csv,md}} and one table per reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
