"""Command-line entry point: ``python -m benchmark.run [overrides]`` (Hydra).

Examples::

    python -m benchmark.run                                   # BadNets on mnist5k, undefended
    python -m benchmark.run attack=badnets dataset=cifar10 model=preact_resnet18
    python -m benchmark.run -m attack=badnets seed=0,1,2      # a sweep (Hydra multirun)
    python -m benchmark.run experiment=smoke_all              # a whole table

Sweeps are safe to interrupt: running the same command again skips the cells whose
``metrics.json`` is complete for the same config (``resume=false`` runs them again), resumes a
half-trained model from its per-epoch checkpoint, and retries failed cells. A failed cell
writes ``status: failed`` with its error and the sweep goes on (``fail_fast=true`` stops it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from benchmark import pipeline
from benchmark.cache import config_digest
from benchmark.callbacks import register_resolvers
from benchmark.composition import install as install_composition_errors
from benchmark.devices import claim_gpu
from benchmark.errors import BenchmarkError
from benchmark.results import empty_record, write_record
from benchmark.tracking import Tracker

log = logging.getLogger("benchmark")
register_resolvers()  # before Hydra resolves the job's folder, also in launcher workers

GROUPS = (
    "dataset", "model", "attack", "defense", "train", "logger", "experiment", "debug",
    "attack_setting", "cell", "track",
)  # fmt: skip


def run_task(
    cfg: DictConfig,
    run_dir: Path,
    choices: dict[str, Any],
    overrides: list[str],
    group: str | None = None,
) -> dict[str, Any]:
    """Run one cell; on any failure write ``status: failed`` with the error, always close the
    tracker, and re-raise."""
    record = empty_record(choices, cfg.seed)
    record["config_digest"] = config_digest(cfg)
    # A result of an earlier run of this folder must not survive as "complete" while this one
    # runs (or after it is killed).
    (run_dir / "metrics.json").unlink(missing_ok=True)
    tracker: Tracker = Tracker()
    failed = True
    try:
        # Every setting is checked before the tracker opens a run or any data is read.
        components = pipeline.build(cfg, choices)
        if cfg.get("logger"):
            tracker = instantiate(cfg.logger)
        tracker.start(
            OmegaConf.to_container(cfg, resolve=True),
            run_dir,
            name="-".join(str(choices.get(g)) for g in ("attack", "defense", "dataset", "model"))
            + f"-s{cfg.seed}",
            group=group,
        )
        record = pipeline.run(
            cfg,
            run_dir=run_dir,
            choices=choices,
            overrides=overrides,
            tracker=tracker,
            record=record,
            components=components,
        )
        failed = False
        return record
    except BaseException as err:
        record["status"] = "failed"
        record["error"] = f"{type(err).__name__}: {err}"
        if not isinstance(err, BenchmarkError):
            record["traceback"] = traceback.format_exc()
        write_record(run_dir, record)
        raise
    finally:
        tracker.finish(failed=failed)


def completed_record(run_dir: Path, digest: str) -> dict[str, Any] | None:
    """The cell's ``metrics.json`` if it is complete and was made with the same config."""
    path = run_dir / "metrics.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("status") != "complete":
        return None
    if record.get("config_digest") != digest:
        log.info("%s holds a result of another config; running the cell again", path)
        return None
    return record


def sweep_group(cfg: DictConfig, hc: Any) -> str | None:
    """The W&B group of a run: ``logger.group``, else the experiment, else the sweep's name."""
    if cfg.get("logger") and cfg.logger.get("group"):
        return str(cfg.logger.group)
    if hc.runtime.choices.get("experiment"):
        return str(hc.runtime.choices.experiment)
    if hc.mode == RunMode.MULTIRUN:
        return Path(str(hc.sweep.dir)).name
    return None


@contextlib.contextmanager
def gpu_for_job(cfg: DictConfig, hc: Any, sweeping: bool) -> Iterator[None]:
    """In a local parallel sweep on several GPUs, give this job a GPU of its own
    (``device=auto`` only; an explicit ``device=cuda:1`` is kept)."""
    count = torch.cuda.device_count() if str(cfg.device) == "auto" else 0
    if not sweeping or count < 2:
        yield
        return
    lock_dir = Path(str(cfg.paths.cache_dir)) / "gpu-locks"
    with claim_gpu(lock_dir, count, int(hc.job.num)) as index:
        with open_dict(cfg):
            cfg.device = f"cuda:{index}"
        log.info("this job runs on cuda:%d of %d GPUs", index, count)
        yield


@contextlib.contextmanager
def cell_lock(run_dir: Path) -> Iterator[None]:
    """Hold the cell's lock (``<run dir>/.cell.lock``) while it runs: the same cell launched
    by a second process (the same sweep started twice) waits, then finds it complete and skips
    it, instead of running it again and overwriting its record."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / ".cell.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another process is running %s; waiting for it", run_dir)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    choices = {g: hc.runtime.choices.get(g) for g in GROUPS}
    run_dir = Path(hc.runtime.output_dir)
    sweeping = hc.mode == RunMode.MULTIRUN
    try:
        with cell_lock(run_dir):
            if cfg.get("resume", True):
                done = completed_record(run_dir, config_digest(cfg))
                if done is not None:
                    log.info(
                        "%s is already complete; skipping it (resume=false runs it again)",
                        run_dir,
                    )
                    return done["defended"]["asr"]
            with gpu_for_job(cfg, hc, sweeping):
                overrides = list(hc.overrides.task)
                record = run_task(cfg, run_dir, choices, overrides, sweep_group(cfg, hc))
    except BenchmarkError as err:
        # Expected, user-facing errors: one clear line, no traceback.
        log.error("%s", err)
        if sweeping and not cfg.get("fail_fast", False):
            return None  # recorded as failed; the sweep goes on
        sys.exit(2)  # SystemExit also stops Hydra's local launchers, which catch Exception
    except Exception:
        if not sweeping:
            raise
        log.exception("the cell %s failed (recorded in its metrics.json)", run_dir)
        if cfg.get("fail_fast", False):
            sys.exit(1)
        return None
    return record["defended"]["asr"]


if __name__ == "__main__":
    install_composition_errors()  # Hydra's unknown options/keys: one line, exit status 2
    main()
