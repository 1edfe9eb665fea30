"""What test_ac.py and test_ss.py share: a fit that records its calls, a context, a toy CNN and
the backdoored mnist5k model of their slow "it works" runs."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from attacks.badnets import BadNets
from benchmark.datasets.mnist5k import MNIST5k
from benchmark.models.small_cnn import SmallCNN
from benchmark.train import FitResult, fit
from benchmark.types import ImageSet, PoisonedSet
from defenses.base import DefenseContext
from tests.defenses.toys import RECIPE

# A short recipe for the slow "it works" tests: SGD with momentum, cosine, batch 32, no
# augmentation.
WORKS_RECIPE: dict[str, Any] = {
    **RECIPE,
    "epochs": 6,
    "lr": 0.05,
    "optimizer": {**RECIPE["optimizer"], "momentum": 0.9},
    "scheduler": {
        "_target_": "torch.optim.lr_scheduler.CosineAnnealingLR",
        "_partial_": True,
        "T_max": 6,
    },
}


class FitSpy:
    """Records every ``fit`` call and trains nothing."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, model: nn.Module, data: ImageSet, **kw: Any) -> FitResult:
        self.calls.append({"model": model, "data": data, **kw})
        return FitResult(epochs=1, history=[{"loss": 1.0, "acc": 0.5}])


def make_ctx(
    model: nn.Module | None, train: ImageSet, tmp_path: Path, fit_fn: Any, new_model: Any
) -> DefenseContext:
    return DefenseContext(
        train_set=train,
        clean_set=train.subset(torch.arange(0)),
        model=model,
        num_classes=train.num_classes,
        fit=fit_fn,
        new_model=new_model,
        seed=0,
        device=torch.device("cpu"),
        work_dir=tmp_path / "defense",
        recipe=OmegaConf.create(RECIPE),
    )


def small_cnn(seed: int = 0, num_classes: int = 3) -> SmallCNN:
    """A width-4 SmallCNN for 3x8x8 images (16 pooled features), seeded."""
    torch.manual_seed(seed)
    return SmallCNN(num_classes, 3, (8, 8), [0.5] * 3, [0.25] * 3, width=4)


@functools.lru_cache(maxsize=1)
def backdoored_mnist5k(n: int = 1500) -> tuple[SmallCNN, PoisonedSet]:
    """BadNets (3x3 white square, 5%, target 0) on ``n`` mnist5k training digits (stratified) and
    a width-8 SmallCNN trained on them (``WORKS_RECIPE``); cached, as both test files use it."""
    train, _ = MNIST5k(max_train=n, seed=0).load()
    poisoned = BadNets(poison_rate=0.05).poison(
        train.subset(torch.arange(n)), torch.Generator().manual_seed(0)
    )
    torch.manual_seed(0)
    model = SmallCNN(10, 1, (28, 28), MNIST5k.mean, MNIST5k.std, width=16)
    fit(model, poisoned.clean_view(), OmegaConf.create(WORKS_RECIPE), progress=False)
    return model.eval(), poisoned
