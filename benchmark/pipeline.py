"""The runner: validate -> data -> poison -> backdoored model -> defend -> evaluate.

``run(cfg)`` calls the stages in order and is the one place that writes the results record;
each stage is a function in its own module that returns plain values:

- ``benchmark.build``: the components (``build``), fresh models, the training augmentation;
- ``benchmark.poisoning``: the splits, the clean reserve and the poisoned training set;
- ``benchmark.attack_services``: surrogates and caches lent to attacks;
- ``benchmark.backdoored``: the backdoored model, trained or from the cache;
- ``benchmark.defend``: the defense under its threat model;
- ``benchmark.evaluate``: predictions, rates, counts, detection metrics, pictures.

The harness reaches attacks, defenses, datasets and models only through
``hydra.utils.instantiate``: it knows no method by name. The backdoor test set of each stage
comes from ``Attack.stage_backdoor_test``, after a cached attack's state is restored.

Seeds: the run seed ``cfg.seed`` is split into independent streams ("reserve", "poison",
"init", "fit", "defense"), so the poison indices do not move when the model or defense changes.
The dataset's own subsets use ``dataset.seed``, so the data are the same for every run seed.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig
from torch import nn

import benchmark.progress
from attacks.base import StageTest
from benchmark import metrics
from benchmark.attack_services import attack_context, stage_context
from benchmark.backdoored import Backdoored, backdoored_model
from benchmark.build import Components, augmentation, build, instantiate_entry, new_model
from benchmark.cache import run_settings
from benchmark.collect import record_row
from benchmark.defend import DEFENSE_CHECKPOINTS, checkpointed_fit, defend
from benchmark.evaluate import (
    detection_metrics,
    poison_grid,
    predictions,
    stage_counts,
    stage_metrics,
    trigger_grid,
)
from benchmark.io import atomic_torch_save
from benchmark.poisoning import Data, load_data
from benchmark.results import (
    empty_record,
    format_table,
    memory_usage,
    provenance,
    result_table,
    write_record,
)
from benchmark.tracking import Tracker

__all__ = [
    "DEFENSE_CHECKPOINTS",
    "Backdoored",
    "Components",
    "Data",
    "Timer",
    "attack_context",
    "augmentation",
    "backdoor_test",
    "backdoored_model",
    "build",
    "checkpointed_fit",
    "defend",
    "instantiate_entry",
    "load_data",
    "new_model",
    "run",
]

log = logging.getLogger(__name__)


class Timer:
    """Wall seconds per stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[f"{stage}_s"] = round(time.perf_counter() - t0, 3)


def backdoor_test(
    cfg: DictConfig, comp: Components, data: Data, model: nn.Module, stage: str, run_dir: Path
) -> StageTest:
    """The backdoor test set ``model`` of ``stage`` is evaluated on, from the attack."""
    ctx = stage_context(cfg, comp, stage, run_dir)
    return comp.attack.stage_backdoor_test(data.test, model, ctx)


def run(
    cfg: DictConfig,
    *,
    run_dir: str | Path,
    choices: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    tracker: Tracker | None = None,
    record: dict[str, Any] | None = None,
    components: Components | None = None,
) -> dict[str, Any]:
    """Run one cell and return its record (also written to ``run_dir/metrics.json``).

    ``record`` may be passed in so that a caller sees the partial record if a stage fails;
    ``components``, the result of :func:`build` when the caller validated the config first.
    """
    benchmark.progress.set_enabled(bool(cfg.progress))
    run_dir = Path(run_dir)
    tracker = tracker or Tracker()
    timer = Timer()
    record = record if record is not None else empty_record(choices or {}, cfg.seed)
    t_start = time.perf_counter() - (components.build_s if components else 0.0)
    comp = components or build(cfg, choices)
    timer.seconds["validate_s"] = comp.build_s
    record["provenance"] = provenance(comp.device, overrides or [])
    record["config"] = run_settings(cfg)  # what defines the cell: tables group and match on it
    with timer("data"):
        data = load_data(cfg, comp)
    record["attack_artifacts"] = data.attack_artifacts
    record["data"] = {
        **comp.dataset.describe(),
        "n_train": len(data.train),
        "n_clean_reserve": len(data.reserve),
        "n_test": len(data.test),
    }
    # Where the reserve and the training set come from (indices into the dataset's training
    # split) and which training samples are poisoned (indices into the training set).
    atomic_torch_save(
        {
            "reserve_index": data.reserve_index.cpu(),
            "train_index": data.train_index.cpu(),
            "poison_index": data.poison_index,
        },
        run_dir / "indices.pt",
    )
    with timer("train"):
        trained = backdoored_model(cfg, comp, data, run_dir)
    model = trained.model
    # described once the model stage has restored a cached attack's trigger state
    record["attack"] = {**comp.attack.describe(len(data.train)), "n_poison": data.train.num_poison}
    record["cache"] = trained.cache
    record["train_history"] = trained.history
    with timer("eval_backdoored"):
        # built now, from the attack's state as restored with a cached model
        tests = {"backdoored": backdoor_test(cfg, comp, data, model, "backdoored", run_dir)}
        bd = tests["backdoored"].backdoor_test
        pred = predictions(model, data.test, bd, comp.device)
        record["backdoored"] = stage_metrics(pred, data.test, bd)
        counts = {"backdoored": stage_counts(pred, data.test, bd)}
        record["counts"] = counts
    record["data"]["n_backdoor_test"] = len(bd)  # of the backdoored stage
    grid = trigger_grid(data.test, bd, run_dir / "trigger_grid.png")
    with timer("defense"):
        result = defend(cfg, comp, data, model, run_dir)
    with timer("eval_defended"):
        tests["defended"] = tests["backdoored"]
        if result.model is not model:  # an unchanged model keeps its predictions
            if comp.attack.model_dependent:  # a changed model has its own backdoor test set
                tests["defended"] = backdoor_test(
                    cfg, comp, data, result.model, "defended", run_dir
                )
            bd = tests["defended"].backdoor_test
            pred = predictions(result.model, data.test, bd, comp.device)
        defended = stage_metrics(pred, data.test, bd)
        counts["defended"] = stage_counts(pred, data.test, bd)
        det, extras = detection_metrics(
            result, data.train.is_poison, data.test, bd, pred, comp.device
        )
    reports = {stage: t.report for stage, t in tests.items() if t.report is not None}
    if reports:
        record[comp.attack.name] = reports
    defended.update({k: det.get(k) for k in ("det_tpr", "det_fpr", "det_precision", "det_auroc")})
    defended["der"] = metrics.der(record["backdoored"], defended)
    record["defended"] = defended
    record["detection"] = {k: v for k, v in det.items() if k.startswith("det_")}
    record["defense_extras"] = {**result.extras, **extras}
    poisons = poison_grid(data.benign, data.train, run_dir / "poison_grid.png")
    record["timing"] = {**timer.seconds, "total_s": round(time.perf_counter() - t_start, 3)}
    record["memory"] = memory_usage(comp.device)
    record["status"], record["error"] = "complete", None
    write_record(run_dir, record)
    shutil.rmtree(run_dir / DEFENSE_CHECKPOINTS, ignore_errors=True)  # only needed to resume
    _log(tracker, record, run_dir, grid, poisons, tests)
    return record


def _log(
    tracker: Tracker,
    record: dict[str, Any],
    run_dir: Path,
    grid: Path,
    poisons: Path | None,
    tests: dict[str, StageTest],
) -> None:
    """The finished record to the log and the tracker: metrics, tables, pictures."""
    log.info("results\n%s", format_table(record))
    tracker.log_metrics(
        {
            f"{stage}/{k}": v
            for stage in ("backdoored", "defended")
            for k, v in record[stage].items()
        }
    )
    tracker.log_table("results", result_table(record))
    row = pd.DataFrame([record_row(record, run_dir / "metrics.json")])
    row = row.drop(columns=["settings", "facts"])
    tracker.log_table("row", row)
    tracker.log_image("trigger_grid", grid, caption="clean test images (top) vs triggered (bottom)")
    if poisons is not None:
        tracker.log_image(
            "poison_grid", poisons, caption="training images (top) vs as poisoned (bottom)"
        )
    for stage, test in tests.items():
        if test.scalars:
            tracker.log_metrics({f"{stage}/{k}": v for k, v in test.scalars.items()})
