"""What test_ac.py and test_ss.py share: a fit that records its calls, a context, a toy CNN and
the mnist5k size of their slow "it works" runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from benchmark.models.small_cnn import SmallCNN
from benchmark.train import FitResult
from benchmark.types import ImageSet
from defenses.base import DefenseContext
from tests.defenses.toys import RECIPE

# BadNets 10% on 1,500 mnist5k images, a width-8 SmallCNN trained 3 epochs (~20 s each run on
# two loaded cores): enough for a backdoor and a separable poison cluster.
WORKS = (
    "progress=false",
    "cache.enabled=false",
    "dataset.max_train=1500",
    "dataset.max_test=300",
    "train.epochs=3",
    "model.width=8",
)


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
