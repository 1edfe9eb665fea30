"""``defense=NONE``: NON-linearity-based backdoor removal (Wang, Ding, Zhai, Ma, arXiv 2202.06382).

"Training with More Confidence: Mitigating Injected and Natural Backdoors During Training",
NeurIPS 2022. Module ``defenses/none.py`` (with ``none_scores.py``, ``none_reset.py`` and
``none_passes.py``), class ``NONE``, config ``conf/defense/NONE.yaml`` (the field's spelling;
nothing here is named ``none``, which a backdoor benchmark would read as "no defense").
Official code: RU-System-Software-and-Security/NONE, commit 624b80f. The channel scores, reset
sets, detection channels and Jenks split are checked against its ``analyze_neuros`` on a fixed
input in ``tests/defenses/test_none_fidelity.py``.

Threat model: the defender is the trainer. It holds the whole (possibly poisoned) training set
without poison marks, no clean reserve, and knows neither the trigger, the target nor the
poison rate. Stage: in-training.

Idea (abstract): a backdoor lives in neurons whose activation acts as a hyperplane that
separates "target-label" inputs from the input domains of every other label. NONE finds such
neurons, resets them, drops the training samples that drive them, and keeps training.

Algorithm (as the official code runs it, notes ``defenses-ultraclean-none-linf.md`` section 2):

1. Phase 1, ordinary training: the harness's cached backdoored model (``ctx.model``; a deep
   copy is changed, never the input).
2. ``rounds`` rounds of:

   a. Statistics, in eval mode over the whole training set without augmentation, in fp32: the
      softmax ``p_i`` of every sample and, for every monitored conv ``l`` and channel ``j``, the
      spatial maximum ``a_lj(x_i)`` of the conv's output (before its norm layer and activation).
      Monitored convs: ``model.monitored_conv_layers()`` (layer2-4 of the ResNets, every conv of
      VGG, the inner convs of NiN, all convs of other models).
   b. Channel score (the hyperplane test): for each class ``k``, ``H_k = {i: p_ik > lambda_high}``
      and ``L_k = {i: p_ik < lambda_low}``;
      ``d_ljk = max_{i in H_k} a_lj(x_i) - (mean_{L_k} a_lj + n_std * std_{L_k} a_lj)`` with the
      population standard deviation (numpy's default, as the official code); ``s_lj = max_k
      d_ljk``, where a class with an empty ``H_k`` (or ``L_k``) contributes 0.
   c. Reset selection: the top ``ceil(reset_fraction * C_l)`` channels of every monitored layer
      by ``s_lj``, each layer its own selection (ties: lower channel index first).
   d. Poisoned-sample detection: ``u_i = sum_l a_{l, j*_l}(x_i)`` with ``j*_l`` each layer's top
      channel (or its top ``ceil(detect_fraction * C_l)`` channels), split in two by Jenks
      natural breaks; flagged: ``u_i >= t`` with ``t`` jenkspy's ``breaks[1]`` (the lower
      class's largest value), as the official code (``flag_break_value: true``); ``false``
      flags the upper class only (``u_i > t``). The flags are recomputed from the whole set
      every round (not cumulative).
   e. Reset: each selected channel's filter (and conv bias) is zeroed, so are the weight and
      bias of the norm layer fed by the conv, and the input slice of every layer that consumes
      the channel (``defenses/none_reset.py``). Plain zeros, not masks: weights may regrow.
   f. Fine-tune for ``finetune_epochs`` on the unflagged samples (all samples with
      ``exclude_flagged: false``, the natural-backdoor setting) with the training augmentation,
      SGD lr ``finetune_lr`` (constant), momentum 0.9, weight decay 1e-4, batch 128, and every
      norm layer in eval mode (running statistics fixed) with its affine parameters trained,
      as the official ``fix_bn`` (``freeze_norm_affine: false``; ``true`` freezes them too).

``train_flags`` / ``train_scores`` are the last round's flags and ``u``. ``extras``: the layer
and channel counts, ``reset_per_layer`` (``name:k`` pairs), the layers without a traced
consumer, and per round ``round<r>_*``: channels reset, samples flagged, the Jenks threshold,
classes without a confident sample, fine-tuning size and last-epoch training accuracy, and the
analysis and fine-tuning seconds; totals in ``analysis_s`` and ``finetune_s``. The per-layer
channel scores, the reset channels and the per-round flags go to ``work_dir/none_rounds.pt``.

A model that is not a harness ``ImageClassifier``, has no monitored conv, calls a monitored conv
more than once per forward pass, or pairs a conv with a norm whose affine parameters do not
match its channels fails with a ``ConfigError`` naming ``model`` and the reason.

Reference::

    @inproceedings{wang2022none,
      title     = {Training with More Confidence: Mitigating Injected and Natural Backdoors
                   During Training},
      author    = {Wang, Zhenting and Ding, Hailun and Zhai, Juan and Ma, Shiqing},
      booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
      year      = {2022},
      note      = {arXiv:2202.06382}
    }

Deviations from the official code:

- Official bug not copied: the ResNet-18 reset (``none/reset_neurons.py``) never clears its
  channel list before ``Layer4.0.Conv1``, ``Layer4.0.Conv2``, ``Layer4.1.Conv1`` and
  ``Layer4.1.Conv2``, so those convs also zero the channels chosen for the layers before them
  (``Layer4.1.Conv2`` the union of four lists, and those ``fc`` columns too). Here each layer
  resets its own selection; the official sets are pinned in the fidelity test.
- Phase 1 is the harness's training recipe (cached model), not 200-320 epochs of SGD lr 0.1
  with a step decay every 80 epochs; the fine-tuning optimiser is a fresh SGD (no momentum
  buffers carried over from phase 1).
- Statistics are the conv output for every monitored conv, the ResNet shortcut (downsample)
  conv included; the official code hooks the downsample branch after its BatchNorm.
- ResNet ``conv2`` channels: the official code also zeroes the next block's ``conv1`` input
  slice across the residual addition; here a trace ends at the addition (the stream's channel
  also carries the shortcut, which is not the reset channel's alone).
- The Jenks split is computed exactly in O(n log n) (``none_scores.py``); no distinct values:
  nothing is flagged.
- A class whose low set ``L_k`` is empty contributes 0 (the official mean of an empty set is
  NaN). Channel ties sort stably, lower index first (the official reversed argsort prefers
  higher indices).
- The summed detection activation is not multiplied by the number of classes (the official
  loop adds it once per class; a constant factor that no split depends on).
- Mixed precision in fine-tuning follows the run's recipe (``train.amp``); the analysis runs
  in fp32.
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

from benchmark.errors import ConfigError
from benchmark.seeding import derive_seed
from benchmark.types import ImageSet
from defenses.base import Defense, DefenseContext, DefenseResult, Stage
from defenses.checks import as_number, is_int, require
from defenses.none_passes import FROZEN_NORMS, collect_statistics, frozen_norms, summed_activation
from defenses.none_report import RoundReport, round_extras, save_rounds
from defenses.none_reset import PASS_THROUGH, InputSlice, ResetSite, reset_channels, reset_sites
from defenses.none_scores import (
    HyperplaneStats,
    JenksSplit,
    hyperplane_scores,
    jenks_flags,
    jenks_two_classes,
    n_reset,
    top_channels,
)

__all__ = [  # the split modules' API, re-exported
    "FROZEN_NORMS",
    "NONE",
    "PASS_THROUGH",
    "HyperplaneStats",
    "InputSlice",
    "JenksSplit",
    "ResetSite",
    "RoundReport",
    "collect_statistics",
    "frozen_norms",
    "hyperplane_scores",
    "jenks_flags",
    "jenks_two_classes",
    "n_reset",
    "reset_channels",
    "reset_sites",
    "summed_activation",
    "top_channels",
]

log = logging.getLogger(__name__)


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
        _check(
            0.0 < as_number(self.reset_fraction) <= 1.0,
            "reset_fraction",
            "a number in (0, 1]",
            self,
        )
        for key in ("rounds", "finetune_batch_size", "batch_size"):
            _check(
                is_int(getattr(self, key)) and getattr(self, key) >= 1, key, "an integer >= 1", self
            )
        _check(
            is_int(self.finetune_epochs) and self.finetune_epochs >= 0,
            "finetune_epochs",
            "an integer >= 0",
            self,
        )
        _check(as_number(self.finetune_lr) > 0, "finetune_lr", "a number > 0", self)
        for key in ("finetune_momentum", "finetune_weight_decay", "n_std"):
            _check(as_number(getattr(self, key)) >= 0, key, "a number >= 0", self)
        for key in ("lambda_low", "lambda_high"):
            _check(0.0 <= as_number(getattr(self, key)) <= 1.0, key, "a number in [0, 1]", self)
        _check(
            as_number(self.lambda_low) < as_number(self.lambda_high),
            "lambda_low",
            f"below lambda_high = {self.lambda_high!r}",
            self,
        )
        _check(
            self.detect_fraction is None or 0.0 < as_number(self.detect_fraction) <= 1.0,
            "detect_fraction",
            "null or a number in (0, 1]",
            self,
        )
        for key in ("augment", "exclude_flagged", "freeze_norm_affine", "flag_break_value"):
            _check(isinstance(getattr(self, key), bool), key, "true or false", self)

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


def _check(ok: bool, key: str, what: str, defense: NONE) -> None:
    require(ok, key, what, getattr(defense, key))
