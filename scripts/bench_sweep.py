"""Wall-time benchmark of a whole Hydra sweep, with what the model cache saves.

Runs ``python -m benchmark.run experiment=<name>`` as a subprocess, in a fresh work folder
(its own empty model cache, outputs and offline W&B files), up to three times:

- ``cold``: from scratch; each backdoored model is trained once and shared by every defense
  of its attack through the cache;
- ``rerun``: the identical command again, in the same sweep folder: the harness skips the
  cells that are already complete, so this measures the skip/resume overhead;
- ``warm_cache``: the same sweep with ``resume=false`` in a new sweep folder: every cell runs
  again, but every backdoored model (and attack artefact) comes from the cold pass's cache.

After each pass it reads every ``metrics.json`` of that pass's sweep folder and sums cells,
failures, cache hits, trainings and the per-stage timings. A ``metrics.json`` that the pass
did not (re)write (a skipped cell) counts under ``skipped`` and not in the stage sums.

    python scripts/bench_sweep.py                                  # experiment=smoke_all
    python scripts/bench_sweep.py --passes cold --experiment smoke_full attack=badnets defense=mmac
    python scripts/bench_sweep.py --experiment badnets_seeds --keep --work-dir /tmp/sweep

Writes ``results/bench/sweep.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from benchmark.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
PASSES = ("cold", "rerun", "warm_cache")
STAGES = (
    "validate_s",
    "data_s",
    "train_s",
    "eval_backdoored_s",
    "defense_s",
    "eval_defended_s",
    "total_s",
)
TAIL_LINES = 40


def sweep_env(work: Path) -> dict[str, str]:
    """The parent's environment (thread counts included) with every output under ``work``."""
    env = dict(os.environ)
    env.update(
        {
            "BENCH_CACHE_DIR": str(work / "cache"),
            "BENCH_OUTPUT_DIR": str(work / "outputs"),
            "WANDB_MODE": "offline",
            "WANDB_SILENT": "true",
            "WANDB_DIR": str(work / "wandb"),
            "WANDB_CONFIG_DIR": str(work / "wandb-config"),
            "WANDB_CACHE_DIR": str(work / "wandb-cache"),
            "WANDB_DATA_DIR": str(work / "wandb-data"),
        }
    )
    return env


def sweep_command(experiment: str, sweep_dir: Path, overrides: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "benchmark.run",
        f"experiment={experiment}",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
    ]


def _tail(path: Path, n: int = TAIL_LINES) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def run_pass(name: str, cmd: list[str], env: dict[str, str], work: Path) -> float | None:
    """Run ``cmd`` from the repository root; its wall time, or None (tail printed) on failure.

    Its stdout and stderr go to ``<work>/logs/<name>.{out,err}``."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    with out.open("w") as fo, err.open("w") as fe:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fo, stderr=fe, check=False)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"pass {name} failed (exit {proc.returncode}): {' '.join(cmd)}", file=sys.stderr)
        print(f"--- last lines of its stderr ---\n{_tail(err)}", file=sys.stderr)
        if not err.read_text(errors="replace").strip():
            print(f"--- last lines of its stdout ---\n{_tail(out)}", file=sys.stderr)
        return None
    return wall


def read_records(sweep_dir: Path, since: float | None = None) -> list[tuple[dict, bool]]:
    """Every ``metrics.json`` under ``sweep_dir``, each with whether it was written at or after
    ``since`` (a ``time.time()``; None: all count as written)."""
    rows = []
    for path in sorted(sweep_dir.rglob("metrics.json")):
        fresh = since is None or path.stat().st_mtime >= since
        rows.append((json.loads(path.read_text()), fresh))
    return rows


def _num(x: Any) -> float:
    return float(x) if isinstance(x, int | float) else 0.0


def summarise(
    records: list[dict], wall_s: float, skipped: list[dict] | None = None
) -> dict[str, Any]:
    """The pass's counts and timings.

    Args:
        records: the ``metrics.json`` contents that the pass (re)wrote: the cells it ran.
        wall_s: the sweep subprocess's wall time.
        skipped: the records that the pass left as they were (cells skipped as complete);
            they count as cells, complete or failed, and nowhere else.
    """
    skipped = skipped or []
    everything = [*records, *skipped]
    hits = 0
    trained: dict[str, dict] = {}  # one record per backdoored model actually trained
    uncached = 0
    for i, r in enumerate(records):
        cache = r.get("cache") or {}
        if not cache.get("key"):
            continue  # failed before the model stage
        if cache.get("hit"):
            hits += 1
        elif cache.get("enabled", True):
            key = cache["key"]
            if key not in trained or _num(r.get("timing", {}).get("train_s")) > _num(
                trained[key].get("timing", {}).get("train_s")
            ):
                trained[key] = r
        else:  # the cache is off: every cell trains its own model
            trained[f"uncached-{i}"] = r
            uncached += 1
    artifacts = [a for r in records for a in r.get("attack_artifacts") or []]
    stage_s = {k: round(sum(_num(r.get("timing", {}).get(k)) for r in records), 3) for k in STAGES}
    timed = [r for r in records if r.get("timing", {}).get("total_s") is not None]
    per_attack: dict[str, float] = defaultdict(float)
    for r in trained.values():
        per_attack[str(r.get("choices", {}).get("attack"))] += _num(
            r.get("timing", {}).get("train_s")
        )
    per_defense: dict[str, list[float]] = defaultdict(list)
    for r in timed:
        per_defense[str(r.get("choices", {}).get("defense"))].append(
            _num(r["timing"].get("defense_s"))
        )
    return {
        "wall_s": round(wall_s, 3),
        "cells": len(everything),
        "ran": len(records),
        "skipped": len(skipped),
        "complete": sum(r.get("status") == "complete" for r in everything),
        "failed": sum(r.get("status") != "complete" for r in everything),
        "cache_hits": hits,
        "trainings": len(trained),
        "uncached_trainings": uncached,
        "trainings_avoided": len(records) - len(trained),
        "artifact_hits": sum(bool(a.get("hit")) for a in artifacts),
        "artifact_computed": sum(not a.get("hit") for a in artifacts),
        "artifact_s": round(
            sum(_num(a.get("train_s")) + _num(a.get("compute_s")) for a in artifacts), 3
        ),
        "stage_s": stage_s,
        "mean_cell_s": round(stage_s["total_s"] / len(timed), 3) if timed else None,
        "per_attack_train_s": {k: round(v, 3) for k, v in sorted(per_attack.items())},
        "per_defense_s": {
            k: round(sum(v) / len(v), 3) for k, v in sorted(per_defense.items()) if v
        },
        "per_cell": [
            {
                "attack": r.get("choices", {}).get("attack"),
                "defense": r.get("choices", {}).get("defense"),
                "seed": r.get("seed"),
                "status": r.get("status"),
                "cache_hit": (r.get("cache") or {}).get("hit"),
                "total_s": r.get("timing", {}).get("total_s"),
                "clean_acc": (r.get("defended") or {}).get("clean_acc"),
                "asr": (r.get("defended") or {}).get("asr"),
            }
            for r in records
        ],
    }


def cost_model(cold: dict[str, Any], records: list[dict]) -> dict[str, Any]:
    """How the sweep's cost grows, and the cold pass's estimate from its stage timings."""
    per_cell = sum(
        _num(r.get("timing", {}).get("total_s")) - _num(r.get("timing", {}).get("train_s"))
        for r in records
    )
    estimate = sum(cold["per_attack_train_s"].values()) + per_cell
    return {
        "trainings": "A x S backdoored models (A attacks, S seeds), each shared by all D "
        "defenses through the cache",
        "per_cell": "D x A x S defense + evaluation stages",
        "estimate_s": round(estimate, 3),
        "estimate": "sum of per-attack training times + sum over cells of (total_s - train_s), "
        "from the cold pass; leaves out process start-up, Hydra and W&B",
        "measured_wall_s": cold["wall_s"],
    }


def header(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "experiment": args.experiment,
        "overrides": args.overrides,
        "pass_names": args.passes,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def summary_line(name: str, s: dict[str, Any]) -> str:
    return (
        f"{name:<10} {s['wall_s']:8.1f} s  cells {s['cells']:3d}  complete {s['complete']:3d}"
        f"  failed {s['failed']:2d}  skipped {s['skipped']:3d}  trainings {s['trainings']:3d}"
        f"  cache hits {s['cache_hits']:3d}"
    )


def parse_passes(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PASSES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"passes must be among {','.join(PASSES)}: {text!r}")
    return names


def bench(args: argparse.Namespace, work: Path) -> int:
    env = sweep_env(work)
    result: dict[str, Any] = {**header(args), "work_dir": str(work), "passes": {}}
    cold_records: list[dict] | None = None
    for name in args.passes:
        sweep_dir = work / ("sweep_warm" if name == "warm_cache" else "sweep")
        extra = ["resume=false"] if name == "warm_cache" else []
        cmd = sweep_command(args.experiment, sweep_dir, [*args.overrides, *extra])
        since = time.time() - 1.0  # file mtimes can be coarser than time.time()
        wall = run_pass(name, cmd, env, work)
        if wall is None:
            return 1
        rows = read_records(sweep_dir, since)
        records = [r for r, fresh in rows if fresh]
        summary = summarise(records, wall, skipped=[r for r, fresh in rows if not fresh])
        summary["command"] = cmd[1:]
        result["passes"][name] = summary
        if name == "cold":
            cold_records = records
        print(summary_line(name, summary), flush=True)
    if cold_records is not None:
        result["cost_model"] = cost_model(result["passes"]["cold"], cold_records)
        print(
            f"cost model: estimate {result['cost_model']['estimate_s']:.1f} s vs measured "
            f"{result['cost_model']['measured_wall_s']:.1f} s (cold)"
        )
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="smoke_all")
    parser.add_argument("--out", default=str(ROOT / "results/bench/sweep.json"))
    parser.add_argument(
        "--work-dir",
        default=None,
        help="folder for the cache, sweeps and logs (default: a fresh temporary folder, "
        "removed at the end unless --keep; a given folder is never removed)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument(
        "--passes",
        type=parse_passes,
        default=list(PASSES),
        help=f"comma-separated, in order (default: {','.join(PASSES)})",
    )
    parser.add_argument(
        "overrides", nargs="*", help="extra Hydra overrides, e.g. dataset.max_train=600"
    )
    args = parser.parse_args(argv)
    if args.work_dir is None:
        work = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
        remove = not args.keep
    else:
        work = Path(args.work_dir).resolve()
        if work.exists() and any(work.iterdir()):
            print(f"warning: {work} is not empty; the cold pass may not be cold", file=sys.stderr)
        work.mkdir(parents=True, exist_ok=True)
        remove = False
    try:
        return bench(args, work)
    finally:
        if remove:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder kept: {work}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
