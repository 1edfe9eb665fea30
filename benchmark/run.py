"""Command-line entry point: ``python -m benchmark.run [overrides]`` (Hydra).

Examples::

    python -m benchmark.run                                   # BadNets on mnist5k, undefended
    python -m benchmark.run attack=badnets dataset=cifar10 model=preact_resnet18
    python -m benchmark.run -m attack=badnets seed=0,1,2      # a sweep (Hydra multirun)
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from benchmark import pipeline
from benchmark.errors import BenchmarkError
from benchmark.results import empty_record, write_record
from benchmark.tracking import Tracker

log = logging.getLogger("benchmark")

GROUPS = ("dataset", "model", "attack", "defense", "train", "logger", "experiment", "debug")


def run_task(
    cfg: DictConfig, run_dir: Path, choices: dict[str, Any], overrides: list[str]
) -> dict[str, Any]:
    """Run one cell; on any failure write ``status: failed`` with the error, always close the
    tracker, and re-raise."""
    record = empty_record(choices, int(cfg.seed))
    tracker: Tracker = instantiate(cfg.logger) if cfg.get("logger") else Tracker()
    failed = True
    try:
        tracker.start(
            OmegaConf.to_container(cfg, resolve=True),
            run_dir,
            name="-".join(str(choices.get(g)) for g in ("attack", "defense", "dataset", "model"))
            + f"-s{cfg.seed}",
        )
        record = pipeline.run(
            cfg,
            run_dir=run_dir,
            choices=choices,
            overrides=overrides,
            tracker=tracker,
            record=record,
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


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    choices = {g: hc.runtime.choices.get(g) for g in GROUPS}
    try:
        record = run_task(cfg, Path(hc.runtime.output_dir), choices, list(hc.overrides.task))
    except BenchmarkError as err:
        # Expected, user-facing errors: one clear line, no traceback.
        log.error("%s", err)
        sys.exit(2)
    return record["defended"]["asr"]


if __name__ == "__main__":
    main()
