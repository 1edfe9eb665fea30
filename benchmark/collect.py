"""Turn run directories into one tidy pandas table and paper-style pivots.

``load_records`` reads every ``metrics.json`` under the given folders into one row per run;
``pivot`` makes the attack rows x defense columns table of "CA / ASR / DR" (means over seeds),
with failed runs shown as failed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

CHOICES = ("dataset", "model", "attack", "defense", "train")
METRICS = ("clean_acc", "asr", "ra", "det_tpr", "det_fpr", "det_precision", "det_auroc", "der")


def find_records(paths: Iterable[str | Path]) -> list[Path]:
    """Every ``metrics.json`` in or under ``paths`` (files or folders), sorted."""
    found: set[Path] = set()
    for p in map(Path, paths):
        if p.is_file() and p.name == "metrics.json":
            found.add(p)
        elif p.is_dir():
            found.update(p.rglob("metrics.json"))
    return sorted(found)


# Overrides that are not other settings of a cell: where files are, tracking, the sweep's
# switches. Group choices (``attack=...``) and ``defense.*`` have their own columns.
NOT_SETTINGS = ("seed", "dataset.root", "attack.key_path", "device", "progress", "resume",
                "fail_fast", "debug", "experiment")  # fmt: skip
NOT_SETTING_PREFIXES = ("defense.", "paths.", "hydra.", "logger.", "logger")


def _is_setting(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return "." in key and key not in NOT_SETTINGS and not key.startswith(NOT_SETTING_PREFIXES)


def record_row(record: dict, source: Path) -> dict:
    """One tidy row: choices, seed, attack scalars, backdoored (``bd_*``) and defended metrics."""
    row: dict = {
        "run_dir": str(source.parent),
        "status": record.get("status"),
        "error": record.get("error"),
        "seed": record.get("seed"),
    }
    choices = record.get("choices") or {}
    row.update({k: choices.get(k) for k in CHOICES})
    # Settings of the defense given on the command line (e.g. an ablation's
    # defense.bound_floor=0.0): such runs are other cells, not more seeds of the default.
    overrides = (record.get("provenance") or {}).get("overrides") or []
    row["defense_args"] = ",".join(sorted(o for o in overrides if o.startswith("defense.")))
    row["run_args"] = ",".join(sorted(o for o in overrides if _is_setting(o)))
    attack = record.get("attack") or {}
    row.update({k: attack.get(k) for k in ("poison_rate", "target_class", "mode", "n_poison")})
    bd = record.get("backdoored") or {}
    row.update({f"bd_{k}": bd.get(k) for k in ("clean_acc", "asr", "ra")})
    defended = record.get("defended") or {}
    row.update({k: defended.get(k) for k in METRICS})
    row["total_s"] = (record.get("timing") or {}).get("total_s")
    return row


def load_records(paths: Iterable[str | Path]) -> pd.DataFrame:
    """The tidy table of every run found under ``paths`` (one row per ``metrics.json``)."""
    rows = []
    for path in find_records(paths):
        try:
            rows.append(record_row(json.loads(path.read_text()), path))
        except (OSError, json.JSONDecodeError) as err:
            log.warning("skipping unreadable %s (%s)", path, err)
    columns = [
        "run_dir",
        "status",
        "error",
        "seed",
        *CHOICES,
        "defense_args",
        "run_args",
        "poison_rate",
        "target_class",
        "mode",
        "n_poison",
        "bd_clean_acc",
        "bd_asr",
        "bd_ra",
        *METRICS,
        "total_s",
    ]
    return pd.DataFrame(rows, columns=columns)


def _cell(group: pd.DataFrame) -> str:
    done = group[group["status"] == "complete"]
    if done.empty:
        return "failed"
    parts = [
        f"{100 * done[k].mean():.1f}" if done[k].notna().any() else "-"
        for k in ("clean_acc", "asr", "det_tpr")
    ]
    text = " / ".join(parts)
    if len(done) > 1:
        text += f" (n={len(done)})"
    if len(done) < len(group):
        text += f" [{len(group) - len(done)} failed]"
    return text


def defense_columns(frame: pd.DataFrame) -> pd.Series:
    """The defense name, with ``[<defense.key=value,...>]`` appended for runs with settings."""
    args = frame["defense_args"].fillna("") if "defense_args" in frame else ""
    return frame["defense"].where(args == "", frame["defense"] + " [" + args + "]")


def attack_rows(frame: pd.DataFrame) -> pd.Series:
    """The attack name, with ``[<key=value,...>]`` appended for runs whose other command-line
    settings (``train.epochs=5``, ``attack.poison_rate=0.05``) differ from the rest of the
    table, so different settings are different rows, never averaged as if they were seeds.
    Settings every run shares are left out of the label."""
    if "run_args" not in frame:
        return frame["attack"]
    sets = frame["run_args"].fillna("").map(lambda a: frozenset(filter(None, a.split(","))))
    common = frozenset.intersection(*sets) if len(sets) else frozenset()
    extra = sets.map(lambda s: ",".join(sorted(s - common)))
    return frame["attack"].where(extra == "", frame["attack"] + " [" + extra + "]")


def pivot(frame: pd.DataFrame) -> pd.DataFrame:
    """(dataset, model, attack) rows x defense columns of "CA / ASR / DR" in percent, means
    over seeds. A defense run with command-line settings is its own column,
    ``<defense> [<defense.key=value,...>]``."""
    if frame.empty:
        return pd.DataFrame()
    frame = frame.assign(defense=defense_columns(frame), attack=attack_rows(frame))
    keys = ["dataset", "model", "attack", "defense"]
    cells = {k: _cell(g) for k, g in frame.groupby(keys, dropna=False)}
    table = pd.Series(cells).unstack()
    table.index.names, table.columns.name = keys[:-1], "defense"
    return table
