"""Our cells next to published numbers, matched on every setting that defines the number.

A reference is a pair of files in ``results/reference/``: ``<name>.csv`` (the published
numbers: ``dataset, model, attack, defense, poison_rate`` in the harness's names, metrics in
percent, ``source``, ``note``) and ``<name>.yaml`` (what defines its cells, as settings of our
runs: see ``backdoorbench_cifar10.yaml``). :func:`compare` gives every run cell of the tidy
table (:mod:`benchmark.collect`: one setting, its seeds) one row: the matched reference row with
our mean, the published number, the delta and a pass/fail at the reference's tolerance, or
``not comparable: <reasons>`` ("blend key: noise, the reference used hello_kitty"). A run cell
matches a CSV row on (dataset, model, attack, defense) and on ``poison_rate_of_train`` (so
clean-label runs match however their rate was set); then every setting of the YAML must hold
(common, per attack, and per defense: the benchmark's recipe where it differs from our defaults),
and the run must not carry command-line defense settings (an ablation, not the published
defense). :func:`reference_rows` lists every reference row with the comparable cell, if any.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from benchmark.stats import summarize

UNSET = "~unset"
RATE_RTOL = 0.01  # poison rates within 1% of each other are the same rate
CELL_KEYS = ["dataset", "model", "row_label", "column_label"]


@dataclass
class Reference:
    """A published table: its numbers and what defines its cells."""

    name: str
    stem: str  # the file name, e.g. backdoorbench_cifar10
    numbers: pd.DataFrame
    settings: dict[str, dict[str, Any]]
    attacks: dict[str, dict[str, dict[str, Any]]]
    tolerance: float = 2.0
    metrics: list[str] = field(default_factory=lambda: ["clean_acc", "asr", "ra"])
    notes: list[str] = field(default_factory=list)
    attack_notes: dict[str, list[str]] = field(default_factory=dict)
    defenses: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    defense_notes: dict[str, list[str]] = field(default_factory=dict)

    def requirements(self, attack: str, defense: str | None = None) -> dict[str, dict[str, Any]]:
        """The settings a run of ``attack`` (and ``defense``) must hold: the common ones, the
        attack's (which replace common ones), the defense's recipe."""
        return {**self.settings, **self.attacks.get(attack, {}), **self.defenses.get(defense, {})}

    def notes_of(self, attack: str, defense: str) -> list[str]:
        """The documented deviations a comparison of (attack, defense) carries."""
        return self.notes + self.attack_notes.get(attack, []) + self.defense_notes.get(defense, [])


def load_references(reference_dir: str | Path) -> list[Reference]:
    """Every ``<name>.yaml`` of ``reference_dir`` with its numbers CSV."""
    out = []
    for spec_path in sorted(Path(reference_dir).glob("*.yaml")):
        spec = yaml.safe_load(spec_path.read_text())
        numbers = pd.read_csv(spec_path.parent / spec["numbers"])
        numbers["note"] = numbers.get("note", pd.Series(dtype=str)).fillna("")
        out.append(
            Reference(
                name=spec.get("name", spec_path.stem),
                stem=spec_path.stem,
                numbers=numbers,
                settings=spec.get("settings") or {},
                attacks=spec.get("attacks") or {},
                tolerance=float(spec.get("tolerance", 2.0)),
                metrics=list(spec.get("metrics", ["clean_acc", "asr", "ra"])),
                notes=list(spec.get("notes") or []),
                attack_notes=spec.get("attack_notes") or {},
                defenses=spec.get("defenses") or {},
                defense_notes=spec.get("defense_notes") or {},
            )
        )
    return out


def _same(ours: Any, theirs: Any) -> bool:
    if isinstance(ours, bool) or isinstance(theirs, bool):
        return ours is theirs or ours == theirs
    if isinstance(ours, int | float) and isinstance(theirs, int | float):
        return math.isclose(float(ours), float(theirs), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(ours, list) and isinstance(theirs, list):
        return len(ours) == len(theirs) and all(map(_same, ours, theirs))
    return ours == theirs


def _text(value: Any) -> str:
    return "unset" if value is UNSET or value == UNSET else "null" if value is None else str(value)


def setting_mismatches(
    settings: dict[str, Any], facts: dict[str, Any], requirements: dict[str, dict[str, Any]]
) -> list[str]:
    """``"<say>: <ours>, the reference used <theirs>"`` for every requirement ``settings``
    (flat, from :func:`benchmark.collect.settings_of`) does not meet."""
    reasons = []
    for key, rule in requirements.items():
        ours = settings.get(key, UNSET)
        allowed = rule["one_of"] if "one_of" in rule else [rule.get("value")]
        if any(_same(ours, a) for a in allowed):
            continue
        theirs = rule.get("name") or " or ".join(_text(a) for a in allowed)
        if "ours_name" in rule:  # an identity (a key file's hash): say it by name
            fact = facts.get(rule["ours_name"].removeprefix("attack."))
            shown = fact if fact else ("not recorded" if ours is UNSET else "another file")
        else:
            shown = _text(ours)
        reasons.append(f"{rule.get('say', key)}: {shown}, the reference used {theirs}")
    return reasons


def _rate_of_train(cell: pd.DataFrame) -> float | None:
    rates = cell["poison_rate_of_train"].dropna().astype(float)
    return float(rates.iloc[0]) if len(rates) else None


def _cell_reasons(reference: Reference, cell: pd.DataFrame) -> tuple[pd.Series | None, list[str]]:
    """The reference row of a run cell and every reason it cannot be compared with it (the
    row is None when no row has the cell's keys; the settings are checked all the same, so
    the reasons list everything that differs)."""
    first = cell.iloc[0]
    reasons: list[str] = []
    candidates = reference.numbers
    for key in ("dataset", "model", "attack"):
        same = candidates[candidates[key] == first[key]]
        if same.empty:
            have = ", ".join(sorted(map(str, candidates[key].unique())))
            reasons.append(f"{key} {first[key]}: not in the reference (it has {have})")
        else:
            candidates = same
    row = None
    same_def = candidates[candidates["defense"] == first["defense"]]
    rate = _rate_of_train(cell)
    if same_def.empty:
        have = ", ".join(sorted(map(str, candidates["defense"].unique())))
        reasons.append(f"defense {first['defense']}: no reference row (it has {have})")
    elif rate is None:
        reasons.append("poison rate of the training set: not recorded")
    else:
        hit = same_def[
            same_def["poison_rate"].map(lambda r: math.isclose(r, rate, rel_tol=RATE_RTOL))
        ]
        if hit.empty:
            have = ", ".join(f"{r:g}" for r in sorted(same_def["poison_rate"].unique())[::-1])
            reasons.append(f"poison rate {rate:g} of the training set: the reference has {have}")
        else:
            row = hit.iloc[0]
    # A dataset or model already named above is not reported again through its _target_.
    named = {r.split(" ", 1)[0] for r in reasons}
    requirements = {
        k: v
        for k, v in reference.requirements(first["attack"], first["defense"]).items()
        if not (k.endswith("._target_") and k.split(".")[0] in named)
    }
    reasons += setting_mismatches(first["settings"], first.get("facts") or {}, requirements)
    args = sorted({a for args in cell["defense_args"].fillna("") for a in args.split(",") if a})
    if args:
        reasons.append(f"defense settings changed on the command line ({', '.join(args)})")
    if reasons:
        row = None
    return row, reasons


def compare(frame: pd.DataFrame, references: Iterable[Reference]) -> pd.DataFrame:
    """One row per run cell per reference (see the module docstring)."""
    references = list(references)
    out = []
    if frame.empty or not references:
        return pd.DataFrame()
    for key, cell in frame.groupby([*CELL_KEYS, "setting"], dropna=False, sort=True):
        done = cell[cell["status"] == "complete"]
        base = dict(zip(["dataset", "model", "attack", "defense", "setting"], key, strict=True))
        base["attack_name"], base["defense_name"] = cell.iloc[0]["attack"], cell.iloc[0]["defense"]
        for reference in references:
            row = {**base, "reference": reference.name, "n_seeds": len(done)}
            if done.empty:
                out.append({**row, "status": "failed", "reasons": "no complete run"})
                continue
            ref, reasons = _cell_reasons(reference, done)
            if ref is None and not reasons:  # pragma: no cover - _cell_reasons gives one
                reasons = ["no reference row"]
            for m in reference.metrics:
                s = summarize(done[m].astype(float) * 100)
                row[f"{m}_ours"], row[f"{m}_ours_std"] = s.mean, s.std
            row["poison_rate_of_train"] = _rate_of_train(done)
            if reasons:
                out.append({**row, "status": "not comparable", "reasons": "; ".join(reasons)})
                continue
            verdict = []
            for m in reference.metrics:
                theirs = ref[m]
                row[f"{m}_ref"] = theirs
                row[f"{m}_diff"] = row[f"{m}_ours"] - theirs if pd.notna(theirs) else math.nan
                if pd.notna(row[f"{m}_diff"]):
                    verdict.append(abs(row[f"{m}_diff"]) <= reference.tolerance)
            notes = reference.notes_of(done.iloc[0]["attack"], done.iloc[0]["defense"])
            if ref["note"]:
                notes = [ref["note"], *notes]
            out.append(
                {
                    **row,
                    "status": "pass" if verdict and all(verdict) else "fail",
                    "tolerance": reference.tolerance,
                    "source": ref["source"],
                    "notes": "; ".join(notes),
                    "reasons": "",
                }
            )
    return pd.DataFrame(out)


def reference_rows(comparison: pd.DataFrame, reference: Reference) -> pd.DataFrame:
    """Every row of ``reference`` with the comparable run cell's numbers where there is one
    (``verdict``: pass / fail / no comparable run)."""
    nums = reference.numbers.copy()
    nums["verdict"] = "no comparable run"
    if comparison.empty:
        return nums
    ok = comparison[
        (comparison["reference"] == reference.name) & comparison["status"].isin(["pass", "fail"])
    ]
    for _, c in ok.iterrows():
        hit = (
            (nums["dataset"] == c["dataset"])
            & (nums["model"] == c["model"])
            & (nums["attack"] == c["attack_name"])
            & (nums["defense"] == c["defense_name"])
            & nums["poison_rate"].map(
                lambda r, c=c: math.isclose(r, c["poison_rate_of_train"], rel_tol=RATE_RTOL)
            )
        )
        for m in reference.metrics:
            nums.loc[hit, f"{m}_ours"] = c[f"{m}_ours"]
            nums.loc[hit, f"{m}_diff"] = c[f"{m}_diff"]
        nums.loc[hit, "n_seeds"] = c["n_seeds"]
        nums.loc[hit, "verdict"] = c["status"]
    return nums


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None or pd.isna(value) else f"{value:{spec}}"


def comparison_markdown(comparison: pd.DataFrame) -> str:
    """Every run cell: "ours / published (delta)" per metric and the verdict, or the reasons
    it cannot be compared."""
    if comparison.empty:
        return "No run cell to compare.\n"
    lines = []
    for ref_name, part in comparison.groupby("reference", sort=False):
        metrics = [c.removesuffix("_ours") for c in part.columns if c.endswith("_ours")]
        shown = part[["dataset", "model", "attack", "defense", "n_seeds"]].copy()
        shown["rate"] = part["poison_rate_of_train"].map(lambda v: _fmt(v, "g"))
        for m in metrics:
            ours, ref = part[f"{m}_ours"], part.get(f"{m}_ref")
            diff = part.get(f"{m}_diff")
            shown[m] = [
                f"{_fmt(o)} / {_fmt(r, '.2f')} ({_fmt(d, '+.1f')})" if pd.notna(r) else _fmt(o)
                for o, r, d in zip(
                    ours,
                    ref if ref is not None else [math.nan] * len(part),
                    diff if diff is not None else [math.nan] * len(part),
                    strict=True,
                )
            ]
        shown["verdict"] = [
            s if s in ("pass", "fail") else f"{s}: {r}"
            for s, r in zip(part["status"], part["reasons"], strict=True)
        ]
        lines.append(
            f"## {ref_name}\n\nours (mean over seeds) / published (ours - published), %; "
            f"pass = every delta within the tolerance\n\n"
            + shown.to_markdown(index=False, disable_numparse=True)
        )
        compared = part[part["status"].isin(["pass", "fail"])]
        notes = compared["notes"].dropna().unique() if "notes" in compared else []
        if len(notes):
            lines.append("Documented differences of the compared cells: " + " | ".join(notes))
    return "\n\n".join(lines) + "\n"


def reference_markdown(rows: pd.DataFrame, reference: Reference) -> str:
    """Every reference row: published, ours, delta, verdict."""
    shown = rows[["attack", "defense", "poison_rate"]].copy()
    for m in reference.metrics:
        ours = rows.get(f"{m}_ours", pd.Series(math.nan, index=rows.index))
        diff = rows.get(f"{m}_diff", pd.Series(math.nan, index=rows.index))
        shown[f"{m} published"] = rows[m].map(lambda v: _fmt(v, ".2f"))
        shown[f"{m} ours"] = ours.map(_fmt)
        shown[f"{m} diff"] = diff.map(lambda v: _fmt(v, "+.1f"))
    shown["n"] = rows.get("n_seeds", pd.Series(math.nan, index=rows.index)).map(
        lambda v: _fmt(v, ".0f")
    )
    shown["verdict"] = rows["verdict"]
    shown["note"] = rows["note"]
    return shown.to_markdown(index=False, disable_numparse=True) + "\n"
