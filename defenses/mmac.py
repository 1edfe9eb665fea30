"""``defense=mmac``: MMAC, maximum-margin activation clipping, with MMDF test-time detection.

Wang, Xiang, Miller, Kesidis. "Improved Activation Clipping for Universal Backdoor Mitigation and
Test-Time Detection". arXiv:2308.04617, 2023. Official code: github.com/wanghangpsu/MMAC
(``mmac.py``, ``mmdf.py``, commit dd1c79e), whose behaviour this follows. Post-training: the
trained model (white box) and a small clean labelled set; the weights are never changed.

MMAC: a learnable upper bound per channel after every activation site (``min(h, Z)``; all of
``model.activation_sites()``, ``defenses/clipping.py``), trained with Adam, the base network
frozen, on ``MSE(clipped logits, original logits) + c * sum of the margins`` of synthetic
maximum-margin inputs (``synth_*``), over ``per_class`` correctly classified clean images per
class; ``c`` adapts to hold the clean agreement at ``target_acc`` (``defenses/bound_fit.py``).
MMDF flags an input whose margin drops by more than mean + ``mmdf_z`` std of the clean drops;
the system answers a flagged input with the clipped network's best other class and an
unflagged one with the original prediction (the result's ``input_detector``). The defended
model is the clipped network.

Checked against the official scripts on a fixed input in
``tests/defenses/test_clipping_fidelity.py``; ``controller_failed`` in the extras flags a run
whose final clean agreement is below ``target_acc``. Deviations (reasons and measurements in
``docs/methods/mmac.md``): clean data from the defender's reserve, not the test split; sites
found by tracing on any model, one bound per call of a shared module; bounds are parameters
in the ``state_dict``, optionally floored (``bound_floor``); synthesis batched over classes;
an exact masked margin; ``synthesize_on: clipped`` as an option; NHWC batches where enabled.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmark.checks import Checks
from benchmark.errors import ConfigError
from benchmark.train import use_channels_last
from defenses.base import Defense, DefenseContext, DefenseResult, InputDetector, Stage
from defenses.bound_fit import (
    batched,
    bound_extras,
    check_floor,
    controller_from,
    fit_bounds,
    prepare_clean,
)
from defenses.clipping import ClippedModel, clip_points, margins, synthesize_max_margin

log = logging.getLogger(__name__)
checks = Checks("defense")

SYNTHESIZE_ON = ("original", "clipped")


def mmdf_statistic(original: Tensor, clipped: Tensor) -> Tensor:
    """``(N,)`` margin of the original prediction on the original logits minus its margin on the
    clipped logits (both ``(N, K)``)."""
    pred = original.argmax(1)
    return margins(original, pred) - margins(clipped, pred)


def mmdf_correct(original: Tensor, clipped: Tensor) -> Tensor:
    """``(N,)`` the clipped network's best class other than the original prediction."""
    own = F.one_hot(original.argmax(1), original.shape[1]).bool()
    return clipped.masked_fill(own, float("-inf")).argmax(1)


def mmdf_threshold(d: Tensor, z: float) -> float:
    """Mean + ``z`` * (unbiased) standard deviation of the clean statistics ``d``."""
    d = d.double()
    return float(d.mean() + z * d.std())


class MMDF:
    """The test-time detector on a clipped model: ``score`` and ``correct`` take float pixels
    ``(N, C, H, W)`` in [0, 1] on the model's device and return ``(N,)`` tensors."""

    def __init__(self, model: ClippedModel) -> None:
        self.model = model

    @torch.no_grad()
    def _logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.model.eval()
        return self.model.original(x).float(), self.model(x).float()

    def score(self, x: Tensor) -> Tensor:
        return mmdf_statistic(*self._logits(x))

    def correct(self, x: Tensor) -> Tensor:
        return mmdf_correct(*self._logits(x))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """The system's answer to an unflagged input: the original network's prediction."""
        self.model.eval()
        return self.model.original(x).float().argmax(1)


class MaxMarginPenalty:
    """MMAC's regulariser: the summed margins of a synthetic batch under the clipped model.

    The synthetic set is (re)made at epochs 0, ``every``, 2 * ``every``, ...; each epoch walks a
    fresh permutation of it, one batch per clean batch, restarting when it runs out (the code's
    ``DataLoader(shuffle=True)`` re-iterated each epoch).
    """

    def __init__(
        self,
        model: ClippedModel,
        num_classes: int,
        shape: tuple[int, ...],
        *,
        per_class: int,
        steps: int,
        lr: float,
        every: int,
        batch_size: int,
        on: str,
        ctx: DefenseContext,
    ) -> None:
        self.model, self.num_classes, self.shape = model, num_classes, shape
        self.per_class, self.steps, self.lr, self.every = per_class, steps, lr, every
        self.batch_size, self.on, self.ctx = batch_size, on, ctx
        self.order_gen = ctx.generator("mmac", "synthetic", "order")
        self.x = self.y = self.order = torch.empty(0)
        self.pos = 0
        self.synth_seconds = 0.0

    def synthesize(self, round_: int) -> None:
        t0 = time.perf_counter()
        net = self.model.original if self.on == "original" else self.model
        self.x, self.y = synthesize_max_margin(
            net,
            self.num_classes,
            self.per_class,
            self.shape,
            steps=self.steps,
            lr=self.lr,
            gen=self.ctx.generator("mmac", "synthetic", round_),
            device=self.ctx.device,
        )
        self.synth_seconds += time.perf_counter() - t0

    def on_epoch_start(self, epoch: int) -> None:
        if epoch % self.every == 0:
            self.synthesize(epoch // self.every)
        self._reshuffle()

    def _reshuffle(self) -> None:
        self.order = torch.randperm(len(self.x), generator=self.order_gen).to(self.ctx.device)
        self.pos = 0

    def __call__(self, step: int) -> Tensor:
        if self.pos >= len(self.order):
            self._reshuffle()
        idx = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return margins(self.model(self.x[idx]), self.y[idx]).sum()


class MMAC(Defense):
    """Maximum-margin activation clipping with MMDF detection (see the module docstring).

    Args:
        per_class: clean images per class drawn from the reserve.
        batch_size: clean batch size (and synthetic batch size).
        epochs: passes over the clean data.
        lr: Adam learning rate of the bounds.
        init_bound: initial value of every bound.
        c0, c_factor, target_acc, c_start_after, c_every: the ``c`` rule (``CController``).
        synth_per_class, synth_steps, synth_lr, synth_every: maximum-margin input synthesis.
        synthesize_on: ``original`` (the code) or ``clipped`` network for the synthesis.
        mmdf_z: the MMDF threshold's multiple of the clean standard deviation.
        bound_floor: null = unconstrained bounds (the code); a number = projected onto >= it.
    """

    name: ClassVar[str] = "mmac"
    stage: ClassVar[Stage] = Stage.POST_TRAINING

    def __init__(
        self,
        per_class: int = 50,
        batch_size: int = 200,
        epochs: int = 300,
        lr: float = 0.1,
        init_bound: float = 1.0,
        c0: float = 0.002,
        c_factor: float = 1.2,
        target_acc: float = 0.95,
        c_start_after: int = 30,
        c_every: int = 10,
        synth_per_class: int = 50,
        synth_steps: int = 300,
        synth_lr: float = 0.01,
        synth_every: int = 100,
        synthesize_on: str = "original",
        mmdf_z: float = 2.576,
        bound_floor: float | None = None,
    ) -> None:
        for key, value in (
            ("per_class", per_class),
            ("batch_size", batch_size),
            ("epochs", epochs),
            ("synth_per_class", synth_per_class),
            ("synth_every", synth_every),
        ):
            checks.integer(value, key)
        checks.number(lr, "lr", 0.0, low_open=True)
        checks.number(synth_lr, "synth_lr", 0.0, low_open=True)
        checks.integer(synth_steps, "synth_steps", 0)
        checks.one_of(synthesize_on, "synthesize_on", SYNTHESIZE_ON)
        checks.number(mmdf_z, "mmdf_z")
        checks.number(init_bound, "init_bound")
        self.controller = controller_from(c0, c_factor, target_acc, c_start_after, c_every)
        self.per_class, self.batch_size, self.epochs, self.lr = per_class, batch_size, epochs, lr
        self.init_bound = float(init_bound)
        self.synth_per_class, self.synth_steps = synth_per_class, synth_steps
        self.synth_lr, self.synth_every = float(synth_lr), synth_every
        self.synthesize_on, self.mmdf_z = synthesize_on, float(mmdf_z)
        self.bound_floor = check_floor(bound_floor)

    def validate(self, num_classes: int, n_train: int, n_clean: int) -> None:
        if n_clean < 1:
            raise ConfigError(
                "defense_data.clean_fraction", "mmac needs clean data; the reserve is empty"
            )

    def run(self, ctx: DefenseContext) -> DefenseResult:
        assert ctx.model is not None, "post-training defenses receive the trained model"
        t0 = time.perf_counter()
        base = copy.deepcopy(ctx.model).to(ctx.device).eval()
        model = ClippedModel(base, clip_points(base), self.init_bound)

        clean = prepare_clean(ctx, model, self.per_class, "mmac")
        channels_last = use_channels_last(ctx.recipe, ctx.device)
        if channels_last:
            base.to(memory_format=torch.channels_last)

        penalty = MaxMarginPenalty(
            model,
            ctx.num_classes,
            ctx.clean_set.image_shape,
            per_class=self.synth_per_class,
            steps=self.synth_steps,
            lr=self.synth_lr,
            every=self.synth_every,
            batch_size=self.batch_size,
            on=self.synthesize_on,
            ctx=ctx,
        )
        fit = fit_bounds(
            model,
            clean.x,
            clean.y,
            clean.ref,
            penalty,
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            controller=self.controller,
            gen=ctx.generator("mmac", "order"),
            on_epoch_start=penalty.on_epoch_start,
            channels_last=channels_last,
            bound_floor=self.bound_floor,
            desc="mmac",
        )
        base.to(memory_format=torch.contiguous_format)
        model.eval()

        detector = MMDF(model)
        d = batched(detector.score, clean.drawn.x)
        threshold = mmdf_threshold(d, self.mmdf_z)
        # The maximum margin over the last synthetic set, before and after clipping.
        mm_orig = margins(batched(model.original, penalty.x), penalty.y)
        mm_clip = margins(batched(model, penalty.x), penalty.y)
        extras: dict[str, Any] = {
            **bound_extras(model, fit, clean, ctx.num_classes, self.controller.target, "mmac"),
            "synthesize_on": self.synthesize_on,
            "synth_max_margin_original": float(mm_orig.max()),
            "synth_max_margin_clipped": float(mm_clip.max()),
            "synth_s": round(penalty.synth_seconds, 3),
            "mmdf_z": self.mmdf_z,
            "mmdf_threshold": threshold,
            "mmdf_calib_flag_rate": float((d > threshold).float().mean()),
            "time_s": round(time.perf_counter() - t0, 3),
        }
        log.info(
            "mmac: c %.4g, clean agreement %.4f, mean bound %.4f, MMDF threshold %.4f",
            fit.c,
            extras["clean_agreement"],
            extras["bound_mean"],
            threshold,
        )
        return DefenseResult(
            model=model,
            input_detector=InputDetector(
                detector.score, threshold, detector.correct, detector.predict
            ),
            extras=extras,
        )
