"""``defense=ft``: fine-tune the backdoored model on the defender's clean reserve.

The fine-tuning baseline of Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against
Backdooring Attacks on Deep Neural Networks", RAID 2018, arXiv:1805.12185 (it evaluates
fine-tuning alone before combining it with pruning); there is no separate paper and no official
code. Post-training: the model and the clean reserve (``ctx.clean_set``) only; no stopping rule
and no model selection (the last epoch is kept), so no test data is needed.

Every default is BackdoorBench's (SCLBD/BackdoorBench f02e353, ``defense/ft.py`` with
``config/defense/ft/cifar10.yaml``): every parameter trained with cross-entropy (``ft.py``
``PureCleanModelTrainer``), 100 epochs (``cifar10.yaml:13``), batch 256 (``:14``), SGD lr 0.01
(``:16``) with momentum 0.9 and weight decay 5e-4 (``:20-22``), ``CosineAnnealingLR`` stepped per
epoch with ``T_max`` = 100 whatever the epochs (``:17``; hard-coded in
``utils/aggregate_block/train_settings_generate.py:67``), the training augmentation (random
crop, flip where the dataset allows; ``ft.py:210``), model in train mode (BatchNorm statistics
updated). BackdoorBench's reserve, 5% of the training set (``ratio: 0.05``, ``:27``), is the
harness's ``defense_data.clean_fraction`` (0.05 by default).

Deviations: the reserve is carved out of the training split before poisoning and never trained
on by the attack (BackdoorBench's 5% are clean copies of training images the model saw); the
harness's ``fit`` with its mixed precision (bf16 autocast where native, not fp16 AMP), its crop
padding per dataset and its seeded batch order; only ``amp`` and ``channels_last`` are taken from
the run's recipe (the optimiser is BackdoorBench's, not the attack training's).
``defense=fp`` (``defenses/fp.py``) fine-tunes with this class's recipe after pruning.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf
from torch import nn

from benchmark.checks import Checks
from benchmark.errors import ConfigError
from benchmark.seeding import derive_seed
from benchmark.train import FitResult
from benchmark.types import ImageSet
from defenses.base import Defense, DefenseContext, DefenseResult, Stage
from defenses.linf_scores import accuracy

log = logging.getLogger(__name__)
checks = Checks("defense")


class FT(Defense):
    """Fine-tuning on the clean reserve (see the module docstring).

    Args:
        epochs: fine-tuning epochs (0 = the model is returned as it is, as a copy).
        batch_size: images per step (and per forward when the reserve accuracy is measured).
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        cosine_t_max: ``T_max`` of the per-epoch cosine schedule (BackdoorBench: 100 whatever
            the epochs); null = ``epochs``.
        augment: fine-tune with the dataset's training augmentation.
    """

    name: ClassVar[str] = "ft"
    stage: ClassVar[Stage] = Stage.POST_TRAINING

    def __init__(
        self,
        epochs: int = 100,
        batch_size: int = 256,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        cosine_t_max: int | None = 100,
        augment: bool = True,
    ) -> None:
        checks.integer(epochs, "epochs", 0)
        checks.integer(batch_size, "batch_size")
        checks.number(lr, "lr", 0.0, low_open=True)
        checks.number(momentum, "momentum", 0.0, 1.0, high_open=True)
        checks.number(weight_decay, "weight_decay", 0.0)
        checks.require(
            cosine_t_max is None or (checks.is_int(cosine_t_max) and cosine_t_max >= 1),
            "cosine_t_max",
            "null or an integer >= 1",
            cosine_t_max,
        )
        checks.boolean(augment, "augment")
        self.epochs, self.batch_size = epochs, batch_size
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.cosine_t_max = cosine_t_max
        self.augment = augment

    def validate(self, num_classes: int, n_train: int, n_clean: int) -> None:
        if n_clean < 1:
            raise ConfigError(
                "defense_data.clean_fraction", f"{self.name} needs a non-empty clean reserve"
            )

    def recipe(self, base: DictConfig) -> DictConfig:
        """The whole fine-tuning recipe for ``fit``: BackdoorBench's optimiser and schedule, the
        run's ``amp`` and ``channels_last``. Built fresh rather than merged into the run's recipe,
        so nothing of the attack training (``nesterov``, per-step schedules) leaks in."""
        return OmegaConf.create(
            {
                "epochs": self.epochs,
                "batch_size": self.batch_size,
                "lr": self.lr,
                "optimizer": {
                    "_target_": "torch.optim.SGD",
                    "_partial_": True,
                    "lr": self.lr,
                    "momentum": self.momentum,
                    "weight_decay": self.weight_decay,
                },
                "scheduler": {
                    "_target_": "torch.optim.lr_scheduler.CosineAnnealingLR",
                    "_partial_": True,
                    "T_max": self.cosine_t_max or max(self.epochs, 1),
                },
                "grad_clip": None,
                "augment": self.augment,
                "amp": base.get("amp", "auto"),
                "channels_last": base.get("channels_last", "auto"),
            }
        )

    def finetune(
        self, ctx: DefenseContext, model: nn.Module, data: ImageSet, desc: str
    ) -> FitResult | None:
        """Fine-tune ``model`` in place on ``data`` (every parameter, train mode); None when
        ``epochs`` is 0."""
        if self.epochs == 0:
            return None
        model.requires_grad_(True)
        result = ctx.fit(
            model,
            data,
            recipe=self.recipe(ctx.recipe),
            seed=derive_seed(ctx.seed, self.name, "finetune"),
            desc=desc,
        )
        model.eval()
        return result

    def run(self, ctx: DefenseContext) -> DefenseResult:
        assert ctx.model is not None, "post-training defenses receive the trained model"
        model = copy.deepcopy(ctx.model).to(ctx.device).eval()
        data = ctx.clean_set
        acc0 = accuracy(model, data, ctx.device, self.batch_size)
        fitted = self.finetune(ctx, model, data, desc=f"{self.name} finetune")
        acc1 = accuracy(model, data, ctx.device, self.batch_size) if fitted else acc0
        log.info(
            "%s: %d epochs on %d reserve images; reserve accuracy %.4f -> %.4f",
            self.name,
            self.epochs,
            len(data),
            acc0,
            acc1,
        )
        extras = self.finetune_extras(len(data), acc0, acc1, fitted)
        return DefenseResult(model=model, extras=extras)

    def finetune_extras(
        self, n_reserve: int, acc_before: float, acc_after: float, fitted: FitResult | None
    ) -> dict[str, Any]:
        """The fine-tuning's extras: reserve size, reserve accuracy (optimistic: the reserve is
        the fine-tuning data), the last epoch's training loss and accuracy."""
        last = fitted.history[-1] if fitted is not None and fitted.history else {}
        return {
            "n_reserve": n_reserve,
            "finetune_epochs": self.epochs,
            "reserve_acc_before": acc_before,
            "reserve_acc_after": acc_after,
            "finetune_last_loss": last.get("loss"),
            "finetune_last_acc": last.get("acc"),
        }
