"""Turn run directories into one tidy pandas table, one row per distinct (setting, seed).

``load_records`` reads every ``metrics.json`` under the given folders. Runs are told apart by
their *setting*: the resolved config each record holds (``record["config"]``) minus the seed and
the places files are read from (a key file's content identity, its sha256, stands in for its
path). So a ``debug=smoke`` run and a full run of the same cell are different settings, never
averaged; and the same setting and seed run twice (the README's commands, a sweep repeated) is
counted once (:func:`dedupe`). Every row carries two labels that say how its setting differs
from the other runs of the table: ``row_label`` (the attack, plus the non-defense settings that
differ among runs of the same dataset, model and attack) and ``column_label`` (the defense, plus
the defense settings that differ among its runs in that row). ``pivot`` is the "CA / ASR / DR"
table of means over seeds; :mod:`benchmark.tables` has the per-metric pivots with statistics.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

CHOICES = ("dataset", "model", "attack", "defense", "train", "track")
METRICS = ("clean_acc", "asr", "ra", "det_tpr", "det_fpr", "det_precision", "det_auroc", "der")
# Settings that are not part of what a run measures: the seed (a replicate), where data and
# keys are read from (the content identity replaces a key's path: ``attack.key_sha256``).
NOT_SETTING_KEYS = frozenset(
    {"seed", "dataset.root", "attack.key_path", "deterministic", "cache.enabled"}
)
# Record facts that identify a trigger whose config value is a path.
IDENTITY_SUFFIX = "_sha256"
# Older records hold no config: their command-line overrides stand in, minus these.
NOT_SETTINGS = ("seed", "dataset.root", "attack.key_path", "device", "progress", "resume",
                "fail_fast")  # fmt: skip
NOT_SETTING_PREFIXES = ("paths.", "hydra.", "logger.", "logger")
LABEL_VALUE_CHARS = 40


def find_records(paths: Iterable[str | Path]) -> list[Path]:
    """Every ``metrics.json`` in or under ``paths`` (files or folders), sorted."""
    found: set[Path] = set()
    for p in map(Path, paths):
        if p.is_file() and p.name == "metrics.json":
            found.add(p)
        elif p.is_dir():
            found.update(p.rglob("metrics.json"))
    return sorted(found)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def _is_setting(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return key not in NOT_SETTINGS and not key.startswith(NOT_SETTING_PREFIXES)


def _is_defense_key(key: str) -> bool:
    return key in ("choice.defense", "override.defense") or key.startswith(
        ("defense.", "override.defense.")
    )


def settings_of(record: dict) -> dict[str, Any]:
    """The flat settings that define a record's cell (see the module docstring).

    Records made before the config was recorded fall back to their group choices and
    command-line overrides (``override.<key>``)."""
    config = record.get("config")
    if isinstance(config, dict):
        flat = {k: v for k, v in flatten(config).items() if k not in NOT_SETTING_KEYS}
    else:
        flat = {f"choice.{k}": v for k, v in sorted((record.get("choices") or {}).items())}
        for override in (record.get("provenance") or {}).get("overrides") or []:
            if _is_setting(override):
                key, _, value = override.lstrip("+~").partition("=")
                flat[f"override.{key}"] = value
        flat.pop("override.seed", None)
    for key, value in (record.get("attack") or {}).items():
        if key.endswith(IDENTITY_SUFFIX):
            flat[f"attack.{key}"] = value
    return flat


def digest(settings: dict[str, Any]) -> str:
    """A short hash of flat settings."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _split(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the backdoored model's settings, the defense's settings)."""
    defense = {k: v for k, v in settings.items() if _is_defense_key(k)}
    return {k: v for k, v in settings.items() if k not in defense}, defense


def record_row(record: dict, source: Path) -> dict:
    """One tidy row: choices, seed, setting digests, attack scalars, backdoored (``bd_*``) and
    defended metrics."""
    settings = settings_of(record)
    model_settings, defense_settings = _split(settings)
    row: dict = {
        "run_dir": str(source.parent),
        "status": record.get("status"),
        "error": record.get("error"),
        "seed": record.get("seed"),
        "setting": digest(settings),
        "model_setting": digest(model_settings),
        "defense_setting": digest(defense_settings),
    }
    choices = record.get("choices") or {}
    row.update({k: choices.get(k) for k in CHOICES})
    overrides = (record.get("provenance") or {}).get("overrides") or []
    # Command-line settings, for people reading the tidy table (grouping uses the settings);
    # defense settings given there make a run an ablation for the reference comparison.
    row["defense_args"] = ",".join(
        sorted(o.lstrip("+~") for o in overrides if o.lstrip("+~").startswith("defense."))
    )
    row["run_args"] = ",".join(sorted(o for o in overrides if _is_setting(o) and "." in o))
    attack = record.get("attack") or {}
    row.update(
        {
            k: attack.get(k)
            for k in ("poison_rate", "poison_rate_of_train", "target_class", "mode", "n_poison")
        }
    )
    if row["poison_rate_of_train"] is None and attack.get("attack_kind") != "clean_label":
        row["poison_rate_of_train"] = attack.get("poison_rate")
    bd = record.get("backdoored") or {}
    row.update({f"bd_{k}": bd.get(k) for k in ("clean_acc", "asr", "ra")})
    defended = record.get("defended") or {}
    row.update({k: defended.get(k) for k in METRICS})
    row["model_key"] = (record.get("cache") or {}).get("key")
    row["timestamp"] = (record.get("provenance") or {}).get("timestamp")
    row["total_s"] = (record.get("timing") or {}).get("total_s")
    row["settings"] = settings
    row["facts"] = attack  # the attack's record (trigger identity names, rates)
    return row


COLUMNS = [
    "run_dir", "status", "error", "seed", "setting", "model_setting", "defense_setting",
    *CHOICES, "row_label", "column_label", "defense_args", "run_args", "poison_rate",
    "poison_rate_of_train", "target_class", "mode", "n_poison", "bd_clean_acc", "bd_asr",
    "bd_ra", *METRICS,
    "model_key", "timestamp", "total_s", "settings", "facts",
]  # fmt: skip


def dedupe(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (setting, seed): the newest complete run, else the newest failed one.

    The same setting and seed must give the same numbers on one machine; where two complete
    runs disagree, a warning names them (the newest is kept)."""
    if frame.empty:
        return frame
    order = frame.assign(_done=frame["status"] == "complete").sort_values(
        ["_done", "timestamp", "run_dir"], na_position="first"
    )
    for (setting, seed), group in order[order["_done"]].groupby(["setting", "seed"]):
        values = group[["clean_acc", "asr"]].astype(float).to_numpy()
        if len(group) > 1 and not np.allclose(values, values[-1], atol=1e-9, equal_nan=True):
            log.warning(
                "setting %s seed %s: %d complete runs disagree (%s); the newest is kept",
                setting, seed, len(group), ", ".join(group["run_dir"]),
            )  # fmt: skip
    kept = order.drop_duplicates(["setting", "seed"], keep="last").drop(columns="_done")
    return kept.sort_values("run_dir").reset_index(drop=True)


def _value_text(value: Any) -> str:
    text = json.dumps(value, default=str) if isinstance(value, list | dict) else str(value)
    return text if len(text) <= LABEL_VALUE_CHARS else text[: LABEL_VALUE_CHARS - 1] + "…"


def _differences(settings: list[dict[str, Any]]) -> list[str]:
    """Keys whose values are not the same in every one of ``settings``."""
    keys = sorted(set().union(*settings))
    missing = object()
    return [k for k in keys if len({repr(s.get(k, missing)) for s in settings}) > 1]


def _labels(
    frame: pd.DataFrame, block: list[str], group: list[str], digest_col: str, part: int, base: str
) -> pd.Series:
    """``base`` plus `` [k=v, ...]`` naming the settings that tell runs apart.

    The keys are those whose values differ among the distinct settings (``digest_col``) of
    some group of ``group`` within a ``block``; every run of the block is labelled with them,
    so a label means the same setting in every row or column of the block."""
    labels = frame[base].astype(str).copy()
    for _, part_frame in frame.groupby(block, dropna=False):
        keys: set[str] = set()
        for _, g in part_frame.groupby(group, dropna=False):
            firsts = g.drop_duplicates(digest_col)
            if len(firsts) > 1:
                keys.update(_differences([_split(s)[part] for s in firsts["settings"]]))
        if not keys:
            continue
        for index, row in part_frame.iterrows():
            setting = _split(row["settings"])[part]
            shown = [f"{k}={_value_text(setting[k])}" for k in sorted(keys) if k in setting]
            labels[index] = f"{row[base]} [{', '.join(shown)}]" if shown else str(row[base])
        # Distinct settings of one group must never share a label (truncated values could).
        for _, g in part_frame.groupby(group, dropna=False):
            firsts = g.drop_duplicates(digest_col)
            if labels[firsts.index].duplicated().any():
                for index, row in g.iterrows():
                    labels[index] += f" #{row[digest_col][:6]}"
    return labels


def label(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``row_label`` and ``column_label`` (see the module docstring)."""
    if frame.empty:
        return frame.assign(row_label=None, column_label=None)
    frame = frame.copy()
    frame["row_label"] = _labels(
        frame, ["dataset", "model"], ["attack"], "model_setting", 0, "attack"
    )
    frame["column_label"] = _labels(
        frame, ["dataset", "model", "defense"], ["row_label"], "defense_setting", 1, "defense"
    )
    return frame


def load_records(paths: Iterable[str | Path], keep_duplicates: bool = False) -> pd.DataFrame:
    """The tidy table of the runs under ``paths``: one row per (setting, seed) unless
    ``keep_duplicates``, labelled by setting."""
    rows = []
    for path in find_records(paths):
        try:
            rows.append(record_row(json.loads(path.read_text()), path))
        except (OSError, json.JSONDecodeError, AttributeError, TypeError) as err:
            log.warning("skipping unreadable %s (%s)", path, err)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    if not keep_duplicates:
        frame = dedupe(frame)
    return label(frame)


def tidy_csv(frame: pd.DataFrame) -> str:
    """The tidy table as CSV (the settings dicts stay out: ``setting`` is their digest)."""
    return frame.drop(columns=["settings", "facts"], errors="ignore").to_csv(index=False)


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


def pivot(frame: pd.DataFrame) -> pd.DataFrame:
    """(dataset, model, row label) rows x defense columns of "CA / ASR / DR" in percent, means
    over seeds of one setting each."""
    if frame.empty:
        return pd.DataFrame()
    keys = ["dataset", "model", "row_label", "column_label"]
    cells = {k: _cell(g) for k, g in frame.groupby(keys, dropna=False)}
    table = pd.Series(cells).unstack()
    table.index.names, table.columns.name = ["dataset", "model", "attack"], "defense"
    return table
