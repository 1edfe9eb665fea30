"""Build models from their YAML alone, the way the runner does (runtime kwargs from the data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from benchmark.models.base import ImageClassifier

MODEL_CONF = Path(__file__).resolve().parents[3] / "conf" / "model"
MODEL_NAMES = sorted(p.stem for p in MODEL_CONF.glob("*.yaml"))

# Realistic statistics: CIFAR-10 for 3 channels, MNIST for 1.
STATS = {3: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), 1: ((0.1307,), (0.3081,))}


def build_model(
    config: str,
    in_chans: int = 3,
    size: tuple[int, int] = (32, 32),
    num_classes: int = 10,
    seed: int = 0,
    **overrides: Any,
) -> ImageClassifier:
    """Compose ``conf/model/<name>.yaml`` (plus overrides), instantiate it, calibrate its
    BatchNorm statistics and return it in eval mode."""
    cfg = OmegaConf.load(MODEL_CONF / f"{config}.yaml")
    cfg = OmegaConf.merge(cfg, overrides)
    mean, std = STATS[in_chans]
    torch.manual_seed(seed)
    model = instantiate(
        cfg,
        num_classes=num_classes,
        in_chans=in_chans,
        image_size=size,
        mean=list(mean),
        std=list(std),
    )
    calibrate_norms(model, torch.rand(4, in_chans, *size))
    return model.eval()


def calibrate_norms(model: nn.Module, x: torch.Tensor) -> None:
    """Set BatchNorm running statistics to those of ``x``.

    Freshly initialised statistics (mean 0, variance 1) make a deep untrained net nearly blind to
    its input in eval mode (VGG-16's logits agree to 1e-4 across inputs), which would hide real
    failures in the tests that compare outputs.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets the statistics exactly
    model.train()
    with torch.no_grad():
        model(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
