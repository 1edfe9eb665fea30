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
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
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

import benchmark.progress
from attacks.base import Attack, AttackContext
from attacks.inversion import InvertedTriggers
from attacks.pgd import adversarial_training_hook
from benchmark import metrics, tracking, validate
from benchmark.cache import ModelCache, cache_key, config_digest, run_settings
from benchmark.collect import record_row
from benchmark.data import stratified_split
from benchmark.datasets.base import Dataset
from benchmark.errors import BenchmarkError, ConfigError
from benchmark.evaluate import (
    detection_metrics,
    poison_grid,
    predictions,
    stage_counts,
    stage_metrics,
    trigger_grid,
)
from benchmark.io import atomic_torch_save, discard_checked
from benchmark.results import (
    empty_record,
    format_table,
    memory_usage,
    provenance,
    result_table,
    save_inverted_triggers,
    write_record,
)
from benchmark.seeding import derive_seed, generator, seed_everything
from benchmark.tracking import Tracker
from benchmark.train import Augment, fit, place, resolve_device, use_amp
from benchmark.types import ImageSet, PoisonedSet
from defenses.base import Defense, DefenseContext, DefenseResult, Stage

log = logging.getLogger(__name__)

# The defense's per-epoch training checkpoints, inside the run folder.
DEFENSE_CHECKPOINTS = "defense/checkpoints"


@dataclass
class Components:
    """The instantiated, validated config entries."""

    dataset: Dataset
    attack: Attack
    defense: Defense
    device: torch.device
    clean_fraction: float
    build_s: float = 0.0  # wall seconds of ``build``


@dataclass
class Data:
    """The run's data: the clean reserve, the poisoned training set and the two test sets.

    ``benign`` is the training set before poisoning (training-controlled attacks train on it
    through their batch hook). For an attack that inverts its trigger from each model
    (``natural``), the test set is split into ``inversion`` and ``evaluation`` halves and
    ``backdoor_test`` is built per stage; until then it is empty.
    """

    reserve: ImageSet
    reserve_index: torch.Tensor  # into the dataset's training split
    train_index: torch.Tensor  # into the dataset's training split, in ``train`` order
    benign: ImageSet
    train: PoisonedSet
    test: ImageSet
    backdoor_test: PoisonedSet
    inversion: ImageSet | None = None
    evaluation: ImageSet | None = None


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


def build(cfg: DictConfig, choices: dict[str, Any] | None = None) -> Components:
    """Check the run's settings, instantiate and validate dataset, model, attack and defense;
    loads no data, trains nothing."""
    t0 = time.perf_counter()
    validate.check_run(cfg, choices)
    device = resolve_device(cfg.device)
    if cfg.get("deterministic"):
        # Needed by cuBLAS before CUDA starts; CPU kernels used here are deterministic anyway.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick kernels
    dataset: Dataset = instantiate_entry(cfg.dataset, "dataset")
    dataset.validate()
    validate.check_model(cfg, dataset.num_classes, dataset.image_shape)
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
    build_s = round(time.perf_counter() - t0, 3)
    return Components(dataset, attack, defense, device, float(fraction), build_s)


def load_data(cfg: DictConfig, comp: Components, record: dict[str, Any] | None = None) -> Data:
    """Load the splits, carve out the clean reserve, poison the rest, build the test sets.

    The images go to the training device when they fit, so triggers run there too.
    """
    full_train, test = comp.dataset.load()
    full_train, test = place(full_train, comp.device), place(test, comp.device)
    reserve_idx, train_idx = stratified_split(
        full_train, round(comp.clean_fraction * len(full_train)), generator(cfg.seed, "reserve")
    )
    reserve, benign = full_train.subset(reserve_idx), full_train.subset(train_idx)
    ctx = attack_context(cfg, comp, benign, record if record is not None else {})
    comp.attack.prepare(benign, generator(cfg.seed, "attack", "prepare"), ctx)
    poisoned = comp.attack.poison(benign, generator(cfg.seed, "poison"))
    if getattr(comp.attack, "inverts_trigger", False):
        n_inv = round(comp.attack.inversion_fraction * len(test))
        inv_idx, eval_idx = stratified_split(test, n_inv, generator(cfg.seed, "natural", "split"))
        inversion, evaluation = test.subset(inv_idx), test.subset(eval_idx)
        return Data(
            reserve,
            reserve_idx,
            train_idx,
            benign,
            poisoned,
            test,
            _empty_backdoor(test),
            inversion,
            evaluation,
        )
    backdoor_test = comp.attack.backdoor_test_set(test)
    return Data(reserve, reserve_idx, train_idx, benign, poisoned, test, backdoor_test)


def _empty_backdoor(test: ImageSet) -> PoisonedSet:
    none = torch.zeros(0, dtype=torch.long, device=test.device)
    return PoisonedSet(
        test.x[:0], none, test.classes, is_poison=none.bool(), y_orig=none, src_index=none
    )


def _derived_key(cfg: DictConfig, name: str, spec: dict[str, Any]) -> str:
    """A cache key for an attack artefact: the run's data, model and recipe plus ``spec``."""
    base = cache_key(cfg, groups=("dataset", "model", "train", "defense_data", "seed"))
    text = json.dumps({"base": base, "name": name, "spec": spec}, sort_keys=True, default=str)
    return f"{name}-" + hashlib.sha256(text.encode()).hexdigest()[:20]


def attack_context(
    cfg: DictConfig, comp: Components, benign: ImageSet, record: dict[str, Any]
) -> AttackContext:
    """The runner's services for attacks: cached surrogate models and cached artefacts."""
    cache = ModelCache(cfg.paths.cache_dir, enabled=cfg.cache.enabled)
    log_entries = record.setdefault("attack_artifacts", [])

    def surrogate(kind: str, adversarial: dict[str, Any] | None) -> nn.Module:
        if kind not in ("clean", "adversarial"):
            raise ValueError(f"unknown surrogate kind {kind!r}")
        spec = {"kind": kind, "adversarial": adversarial if kind == "adversarial" else None}
        key = _derived_key(cfg, "surrogate", spec)
        model = new_model(cfg, comp.dataset, "surrogate", kind)
        entry = {"name": f"surrogate_{kind}", "key": key, "hit": False}
        log_entries.append(entry)
        with cache.lock(key) if cache.enabled else contextlib.nullcontext():
            payload = cache.load(key)
            if payload is not None:
                model.load_state_dict(payload["model"])
                entry["hit"] = True
                return model.to(comp.device).eval()
            aug = augmentation(comp.dataset) if cfg.train.get("augment", True) else None
            hook = None
            if kind == "adversarial":
                hook = adversarial_training_hook(
                    model, **spec["adversarial"], augment=aug, amp=use_amp(cfg.train, comp.device)
                )
                aug = None  # the hook augments before the PGD step
            ckpt_dir = cache.entry_dir(key) if cache.enabled else Path(cfg.paths.output_dir)
            t0 = time.perf_counter()
            result = fit(
                model,
                benign,
                cfg.train,
                device=comp.device,
                seed=derive_seed(cfg.seed, "fit", "surrogate", kind),
                augment=aug,
                batch_hook=hook,
                checkpoint=ckpt_dir / f"{key}_ckpt.pt",
                progress=cfg.progress,
                desc=f"surrogate ({kind})",
            )
            entry["train_s"] = round(time.perf_counter() - t0, 3)
            entry["final_train_acc"] = result.history[-1]["acc"] if result.history else None
            cache.save(
                key,
                {
                    "model": {k: v.cpu() for k, v in model.state_dict().items()},
                    "history": result.history,
                },
                OmegaConf.to_yaml({"surrogate": spec}),
            )
            discard_checked(ckpt_dir / f"{key}_ckpt.pt")
        return model.eval()

    def memo(
        name: str, spec: dict[str, Any], compute: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        key = _derived_key(cfg, name, spec)
        entry = {"name": name, "key": key, "hit": False}
        log_entries.append(entry)
        with cache.lock(key) if cache.enabled else contextlib.nullcontext():
            payload = cache.load(key)
            if payload is not None:
                entry["hit"] = True
                return payload["tensors"]
            t0 = time.perf_counter()
            tensors = compute()
            entry["compute_s"] = round(time.perf_counter() - t0, 3)
            cache.save(key, {"tensors": tensors}, OmegaConf.to_yaml({name: spec}))
        return tensors

    return AttackContext(
        device=comp.device, surrogate=surrogate, memo=memo, amp=use_amp(cfg.train, comp.device)
    )


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


def augmentation(
    dataset: Dataset, attack: Attack | None = None
) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """The training augmentation: the attack's own where it supplies one (``train_augment``,
    e.g. WaNet's ``augment=backdoorbench``), else the dataset's crop + flip."""
    own = getattr(attack, "train_augment", None)
    return (own(dataset) if own else None) or Augment(dataset.crop_padding, dataset.hflip)


def backdoored_model(
    cfg: DictConfig, comp: Components, data: Data, run_dir: Path, record: dict[str, Any]
) -> nn.Module:
    """Train the model on the poisoned set, or load it from the cache."""
    cache = ModelCache(cfg.paths.cache_dir, enabled=cfg.cache.enabled)
    key = cache_key(cfg)
    model = new_model(cfg, comp.dataset, "backdoored")
    poison_index = torch.nonzero(data.train.is_poison.cpu()).flatten()
    record["cache"] = {"key": key, "enabled": bool(cfg.cache.enabled), "hit": False}
    t_wait = time.perf_counter()
    # A concurrent job training the same model holds the lock: wait for it, then load.
    with cache.lock(key) if cache.enabled else contextlib.nullcontext():
        record["cache"]["wait_s"] = round(time.perf_counter() - t_wait, 3)
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
            tracking.curve("backdoored").log_all(payload["history"])
            log.info("loaded the backdoored model from the cache (%s)", key)
            return model.to(comp.device)
        ckpt_dir = cache.entry_dir(key) if cache.enabled else run_dir
        attack = comp.attack
        # A training-controlled attack (WaNet) poisons each batch of the benign set itself.
        result = fit(
            model,
            data.benign if attack.controls_training else data.train.clean_view(),
            cfg.train,
            device=comp.device,
            seed=derive_seed(cfg.seed, "fit", "backdoored"),
            augment=augmentation(comp.dataset, attack),
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
        discard_checked(ckpt_dir / "train_ckpt.pt")
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
        fit=checkpointed_fit(
            functools.partial(
                fit,
                recipe=cfg.train,
                device=comp.device,
                seed=derive_seed(seed, "fit"),
                augment=augmentation(comp.dataset),
                progress=cfg.progress,
            ),
            run_dir / DEFENSE_CHECKPOINTS,
            config_digest(cfg),
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


def checkpointed_fit(fit_fn: Callable[..., Any], folder: Path, digest: str) -> Callable[..., Any]:
    """``fit_fn`` with a per-epoch checkpoint for each call, so a killed cell resumes the
    defense's trainings (UltraClean's retraining, NONE's rounds) where they stopped.

    The n-th call of the cell gets ``<folder>/fit<n>-<config digest>.pt``: defenses are
    seeded, so the n-th training of a rerun is the same training, and another config never
    picks up these files. A complete cell removes the folder.
    """
    calls = itertools.count()

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        n = next(calls)
        kwargs.setdefault("checkpoint", folder / f"fit{n}-{digest}.pt")
        return fit_fn(*args, **kwargs)

    return wrapped


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
        data = load_data(cfg, comp, record)
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
        backdoor_test = stage_backdoor_test(cfg, comp, data, model, "backdoored", run_dir, record)
        pred = predictions(model, data.test, backdoor_test, comp.device)
        record["backdoored"] = stage_metrics(pred, data.test, backdoor_test)
        record["counts"] = {"backdoored": stage_counts(pred, data.test, backdoor_test)}
    grid = trigger_grid(data.test, backdoor_test, run_dir / "trigger_grid.png")
    with timer("defense"):
        result = defend(cfg, comp, data, model, run_dir)
    with timer("eval_defended"):
        if result.model is not model:  # an unchanged model keeps its predictions
            if data.inversion is not None:  # a changed model has its own natural trigger
                backdoor_test = stage_backdoor_test(
                    cfg, comp, data, result.model, "defended", run_dir, record
                )
            pred = predictions(result.model, data.test, backdoor_test, comp.device)
        elif data.inversion is not None:
            record.setdefault("natural", {})["defended"] = record["natural"]["backdoored"]
        defended = stage_metrics(pred, data.test, backdoor_test)
        record["counts"]["defended"] = stage_counts(pred, data.test, backdoor_test)
        det, extras = detection_metrics(
            result, data.train.is_poison, data.test, backdoor_test, pred, comp.device
        )
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
    for stage, report in (record.get("natural") or {}).items():
        tracker.log_metrics(
            {f"{stage}/natural_asr@{b}": r["asr"] for b, r in report["budgets"].items()}
        )
    return record


def stage_backdoor_test(
    cfg: DictConfig,
    comp: Components,
    data: Data,
    model: nn.Module,
    stage: str,
    run_dir: Path,
    record: dict[str, Any],
) -> PoisonedSet:
    """The backdoor test set of one stage: the attack's fixed one, or, for an attack that
    inverts its trigger from the model (``natural``), one built from this model's trigger on
    the evaluation half of the test set (the inversion half never scores)."""
    attack = comp.attack
    if data.inversion is None or data.evaluation is None:
        return data.backdoor_test

    def invert() -> dict[str, Any]:
        report, inverted = attack.invert(
            model,
            data.inversion,
            data.evaluation,
            device=comp.device,
            seed=derive_seed(cfg.seed, "natural", stage),
            amp=use_amp(cfg.train, comp.device),
        )
        return {
            "report": report,
            "trigger": attack.state_dict(),
            "targets": inverted.targets,
            "budgets": list(inverted.budgets),
            "mask": inverted.mask,
            "pattern": inverted.pattern,
            "fit_asr": inverted.fit_asr,
        }

    # The backdoored model is the cached one, so its inversion is cached with it: every
    # defense of a sweep then inverts only its own defended model.
    cache = ModelCache(cfg.paths.cache_dir, enabled=cfg.cache.enabled and stage == "backdoored")
    key = f"natural-{cache_key(cfg)}"
    with cache.lock(key) if cache.enabled else contextlib.nullcontext():
        found = cache.load(key)
        hit = found is not None
        if found is None:
            found = invert()
            cache.save(key, found, OmegaConf.to_yaml(cfg.attack, resolve=True))
        else:
            attack.load_state_dict(found["trigger"])
    keys = ("targets", "budgets", "mask", "pattern", "fit_asr")
    atomic_torch_save({k: found[k] for k in keys}, run_dir / f"natural_triggers_{stage}.pt")
    inverted = InvertedTriggers(
        **{k: found[k] for k in keys} | {"budgets": tuple(found["budgets"])}
    )
    report = found["report"]
    save_inverted_triggers(inverted, report, run_dir / f"natural_triggers_{stage}.png")
    record.setdefault("natural", {})[stage] = {
        "budget": attack.budget,
        "target": attack.target_class,
        "budgets": report,
        "n_inversion": len(data.inversion),
        "n_evaluation": len(data.evaluation),
        "from_cache": hit,
    }
    log.info(
        "natural backdoor (%s): %s",
        stage,
        ", ".join(f"{b}: {r['asr']:.3f} (target {r['target']})" for b, r in report.items()),
    )
    bd = attack.backdoor_test_set(data.evaluation)
    record["data"]["n_backdoor_test"] = len(bd)
    return bd
