"""The defense stage: run the defense with only what its threat model allows."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from benchmark.build import Components, augmentation, new_model
from benchmark.cache import config_digest
from benchmark.poisoning import Data
from benchmark.seeding import derive_seed
from benchmark.train import fit
from defenses.base import DefenseContext, DefenseResult, Stage

# The defense's per-epoch training checkpoints, inside the run folder.
DEFENSE_CHECKPOINTS = "defense/checkpoints"


def defend(
    cfg: DictConfig, comp: Components, data: Data, model: nn.Module, run_dir: Path
) -> DefenseResult:
    """Run the defense with only what its threat model allows: the training set without its
    poison marks, the clean reserve, and the model unless it defends before training."""
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
        augment=augmentation(comp.dataset) if cfg.train.get("augment", True) else None,
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
