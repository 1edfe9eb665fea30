"""The model stage: train the backdoored model on the poisoned set, or load it (and the
attack's trigger state) from the cache."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from benchmark import tracking
from benchmark.build import Components, augmentation, new_model
from benchmark.cache import ModelCache, cache_key
from benchmark.io import discard_checked
from benchmark.poisoning import Data
from benchmark.seeding import derive_seed
from benchmark.train import fit

log = logging.getLogger(__name__)


@dataclass
class Backdoored:
    """The backdoored model, its training history and how the cache served it
    (``key``, ``enabled``, ``hit``, ``wait_s``: seconds spent waiting for the cache's lock)."""

    model: nn.Module
    history: list[dict[str, Any]]
    cache: dict[str, Any]


def backdoored_model(cfg: DictConfig, comp: Components, data: Data, run_dir: Path) -> Backdoored:
    """Train the model on the poisoned set, or load it from the cache. A cache hit restores
    the attack's trigger state too, before anything is triggered with it."""
    cache = ModelCache(cfg.paths.cache_dir, enabled=cfg.cache.enabled)
    key = cache_key(cfg)
    model = new_model(cfg, comp.dataset, "backdoored")
    poison_index = data.poison_index
    info: dict[str, Any] = {"key": key, "enabled": bool(cfg.cache.enabled), "hit": False}
    t_wait = time.perf_counter()
    # A concurrent job training the same model holds the lock: wait for it, then load.
    with cache.lock(key) if cache.enabled else contextlib.nullcontext():
        info["wait_s"] = round(time.perf_counter() - t_wait, 3)
        payload = cache.load(key)
        if payload is not None and not torch.equal(payload["poison_index"], poison_index):
            log.warning("cache entry %s was made with other poison indices; retraining", key)
            cache.clear(key)
            payload = None
        if payload is not None:
            model.load_state_dict(payload["model"])
            comp.attack.load_state_dict(payload["attack_state"])
            info["hit"] = True
            tracking.curve("backdoored").log_all(payload["history"])
            log.info("loaded the backdoored model from the cache (%s)", key)
            return Backdoored(model.to(comp.device), payload["history"], info)
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
    return Backdoored(model, result.history, info)
