"""``defense=abl``: Anti-Backdoor Learning, isolate the lowest-loss training samples, unlearn them.

Li, Lyu, Koren, Lyu, Li, Ma. "Anti-Backdoor Learning: Training Clean Models on Poisoned Data."
NeurIPS 2021, arXiv:2110.11571. Official code bboylyg/ABL 3fd736c (``backdoor_isolation.py``,
``backdoor_unlearning.py``, ``config.py``); benchmark port SCLBD/BackdoorBench f02e353
``defense/abl.py`` with ``config/defense/abl/cifar10.yaml`` (BB). In-training: the unmarked
training set only (a fresh model is trained from scratch; ``ctx.model`` is not used).

1. Isolation: a fresh model trained on the whole training set without augmentation under the
   local gradient ascent loss ``sign(l - gamma) * l`` on the batch-mean CE ``l`` (LGA, the
   paper's; gamma 0.5, official ``config.py:33``): 20 epochs (BB ``tuning_epochs``, yaml ``:27``),
   SGD lr 0.01 (BB ``:16``; ``abl.py:84-99``), nesterov, momentum 0.9, wd 1e-4 (BB ``:33-34``,
   official ``config.py:28-29``), batch 256 (BB ``:14``).
2. Per-sample CE in eval mode without augmentation; the ``isolation_ratio`` = 1% lowest (stable
   ascending order, official ``backdoor_isolation.py:9-59``, BB ``:101-185``) are isolated:
   ``train_flags``; ``train_scores`` = ``-loss`` (low loss = suspicious).
3. Fine-tuning on the other 99% with the training augmentation: 60 epochs, lr 0.01, x0.1 from
   epoch 40 (BB ``:28-29``, ``abl.py:189-206``), then unlearning: 20 epochs of gradient ascent
   ``-CE`` on the isolated samples with augmentation, lr 1e-4 (BB ``:30``, ``abl.py:208-223``).
   The final model is kept.

Deviations: LGA is the default ascent (the paper's); BB and the official code default to
Flooding ``|l - 0.5| + 0.5`` (``ascent: flooding``), whose gradient is the same as LGA's at
the same threshold, so only the reported loss differs. The official code isolates after 10
epochs at lr 0.1, batch 128, and unlearns 5 epochs (4 effective) at lr 5e-4 without
augmentation; its fine-tuning adds Cutout (BB's defaults are taken). The unlearning gets a
fresh optimiser (BB carries the fine-tuning's SGD momentum over); the harness's ``fit`` (its
bf16 autocast where native, its seeded batch order and crop padding).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from benchmark.checks import Checks
from benchmark.errors import ConfigError
from benchmark.io import atomic_torch_save
from benchmark.predict import predict_logits
from benchmark.seeding import derive_seed
from benchmark.types import ImageSet
from defenses.base import Defense, DefenseContext, DefenseResult, Stage

log = logging.getLogger(__name__)
checks = Checks("defense")


def lga_loss(gamma: float) -> Callable[[Tensor, Tensor], Tensor]:
    """ABL's local gradient ascent on the batch-mean CE ``l``: ``sign(l - gamma) * l``."""

    def loss(logits: Tensor, y: Tensor) -> Tensor:
        ce = F.cross_entropy(logits, y)
        return torch.sign(ce - gamma) * ce

    return loss


def flooding_loss(level: float) -> Callable[[Tensor, Tensor], Tensor]:
    """Flooding (the official code's default ascent): ``|l - level| + level``."""

    def loss(logits: Tensor, y: Tensor) -> Tensor:
        return (F.cross_entropy(logits, y) - level).abs() + level

    return loss


def ascent_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Unlearning: gradient ascent on the cross-entropy."""
    return -F.cross_entropy(logits, y)


def isolate(losses: Tensor, ratio: float) -> Tensor:
    """``(N,)`` bool: the ``int(N * ratio)`` lowest losses, ties broken by position (stable)."""
    order = torch.sort(losses.double(), stable=True).indices
    flags = torch.zeros(losses.numel(), dtype=torch.bool)
    flags[order[: int(losses.numel() * ratio)]] = True
    return flags


@torch.no_grad()
def sample_losses(
    model: nn.Module, data: ImageSet, device: torch.device, batch_size: int = 512
) -> Tensor:
    """Per-sample CE of ``data`` under ``model`` (eval mode, no augmentation), CPU float64."""
    logits = predict_logits(model, data.x, device=device, batch_size=batch_size)
    return F.cross_entropy(logits.double(), data.y.cpu(), reduction="none")


class ABL(Defense):
    """Anti-Backdoor Learning (see the module docstring for every setting's source)."""

    name: ClassVar[str] = "abl"
    stage: ClassVar[Stage] = Stage.IN_TRAINING

    def __init__(
        self,
        isolation_epochs: int = 20,
        isolation_lr: float = 0.01,
        isolation_ratio: float = 0.01,
        ascent: str = "lga",
        gamma: float = 0.5,
        finetune_epochs: int = 60,
        finetune_lr: float = 0.01,
        finetune_milestone: int = 40,
        unlearn_epochs: int = 20,
        unlearn_lr: float = 1e-4,
        unlearn_augment: bool = True,
        batch_size: int = 256,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        nesterov: bool = True,
    ) -> None:
        checks.integer(isolation_epochs, "isolation_epochs")
        checks.number(isolation_lr, "isolation_lr", 0.0, low_open=True)
        checks.number(isolation_ratio, "isolation_ratio", 0.0, 1.0, low_open=True, high_open=True)
        checks.one_of(ascent, "ascent", ("lga", "flooding"))
        checks.number(gamma, "gamma", 0.0, low_open=True)
        checks.integer(finetune_epochs, "finetune_epochs", 0)
        checks.number(finetune_lr, "finetune_lr", 0.0, low_open=True)
        checks.integer(finetune_milestone, "finetune_milestone", 0)
        checks.integer(unlearn_epochs, "unlearn_epochs", 0)
        checks.number(unlearn_lr, "unlearn_lr", 0.0, low_open=True)
        checks.boolean(unlearn_augment, "unlearn_augment")
        checks.integer(batch_size, "batch_size")
        checks.number(momentum, "momentum", 0.0, 1.0, high_open=True)
        checks.number(weight_decay, "weight_decay", 0.0)
        checks.boolean(nesterov, "nesterov")
        checks.require(not nesterov or momentum > 0, "momentum", "> 0 with nesterov", momentum)
        self.isolation_epochs, self.isolation_lr = isolation_epochs, float(isolation_lr)
        self.isolation_ratio, self.ascent, self.gamma = float(isolation_ratio), ascent, float(gamma)
        self.finetune_epochs, self.finetune_lr = finetune_epochs, float(finetune_lr)
        self.finetune_milestone = finetune_milestone
        self.unlearn_epochs, self.unlearn_lr = unlearn_epochs, float(unlearn_lr)
        self.unlearn_augment, self.batch_size = unlearn_augment, batch_size
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.nesterov = nesterov

    def validate(self, num_classes: int, n_train: int, n_clean: int) -> None:
        if int(n_train * self.isolation_ratio) < 1:
            raise ConfigError(
                "defense.isolation_ratio",
                f"isolates no sample of {n_train}: must be >= 1/{n_train}, "
                f"got {self.isolation_ratio}",
            )

    def recipe(
        self, base: DictConfig, epochs: int, lr: float, augment: bool, milestone: int | None
    ) -> DictConfig:
        """One phase's recipe: SGD (nesterov), a step x0.1 at ``milestone`` or a constant lr."""
        scheduler = None
        if milestone is not None and 0 < milestone < epochs:
            scheduler = {
                "_target_": "torch.optim.lr_scheduler.MultiStepLR",
                "_partial_": True,
                "milestones": [milestone],
                "gamma": 0.1,
            }
        optimizer = {
            "_target_": "torch.optim.SGD",
            "_partial_": True,
            "lr": lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "nesterov": self.nesterov,
        }
        return OmegaConf.create(
            {
                "epochs": epochs,
                "batch_size": self.batch_size,
                "lr": lr,
                "optimizer": optimizer,
                "scheduler": scheduler,
                "grad_clip": None,
                "augment": augment,
                "amp": base.get("amp", "auto"),
                "channels_last": base.get("channels_last", "auto"),
            }
        )

    def phase(
        self,
        ctx: DefenseContext,
        model: nn.Module,
        data: ImageSet,
        recipe: DictConfig,
        loss: Callable[[Tensor, Tensor], Tensor] | None,
        tag: str,
    ) -> dict[str, Any]:
        """Train ``model`` in place for one phase; the last epoch's statistics."""
        fitted = ctx.fit(
            model,
            data,
            recipe=recipe,
            loss_fn=loss,
            seed=derive_seed(ctx.seed, self.name, tag),
            desc=f"abl {tag}",
        )
        model.eval()
        return fitted.history[-1] if fitted is not None and fitted.history else {}

    def run(self, ctx: DefenseContext) -> DefenseResult:
        train = ctx.train_set
        self.validate(ctx.num_classes, len(train), len(ctx.clean_set))
        model = ctx.new_model()
        ascent = lga_loss if self.ascent == "lga" else flooding_loss
        iso = self.recipe(ctx.recipe, self.isolation_epochs, self.isolation_lr, False, None)
        iso_last = self.phase(ctx, model, train, iso, ascent(self.gamma), "isolation")
        losses = sample_losses(model, train, ctx.device, self.batch_size)
        flags = isolate(losses, self.isolation_ratio)
        keep, isolated = torch.nonzero(~flags).flatten(), torch.nonzero(flags).flatten()
        log.info("abl: isolated %d of %d training samples", len(isolated), len(train))
        extras: dict[str, Any] = {
            "n_isolated": int(isolated.numel()),
            "isolation_last_loss": iso_last.get("loss"),
            "isolated_loss_max": float(losses[flags].max()),
            "loss_median": float(losses.median()),
        }
        if self.finetune_epochs:
            ft = self.recipe(
                ctx.recipe, self.finetune_epochs, self.finetune_lr, True, self.finetune_milestone
            )
            last = self.phase(ctx, model, train.subset(keep), ft, None, "finetune")
            extras["finetune_last_acc"] = last.get("acc")
        if self.unlearn_epochs:
            un = self.recipe(
                ctx.recipe, self.unlearn_epochs, self.unlearn_lr, self.unlearn_augment, None
            )
            last = self.phase(ctx, model, train.subset(isolated), un, ascent_loss, "unlearn")
            extras["unlearn_last_acc"] = last.get("acc")
        atomic_torch_save({"losses": losses, "flags": flags}, ctx.work_dir / "abl_isolation.pt")
        return DefenseResult(
            model=model, train_flags=flags, train_scores=(-losses).float(), extras=extras
        )
