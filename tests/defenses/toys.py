"""Toy settings the defense tests share: a short training recipe and model constructor kwargs."""

from __future__ import annotations

from typing import Any

# Two quick epochs of plain SGD, no augmentation (as a dict: tests wrap it in OmegaConf).
RECIPE: dict[str, Any] = {
    "epochs": 2,
    "batch_size": 32,
    "lr": 0.1,
    "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": "${..lr}"},
    "scheduler": None,
    "augment": False,
    "amp": False,
    "channels_last": False,
}

# Keyword arguments of the harness models for 32x32 RGB, 10 classes.
KW: dict[str, Any] = {
    "num_classes": 10,
    "in_chans": 3,
    "image_size": (32, 32),
    "mean": [0.5] * 3,
    "std": [0.25] * 3,
}
