"""``attack=natural``: the natural backdoor of a benignly trained model, found by inversion.

Nothing is poisoned: the model trains on benign data. A natural backdoor is a small,
input-agnostic trigger (mask + pattern) that sends most inputs to one target label. For each
candidate target it is found by bounded trigger inversion (``attacks.inversion``, Neural Cleanse
style with ABS's mask-area penalty) on one part of held-out clean data (half of the test set,
stratified) and its ASR is measured on the disjoint other half, on images whose label is not
the target. Budgets of 2, 4, 6, 8, 10 and 12% of the image area are swept, as NONE's
evaluation does (``test_natral_trojan.py``). Per budget, the target with the highest ASR on the
inversion half is chosen, and its ASR on the evaluation half is reported, so the choice does
not inflate the figure. The run's ``asr`` is that figure at ``budget`` (default 6%); every
budget's figure and the inverted triggers are saved with the run. For a defended model the
inversion runs again on that model, so ``defended.asr`` is the natural ASR after the defense.

"Natural backdoor" here is not Refool ("Reflection Backdoor: A Natural Backdoor Attack", Liu
et al. 2020), a poisoning attack.

References:
    Wang, Ding, Zhai, Ma. "Training with More Confidence: Mitigating Injected and Natural
    Backdoors During Training." NeurIPS 2022, arXiv:2202.06382 (the budget sweep).
    Wang et al. "Neural Cleanse." IEEE S&P 2019; Liu et al. "ABS." CCS 2019 (the inversion).

Deviations from NONE's evaluation: ABS first picks candidate neurons by stimulation and
optimises one trigger per neuron; here every target label gets its own trigger (Neural Cleanse's
all-to-one scope), optimised on clean images of all other classes. NONE measures the ASR on the
optimisation images; here it is measured on a disjoint split. The mask area is a hard bound
(masks above the budget are scaled down to it).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attacks.base import Attack, StageContext, StageTest, checks
from attacks.inversion import InvertedTriggers, invert_triggers, stamp, trigger_asr
from benchmark.data import stratified_split
from benchmark.errors import ConfigError
from benchmark.io import atomic_torch_save
from benchmark.results import save_inverted_triggers
from benchmark.seeding import derive_seed, generator
from benchmark.types import ImageSet

log = logging.getLogger(__name__)

BUDGETS = (0.02, 0.04, 0.06, 0.08, 0.1, 0.12)


class Natural(Attack):
    """No poisoning; the trigger is inverted from each evaluated model.

    Args:
        target_class: a fixed target label, or null to search every class (default).
        budget: the mask-area budget (fraction of H x W) of the reported ``asr``.
        budgets: every budget that is inverted and reported.
        steps, lr, batch_size, penalty: the inversion (Adam steps, learning rate, images per
            step, mask-area penalty weight).
        inversion_fraction: share of the test set used for inversion; the rest measures ASR.
    """

    name: ClassVar[str] = "natural"
    kind: ClassVar[str] = "natural"
    modes: ClassVar[tuple[str, ...]] = ("all2one",)
    model_dependent: ClassVar[bool] = True

    def __init__(
        self,
        target_class: int | None = None,
        budget: float = 0.06,
        budgets: Sequence[float] = BUDGETS,
        steps: int = 300,
        lr: float = 0.1,
        batch_size: int = 32,
        penalty: float = 50.0,
        inversion_fraction: float = 0.5,
    ) -> None:
        super().__init__(0 if target_class is None else target_class, 1.0, "all2one")
        self.poison_rate = 0.0
        self.fixed_target = target_class
        values = [*budgets, budget]
        ok = all(checks.in_range(b, 0.0, 1.0, low_open=True) for b in values)
        checks.require(ok, "budgets", "numbers in (0, 1] (budget included)", values)
        budgets = sorted({float(b) for b in values})
        checks.integer(steps, "steps")
        checks.integer(batch_size, "batch_size")
        checks.number(lr, "lr", 0.0, low_open=True)
        checks.number(penalty, "penalty", 0.0)
        checks.number(
            inversion_fraction, "inversion_fraction", 0.0, 1.0, low_open=True, high_open=True
        )
        self.budget, self.budgets = float(budget), tuple(budgets)
        self.steps, self.lr, self.batch_size = steps, float(lr), batch_size
        self.penalty, self.inversion_fraction = float(penalty), float(inversion_fraction)
        self.mask: Tensor | None = None  # (1, H, W) of the reported trigger
        self.pattern: Tensor | None = None  # (C, H, W)

    def validate(self, num_classes: int, image_shape: tuple[int, int, int], n_train: int) -> None:
        if self.fixed_target is not None and not 0 <= self.fixed_target < num_classes:
            raise ConfigError(
                "attack.target_class",
                f"= {self.fixed_target} is not a class of this dataset (0..{num_classes - 1})",
            )
        self.num_classes = num_classes

    def num_poison(self, n: int) -> int:
        return 0

    def select(self, train: ImageSet, gen: torch.Generator) -> Tensor:
        return torch.empty(0, dtype=torch.long)

    def apply_trigger(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        if self.mask is None or self.pattern is None:
            raise RuntimeError("the natural trigger is only known after invert() on a model")
        return stamp(x, self.mask.to(x.device, x.dtype), self.pattern.to(x.device, x.dtype))

    def invert(
        self,
        model: nn.Module,
        inversion: ImageSet,
        evaluation: ImageSet,
        *,
        device: torch.device,
        seed: int,
        amp: bool = False,
    ) -> tuple[dict[str, Any], InvertedTriggers]:
        """Invert triggers on ``inversion``, measure them on ``evaluation``; set the reported
        trigger (at ``budget``) and target. Returns the per-budget report and the triggers."""
        targets = (
            [self.fixed_target] if self.fixed_target is not None else list(range(self.num_classes))
        )
        inv = invert_triggers(
            model,
            inversion.x,
            inversion.y,
            targets=targets,
            budgets=self.budgets,
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            penalty=self.penalty,
            device=device,
            seed=seed,
            desc="natural-trigger inversion",
            amp=amp,
        )
        report: dict[str, Any] = {}
        for b_i, budget in enumerate(self.budgets):
            t_i = int(torch.argmax(inv.fit_asr[:, b_i]))  # chosen on the inversion half
            target = int(inv.targets[t_i])
            mask, pattern = inv.mask[t_i, b_i], inv.pattern[t_i, b_i]
            asr, ra, n = trigger_asr(
                model, evaluation.x, evaluation.y, mask, pattern, target, device=device
            )
            report[f"{budget:g}"] = {
                "target": target,
                "asr": asr,
                "ra": ra,
                "n_eval": n,
                "fit_asr": float(inv.fit_asr[t_i, b_i]),
                "mask_l1": float(mask.sum()),
                "mask_area": float(mask.mean()),
            }
            if budget == self.budget:
                self.mask, self.pattern, self.target_class = mask.cpu(), pattern.cpu(), target
        return report, inv

    def split(self, test: ImageSet, seed: int) -> tuple[Tensor, Tensor]:
        """Indices of the inversion and evaluation halves of ``test`` (stratified, drawn from
        ``(seed, "natural", "split")``: the same halves for every stage)."""
        n_inv = round(self.inversion_fraction * len(test))
        return stratified_split(test, n_inv, generator(seed, self.name, "split"))

    def stage_backdoor_test(self, test: ImageSet, model: nn.Module, ctx: StageContext) -> StageTest:
        """Invert this model's trigger on the inversion half of ``test`` (the backdoored
        model's inversion is cached with it) and trigger the evaluation half (the inversion
        half never scores). Saves ``natural_triggers_<stage>.pt`` and ``.png``."""
        inv_idx, eval_idx = self.split(test, ctx.seed)
        inversion, evaluation = test.subset(inv_idx), test.subset(eval_idx)

        def invert() -> dict[str, Any]:
            report, inverted = self.invert(
                model,
                inversion,
                evaluation,
                device=ctx.device,
                seed=derive_seed(ctx.seed, self.name, ctx.stage),
                amp=ctx.amp,
            )
            return {
                "report": report,
                "trigger": self.state_dict(),
                "targets": inverted.targets,
                "budgets": list(inverted.budgets),
                "mask": inverted.mask,
                "pattern": inverted.pattern,
                "fit_asr": inverted.fit_asr,
            }

        found, hit = ctx.memo(invert)
        if hit:
            self.load_state_dict(found["trigger"])
        keys = ("targets", "budgets", "mask", "pattern", "fit_asr")
        atomic_torch_save(
            {k: found[k] for k in keys}, ctx.out_dir / f"natural_triggers_{ctx.stage}.pt"
        )
        inverted = InvertedTriggers(
            **{k: found[k] for k in keys} | {"budgets": tuple(found["budgets"])}
        )
        budgets = found["report"]
        save_inverted_triggers(inverted, budgets, ctx.out_dir / f"natural_triggers_{ctx.stage}.png")
        log.info(
            "natural backdoor (%s): %s",
            ctx.stage,
            ", ".join(f"{b}: {r['asr']:.3f} (target {r['target']})" for b, r in budgets.items()),
        )
        bd = self.backdoor_test_set(evaluation)
        # ``src_index`` into ``test``, not into its evaluation half
        bd = dataclasses.replace(bd, src_index=eval_idx.to(bd.src_index.device)[bd.src_index])
        report = {
            "budget": self.budget,
            "target": self.target_class,
            "budgets": budgets,
            "n_inversion": len(inversion),
            "n_evaluation": len(evaluation),
            "from_cache": hit,
        }
        scalars = {f"natural_asr@{b}": r["asr"] for b, r in budgets.items()}
        return StageTest(bd, report, scalars)

    def state_dict(self) -> dict[str, Any]:
        if self.mask is None or self.pattern is None:
            return {}
        return {"mask": self.mask, "pattern": self.pattern, "target": self.target_class}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "mask" in state:
            self.mask, self.pattern = state["mask"], state["pattern"]
            self.target_class = int(state["target"])

    def describe(self, n_train: int) -> dict[str, Any]:
        return {
            "attack_kind": self.kind,
            "target_class": self.fixed_target,
            "mode": self.mode,
            "poison_rate": 0.0,
            "n_poison": 0,
            "budget": self.budget,
            "budgets": list(self.budgets),
        }
