"""The run's components: the config entries instantiated and validated, and the factories the
stages share (a freshly seeded model, the training augmentation). Loads no data."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, MissingMandatoryValue
from torch import nn

from attacks.base import Attack
from benchmark import validate
from benchmark.datasets.base import Dataset
from benchmark.errors import BenchmarkError, ConfigError
from benchmark.seeding import seed_everything
from benchmark.train import Augment, resolve_device
from defenses.base import Defense

log = logging.getLogger(__name__)


@dataclass
class Components:
    """The instantiated, validated config entries."""

    dataset: Dataset
    attack: Attack
    defense: Defense
    device: torch.device
    clean_fraction: float
    build_s: float = 0.0  # wall seconds of ``build``


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
    c, h, w = dataset.image_shape
    probe = {"num_classes": dataset.num_classes, "in_chans": c, "image_size": (h, w)}
    probe_model = validate.check_model(
        lambda: instantiate_entry(cfg.model, "model", **probe, mean=[0.5] * c, std=[0.25] * c),
        dataset.image_shape,
        f"{cfg.model.get('_target_')} with {dataset.num_classes} classes",
    )
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
    defense.check_model(probe_model)
    build_s = round(time.perf_counter() - t0, 3)
    return Components(dataset, attack, defense, device, float(fraction), build_s)


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
    own = attack.train_augment(dataset) if attack is not None else None
    return own or Augment(dataset.crop_padding, dataset.hflip)
