"""Fake ``metrics.json`` files with real resolved configs, for the table and fidelity tests."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from benchmark.cache import run_settings
from benchmark.results import empty_record
from tests.conftest import compose_cfg

GROUPS = ("dataset", "model", "attack", "defense", "train")


@functools.cache
def _composed(overrides: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    cfg = compose_cfg([*overrides, "logger=none"], Path("/nonexistent"))
    attack = dict(cfg.attack)
    return run_settings(cfg), attack


def write_record(
    folder: Path,
    overrides: tuple[str, ...] = (),
    seed: int = 0,
    *,
    status: str = "complete",
    clean_acc: float = 0.95,
    asr: float = 0.9,
    ra: float = 0.05,
    det_tpr: float | None = None,
    model_key: str | None = None,
    timestamp: str = "2026-12-01T00:00:00+00:00",
    facts: dict[str, Any] | None = None,
    choices: dict[str, str] | None = None,
) -> Path:
    """A record as ``benchmark.pipeline.run`` writes it, for the config ``overrides`` make.

    ``choices`` default to the group options named in ``overrides`` (else the config's
    defaults: mnist5k, small_cnn, badnets, undefended); ``facts`` are the attack's recorded
    scalars (default: its rates, mode and target from the config)."""
    settings, attack = _composed(tuple(sorted(overrides)))
    settings = {**settings, "seed": seed}
    given = dict(o.split("=", 1) for o in overrides if "=" in o and "." not in o.split("=")[0])
    base = {"dataset": "mnist5k", "model": "small_cnn", "attack": "badnets"}
    base |= {"defense": "undefended", "train": "small"}
    if "attack_setting" in given:
        base["attack"] = given["attack_setting"].split("/")[-1]
    chosen = {g: given.get(g, base[g]) for g in GROUPS} | (choices or {})
    record = empty_record(chosen, seed)
    record["status"] = status
    record["config"] = settings
    record["provenance"] = {"overrides": [*overrides, f"seed={seed}"], "timestamp": timestamp}
    rate = attack.get("poison_rate")
    record["attack"] = facts or {
        "attack_kind": "clean_label" if "rate_of" in attack else "dirty_label",
        "poison_rate": rate,
        "target_class": attack.get("target_class"),
        "mode": attack.get("mode"),
        "poison_rate_of_train": rate if attack.get("rate_of", "train_set") == "train_set" else None,
    }
    record["cache"] = {"key": model_key or f"model-{seed}"}
    if status == "complete":
        record["backdoored"] = {"clean_acc": 0.97, "asr": 0.99, "ra": 0.01}
        record["defended"].update(
            {"clean_acc": clean_acc, "asr": asr, "ra": ra, "det_tpr": det_tpr}
        )
    folder.mkdir(parents=True)
    path = folder / "metrics.json"
    path.write_text(json.dumps(record))
    return path
