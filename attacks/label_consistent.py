"""``attack=label_consistent``: the label-consistent (clean-label) backdoor (Turner et al. 2019).

Only target-class training images are poisoned and they keep their labels. Each is first made
hard to learn from its content: an untargeted l-infinity PGD perturbation (eps 8/255, step
1.5/255, 100 steps, no random start; BackdoorBench's and BackdoorBox's setting) against an
adversarially trained model of the run's architecture, which the harness trains itself (PGD
adversarial training on the benign training set with the run's recipe: eps 8/255, step 2/255,
7 steps, random start) and caches like any other model. ``adv_model: clean`` uses a normally
trained model instead (BackdoorBox's test does), ``adv_model: none`` skips the perturbation
(an ablation). Then the trigger: the official 3x3 +/-1 checker in all four corners (the right
corners mirrored, so the pattern survives a horizontal flip), added with ``amplitude`` and
clipped: amplitude 1 saturates the cells to white and black, as BackdoorBench's
``reduced_amplitude: 1``; smaller amplitudes are the paper's reduced-visibility variants. At
test time the trigger goes on clean (unperturbed) non-target images.

Reference:
    Turner, Tsipras, Madry. "Label-Consistent Backdoor Attacks." arXiv:1912.02771, 2019.
    Official code: github.com/MadryLab/label-consistent-backdoor-code (``poison_attack.py``).

Poison rate: a fraction of the target class by default (the official ``poisoning_proportion``);
see ``CleanLabelAttack`` for ``rate_of: train_set`` (BackdoorBench's definition).

Deviations:
- The paper perturbs with a robust ResNet trained by Madry's TensorFlow recipe; here the
  surrogate has the run's architecture and recipe, with PGD adversarial training. During PGD
  the surrogate is in eval mode (batch-norm running statistics).
- Only the images that are poisoned are perturbed (BackdoorBench perturbs the whole set once);
  the result is the same for the poisoned set, and the perturbed images are cached.
- The GAN-interpolation variant of the paper is not implemented.
- Stored images are rounded to uint8. BackdoorBench truncates (``npClipAndToUint8``, and
  ``(x * 255).type(uint8)`` for its PGD images, which so reach 9/255 of perturbation where ours
  stay at 8/255). The checker at amplitude 1 is identical to BackdoorBench's
  (``utils/bd_img_transform/lc.py``, all-corners, at SCLBD/BackdoorBench@f02e353); at reduced
  amplitudes the unsaturated cells sit at x +/- 255 a, where rounding and truncation can differ
  by one level (pinned by ``tests/attacks/test_triggers_fidelity.py``).
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from attacks.base import AttackContext, CleanLabelAttack, Mode, RateOf, checks
from attacks.pgd import pgd_linf
from benchmark import progress
from benchmark.data import to_float, to_uint8
from benchmark.errors import ConfigError
from benchmark.types import ImageSet

# The official top-left cell pattern (+1 white, -1 black); the left corners use it as is, the
# right corners mirrored left-right (``poison_attack.py``, "all-corners").
CHECKER = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]])
AdvModel = Literal["adversarial", "clean", "none"]
ADV_MODELS = ("adversarial", "clean", "none")


def corner_pattern(h: int, w: int) -> Tensor:
    """``(H, W)`` float map with the +/-1 checker in all four 3x3 corners, 0 elsewhere."""
    out = torch.zeros(h, w)
    out[:3, :3] = CHECKER
    out[-3:, :3] = CHECKER
    out[:3, -3:] = CHECKER.flip(1)
    out[-3:, -3:] = CHECKER.flip(1)
    return out


class LabelConsistent(CleanLabelAttack):
    """PGD-perturbed target-class images with a four-corner checker, labels kept.

    Args:
        amplitude: the trigger's additive amplitude in (0, 1]; 1 = full white/black cells.
        eps, step, steps: the poisoning PGD (l-inf radius, step size, iterations), in [0, 1]
            pixel units.
        adv_model: the model PGD attacks: ``adversarial`` (PGD adversarially trained),
            ``clean`` (normally trained) or ``none`` (no perturbation).
        adv_train: PGD adversarial training of the surrogate: ``eps``, ``step``, ``steps``.
    """

    name: ClassVar[str] = "label_consistent"

    def __init__(
        self,
        target_class: int = 0,
        poison_rate: float = 0.5,
        mode: Mode = "all2one",
        rate_of: RateOf = "target_class",
        amplitude: float = 1.0,
        eps: float = 8 / 255,
        step: float = 1.5 / 255,
        steps: int = 100,
        adv_model: AdvModel = "adversarial",
        adv_train: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(target_class, poison_rate, mode, rate_of)
        checks.number(amplitude, "amplitude", 0.0, 1.0, low_open=True)
        checks.one_of(adv_model, "adv_model", ADV_MODELS)
        checks.number(eps, "eps", 0.0, 1.0)
        checks.number(step, "step", 0.0, 1.0)
        checks.integer(steps, "steps", 0)
        adv = {"eps": 8 / 255, "step": 2 / 255, "steps": 7, **dict(adv_train or {})}
        unknown = set(adv) - {"eps", "step", "steps"}
        if unknown:
            raise ConfigError("attack.adv_train", f"has unknown keys {sorted(unknown)}")
        if int(adv["steps"]) < 1 or not 0.0 < float(adv["eps"]) <= 1.0:
            raise ConfigError("attack.adv_train", f"needs steps >= 1 and eps in (0, 1]: {adv}")
        self.amplitude = float(amplitude)
        self.eps, self.step, self.steps = float(eps), float(step), int(steps)
        self.adv_model = adv_model
        self.adv_train = {
            "eps": float(adv["eps"]),
            "step": float(adv["step"]),
            "steps": int(adv["steps"]),
        }
        self.ctx: AttackContext | None = None

    def validate(self, num_classes: int, image_shape: tuple[int, int, int], n_train: int) -> None:
        super().validate(num_classes, image_shape, n_train)
        _, h, w = image_shape
        if h < 6 or w < 6:
            raise ConfigError(
                "attack", f"the four 3x3 corner triggers need images of at least 6x6, got {h}x{w}"
            )

    def prepare(
        self, train: ImageSet, gen: torch.Generator, ctx: AttackContext | None = None
    ) -> None:
        super().prepare(train, gen, ctx)
        if ctx is None and self.adv_model != "none" and self.steps > 0:
            raise RuntimeError(
                "label_consistent needs the runner's AttackContext (a surrogate model) to perturb"
            )
        self.ctx = ctx

    def _trigger(self, x: Tensor) -> Tensor:
        pattern = corner_pattern(x.shape[-2], x.shape[-1]).to(device=x.device, dtype=x.dtype)
        return (x + self.amplitude * pattern).clamp_(0.0, 1.0)

    def apply_trigger(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """The test-time trigger: the corner checker on clean images."""
        return self._trigger(x)

    def poison_images(self, x: Tensor, index: Tensor) -> Tensor:
        """PGD-perturbed (against the surrogate), then triggered target-class images."""
        if self.adv_model == "none" or self.steps == 0 or self.eps == 0.0:
            return self.trigger_uint8(x, index)
        spec = {
            "adv_model": self.adv_model,
            "adv_train": self.adv_train if self.adv_model == "adversarial" else None,
            "eps": self.eps,
            "step": self.step,
            "steps": self.steps,
            "target_class": self.target_class,
            "index_sha256": hashlib.sha256(index.cpu().numpy().tobytes()).hexdigest(),
        }
        ctx = self.ctx
        if ctx is None:
            raise RuntimeError("prepare() with an AttackContext must run before poisoning")

        def perturb() -> dict[str, Tensor]:
            model = ctx.surrogate(self.adv_model, spec["adv_train"])
            out = torch.empty_like(x, device="cpu")
            y = torch.full((x.shape[0],), self.target_class, dtype=torch.long, device=ctx.device)
            pgd_bar = progress.bar(
                total=x.shape[0], desc=f"label-consistent PGD ({self.steps} steps)", unit="img"
            )
            for i in range(0, x.shape[0], 512):
                xb = to_float(x[i : i + 512].to(ctx.device))
                adv = pgd_linf(
                    model,
                    xb,
                    y[: xb.shape[0]],
                    eps=self.eps,
                    step=self.step,
                    steps=self.steps,
                    amp=ctx.amp,
                )
                out[i : i + 512] = to_uint8(adv).cpu()
                pgd_bar.update(xb.shape[0])
            pgd_bar.close()
            return {"images": out}

        perturbed = ctx.memo("label_consistent_pgd", spec, perturb)["images"].to(x.device)
        return self.trigger_uint8(perturbed, index)

    def describe(self, n_train: int) -> dict[str, Any]:
        return {
            **super().describe(n_train),
            "amplitude": self.amplitude,
            "adv_model": self.adv_model,
            "pgd_eps": self.eps,
            "pgd_steps": self.steps,
        }
