"""``defense=NONE``: NON-linearity-based backdoor removal (Wang, Ding, Zhai, Ma, NeurIPS 2022).

"Training with More Confidence: Mitigating Injected and Natural Backdoors During Training",
arXiv:2202.06382. Official code: RU-System-Software-and-Security/NONE, commit 624b80f; scores,
reset sets, detection channels and the Jenks split are checked against its ``analyze_neuros``
in ``tests/defenses/test_none_fidelity.py``. Stage: in-training; the defender is the trainer
(the whole training set without poison marks, no clean reserve).

The paper: a backdoor lives in neurons whose activation acts as a hyperplane separating
target-label inputs from every other label's. Each round (``rounds``) scores every monitored
conv channel (``model.monitored_conv_layers()``) by that hyperplane test on the spatial maxima
of its output (``none_scores.py``, ``none_passes.py``), resets each layer's top
``ceil(reset_fraction * C)`` channels (filter, norm and consumers' input slices:
``none_reset.py``), flags the samples whose summed top-channel activation falls in the upper
Jenks class, and fine-tunes on the rest with the norm statistics frozen. This module holds the
orchestration; ``none_report.py`` the extras and ``work_dir/none_rounds.pt``.

Deviations (details and reasons in ``docs/methods/NONE.md``):

- the official ResNet-18 reset's un-cleared layer4 channel lists are not copied: each layer
  resets its own selection (the official sets are pinned in the fidelity test);
- phase 1 is the harness's cached model and recipe; fine-tuning uses a fresh SGD;
- statistics hook every monitored conv's output (the shortcut conv before its BatchNorm), and a
  reset trace ends at a residual addition;
- exact O(n log n) Jenks split; empty sets contribute 0; channel ties sort stably (lower index
  first); the detection sum is not multiplied by the number of classes (a constant factor);
- fine-tuning follows the run's mixed precision; the analysis runs in fp32.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from benchmark.checks import Checks
from benchmark.errors import ConfigError
from benchmark.seeding import derive_seed
from benchmark.types import ImageSet
from defenses.base import Defense, DefenseContext, DefenseResult, Stage
from defenses.none_passes import collect_statistics, frozen_norms, summed_activation
from defenses.none_report import RoundReport, round_extras, save_rounds
from defenses.none_reset import ResetSite, reset_channels, reset_sites
from defenses.none_scores import jenks_flags, n_reset, top_channels

__all__ = ["NONE"]

log = logging.getLogger(__name__)
checks = Checks("defense")


# -- the defense --------------------------------------------------------------------------------
class NONE(Defense):
    """NONE: reset hyperplane-like channels, drop the samples that drive them, fine-tune.

    Args:
        reset_fraction: ``rho``, the share of each monitored layer's channels reset per round
            (``ceil(rho * C)``).
        rounds: number of analyse-reset-fine-tune rounds.
        finetune_epochs: fine-tuning epochs per round (0 = reset only).
        finetune_lr: the constant fine-tuning learning rate.
        finetune_momentum, finetune_weight_decay: the fine-tuning SGD.
        finetune_batch_size: the fine-tuning batch size.
        augment: use the training augmentation while fine-tuning.
        lambda_low, lambda_high: the probability thresholds of the unlikely (``L_k``) and
            confident (``H_k``) sets.
        n_std: standard deviations above the unlikely set's mean in the baseline.
        detect_fraction: null = each layer's top channel sums into the detection score; a
            fraction ``beta`` = its top ``ceil(beta * C)`` channels.
        exclude_flagged: fine-tune without the flagged samples (false: the natural-backdoor
            setting, where nothing is removed).
        freeze_norm_affine: also freeze the norm layers' weight and bias while fine-tuning
            (their running statistics are always frozen); false = trained, as the official
            ``fix_bn`` (BatchNorm in eval mode only).
        flag_break_value: flag ``u >= t`` (the official ``>= breaks[1]``, which adds the lower
            Jenks class's largest value) instead of the upper class only (``u > t``).
        batch_size: images per forward pass of the analysis.
    """

    name: ClassVar[str] = "NONE"
    stage: ClassVar[Stage] = Stage.IN_TRAINING

    def __init__(
        self,
        reset_fraction: float = 0.03,
        rounds: int = 1,
        finetune_epochs: int = 20,
        finetune_lr: float = 1e-4,
        finetune_momentum: float = 0.9,
        finetune_weight_decay: float = 1e-4,
        finetune_batch_size: int = 128,
        augment: bool = True,
        lambda_low: float = 0.1,
        lambda_high: float = 0.9,
        n_std: float = 3.0,
        detect_fraction: float | None = None,
        exclude_flagged: bool = True,
        freeze_norm_affine: bool = False,
        flag_break_value: bool = True,
        batch_size: int = 256,
    ) -> None:
        self.reset_fraction = reset_fraction
        self.rounds = rounds
        self.finetune_epochs = finetune_epochs
        self.finetune_lr = finetune_lr
        self.finetune_momentum = finetune_momentum
        self.finetune_weight_decay = finetune_weight_decay
        self.finetune_batch_size = finetune_batch_size
        self.augment = augment
        self.lambda_low = lambda_low
        self.lambda_high = lambda_high
        self.n_std = n_std
        self.detect_fraction = detect_fraction
        self.exclude_flagged = exclude_flagged
        self.freeze_norm_affine = freeze_norm_affine
        self.flag_break_value = flag_break_value
        self.batch_size = batch_size

    # -- settings ---------------------------------------------------------------------------
    def validate(self, num_classes: int, n_train: int, n_clean: int) -> None:
        """Check every setting (``ConfigError`` naming ``defense.<key>``) and the run's sizes."""
        self._check_settings()
        if num_classes < 2:
            raise ConfigError("dataset", f"NONE needs at least 2 classes, got {num_classes}")
        if n_train < 2:
            raise ConfigError(
                "defense_data.clean_fraction",
                f"leaves {n_train} training images; NONE's Jenks split needs at least 2",
            )

    def _check_settings(self) -> None:
        checks.number(self.reset_fraction, "reset_fraction", 0.0, 1.0, low_open=True)
        for key in ("rounds", "finetune_batch_size", "batch_size"):
            checks.integer(getattr(self, key), key)
        checks.integer(self.finetune_epochs, "finetune_epochs", 0)
        checks.number(self.finetune_lr, "finetune_lr", 0.0, low_open=True)
        for key in ("finetune_momentum", "finetune_weight_decay", "n_std"):
            checks.number(getattr(self, key), key, 0.0)
        for key in ("lambda_low", "lambda_high"):
            checks.number(getattr(self, key), key, 0.0, 1.0)
        checks.require(
            self.lambda_low < self.lambda_high,
            "lambda_low",
            f"below lambda_high = {self.lambda_high!r}",
            self.lambda_low,
        )
        checks.null_or_number(self.detect_fraction, "detect_fraction", 0.0, 1.0, low_open=True)
        for key in ("augment", "exclude_flagged", "freeze_norm_affine", "flag_break_value"):
            checks.boolean(getattr(self, key), key)

    def _recipe(self, base: DictConfig) -> DictConfig:
        """The fine-tuning recipe: the official optimiser at a constant learning rate; only the
        run's hardware settings (``amp``, ``channels_last``) come from ``base``."""
        return OmegaConf.create(
            {
                "epochs": self.finetune_epochs,
                "batch_size": self.finetune_batch_size,
                "lr": float(self.finetune_lr),
                "optimizer": {
                    "_target_": "torch.optim.SGD",
                    "_partial_": True,
                    "lr": float(self.finetune_lr),
                    "momentum": float(self.finetune_momentum),
                    "weight_decay": float(self.finetune_weight_decay),
                },
                "scheduler": None,  # E2 < 80: the official step decay never fires
                "grad_clip": None,
                "augment": self.augment,
                "amp": base.get("amp", "auto"),
                "channels_last": base.get("channels_last", "auto"),
            }
        )

    # -- one round ----------------------------------------------------------------------------
    def analyse(
        self,
        model: nn.Module,
        sites: list[ResetSite],
        data: ImageSet,
        *,
        num_classes: int,
        device: torch.device,
    ) -> RoundReport:
        """Score the channels, choose the resets, score and flag the samples (no change made)."""
        t0 = time.perf_counter()
        stats = collect_statistics(
            model,
            sites,
            data,
            num_classes=num_classes,
            lambda_low=self.lambda_low,
            lambda_high=self.lambda_high,
            device=device,
            batch_size=self.batch_size,
        )
        scores, reset, detect = {}, {}, {}
        for site, st in zip(sites, stats, strict=True):
            s = st.scores(self.n_std)
            c = site.channels
            n_detect = 1 if self.detect_fraction is None else math.ceil(self.detect_fraction * c)
            scores[site.name] = s
            reset[site.name] = top_channels(s, n_reset(self.reset_fraction, c))
            detect[site.name] = top_channels(s, min(n_detect, c))
        u = summed_activation(
            model,
            sites,
            [detect[s.name] for s in sites],
            data,
            device=device,
            batch_size=self.batch_size,
        )
        flags, split = jenks_flags(u, include_break=self.flag_break_value)
        return RoundReport(
            scores=scores,
            reset=reset,
            detect=detect,
            u=u,
            flags=flags,
            threshold=split.threshold if split is not None else None,
            no_confident=stats[0].classes_without_confident() if stats else num_classes,
            analysis_s=time.perf_counter() - t0,
        )

    def run(self, ctx: DefenseContext) -> DefenseResult:
        self._check_settings()
        if ctx.model is None:
            raise ConfigError("defense", "NONE starts from the normally trained model")
        device = ctx.device
        model = copy.deepcopy(ctx.model).to(device)
        sites = reset_sites(model)
        data = ctx.train_set
        recipe = self._recipe(ctx.recipe)
        per_layer = {s.name: n_reset(self.reset_fraction, s.channels) for s in sites}
        no_consumer = [s.name for s in sites if not s.consumers]
        log.info(
            "NONE: %d monitored convs (%d channels), %d round(s); resets per layer: %s; no "
            "traced consumer: %s",
            len(sites),
            sum(s.channels for s in sites),
            self.rounds,
            per_layer,
            no_consumer or "none",
        )
        reports: list[RoundReport] = []
        for r in range(1, self.rounds + 1):
            rep = self.analyse(model, sites, data, num_classes=ctx.num_classes, device=device)
            for site in sites:
                reset_channels(site, rep.reset[site.name])
            keep = ~rep.flags if self.exclude_flagged else torch.ones_like(rep.flags)
            subset = data.subset(torch.nonzero(keep).flatten())
            rep.n_finetune = len(subset)
            log.info(
                "NONE round %d/%d: %d of %d samples flagged (Jenks threshold %s); fine-tuning "
                "on %d for %d epochs",
                r,
                self.rounds,
                int(rep.flags.sum()),
                len(data),
                rep.threshold,
                len(subset),
                self.finetune_epochs,
            )
            if self.finetune_epochs > 0:
                t0 = time.perf_counter()
                with frozen_norms(model, affine=self.freeze_norm_affine) as train_mode:
                    fitted = ctx.fit(
                        model,
                        subset,
                        recipe=recipe,
                        seed=derive_seed(ctx.seed, "NONE", "finetune", r),
                        train_mode=train_mode,
                        desc=f"NONE round {r}",
                    )
                rep.finetune_s = time.perf_counter() - t0
                if fitted.history:
                    rep.finetune_acc = float(fitted.history[-1]["acc"])
            reports.append(rep)
        model.eval()
        last = reports[-1]
        save_rounds(sites, reports, ctx.work_dir / "none_rounds.pt")
        return DefenseResult(
            model=model,
            train_flags=last.flags.clone(),
            train_scores=last.u.float(),
            extras=round_extras(sites, per_layer, no_consumer, reports),
        )
