"""The fast-track validation table: every cell trained on two tracks, side by side.

A *track* is a model and its recipe chosen together (``conf/track/``: ``standard`` =
PreAct-ResNet18 + BackdoorBench's recipe, ``fast`` = fastnet + airbench94's recipe; ``*_cpu``
their 2-core sizes). ``experiment=fast_validation`` runs each (attack, defense) cell once per
track on the same data and seeds; :func:`compare_tracks` turns the tidy table of that sweep
(:func:`benchmark.collect.load_records`) into one row per (dataset, attack, defense):

- ``<metric>_<track>``: the defended model's CA, ASR and RA on each track, means over seeds
  (for ``undefended`` the backdoored model's);
- ``d_<metric>``: fast - reference, in the same units (fractions);
- ``effect_<metric>_<track>``: what the defense did on that track, defended - backdoored
  on the same model (``bd_*`` of the same record), and ``d_effect_<metric>``: fast - reference;
- ``agrees``: every ``d_*`` within ``tolerance`` (default 0.10, ten points); None where a
  cell has run on one track only.

The reference track is the one named ``standard*`` (or ``reference=``); exactly two tracks are
compared. Cells on one track must share one setting (the same config up to the seed): the
table never averages unlike settings, and names the cell that breaks this. A study that runs
over several sessions grows with :func:`update`: the new sweep's values replace those of the
same cells and tracks in the earlier table, which fills in the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

METRICS = ("clean_acc", "asr", "ra")
EFFECTS = ("clean_acc", "asr")
KEYS = ["dataset", "attack", "defense"]
TOLERANCE = 0.10


def _track_names(frame: pd.DataFrame, reference: str | None) -> tuple[str, str]:
    tracks = sorted(t for t in frame["track"].dropna().unique())
    if len(tracks) != 2:
        raise ValueError(
            f"the validation table compares two tracks, found {tracks or 'none'} "
            "(records without track= are left out; pass one fast_validation sweep)"
        )
    if reference is None:
        named = [t for t in tracks if t.startswith("standard")]
        if len(named) != 1:
            raise ValueError(f"no single standard* track among {tracks}: pass reference=")
        reference = named[0]
    if reference not in tracks:
        raise ValueError(f"reference track {reference!r} is not among {tracks}")
    return reference, next(t for t in tracks if t != reference)


def _means(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, attack, defense, track): seed means of the defended and backdoored
    metrics, the seed count, and one setting (else ValueError)."""
    settings = frame.groupby([*KEYS, "track"])["setting"].nunique()
    unlike = settings[settings > 1]
    if not unlike.empty:
        cell = ", ".join(map(str, unlike.index[0]))
        raise ValueError(
            f"unlike settings in one cell ({cell}): {int(unlike.iloc[0])} settings; "
            "pass the folder of one sweep"
        )
    columns = [*METRICS, *(f"bd_{m}" for m in METRICS)]
    means = frame.groupby([*KEYS, "track"])[columns].mean()
    means["n_seeds"] = frame.groupby([*KEYS, "track"])["seed"].nunique()
    return means


def _compare(table: pd.DataFrame, ref: str, fast: str, tolerance: float) -> None:
    """In place: the ``d_*`` columns (fast - reference) and ``agrees``: every ``d_*`` within
    ``tolerance``, None for a cell run on one track only (a sweep still under way)."""
    for m in METRICS:
        table[f"d_{m}"] = table[f"{m}_{fast}"] - table[f"{m}_{ref}"]
    for m in EFFECTS:
        table[f"d_effect_{m}"] = table[f"effect_{m}_{fast}"] - table[f"effect_{m}_{ref}"]
    diffs = table[[*(f"d_{m}" for m in METRICS), *(f"d_effect_{m}" for m in EFFECTS)]]
    within = (diffs.abs() <= tolerance).all(axis=1)
    complete = diffs.notna().all(axis=1)
    values = [bool(w) if c else None for w, c in zip(within, complete, strict=True)]
    table["agrees"] = pd.Series(values, index=table.index, dtype=object)


def compare_tracks(
    frame: pd.DataFrame, reference: str | None = None, tolerance: float = TOLERANCE
) -> pd.DataFrame:
    """The validation table (module docstring) from a tidy table of complete runs."""
    done = frame[frame["status"] == "complete"]
    if done.empty:
        raise ValueError("no complete runs to compare")
    ref, fast = _track_names(done, reference)
    means = _means(done)
    table = pd.DataFrame(index=means.xs(ref, level="track").index.union(
        means.xs(fast, level="track").index
    ))  # fmt: skip
    for track in (ref, fast):
        part = means.xs(track, level="track").reindex(table.index)
        for m in METRICS:
            table[f"{m}_{track}"] = part[m]
        for m in EFFECTS:
            table[f"effect_{m}_{track}"] = part[m] - part[f"bd_{m}"]
        table[f"n_seeds_{track}"] = part["n_seeds"]
    _compare(table, ref, fast, tolerance)
    table.attrs.update(reference=ref, fast=fast, tolerance=tolerance)
    return table.reset_index()


def update(table: pd.DataFrame, previous: pd.DataFrame) -> pd.DataFrame:
    """``table`` completed from ``previous`` (an earlier table, e.g. a ``validation.csv`` read
    back): a track ``table`` lacks for a cell, or a whole cell, comes from ``previous``; the
    differences and ``agrees`` are recomputed at ``table``'s tolerance. ValueError if the two
    do not compare the same tracks (their columns differ)."""
    if list(previous.columns) != list(table.columns):
        differ = sorted(set(table.columns) ^ set(previous.columns))
        raise ValueError(
            f"the earlier table has other columns ({', '.join(differ[:4])}): "
            "it compares other tracks; write to another --out-dir"
        )
    # combine_first takes previous's value only where table's is missing, and every column of
    # a track is missing together (a cell not run on that track this time).
    merged = table.set_index(KEYS).combine_first(previous.set_index(KEYS))
    merged = merged.sort_index().reset_index()[list(table.columns)]
    ref, fast, tolerance = (table.attrs[k] for k in ("reference", "fast", "tolerance"))
    _compare(merged, ref, fast, tolerance)
    merged.attrs.update(table.attrs)
    return merged


def _points(value: float, signed: bool = False) -> str:
    if pd.isna(value):
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def markdown(table: pd.DataFrame, metrics: Sequence[str] = METRICS) -> str:
    """The table in percent: each metric as "reference / fast (difference)", each defense's
    ASR and CA effects the same way, and whether the tracks agree."""
    ref, fast = table.attrs["reference"], table.attrs["fast"]
    names = {"clean_acc": "CA", "asr": "ASR", "ra": "RA"}
    rows = []
    for _, r in table.iterrows():
        row = {k: r[k] for k in KEYS}
        for m in metrics:
            row[names[m]] = (
                f"{_points(r[f'{m}_{ref}'])} / {_points(r[f'{m}_{fast}'])} "
                f"({_points(r[f'd_{m}'], True)})"
            )
        for m in EFFECTS:
            row[f"defense Δ{names[m]}"] = (
                "-"
                if r["defense"] == "undefended"
                else f"{_points(r[f'effect_{m}_{ref}'], True)} / "
                f"{_points(r[f'effect_{m}_{fast}'], True)}"
            )
        row["agrees"] = "-" if pd.isna(r["agrees"]) else "yes" if r["agrees"] else "no"
        rows.append(row)
    title = (
        f"Fast track vs standard recipe: {ref} / {fast} (fast - {ref}), percent; defense Δ = "
        f"defended - backdoored on the same track; agrees = every difference within "
        f"{100 * table.attrs['tolerance']:.0f} points\n\n"
    )
    return title + pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) + "\n"
