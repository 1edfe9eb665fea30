"""Paper-style tables, heatmaps and reference comparisons from the tidy table of runs.

The tidy table comes from :func:`benchmark.collect.load_records` (one row per ``metrics.json``,
rates as fractions). From it:

- :func:`metric_pivot`: (dataset, model, attack) rows x defense columns of one metric, cells
  "mean ± std" in percent over seeds (sample std, ddof=1), "failed" where every run of the cell
  failed, "-" where the runs have no value (e.g. no detection); a defense run with command-line
  settings is its own column, as in :func:`benchmark.collect.pivot`;
- :func:`reference_comparison`: our means next to published numbers (``results/reference``);
- :func:`make_tables`: everything above written as CSV, Markdown, LaTeX and PNG.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.collect import attack_rows, defense_columns, load_records
from benchmark.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

ROW_KEYS = ["dataset", "model", "attack"]
MATCH_KEYS = ["dataset", "model", "attack", "defense"]
# Output name -> (tidy column, title). det_tpr is the detection rate (DR).
PIVOTS = {
    "ca": ("clean_acc", "Clean accuracy (CA, %)"),
    "asr": ("asr", "Attack success rate (ASR, %)"),
    "detection": ("det_tpr", "Detection rate (DR = det_tpr, %)"),
}
# Reference columns (percent) -> our tidy columns (fractions).
REFERENCE_METRICS = {"clean_acc": "clean_acc", "asr": "asr", "ra": "ra"}
BASELINE = "undefended"


def mean_std(values: pd.Series, digits: int = 1) -> str:
    """``values`` (fractions) as "mean ± std" in percent; the mean alone for one value.

    Returns "-" when no value is present.
    """
    values = values.dropna().astype(float) * 100
    if values.empty:
        return "-"
    if len(values) == 1:
        return f"{values.iloc[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


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


def metric_pivot(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """(dataset, model, attack) rows x defense columns of ``column`` as "mean ± std" (%)."""
    if frame.empty:
        return pd.DataFrame()
    frame = frame.assign(defense=defense_columns(frame), attack=attack_rows(frame))
    cells = {k: _cell(g, column) for k, g in frame.groupby([*ROW_KEYS, "defense"], dropna=False)}
    table = pd.Series(cells, dtype=object).unstack().fillna("-")
    table = table[_ordered_columns(table.columns)]
    table.index.names, table.columns.name = ROW_KEYS, "defense"
    return table


def metric_means(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Like :func:`metric_pivot` but numeric: means over complete runs in percent, NaN else."""
    frame = frame.assign(attack=attack_rows(frame))
    done = frame[frame["status"] == "complete"]
    if done.empty:
        return pd.DataFrame()
    done = done.assign(defense=defense_columns(done), value=done[column].astype(float) * 100)
    table = done.pivot_table(
        index=ROW_KEYS, columns="defense", values="value", aggfunc="mean", dropna=False
    )
    # Same rows and columns as the text pivot, so failed cells show up as blanks, not vanish.
    full = frame.assign(defense=defense_columns(frame))
    rows = pd.MultiIndex.from_frame(full[ROW_KEYS].drop_duplicates()).sort_values()
    return table.reindex(index=rows, columns=_ordered_columns(full["defense"].unique()))


def load_reference(reference_dir: str | Path) -> pd.DataFrame:
    """Every ``*.csv`` in ``reference_dir`` as one table (empty if none)."""
    paths = sorted(Path(reference_dir).glob("*.csv"))
    if not paths:
        return pd.DataFrame()
    return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)


def reference_comparison(frame: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Our complete default-setting runs next to the reference rows they match.

    Rows match on (dataset, model, attack, defense) and on the poison rate where our runs record
    one. Columns: the keys, ``poison_rate``, ``n_seeds``, then per metric ``<m>_ours`` (mean,
    %), ``<m>_ours_std``, ``<m>_ref`` and ``<m>_diff`` (ours - ref), then ``source``. Empty when
    nothing matches.
    """
    if frame.empty or reference.empty:
        return pd.DataFrame()
    # Runs with command-line defense settings are ablations, not the published configuration.
    args = frame["defense_args"].fillna("")
    done = frame[(frame["status"] == "complete") & (args == "")]
    if done.empty:
        return pd.DataFrame()
    ours = done.assign(
        poison_rate=done["poison_rate"].astype(float).round(6),
        **{m: done[col].astype(float) * 100 for m, col in REFERENCE_METRICS.items()},
    )
    groups = ours.groupby([*MATCH_KEYS, "poison_rate"], dropna=False)
    stats = groups.size().rename("n_seeds").to_frame()
    for m in REFERENCE_METRICS:
        stats[f"{m}_ours"] = groups[m].mean()
        stats[f"{m}_ours_std"] = groups[m].std(ddof=1)
    stats = stats.reset_index()
    ref = reference.assign(poison_rate=reference["poison_rate"].astype(float).round(6))
    ref = ref.rename(columns={m: f"{m}_ref" for m in REFERENCE_METRICS})
    merged = stats.merge(ref, on=MATCH_KEYS, suffixes=("", "_reference"))
    # A run without a recorded poison rate matches any; otherwise the rates must agree.
    keep = merged["poison_rate"].isna() | np.isclose(
        merged["poison_rate"].fillna(-1), merged["poison_rate_reference"]
    )
    merged = merged[keep].drop(columns="poison_rate_reference")
    if merged.empty:
        return pd.DataFrame()
    columns = [*MATCH_KEYS, "poison_rate", "n_seeds"]
    for m in REFERENCE_METRICS:
        merged[f"{m}_diff"] = merged[f"{m}_ours"] - merged[f"{m}_ref"]
        columns += [f"{m}_ours", f"{m}_ours_std", f"{m}_ref", f"{m}_diff"]
    return merged[[*columns, "source"]].reset_index(drop=True)


def comparison_markdown(comparison: pd.DataFrame) -> str:
    """The comparison as Markdown: "ours (± std) / ref" per metric, then the source."""

    def fmt(v: float, spec: str = ".1f") -> str:
        return "-" if pd.isna(v) else f"{v:{spec}}"

    shown = comparison[[*MATCH_KEYS, "poison_rate", "n_seeds"]].copy()
    for m in REFERENCE_METRICS:
        ours = [
            fmt(mu) if pd.isna(sd) else f"{mu:.1f} ± {sd:.1f}"
            for mu, sd in zip(comparison[f"{m}_ours"], comparison[f"{m}_ours_std"], strict=True)
        ]
        shown[f"{m} ours"] = ours
        # Published numbers keep their two decimals.
        shown[f"{m} ref"] = comparison[f"{m}_ref"].map(lambda v: fmt(v, ".2f"))
        shown[f"{m} diff"] = comparison[f"{m}_diff"].map(lambda v: fmt(v, "+.1f"))
    shown["source"] = comparison["source"]
    title = "Ours vs. published numbers (%; ours = mean ± std over seeds)\n\n"
    # disable_numparse: tabulate would otherwise reformat "95.00" as "95" and drop the "+".
    return title + shown.to_markdown(index=False, disable_numparse=True) + "\n"


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
    md = f"{title}, mean ± std over seeds\n\n" + flat.to_markdown(
        index=False, disable_numparse=True
    )
    atomic_write_text(paths[1], md + "\n")
    atomic_write_text(paths[2], pivot_latex(table, f"{title}, mean $\\pm$ std", f"tab:{name}"))
    return paths


def heatmap_png(
    means: pd.DataFrame, title: str, notes: pd.DataFrame | None = None, cmap: str = "viridis"
) -> bytes:
    """An annotated heatmap of ``means`` (rows x columns, percent) as PNG bytes.

    NaN cells are blank, labelled with the matching cell of ``notes`` (e.g. "failed") if given.
    """
    # Figure without pyplot: no global state and no display backend, safe in sweeps and tests.
    from matplotlib.figure import Figure

    rows = [" / ".join(map(str, k)) if isinstance(k, tuple) else str(k) for k in means.index]
    cols = [str(c) for c in means.columns]
    fig = Figure(figsize=(1.2 * len(cols) + 3.5, 0.5 * len(rows) + 1.8), layout="constrained")
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
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="%")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def make_tables(
    paths: Iterable[str | Path], out_dir: str | Path, reference_dir: str | Path | None = None
) -> list[Path]:
    """Read the runs under ``paths`` and write every table and figure into ``out_dir``.

    Writes ``tidy.csv``, ``{ca,asr,detection}.{csv,md,tex}``, ``heatmap_{asr,ca}.png`` and,
    when any row matches a reference in ``reference_dir``, ``reference_comparison.{csv,md}``.
    Returns the written paths (none when no run was found).
    """
    paths = list(paths)
    frame = load_records(paths)
    if frame.empty:
        log.warning("no metrics.json under %s; no tables written", [str(p) for p in paths])
        return []
    out_dir = Path(out_dir)
    written = [out_dir / "tidy.csv"]
    atomic_write_text(written[0], frame.to_csv(index=False))
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
    if reference_dir is not None:
        comparison = reference_comparison(frame, load_reference(reference_dir))
        if not comparison.empty:
            csv_path, md_path = (
                out_dir / "reference_comparison.csv",
                out_dir / "reference_comparison.md",
            )
            atomic_write_text(csv_path, comparison.to_csv(index=False))
            atomic_write_text(md_path, comparison_markdown(comparison))
            written += [csv_path, md_path]
    log.info("wrote %d table files to %s (%d runs)", len(written), out_dir, len(frame))
    return written
