"""``defense=linf_prune``: prune last-conv channels ranked by the l-inf norm of their maps.

Cheng, Xu, Liu, Chen, Zhao, Lin. "Defending against Backdoor Attack on Deep Neural Networks."
KDD 2019 Workshop on Adversarial Learning Methods, arXiv:2002.12162.

Threat model: post-training. The defender holds the trained (possibly backdoored) model and a
small clean reserve (``ctx.clean_set``); no poisoned data, no trigger, no target label.

The paper's finding (abstract): a backdoor biases neuron activations most visibly in the
l-inf norm of each activation map (not its l1 or l2 norm), and pruning neurons by that statistic
lowers the attack success rate while keeping clean accuracy. Only the abstract and secondary
summaries could be read and there is no official code, so the procedure follows the
reconstruction in the implementer notes (``defenses-ultraclean-none-linf.md`` section 3):

1. Layer: the last convolution of the model (``model.conv_layers()[-1]``); each output channel
   is a "neuron". Its map is measured after the conv's norm layer and the following activation
   (the post-ReLU feature map of the notes); see ``defenses/linf_sites.py``.
2. Channel score: the norm of each channel's spatial map per image (``norm``: l-inf = max over
   positions of ``|A|``, the default; l1 = sum of ``|A|``; l2 = Euclidean norm, as ablations),
   averaged over the images (the notes' "mean l-inf norm over the clean set").
3. Ranking (``ranking``):
   - ``inverted_desc`` (default; the notes' variant A, the paper's procedure as far as the
     abstract and the only summary say: prune the neurons that the reverse-engineered,
     "synthetic" trigger excites most in l-inf): a trigger is inverted on the clean reserve
     with ``attacks.inversion.invert_triggers`` (all-to-one, one trigger per candidate target at
     the mask-area budget ``inversion_budget``); the target is the class whose trigger has the
     highest fit ASR on the reserve (ties: lowest class index), or ``inversion_target`` when
     set. Channels are scored on the reserve images whose label is not that target, stamped
     with its trigger, and pruned in descending order.
   - ``inverted_diff_desc``: as ``inverted_desc``, ranked by the increase of the score over the
     same images unstamped (the notes' "trigger minus clean" alternative).
   - ``clean_asc`` (the notes' variant B, Fine-Pruning with the mean activation replaced by the
     l-inf norm): scores on the clean reserve, ascending; channels dormant on clean data go
     first. Needs no trigger, and no inversion time; weak on BN networks, where no channel is
     dormant (fidelity review, Part 2b section 3.4).
4. Pruning: channels are masked one at a time in ranking order. After each step the clean
   reserve accuracy is measured; the step that would make the drop from the unpruned model
   exceed ``max_acc_drop`` is undone and pruning stops (a drop of exactly the budget is allowed).
   Pruning also stops at ``floor(max_fraction * C)`` channels, and, for the inverted rankings
   when ``stop_asr`` is set, as soon as the inverted trigger's ASR on the reserve is at most
   ``stop_asr`` (the notes' "prune until ASR(t) < target" alternative; that step is kept).
5. Optional fine-tuning on the reserve (``finetune_epochs``, ``finetune_lr``) with
   ``ctx.fit``; the masks stay in place.

Extras (plain scalars): ``layer`` (the masked site), ``conv_layer``, ``site_kind``, ``ranking``,
``norm``, ``n_channels``, ``n_pruned``, ``fraction_pruned``, ``stop_reason`` (``acc_budget``,
``max_fraction`` or ``asr``), ``n_reserve``, ``reserve_acc_before`` / ``_pruned`` / ``_after``
(before pruning, after pruning, after fine-tuning), and for the inverted rankings
``inversion_target``, ``inversion_fit_asr`` and ``inverted_asr_before`` / ``_pruned`` (the
inverted trigger's ASR on the reserve; None otherwise), and ``rank_s`` (seconds of the ranking,
the inversion included).

Where the map is taken and how masks persist: ``defenses/linf_sites.py``.

Choices the paper does not fix (all [INF] in the notes) and deviations:

- The l-inf norm takes ``|A|`` (identical to ``max A`` after a ReLU; for signed maps such as the
  pre-residual conv output of PreAct-ResNet it counts strong negative responses too).
- l1 is the sum over positions, not the mean: every channel has the same map size, so the
  ranking is the same.
- The ranking, the accuracy check of the stop rule, the inversion and the fine-tuning all use
  the same reserve images (``reserve_share`` of ``ctx.clean_set``, a seeded subset; all of it by
  default), as Fine-Pruning uses one validation set. The reported ``reserve_acc_*`` are
  therefore optimistic (the test accuracy is the runner's).
- The stop rule is the 4-point clean-accuracy budget of Fine-Pruning (the notes' default).
  The notes give no fraction cap; ``max_fraction: 1.0`` means none, except that at least one
  channel always stays (a model with every channel of the layer masked ignores its input).
- ``stop_asr`` (off by default): the notes' ASR-based stop, measured with the inverted trigger on
  the reserve (never the real trigger, which the defender does not know).
- Fine-tuning is off by default (the summaries do not mention it); the notes' ablation is
  10 epochs at lr 0.01. It uses the run's recipe otherwise (optimizer, schedule over the
  fine-tuning epochs, batch size, augmentation).
- Inversion: the harness's bounded inversion (Neural Cleanse objective with ABS's mask-area
  hinge, hard area bound) stands in for the paper's unspecified reverse engineering; budget 6%
  of the image area (the natural-backdoor attack's default), 300 Adam steps, lr 0.1, 32 images
  per step, penalty 50. The candidate target is chosen by fit ASR on the inversion images
  themselves (the reserve is small; a split would halve it).
- Scores are computed in eval mode (BatchNorm running statistics, no dropout) in fp32; the
  accuracy checks use ``benchmark.train.predict`` (bf16 autocast on CUDA).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attacks.inversion import invert_triggers, stamp, trigger_asr
from benchmark.errors import ConfigError
from benchmark.seeding import derive_seed
from benchmark.types import ImageSet
from defenses.base import Defense, DefenseContext, DefenseResult, Stage
from defenses.linf_scores import (  # re-exported
    NORMS,
    Ranking,
    accuracy,
    channel_norms,
    prune_count,
    rank_channels,
    site_scores,
)
from defenses.linf_sites import PruneSite, find_site  # re-exported
from defenses.masking import MASK_BUFFER, install_mask, restore_masks, set_pruned  # re-exported

__all__ = [
    "MASK_BUFFER",
    "NORMS",
    "RANKINGS",
    "LinfPrune",
    "PruneSite",
    "Ranking",
    "channel_norms",
    "find_site",
    "install_mask",
    "prune_count",
    "rank_channels",
    "restore_masks",
    "set_pruned",
    "site_scores",
]

log = logging.getLogger(__name__)

RANKINGS = ("clean_asc", "inverted_desc", "inverted_diff_desc")


class LinfPrune(Defense):
    """l-inf-based pruning of the last conv layer's channels (see the module docstring).

    Args:
        ranking: ``clean_asc`` | ``inverted_desc`` | ``inverted_diff_desc``.
        norm: ``linf`` | ``l1`` | ``l2``: the norm of each channel's spatial map.
        max_acc_drop: the clean-reserve accuracy budget (fraction, 0.04 = 4 points).
        max_fraction: most channels pruned, as a fraction of the layer (1.0 = no cap; at least
            one channel always stays).
        stop_asr: inverted rankings only: stop once the inverted trigger's reserve ASR is at
            most this; null = off.
        reserve_share: share of the clean reserve used (a seeded subset; 1.0 = all).
        finetune_epochs: fine-tuning epochs on the reserve after pruning (0 = none).
        finetune_lr: fine-tuning learning rate (the recipe's optimizer and schedule).
        inversion_budget: mask-area budget of the inverted trigger (fraction of H x W).
        inversion_target: fix the inverted target class; null = choose by fit ASR.
        inversion_steps, inversion_lr, inversion_batch_size, inversion_penalty: the inversion.
        batch_size: images per forward when scoring and evaluating.
    """

    name: ClassVar[str] = "linf_prune"
    stage: ClassVar[Stage] = Stage.POST_TRAINING

    def __init__(
        self,
        ranking: str = "inverted_desc",
        norm: str = "linf",
        max_acc_drop: float = 0.04,
        max_fraction: float = 1.0,
        stop_asr: float | None = None,
        reserve_share: float = 1.0,
        finetune_epochs: int = 0,
        finetune_lr: float = 0.01,
        inversion_budget: float = 0.06,
        inversion_target: int | None = None,
        inversion_steps: int = 300,
        inversion_lr: float = 0.1,
        inversion_batch_size: int = 32,
        inversion_penalty: float = 50.0,
        batch_size: int = 256,
    ) -> None:
        if ranking not in RANKINGS:
            raise ConfigError("defense.ranking", f"must be one of {RANKINGS}, got {ranking!r}")
        if norm not in NORMS:
            raise ConfigError("defense.norm", f"must be one of {NORMS}, got {norm!r}")
        for key, value, low, high in (
            ("max_acc_drop", max_acc_drop, 0.0, 1.0),
            ("max_fraction", max_fraction, 0.0, 1.0),
            ("inversion_budget", inversion_budget, 0.0, 1.0),
        ):
            if isinstance(value, bool) or not low <= float(value) <= high:
                raise ConfigError(f"defense.{key}", f"must lie in [{low}, {high}], got {value!r}")
        if not 0.0 < float(reserve_share) <= 1.0:
            raise ConfigError("defense.reserve_share", f"must lie in (0, 1], got {reserve_share!r}")
        if float(inversion_budget) == 0.0:
            raise ConfigError("defense.inversion_budget", "must be > 0")
        if stop_asr is not None and not 0.0 <= float(stop_asr) <= 1.0:
            raise ConfigError("defense.stop_asr", f"must be null or in [0, 1], got {stop_asr!r}")
        if stop_asr is not None and ranking == "clean_asc":
            raise ConfigError(
                "defense.stop_asr", "needs an inverted trigger: use an inverted_* ranking"
            )
        for key, value, low in (
            ("finetune_epochs", finetune_epochs, 0),
            ("inversion_steps", inversion_steps, 1),
            ("inversion_batch_size", inversion_batch_size, 1),
            ("batch_size", batch_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"defense.{key}", f"must be an integer >= {low}, got {value!r}")
        if not float(finetune_lr) > 0:
            raise ConfigError("defense.finetune_lr", f"must be > 0, got {finetune_lr!r}")
        if not float(inversion_lr) > 0 or not float(inversion_penalty) >= 0:
            raise ConfigError(
                "defense.inversion_lr",
                f"lr must be > 0 and penalty >= 0, got {inversion_lr!r}, {inversion_penalty!r}",
            )
        self.ranking, self.norm = ranking, norm
        self.max_acc_drop, self.max_fraction = float(max_acc_drop), float(max_fraction)
        self.stop_asr = None if stop_asr is None else float(stop_asr)
        self.reserve_share = float(reserve_share)
        self.finetune_epochs, self.finetune_lr = finetune_epochs, float(finetune_lr)
        self.inversion_budget = float(inversion_budget)
        self.inversion_target = inversion_target
        self.inversion_steps, self.inversion_lr = inversion_steps, float(inversion_lr)
        self.inversion_batch_size = inversion_batch_size
        self.inversion_penalty = float(inversion_penalty)
        self.batch_size = batch_size

    def validate(self, num_classes: int, n_train: int, n_clean: int) -> None:
        if n_clean < 1:
            raise ConfigError(
                "defense_data.clean_fraction", "linf_prune needs a non-empty clean reserve"
            )
        t = self.inversion_target
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < num_classes
        ):
            raise ConfigError(
                "defense.inversion_target",
                f"= {t!r} is not a class of this dataset (0..{num_classes - 1})",
            )

    # -- steps ------------------------------------------------------------------------------
    def reserve(self, ctx: DefenseContext) -> ImageSet:
        """The reserve images used: all of ``ctx.clean_set`` or a seeded ``reserve_share``."""
        data = ctx.clean_set
        if self.reserve_share >= 1.0:
            return data
        n = max(1, round(self.reserve_share * len(data)))
        return data.subset(torch.randperm(len(data), generator=ctx.generator("reserve"))[:n])

    def rank(
        self,
        model: nn.Module,
        site: PruneSite,
        data: ImageSet,
        *,
        num_classes: int,
        device: torch.device,
        seed: int,
    ) -> Ranking:
        """The pruning order of ``site``'s channels under ``self.ranking`` on ``data``."""

        def scores(x: Tensor, transform: Callable[[Tensor], Tensor] | None = None) -> Tensor:
            per_image = site_scores(
                model,
                site.module,
                x,
                norm=self.norm,
                transform=transform,
                device=device,
                batch_size=self.batch_size,
            )
            return per_image.mean(0)  # aggregate over images: mean of the per-image norms

        if self.ranking == "clean_asc":
            s = scores(data.x)
            return Ranking(rank_channels(s, descending=False), s)

        targets = (
            [int(self.inversion_target)]
            if self.inversion_target is not None
            else list(range(num_classes))
        )
        inv = invert_triggers(
            model,
            data.x,
            data.y,
            targets=targets,
            budgets=[self.inversion_budget],
            steps=self.inversion_steps,
            lr=self.inversion_lr,
            batch_size=self.inversion_batch_size,
            penalty=self.inversion_penalty,
            device=device,
            seed=seed,
            amp=device.type == "cuda",
            desc="linf_prune trigger inversion",
        )
        row = int(torch.argmax(inv.fit_asr[:, 0]))  # first maximum: lowest class on ties
        target = int(inv.targets[row])
        mask, pattern = inv.mask[row, 0], inv.pattern[row, 0]
        x_other = data.x[(data.y != target).to(data.x.device)]
        if x_other.shape[0] == 0:
            raise ConfigError(
                "defense.reserve_share",
                f"the reserve has no image outside the inverted target {target}",
            )
        m, p = mask.to(device), pattern.to(device)
        s = scores(x_other, lambda xb: stamp(xb, m, p))
        if self.ranking == "inverted_diff_desc":
            s = s - scores(x_other)
        return Ranking(
            rank_channels(s, descending=True),
            s,
            target=target,
            mask=mask,
            pattern=pattern,
            fit_asr=float(inv.fit_asr[row, 0]),
        )

    def run(self, ctx: DefenseContext) -> DefenseResult:
        assert ctx.model is not None, "post-training defenses receive the trained model"
        device = ctx.device
        model = copy.deepcopy(ctx.model)
        site = find_site(model)
        mask = install_mask(site.module, site.channels)
        model.to(device).eval()
        data = self.reserve(ctx)
        log.info(
            "linf_prune: %s channels of %s, measured at %s (%s); %d reserve images",
            site.channels,
            site.conv_name,
            site.name,
            site.kind,
            len(data),
        )

        seed = derive_seed(ctx.seed, "inversion")
        t0 = time.perf_counter()
        ranking = self.rank(
            model, site, data, num_classes=ctx.num_classes, device=device, seed=seed
        )
        rank_s = time.perf_counter() - t0

        def acc_at(k: int) -> float:
            set_pruned(mask, ranking.order[:k])
            return accuracy(model, data, device, self.batch_size)

        def asr_at(k: int) -> float:
            set_pruned(mask, ranking.order[:k])
            return self._trigger_asr(model, data, ranking, device)

        acc0 = acc_at(0)
        asr0 = self._trigger_asr(model, data, ranking, device)
        n_max = min(math.floor(self.max_fraction * site.channels + 1e-9), site.channels - 1)
        n, reason = prune_count(acc_at, acc0, n_max, self.max_acc_drop, asr_at, self.stop_asr)
        set_pruned(mask, ranking.order[:n])
        acc_pruned = accuracy(model, data, device, self.batch_size)
        asr_pruned = self._trigger_asr(model, data, ranking, device)
        log.info(
            "linf_prune: pruned %d/%d channels (%s); reserve accuracy %.4f -> %.4f",
            n,
            site.channels,
            reason,
            acc0,
            acc_pruned,
        )

        acc_after = acc_pruned
        if self.finetune_epochs > 0:
            ctx.fit(
                model,
                data,
                epochs=self.finetune_epochs,
                lr=self.finetune_lr,
                desc="linf_prune finetune",
            )
            model.eval()
            acc_after = accuracy(model, data, device, self.batch_size)

        extras: dict[str, Any] = {
            "layer": site.name,
            "conv_layer": site.conv_name,
            "site_kind": site.kind,
            "ranking": self.ranking,
            "norm": self.norm,
            "n_channels": site.channels,
            "n_pruned": n,
            "fraction_pruned": n / site.channels,
            "stop_reason": reason,
            "n_reserve": len(data),
            "reserve_acc_before": acc0,
            "reserve_acc_pruned": acc_pruned,
            "reserve_acc_after": acc_after,
            "inversion_target": ranking.target,
            "inversion_fit_asr": ranking.fit_asr,
            "inverted_asr_before": asr0,
            "inverted_asr_pruned": asr_pruned,
            "rank_s": round(rank_s, 3),  # ranking, with the inversion for inverted_*
        }
        return DefenseResult(model=model, extras=extras)

    def _trigger_asr(
        self, model: nn.Module, data: ImageSet, ranking: Ranking, device: torch.device
    ) -> float | None:
        """The inverted trigger's ASR on the reserve (None without an inverted trigger)."""
        if ranking.mask is None or ranking.pattern is None or ranking.target is None:
            return None
        asr, _, _ = trigger_asr(
            model,
            data.x,
            data.y,
            ranking.mask,
            ranking.pattern,
            ranking.target,
            device=device,
            batch_size=self.batch_size,
        )
        return asr
