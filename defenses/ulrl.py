"""``defense=ulrl``: UnLearn and ReLearn (Min, Pham and Sun, arXiv 2405.14781, 2024).

"Unified Neural Backdoor Removal with Only Few Clean Samples through Unlearning and
Relearning". Post-training: white-box model and a small clean set (1% of the training split);
no knowledge of the trigger, the target or whether there is an attack.

1. **Unlearn.** A copy is trained by gradient ascent on the clean set until its running
   training accuracy of an epoch is at most ``stop_acc`` (0.20).
2. **Score.** Each row of the final linear layer is scored by the L1 norm of its weight change;
   rows with a robust z-score (median, MAD x 1.4826) above 3.5 and above the median are
   flagged, at most two (``ulrl_parts.select_rows``).
3. **Relearn.** From the backdoored weights, the flagged rows are re-initialised and the whole
   network is fine-tuned with ``CE + alpha * sum_j cos(W_j, W0_j)``, pushing each row away from
   its backdoored original.

Follows the official code (github.com/NayMyatMin/ULRL, commit 094debf) in every
hyper-parameter (``conf/defense/ulrl.yaml``; per-dataset ``lr``/``alpha`` in
``conf/defense_tuning/ulrl_cifar10.yaml``); checked against it in
``tests/defenses/test_ulrl_fidelity.py``. Deviations (reasons and measurements in
``docs/methods/ulrl.md``): a seeded stratified clean draw from the reserve (``source: train``
draws from the delivered, possibly poisoned, training set as the official code); the layer is
``model.last_linear()`` (``benchmark/models/trace.py``), not a module named ``linear``;
``order: score`` is an option; MAD = 0 gives z = +inf off the median and 0 at it; the harness's
mixed precision and one forward pass per relearning batch; both phases use the official
optimisers, taking only ``amp`` and ``channels_last`` from the run's recipe.

Reference: Min, Pham, Sun, arXiv:2405.14781 (BibTeX in ``docs/methods/ulrl.md``).
"""

from __future__ import annotations

import copy
import logging
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmark.checks import Checks
from benchmark.errors import ConfigError
from benchmark.seeding import derive_seed
from benchmark.types import ImageSet
from defenses.base import Defense, DefenseContext, DefenseResult, Stage
from defenses.ulrl_parts import (
    ORDERS,
    SOURCES,
    Order,
    clean_subset_size,
    cosine_penalty,
    draw_clean_subset,
    find_last_linear,
    phase_recipe,
    reinit_rows,
    report,
    row_change_scores,
    select_rows,
    sgd,
)

log = logging.getLogger(__name__)
checks = Checks("defense")


# -- the defense --------------------------------------------------------------------------------
class ULRL(Defense):
    """UnLearn and ReLearn.

    Args:
        clean_fraction_of_train: size of the clean set as a fraction of the whole training
            split (training set + reserve); drawn stratified from ``source``.
        source: ``reserve`` (the clean reserve) or ``train`` (the delivered training set
            without marks, possibly poisoned; the official code's fitted training split).
        batch_size: batch size of both phases.
        augment: use the training augmentation (random crop, flip where allowed) on the clean
            set in both phases, as the official code does.
        unlearn_epochs: maximum number of gradient-ascent epochs.
        unlearn_lr, unlearn_momentum, unlearn_weight_decay: SGD of the unlearning phase.
        unlearn_milestones, unlearn_gamma: its MultiStepLR schedule (stepped per epoch).
        unlearn_grad_clip: maximum global gradient L2 norm while unlearning.
        stop_acc: stop unlearning after the first epoch whose running training accuracy is at
            most this.
        z_threshold: robust z-score a row must exceed to be flagged.
        mad_scale: the MAD's consistency constant (1.4826 for normal data).
        max_flagged: at most this many rows are flagged.
        order: which rows are kept when more qualify: ``index`` (the first ones, official) or
            ``score`` (the highest scores).
        reinit: re-initialise the flagged rows before relearning.
        relearn_epochs, relearn_lr, relearn_momentum: SGD (no weight decay) with a cosine
            schedule over ``relearn_epochs``.
        alpha: weight of the cosine term.
    """

    name: ClassVar[str] = "ulrl"
    stage: ClassVar[Stage] = Stage.POST_TRAINING

    def __init__(
        self,
        clean_fraction_of_train: float = 0.01,
        source: str = "reserve",
        batch_size: int = 128,
        augment: bool = True,
        unlearn_epochs: int = 20,
        unlearn_lr: float = 0.01,
        unlearn_momentum: float = 0.9,
        unlearn_weight_decay: float = 5e-4,
        unlearn_milestones: tuple[int, ...] | list[int] = (10, 20),
        unlearn_gamma: float = 0.1,
        unlearn_grad_clip: float | None = 20.0,
        stop_acc: float = 0.2,
        z_threshold: float = 3.5,
        mad_scale: float = 1.4826,
        max_flagged: int = 2,
        order: Order = "index",
        reinit: bool = True,
        relearn_epochs: int = 20,
        relearn_lr: float = 0.001,
        relearn_momentum: float = 0.9,
        alpha: float = 0.001,
    ) -> None:
        checks.number(clean_fraction_of_train, "clean_fraction_of_train", 0.0, 1.0, low_open=True)
        for key, value in (
            ("batch_size", batch_size),
            ("unlearn_epochs", unlearn_epochs),
            ("relearn_epochs", relearn_epochs),
            ("max_flagged", max_flagged),
        ):
            checks.integer(value, key)
        for key, value in (
            ("unlearn_lr", unlearn_lr),
            ("relearn_lr", relearn_lr),
            ("z_threshold", z_threshold),
            ("mad_scale", mad_scale),
            ("unlearn_gamma", unlearn_gamma),
        ):
            checks.number(value, key, 0.0, low_open=True)
        checks.null_or_number(unlearn_grad_clip, "unlearn_grad_clip", 0.0, low_open=True)
        for key, value in (
            ("unlearn_momentum", unlearn_momentum),
            ("unlearn_weight_decay", unlearn_weight_decay),
            ("relearn_momentum", relearn_momentum),
            ("alpha", alpha),
        ):
            checks.number(value, key, 0.0)
        checks.number(stop_acc, "stop_acc", 0.0, 1.0)
        milestones = list(unlearn_milestones)
        checks.require(
            all(checks.is_int(m) and m >= 1 for m in milestones),
            "unlearn_milestones",
            "a list of epochs >= 1",
            unlearn_milestones,
        )
        checks.one_of(order, "order", ORDERS)
        checks.one_of(source, "source", SOURCES)
        checks.boolean(reinit, "reinit")
        checks.boolean(augment, "augment")
        self.clean_fraction_of_train = float(clean_fraction_of_train)
        self.batch_size = int(batch_size)
        self.augment = augment
        self.unlearn_epochs = int(unlearn_epochs)
        self.unlearn_lr = float(unlearn_lr)
        self.unlearn_momentum = float(unlearn_momentum)
        self.unlearn_weight_decay = float(unlearn_weight_decay)
        self.unlearn_milestones = [int(m) for m in milestones]
        self.unlearn_gamma = float(unlearn_gamma)
        self.unlearn_grad_clip = None if unlearn_grad_clip is None else float(unlearn_grad_clip)
        self.stop_acc = float(stop_acc)
        self.z_threshold = float(z_threshold)
        self.mad_scale = float(mad_scale)
        self.max_flagged = int(max_flagged)
        self.order: Order = order
        self.source = source
        self.reinit = reinit
        self.relearn_epochs = int(relearn_epochs)
        self.relearn_lr = float(relearn_lr)
        self.relearn_momentum = float(relearn_momentum)
        self.alpha = float(alpha)

    def validate(self, num_classes: int, n_train: int, n_clean: int) -> None:
        if self.source == "reserve" and n_clean < 1:
            raise ConfigError(
                "defense_data.clean_fraction",
                "ULRL needs clean data, but the clean reserve is empty; set it > 0",
            )
        if clean_subset_size(self.clean_fraction_of_train, n_train + n_clean) < 1:
            raise ConfigError(
                "defense.clean_fraction_of_train",
                f"= {self.clean_fraction_of_train} of {n_train + n_clean} training images "
                "is less than one image",
            )

    # -- run ------------------------------------------------------------------------------------
    def run(self, ctx: DefenseContext) -> DefenseResult:
        assert ctx.model is not None, "post-training defenses receive the trained model"
        clean, subset_info = self.clean_subset(ctx)
        layer_name, head = find_last_linear(ctx.model, ctx.num_classes)
        log.info(
            "ULRL on %d clean images; scoring the rows of %s (%d x %d)",
            len(clean),
            layer_name,
            head.out_features,
            head.in_features,
        )

        # 1. Unlearn a copy by gradient ascent.
        unlearned = copy.deepcopy(ctx.model).requires_grad_(True)
        before = head.weight.detach().float().cpu().clone()
        unlearn = ctx.fit(
            unlearned,
            clean,
            recipe=phase_recipe(
                ctx.recipe,
                batch_size=self.batch_size,
                augment=self.augment,
                epochs=self.unlearn_epochs,
                optimizer=sgd(self.unlearn_lr, self.unlearn_momentum, self.unlearn_weight_decay),
                scheduler={
                    "_target_": "torch.optim.lr_scheduler.MultiStepLR",
                    "_partial_": True,
                    "milestones": self.unlearn_milestones,
                    "gamma": self.unlearn_gamma,
                },
                grad_clip=self.unlearn_grad_clip,
            ),
            seed=derive_seed(ctx.seed, "ulrl", "unlearn"),
            loss_fn=lambda logits, y: -F.cross_entropy(logits, y),
            on_epoch_end=lambda epoch, stats: stats["acc"] <= self.stop_acc,
            desc="ulrl unlearn",
        )
        after = unlearned.get_submodule(layer_name).weight.detach().float().cpu()
        del unlearned

        # 2. Score the rows and flag the outliers.
        scores = row_change_scores(before, after)
        sel = select_rows(
            scores,
            z_threshold=self.z_threshold,
            scale=self.mad_scale,
            max_flagged=self.max_flagged,
            order=self.order,
        )
        rows = sel.rows
        log.info(
            "ULRL row scores %s; median %.4g, MAD %.4g; flagged %s of candidates %s",
            ", ".join(f"{i}: {s:.3g}" for i, s in enumerate(scores.tolist())),
            sel.median,
            sel.mad,
            rows.tolist(),
            sel.candidates.tolist(),
        )
        if rows.numel() == 0:
            log.warning(
                "ULRL flagged no row: relearning is plain fine-tuning of the original model "
                "on the clean set (as in the official code)"
            )

        # 3. Relearn from the original weights with the flagged rows re-initialised.
        relearned = copy.deepcopy(ctx.model).requires_grad_(True).to(ctx.device)
        layer = relearned.get_submodule(layer_name)
        original = layer.weight.detach()[rows.to(layer.weight.device)].float().clone()
        if self.reinit:
            reinit_rows(layer, rows, ctx.generator("ulrl", "reinit"))

        def relearn_loss(logits: Tensor, y: Tensor) -> Tensor:
            loss = F.cross_entropy(logits, y)
            if rows.numel() == 0 or self.alpha == 0.0:
                return loss
            return loss + self.alpha * cosine_penalty(layer.weight, rows, original)

        relearn = ctx.fit(
            relearned,
            clean,
            recipe=phase_recipe(
                ctx.recipe,
                batch_size=self.batch_size,
                augment=self.augment,
                epochs=self.relearn_epochs,
                optimizer=sgd(self.relearn_lr, self.relearn_momentum, 0.0),
                scheduler={
                    "_target_": "torch.optim.lr_scheduler.CosineAnnealingLR",
                    "_partial_": True,
                    "T_max": self.relearn_epochs,
                },
                grad_clip=None,
            ),
            seed=derive_seed(ctx.seed, "ulrl", "relearn"),
            loss_fn=relearn_loss,
            desc="ulrl relearn",
        )
        relearned.eval()
        with torch.no_grad():
            final_cos = cosine_penalty(layer.weight.detach(), rows, original)

        extras = report(
            ctx.work_dir / "ulrl_scores.pt",
            layer_name=layer_name,
            scores=scores,
            sel=sel,
            unlearn=unlearn,
            relearn=relearn,
            subset_info=subset_info,
            final_cos=float(final_cos),
        )
        return DefenseResult(model=relearned, extras=extras)

    def clean_subset(self, ctx: DefenseContext) -> tuple[ImageSet, dict[str, Any]]:
        """The clean set of both phases (``ulrl_parts.draw_clean_subset``)."""
        return draw_clean_subset(ctx, self.source, self.clean_fraction_of_train)
