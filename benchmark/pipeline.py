"""The runner's stages: validate -> data -> poison -> backdoored model -> defend -> evaluate.

Each stage is a small function returning plain values; ``run(cfg)`` calls them in order and
returns the results record. The harness reaches attacks, defenses, datasets and models only
through ``hydra.utils.instantiate``: it knows no method by name.

Seeds: the run seed ``cfg.seed`` is split into independent streams ("reserve", "poison",
"init", "fit", "defense"), so the poison indices do not move when the model or defense changes.
The dataset's own subsets use ``dataset.seed``, so the data are the same for every run seed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf
from torch import nn

from attacks.base import Attack
from benchmark import metrics
from benchmark.cache import ModelCache, cache_key
from benchmark.collect import record_row
from benchmark.data import stratified_split
from benchmark.datasets.base import Dataset
from benchmark.errors import BenchmarkError, ConfigError
from benchmark.evaluate import detection_metrics, predictions, stage_metrics, trigger_grid
from benchmark.io import atomic_torch_save
from benchmark.results import (
    empty_record,
    format_table,
    memory_usage,
    provenance,
    result_table,
    write_record,
)
from benchmark.seeding import derive_seed, generator, seed_everything
from benchmark.tracking import Tracker
from benchmark.train import Augment, fit, place, resolve_device
from benchmark.types import ImageSet, PoisonedSet
from defenses.base import Defense, DefenseContext, DefenseResult, Stage

log = logging.getLogger(__name__)


@dataclass
class Components:
    """The instantiated, validated config entries."""

    dataset: Dataset
    attack: Attack
    defense: Defense
    device: torch.device
    clean_fraction: float


@dataclass
class Data:
    """The run's data: the clean reserve, the poisoned training set and the two test sets."""

    reserve: ImageSet
    reserve_index: torch.Tensor  # into the dataset's training split
    train_index: torch.Tensor  # into the dataset's training split, in ``train`` order
    train: PoisonedSet
    test: ImageSet
    backdoor_test: PoisonedSet


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


def instantiate_entry(node: DictConfig, group: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets the harness's own errors (e.g. a ``ConfigError``
    raised by a constructor) through instead of Hydra's generic wrapper."""
    log.info("Instantiating %s <%s>", group, node.get("_target_"))
    try:
        return instantiate(node, **kwargs)
    except MissingMandatoryValue as err:
        key = f"{group}.{err.key}" if err.key else group
        raise ConfigError(key, f"is required; set it on the command line, e.g. {key}=...") from None
    except InstantiationException as err:
        if isinstance(err.__cause__, BenchmarkError):
            raise err.__cause__ from None
        raise


def build(cfg: DictConfig) -> Components:
    """Instantiate and validate dataset, attack and defense; loads no data, trains nothing."""
    device = resolve_device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device", f"= {cfg.device} but CUDA is not available; use device=cpu or device=auto"
        )
    _validate_recipe(cfg.train)
    if cfg.get("deterministic"):
        # Needed by cuBLAS before CUDA starts; CPU kernels used here are deterministic anyway.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick kernels
    dataset: Dataset = instantiate_entry(cfg.dataset, "dataset")
    dataset.validate()
    n_full = dataset.n_train
    fraction = cfg.defense_data.clean_fraction
    if not isinstance(fraction, int | float) or not 0.0 <= fraction < 1.0:
        raise ConfigError("defense_data.clean_fraction", f"must be in [0, 1), got {fraction!r}")
    n_reserve = round(fraction * n_full)
    if n_full - n_reserve < dataset.num_classes:
        raise ConfigError(
            "defense_data.clean_fraction",
            f"= {fraction} leaves "
            f"{n_full - n_reserve} training images for {dataset.num_classes} "
            "classes",
        )
    n_train = n_full - n_reserve
    attack: Attack = instantiate_entry(cfg.attack, "attack")
    attack.validate(dataset.num_classes, dataset.image_shape, n_train)
    defense: Defense = instantiate_entry(cfg.defense, "defense")
    defense.validate(dataset.num_classes, n_train, n_reserve)
    return Components(dataset, attack, defense, device, float(fraction))


def _validate_recipe(train: DictConfig) -> None:
    for key, low in (("epochs", 1), ("batch_size", 1)):
        value = train.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"train.{key}", f"must be an integer >= {low}, got {value!r}")
    lr = train.get("lr")
    if isinstance(lr, bool) or not isinstance(lr, int | float) or lr <= 0:
        raise ConfigError("train.lr", f"must be a number > 0, got {lr!r}")


def load_data(cfg: DictConfig, comp: Components) -> Data:
    """Load the splits, carve out the clean reserve, poison the rest, build the test sets.

    The images go to the training device when they fit, so triggers run there too.
    """
    full_train, test = comp.dataset.load()
    full_train, test = place(full_train, comp.device), place(test, comp.device)
    reserve_idx, train_idx = stratified_split(
        full_train, round(comp.clean_fraction * len(full_train)), generator(cfg.seed, "reserve")
    )
    reserve, benign = full_train.subset(reserve_idx), full_train.subset(train_idx)
    comp.attack.prepare(benign, generator(cfg.seed, "attack", "prepare"))
    poisoned = comp.attack.poison(benign, generator(cfg.seed, "poison"))
    backdoor_test = comp.attack.backdoor_test_set(test)
    return Data(reserve, reserve_idx, train_idx, poisoned, test, backdoor_test)


def new_model(cfg: DictConfig, dataset: Dataset, *names: object) -> nn.Module:
    """A freshly initialised model, its weights seeded from ``(cfg.seed, "init", *names)``."""
    seed_everything(cfg.seed, "init", *names)
    c, h, w = dataset.image_shape
    return instantiate_entry(
        cfg.model,
        "model",
        num_classes=dataset.num_classes,
        in_chans=c,
        image_size=(h, w),
        mean=list(dataset.mean),
        std=list(dataset.std),
    )


def augmentation(dataset: Dataset) -> Augment:
    return Augment(crop_padding=dataset.crop_padding, hflip=dataset.hflip)


def backdoored_model(
    cfg: DictConfig, comp: Components, data: Data, run_dir: Path, record: dict[str, Any]
) -> nn.Module:
    """Train the model on the poisoned set, or load it from the cache."""
    cache = ModelCache(cfg.paths.cache_dir, enabled=cfg.cache.enabled)
    key = cache_key(cfg)
    model = new_model(cfg, comp.dataset, "backdoored")
    poison_index = torch.nonzero(data.train.is_poison.cpu()).flatten()
    record["cache"] = {"key": key, "enabled": bool(cfg.cache.enabled), "hit": False}
    with cache.lock(key) if cache.enabled else contextlib.nullcontext():
        payload = cache.load(key)
        if payload is not None and not torch.equal(payload["poison_index"], poison_index):
            log.warning("cache entry %s was made with other poison indices; retraining", key)
            cache.clear(key)
            payload = None
        if payload is not None:
            model.load_state_dict(payload["model"])
            comp.attack.load_state_dict(payload["attack_state"])
            record["cache"]["hit"] = True
            record["train_history"] = payload["history"]
            log.info("loaded the backdoored model from the cache (%s)", key)
            return model.to(comp.device)
        ckpt_dir = cache.entry_dir(key) if cache.enabled else run_dir
        attack = comp.attack
        result = fit(
            model,
            data.train.clean_view(),
            cfg.train,
            device=comp.device,
            seed=derive_seed(cfg.seed, "fit", "backdoored"),
            augment=augmentation(comp.dataset),
            batch_hook=attack.batch_hook if attack.controls_training else None,
            checkpoint=ckpt_dir / "train_ckpt.pt",
            progress=cfg.progress,
            desc="backdoored",
        )
        record["train_history"] = result.history
        cache.save(
            key,
            {
                "model": {k: v.cpu() for k, v in model.state_dict().items()},
                "poison_index": poison_index,
                "reserve_index": data.reserve_index,
                "attack_state": attack.state_dict(),
                "history": result.history,
            },
            OmegaConf.to_yaml(cfg, resolve=True),
        )
        (ckpt_dir / "train_ckpt.pt").unlink(missing_ok=True)
    return model


def defend(
    cfg: DictConfig, comp: Components, data: Data, model: nn.Module, run_dir: Path
) -> DefenseResult:
    """Run the defense with only what its threat model allows."""
    defense = comp.defense
    seed = derive_seed(cfg.seed, "defense")
    ctx = DefenseContext(
        train_set=data.train.clean_view(),
        clean_set=data.reserve,
        model=None if defense.stage == Stage.PRE_TRAINING else model,
        num_classes=comp.dataset.num_classes,
        fit=functools.partial(
            fit,
            recipe=cfg.train,
            device=comp.device,
            seed=derive_seed(seed, "fit"),
            augment=augmentation(comp.dataset),
            progress=cfg.progress,
        ),
        new_model=functools.partial(new_model, cfg, comp.dataset, "defense"),
        seed=seed,
        device=comp.device,
        work_dir=run_dir / "defense",
        recipe=cfg.train,
    )
    result = defense.run(ctx)
    _check_result(result, len(data.train))
    return result


def _check_result(result: DefenseResult, n_train: int) -> None:
    for name in ("train_flags", "train_scores"):
        t = getattr(result, name)
        if t is not None and t.shape != (n_train,):
            raise ValueError(
                f"defense returned {name} of shape {tuple(t.shape)}, expected ({n_train},)"
            )
    if result.train_flags is not None and result.train_flags.dtype != torch.bool:
        raise ValueError("defense returned train_flags that are not bool")


def run(
    cfg: DictConfig,
    *,
    run_dir: str | Path,
    choices: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    tracker: Tracker | None = None,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one cell and return its record (also written to ``run_dir/metrics.json``).

    ``record`` may be passed in so that a caller sees the partial record if a stage fails.
    """
    run_dir = Path(run_dir)
    tracker = tracker or Tracker()
    timer = Timer()
    record = record if record is not None else empty_record(choices or {}, int(cfg.seed))
    t_start = time.perf_counter()
    with timer("validate"):
        comp = build(cfg)
    record["provenance"] = provenance(comp.device, overrides or [])
    with timer("data"):
        data = load_data(cfg, comp)
    record["data"] = {
        **comp.dataset.describe(),
        "n_train": len(data.train),
        "n_clean_reserve": len(data.reserve),
        "n_test": len(data.test),
        "n_backdoor_test": len(data.backdoor_test),
    }
    record["attack"] = {**comp.attack.describe(len(data.train)), "n_poison": data.train.num_poison}
    # Where the reserve and the training set come from (indices into the dataset's training
    # split) and which training samples are poisoned (indices into the training set).
    atomic_torch_save(
        {
            "reserve_index": data.reserve_index.cpu(),
            "train_index": data.train_index.cpu(),
            "poison_index": torch.nonzero(data.train.is_poison.cpu()).flatten(),
        },
        run_dir / "indices.pt",
    )
    with timer("train"):
        model = backdoored_model(cfg, comp, data, run_dir, record)
    with timer("eval_backdoored"):
        pred = predictions(model, data.test, data.backdoor_test, comp.device)
        record["backdoored"] = stage_metrics(pred, data.test, data.backdoor_test)
    with timer("defense"):
        result = defend(cfg, comp, data, model, run_dir)
    with timer("eval_defended"):
        if result.model is not model:  # an unchanged model keeps its predictions
            pred = predictions(result.model, data.test, data.backdoor_test, comp.device)
        defended = stage_metrics(pred, data.test, data.backdoor_test)
        det, extras = detection_metrics(
            result, data.train.is_poison, data.test, data.backdoor_test, pred, comp.device
        )
    defended.update({k: det.get(k) for k in ("det_tpr", "det_fpr", "det_precision", "det_auroc")})
    defended["der"] = metrics.der(record["backdoored"], defended)
    record["defended"] = defended
    record["detection"] = {k: v for k, v in det.items() if k.startswith("det_")}
    record["defense_extras"] = {**result.extras, **extras}
    grid = trigger_grid(data.test, data.backdoor_test, run_dir / "trigger_grid.png")
    record["timing"] = {**timer.seconds, "total_s": round(time.perf_counter() - t_start, 3)}
    record["memory"] = memory_usage(comp.device)
    record["status"], record["error"] = "complete", None
    write_record(run_dir, record)
    log.info("results\n%s", format_table(record))
    tracker.log_metrics(
        {
            f"{stage}/{k}": v
            for stage in ("backdoored", "defended")
            for k, v in record[stage].items()
        }
    )
    tracker.log_table("results", result_table(record))
    tracker.log_table("row", pd.DataFrame([record_row(record, run_dir / "metrics.json")]))
    tracker.log_image("trigger_grid", grid, caption="clean (top) vs triggered (bottom)")
    return record
