"""The runner's services for attacks, all cached like the backdoored model: surrogate models
and memoised artefacts while poisoning (``AttackContext``), and a cache for what an attack
derives from the backdoored model at evaluation (``StageContext``)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from attacks.base import AttackContext, StageContext
from attacks.pgd import adversarial_training_hook
from benchmark.build import Components, augmentation, new_model
from benchmark.cache import ModelCache, cache_key
from benchmark.io import discard_checked
from benchmark.seeding import derive_seed
from benchmark.train import fit, use_amp
from benchmark.types import ImageSet


def _derived_key(cfg: DictConfig, name: str, spec: dict[str, Any]) -> str:
    """A cache key for an attack artefact: the run's data, model and recipe plus ``spec``."""
    base = cache_key(cfg, groups=("dataset", "model", "train", "defense_data", "seed"))
    text = json.dumps({"base": base, "name": name, "spec": spec}, sort_keys=True, default=str)
    return f"{name}-" + hashlib.sha256(text.encode()).hexdigest()[:20]


def attack_context(
    cfg: DictConfig, comp: Components, benign: ImageSet
) -> tuple[AttackContext, list[dict[str, Any]]]:
    """Cached surrogate models and cached artefacts for ``attack.prepare``, and the log of
    what they used (one entry per surrogate or artefact: name, key, cache hit, seconds),
    filled as the attack calls them."""
    cache = ModelCache(cfg.paths.cache_dir, enabled=cfg.cache.enabled)
    log_entries: list[dict[str, Any]] = []

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

    ctx = AttackContext(
        device=comp.device, surrogate=surrogate, memo=memo, amp=use_amp(cfg.train, comp.device)
    )
    return ctx, log_entries


def stage_context(cfg: DictConfig, comp: Components, stage: str, run_dir: Path) -> StageContext:
    """The services for ``attack.stage_backdoor_test`` on ``stage``. The backdoored model is
    the cached one, so what the attack derives from it is cached with it (key
    ``<attack name>-<model key>``): every defense of a sweep then redoes only its own model's."""
    cache = ModelCache(cfg.paths.cache_dir, enabled=cfg.cache.enabled and stage == "backdoored")
    key = f"{comp.attack.name}-{cache_key(cfg)}"

    def memo(compute: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        with cache.lock(key) if cache.enabled else contextlib.nullcontext():
            found = cache.load(key)
            if found is not None:
                return found, True
            found = compute()
            cache.save(key, found, OmegaConf.to_yaml(cfg.attack, resolve=True))
        return found, False

    return StageContext(
        stage=stage,
        seed=cfg.seed,
        device=comp.device,
        out_dir=run_dir,
        memo=memo,
        amp=use_amp(cfg.train, comp.device),
    )
