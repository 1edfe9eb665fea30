"""``defense=ulrl``: UnLearn and ReLearn (Min, Pham and Sun, arXiv 2405.14781).

Post-training repair of a possibly backdoored classifier with a small clean set (1% of the
training split, drawn from the defender's clean reserve).

1. **Unlearn.** A copy of the model is trained by gradient *ascent* on the clean set (the
   cross-entropy negated) until its running training accuracy of an epoch is at most 0.20.
2. **Score.** Each row of the final linear layer (one per class) is scored by the L1 norm of
   its weight change, unlearned minus original. Rows with a robust z-score (median and MAD,
   scale 1.4826) above 3.5 *and* a score above the median are flagged, at most two.
3. **Relearn.** Restarting from the backdoored weights, the flagged rows are re-initialised
   (weights uniform in +-sqrt(2 / fan_in), biases 0) and the whole network is fine-tuned on the
   same clean set with ``CE + alpha * sum_j cos(W_j, W0_j)`` over the flagged rows ``j``.
   Minimising the cosine pushes each re-initialised row *away* from the direction of its
   backdoored original (towards cos = -1), the "significant weight deviation" of the paper.

Threat model: white-box access to the trained model and a small clean labelled set; no
knowledge of the trigger, the target class, the poison rate or whether there is an attack; the
poisoned training set is not used.

Reference::

    @article{min2024ulrl,
      title   = {Unified Neural Backdoor Removal with Only Few Clean Samples through
                 Unlearning and Relearning},
      author  = {Min, Nay Myat and Pham, Long H. and Sun, Jun},
      journal = {arXiv preprint arXiv:2405.14781},
      year    = {2024}
    }

Follows the official code (github.com/NayMyatMin/ULRL, commit 094debf, ``defense/ulrl.py`` and
``UnlearningTrainer``/``RelearningTrainer`` in ``utils/trainer_cls.py``) in every
hyper-parameter: unlearning SGD lr 0.01, momentum 0.9, weight decay 5e-4, MultiStepLR at epochs
10 and 20 (gamma 0.1), gradient-norm clip 20, at most 20 epochs, stop at accuracy <= 0.20 (that
epoch's update kept); batch 128; the clean set is used with the training augmentation in both
phases (the official loader carries BackdoorBench's training transforms); torch's lower median
for even counts; the first two flagged rows by index; relearning SGD momentum 0.9 without
weight decay, cosine schedule over 20 epochs, no early stopping, last epoch returned; lr 0.005
and alpha 0.7 on CIFAR-10, 0.001 and 0.001 elsewhere (``conf/defense_tuning/ulrl_cifar10.yaml``).
An empty selection leaves the relearning phase as plain fine-tuning of the original model, as
in the official code (the cosine sum over no rows is 0); ``extras`` says so.

Deviations:

- The clean subset is a seeded *stratified* sample (the official code draws ``random.sample``)
  of ``floor(fraction * N)`` images, ``N`` the whole training split (training set plus
  reserve), so CIFAR-10 gives the paper's 500; a pool smaller than that is used whole
  (``extras``). Its pool (``source``): ``reserve`` (default), the defender's clean reserve,
  images the model never trained on, so clean loss and accuracy on them are test-like;
  ``train``, the delivered training set without marks, images the model has fitted, as the
  official draw from BackdoorBench's ``clean_train``. Unlike that clean split, the delivered
  set is poisoned: about ``poison_rate`` of a ``train`` draw carries the trigger and the
  target label (the defender cannot tell which). Measured on mnist5k models (fidelity
  review, one draw each): training-split draws stop unlearning sooner (7-10 epochs against
  10-17) and can flag other rows (BadNets 0 -> 0, 8; natural 8 -> 2; SIG 8 -> none).
- The layer is the model's final ``nn.Linear`` found through ``model.last_linear()`` (or the
  last ``nn.Linear`` of a model without that method), not a module named ``linear``; its
  ``out_features`` must equal the number of classes.
- ``order: score`` (keep the highest scores instead of the first indices) is an option.
- MAD = 0 is handled without dividing by zero: a score different from the median gets
  z = +inf (the limit of the rule, and what the official division gives), a score at the
  median z = 0 (the official 0/0 = NaN never passes the test either), so every row above the
  median qualifies before the cap. ``extras["max_z"]`` is then None.
- Mixed precision is the harness's (bf16 autocast where native, ``train.amp``), not fp16 with
  a gradient scaler. Relearning records training predictions from its one forward pass; the
  official trainer runs a second train-mode forward per batch just for them, which updates the
  BatchNorm running statistics twice per batch.
- Both phases use the official optimiser settings, not the run's training recipe: only the
  recipe's ``amp`` and ``channels_last`` (hardware settings) are taken from it.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmark.data import stratified_indices
from benchmark.errors import ConfigError
from benchmark.io import atomic_torch_save
from benchmark.seeding import derive_seed
from benchmark.types import ImageSet
from defenses.base import Defense, DefenseContext, DefenseResult, Stage
from defenses.checks import as_number, is_int, require
from defenses.ulrl_parts import (
    ORDERS,
    Order,
    clean_subset_size,
    cosine_penalty,
    find_last_linear,
    phase_recipe,
    reinit_rows,
    row_change_scores,
    select_rows,
    sgd,
)

log = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = ("reserve", "train")


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
        require(
            0.0 < as_number(clean_fraction_of_train) <= 1.0,
            "clean_fraction_of_train",
            "in (0, 1]",
            clean_fraction_of_train,
        )
        for key, value in (
            ("batch_size", batch_size),
            ("unlearn_epochs", unlearn_epochs),
            ("relearn_epochs", relearn_epochs),
            ("max_flagged", max_flagged),
        ):
            require(is_int(value) and value >= 1, key, "an integer >= 1", value)
        for key, value in (
            ("unlearn_lr", unlearn_lr),
            ("relearn_lr", relearn_lr),
            ("z_threshold", z_threshold),
            ("mad_scale", mad_scale),
            ("unlearn_gamma", unlearn_gamma),
        ):
            require(as_number(value) > 0, key, "a number > 0", value)
        for key, value in (
            ("unlearn_momentum", unlearn_momentum),
            ("unlearn_weight_decay", unlearn_weight_decay),
            ("relearn_momentum", relearn_momentum),
            ("alpha", alpha),
        ):
            require(as_number(value) >= 0, key, "a number >= 0", value)
        require(0.0 <= as_number(stop_acc) <= 1.0, "stop_acc", "in [0, 1]", stop_acc)
        require(
            unlearn_grad_clip is None or as_number(unlearn_grad_clip) > 0,
            "unlearn_grad_clip",
            "a number > 0 or null",
            unlearn_grad_clip,
        )
        milestones = list(unlearn_milestones)
        require(
            all(is_int(m) and m >= 1 for m in milestones),
            "unlearn_milestones",
            "a list of epochs >= 1",
            unlearn_milestones,
        )
        require(order in ORDERS, "order", f"one of {ORDERS}", order)
        require(source in SOURCES, "source", f"one of {SOURCES}", source)
        require(isinstance(reinit, bool), "reinit", "true or false", reinit)
        require(isinstance(augment, bool), "augment", "true or false", augment)
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

        atomic_torch_save(
            {
                "layer": layer_name,
                "scores": scores,
                "z": sel.z,
                "median": sel.median,
                "mad": sel.mad,
                "candidates": sel.candidates,
                "flagged": rows,
                "unlearn_history": unlearn.history,
                "relearn_history": relearn.history,
            },
            ctx.work_dir / "ulrl_scores.pt",
        )
        finite_z = sel.z[torch.isfinite(sel.z)]
        all_finite = bool(finite_z.numel() == sel.z.numel())
        last = unlearn.history[-1] if unlearn.history else {}
        extras: dict[str, Any] = {
            **subset_info,
            "layer": layer_name,
            "flagged_rows": ",".join(str(r) for r in rows.tolist()),
            "n_flagged": int(rows.numel()),
            "n_candidates": int(sel.candidates.numel()),
            "candidate_rows": ",".join(str(r) for r in sel.candidates.tolist()),
            "nothing_flagged": bool(rows.numel() == 0),
            "top_score_row": int(scores.argmax()),
            "unlearn_epochs": len(unlearn.history),
            "unlearn_final_acc": last.get("acc"),
            "unlearn_reached_stop_acc": bool(unlearn.stopped_early),
            "median": sel.median,
            "mad": sel.mad,
            "mad_zero": bool(sel.mad == 0.0),
            "max_z": float(sel.z.max()) if all_finite else None,
            "relearn_final_acc": relearn.history[-1]["acc"] if relearn.history else None,
            # mean cosine of the flagged rows to their originals after relearning
            "relearn_mean_cos": float(final_cos) / rows.numel() if rows.numel() else None,
        }
        return DefenseResult(model=relearned, extras=extras)

    def clean_subset(self, ctx: DefenseContext) -> tuple[ImageSet, dict[str, Any]]:
        """A seeded stratified subset of the ``source`` pool of ``floor(fraction * N)`` images,
        ``N`` the whole training split; the whole pool when it is smaller."""
        pool = ctx.clean_set if self.source == "reserve" else ctx.train_set
        n_split = len(ctx.train_set) + len(ctx.clean_set)
        wanted = clean_subset_size(self.clean_fraction_of_train, n_split)
        info: dict[str, Any] = {
            "clean_source": self.source,
            "n_clean_wanted": wanted,
            "clean_reserve_too_small": wanted > len(pool),
        }
        if wanted >= len(pool):
            if wanted > len(pool):
                log.warning(
                    "ULRL wants %d clean images (%.3g of the training split) but the %s "
                    "holds %d; using all of it",
                    wanted,
                    self.clean_fraction_of_train,
                    self.source,
                    len(pool),
                )
            info["n_clean_used"] = len(pool)
            return pool, info
        index = stratified_indices(pool.y, wanted, ctx.num_classes, ctx.generator("ulrl", "clean"))
        info["n_clean_used"] = wanted
        return pool.subset(index), info
