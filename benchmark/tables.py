"""Paper-style tables, statistics, heatmaps and reference comparisons from the tidy table.

The tidy table comes from :func:`benchmark.collect.load_records` (one row per setting and seed,
rates as fractions, rows and columns labelled by setting). From it:

- :func:`metric_pivot`: (dataset, model, attack) rows x defense columns of one metric, cells
  "mean ± std [95% CI] n=<seeds>" in percent (:mod:`benchmark.stats`), "failed" where every run
  of the cell failed, "-" where the runs have no value (e.g. no detection). Unlike settings are
  never one cell: a row or column label names the settings in which its runs differ;
- :func:`summary_table`: the same statistics as numbers, one row per cell and metric;
- :func:`benchmark.stats.paired_comparison`: two defenses on the same backdoored models;
- :func:`benchmark.fidelity.compare`: our cells next to published numbers, or why not;
- :func:`make_tables`: everything above written as CSV, Markdown, LaTeX and PNG.
"""

from __future__ import annotations

import io
import logging
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from benchmark import fidelity
from benchmark.collect import load_records, tidy_csv
from benchmark.io import atomic_write_bytes, atomic_write_text
from benchmark.stats import paired_comparison, summarize

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

ROW_KEYS = ["dataset", "model", "attack"]
LABEL_KEYS = ["dataset", "model", "row_label", "column_label"]
# Output name -> (tidy column, title). det_tpr is the detection rate (DR).
PIVOTS = {
    "ca": ("clean_acc", "Clean accuracy (CA, %)"),
    "asr": ("asr", "Attack success rate (ASR, %)"),
    "detection": ("det_tpr", "Detection rate (DR = det_tpr, %)"),
}
SUMMARY_METRICS = ("clean_acc", "asr", "ra", "det_tpr", "det_fpr", "det_auroc", "der")
BASELINE = "undefended"
CELL_FORMAT = "mean ± std [95% CI over seeds] n=seeds"


def mean_std(values: pd.Series, digits: int = 1) -> str:
    """``values`` (fractions) in percent as "mean ± std [95% CI] n=k" ("mean n=1" for one
    value, "-" for none)."""
    return summarize(values.astype(float) * 100).text(digits)


def _cell(group: pd.DataFrame, column: str) -> str:
    done = group[group["status"] == "complete"]
    if done.empty:
        return "failed"
    text = mean_std(done[column])
    failed = len(group) - len(done)
    # A cell whose mean hides failed seeds must say so, or a flaky defense looks stable.
    if failed and text != "-":
        text += f" [{failed} failed]"
    return text


def _ordered_columns(columns: Iterable[str]) -> list[str]:
    """The no-defense baseline first (the paper convention), the rest alphabetically."""
    cols = sorted(columns)
    return [c for c in cols if c == BASELINE] + [c for c in cols if c != BASELINE]


def _labelled(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with ``attack`` / ``defense`` replaced by their setting labels."""
    return frame.assign(attack=frame["row_label"], defense=frame["column_label"])


def metric_pivot(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """(dataset, model, attack) rows x defense columns of ``column`` (see the module docstring)."""
    if frame.empty:
        return pd.DataFrame()
    frame = _labelled(frame)
    cells = {k: _cell(g, column) for k, g in frame.groupby([*ROW_KEYS, "defense"], dropna=False)}
    table = pd.Series(cells, dtype=object).unstack().fillna("-")
    table = table[_ordered_columns(table.columns)]
    table.index.names, table.columns.name = ROW_KEYS, "defense"
    return table


def metric_means(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Like :func:`metric_pivot` but numeric: means over complete runs in percent, NaN else."""
    frame = _labelled(frame)
    done = frame[frame["status"] == "complete"]
    if done.empty:
        return pd.DataFrame()
    done = done.assign(value=done[column].astype(float) * 100)
    table = done.pivot_table(
        index=ROW_KEYS, columns="defense", values="value", aggfunc="mean", dropna=False
    )
    # Same rows and columns as the text pivot, so failed cells show up as blanks, not vanish.
    rows = pd.MultiIndex.from_frame(frame[ROW_KEYS].drop_duplicates()).sort_values()
    return table.reindex(index=rows, columns=_ordered_columns(frame["defense"].unique()))


def summary_table(frame: pd.DataFrame, columns: Iterable[str] = SUMMARY_METRICS) -> pd.DataFrame:
    """One row per cell and metric: ``n`` (seeds), ``mean``, ``std``, ``ci_low``, ``ci_high``
    in percent over the complete runs, ``n_failed``, and the cell's setting digests."""
    rows = []
    for key, group in _labelled(frame).groupby([*ROW_KEYS, "defense"], dropna=False):
        done = group[group["status"] == "complete"]
        for column in columns:
            s = summarize(done[column].astype(float) * 100)
            rows.append(
                {
                    **dict(zip([*ROW_KEYS, "defense"], key, strict=True)),
                    "metric": column,
                    "n": s.n,
                    "mean": s.mean,
                    "std": s.std,
                    "ci_low": s.ci_low,
                    "ci_high": s.ci_high,
                    "n_failed": int((group["status"] != "complete").sum()),
                    "settings": ",".join(sorted(group["setting"].unique())),
                }
            )
    return pd.DataFrame(rows)


def paired_markdown(paired: pd.DataFrame) -> str:
    """The paired comparisons as Markdown: "mean difference [95% CI] n=pairs" per metric."""
    cells = paired.assign(
        value=[
            f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}] n={n}" if n > 1 else f"{m:+.1f} n=1"
            for m, lo, hi, n in zip(
                paired["mean_diff"], paired["ci_low"], paired["ci_high"], paired["n_pairs"],
                strict=True,
            )
        ]
    )  # fmt: skip
    table = cells.pivot_table(
        index=["dataset", "model", "attack", "defense_a", "defense_b"],
        columns="metric",
        values="value",
        aggfunc="first",
    ).reset_index()
    title = (
        "Paired differences, defense_a - defense_b on the same backdoored models (points; "
        "mean [95% CI] over the shared models)\n\n"
    )
    return title + table.to_markdown(index=False, disable_numparse=True) + "\n"


def pivot_latex(table: pd.DataFrame, caption: str, label: str) -> str:
    """A pivot as a LaTeX table (booktabs); needs jinja2, as ``DataFrame.to_latex`` does."""
    flat = table.reset_index()
    flat.columns = [str(c) for c in flat.columns]
    # The caption is not escaped by pandas; a bare "%" would comment out the rest of the line.
    caption = caption.replace("%", r"\%")
    tex = flat.to_latex(index=False, escape=True, caption=caption, label=label)
    # Escaping first, then swapping in math mode, so the backslash is not escaped itself.
    return tex.replace("±", r"$\pm$")


def write_pivot(table: pd.DataFrame, out_dir: str | Path, name: str, title: str) -> list[Path]:
    """Write ``<name>.csv``, ``<name>.md`` and ``<name>.tex``; returns the paths."""
    out_dir = Path(out_dir)
    paths = [out_dir / f"{name}.{ext}" for ext in ("csv", "md", "tex")]
    atomic_write_text(paths[0], table.reset_index().to_csv(index=False))
    flat = table.reset_index()
    md = f"{title}; cells: {CELL_FORMAT}\n\n" + flat.to_markdown(index=False, disable_numparse=True)
    atomic_write_text(paths[1], md + "\n")
    caption = f"{title}, mean $\\pm$ std [95% CI] over n seeds"
    atomic_write_text(paths[2], pivot_latex(table, caption, f"tab:{name}"))
    return paths


def heatmap_png(
    means: pd.DataFrame, title: str, notes: pd.DataFrame | None = None, cmap: str = "viridis"
) -> bytes:
    """An annotated heatmap of ``means`` (rows x columns, percent) as PNG bytes.

    NaN cells are blank, labelled with the matching cell of ``notes`` (e.g. "failed") if given.
    """
    fig = heatmap_figure(means, title, notes, cmap)
    buf = io.BytesIO()
    # A tight box, so neither a long title nor long labels are cut off.
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight", pad_inches=0.1)
    return buf.getvalue()


def heatmap_figure(
    means: pd.DataFrame, title: str, notes: pd.DataFrame | None = None, cmap: str = "viridis"
) -> Figure:
    """The figure of :func:`heatmap_png`; the title is wrapped to the figure's width."""
    # Figure without pyplot: no global state and no display backend, safe in sweeps and tests.
    from matplotlib.figure import Figure

    rows = [" / ".join(map(str, k)) if isinstance(k, tuple) else str(k) for k in means.index]
    cols = [str(c) for c in means.columns]
    width = 1.2 * len(cols) + 3.5
    fig = Figure(figsize=(width, 0.5 * len(rows) + 1.8), layout="constrained")
    ax = fig.add_subplot()
    data = np.ma.masked_invalid(means.to_numpy(dtype=float))
    image = ax.imshow(data, cmap=cmap, vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), v in np.ndenumerate(means.to_numpy(dtype=float)):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w" if v < 60 else "k")
        elif notes is not None:
            note = notes.reindex(index=means.index, columns=means.columns).iloc[i, j]
            ax.text(j, i, "-" if pd.isna(note) else str(note), ha="center", va="center")
    # Centred on the figure, wrapped at about 10 characters per inch (default font size).
    fig.suptitle(textwrap.fill(title, width=max(24, int(width * 10))))
    fig.colorbar(image, ax=ax, label="%")
    return fig


def make_tables(
    paths: Iterable[str | Path], out_dir: str | Path, reference_dir: str | Path | None = None
) -> list[Path]:
    """Read the runs under ``paths`` and write every table and figure into ``out_dir``.

    Writes ``tidy.csv`` (one row per setting and seed), ``{ca,asr,detection}.{csv,md,tex}``,
    ``heatmap_{asr,ca}.png``, ``summary.csv`` (n, mean, std, 95% CI per cell and metric),
    ``paired.{csv,md}`` (defense pairs on the same backdoored models) and, with
    ``reference_dir``, ``reference_comparison.{csv,md}`` (every cell: matched or why not).
    Returns the written paths (none when no run was found).
    """
    paths = list(paths)
    frame = load_records(paths)
    if frame.empty:
        log.warning("no metrics.json under %s; no tables written", [str(p) for p in paths])
        return []
    out_dir = Path(out_dir)
    written = [out_dir / "tidy.csv"]
    atomic_write_text(written[0], tidy_csv(frame))
    for name, (column, title) in PIVOTS.items():
        written += write_pivot(metric_pivot(frame, column), out_dir, name, title)
    for name in ("asr", "ca"):
        column, title = PIVOTS[name]
        means = metric_means(frame, column)
        if means.empty:
            log.warning("no complete run: heatmap_%s.png not written", name)
            continue
        path = out_dir / f"heatmap_{name}.png"
        png = heatmap_png(means, f"{title}, mean over seeds", notes=metric_pivot(frame, column))
        atomic_write_bytes(path, png)
        written.append(path)
    summary = out_dir / "summary.csv"
    atomic_write_text(summary, summary_table(frame).to_csv(index=False))
    written.append(summary)
    paired = paired_comparison(frame)
    if not paired.empty:
        paths = [out_dir / "paired.csv", out_dir / "paired.md"]
        atomic_write_text(paths[0], paired.to_csv(index=False))
        atomic_write_text(paths[1], paired_markdown(paired))
        written += paths
    if reference_dir is not None:
        comparison = fidelity.compare(frame, fidelity.load_references(reference_dir))
        if not comparison.empty:
            paths = [out_dir / "reference_comparison.csv", out_dir / "reference_comparison.md"]
            atomic_write_text(paths[0], comparison.to_csv(index=False))
            atomic_write_text(paths[1], fidelity.comparison_markdown(comparison))
            written += paths
    log.info("wrote %d table files to %s (%d runs)", len(written), out_dir, len(frame))
    return written
