"""``defense=mmbm``: MM-BM (UnivBM), activation-bound mitigation, MMAC's predecessor.

Wang, Xiang, Miller, Kesidis. "MM-BD: Post-Training Detection of Backdoor Attacks with Arbitrary
Backdoor Pattern Types Using a Maximum Margin Statistic". IEEE S&P 2024, arXiv:2205.06900.
Official code: github.com/wanghangpsu/MM-BD, ``univ_bm.py`` (commit 903338d), whose behaviour
this follows. Post-training: the trained model and a small clean labelled set; the weights are
never changed.

Method: per-channel upper bounds ``min(h, Z)`` at three sites, initialised to ``init_bound``,
trained with Adam on ``MSE(clipped logits, original logits) + c * sum_s ||Z_s||_2`` over
``per_class`` correctly classified clean images per class, ``c`` adapted to hold the clean
agreement at 95% (``defenses/bound_fit.py``). No input detector (the code has none).

Sites on any harness model (``sites: null``): the activation sites are cut into stages (runs
of consecutive sites with the same top-level module and output size); the clip sites are the
last site of each of the first ``n_sites`` stages, skipping squeeze-excite gates; the first
``n_sites`` sites when there are fewer stages (a ViT). That gives the official three on
``resnet18``; the per-model lists are in ``docs/methods/mmbm.md``. ``sites`` may name them.

Deviations (reasons in ``docs/methods/mmbm.md``): clean data from the defender's reserve, not
the test split; sites by the rule above, one bound per call of a shared module; bounds are
parameters in the ``state_dict``, unconstrained as in the code (``bound_floor`` optional);
original logits computed once; NHWC batches where enabled.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from omegaconf import ListConfig
from torch import Tensor

from benchmark.checks import Checks
from benchmark.errors import ConfigError
from benchmark.train import use_channels_last
from defenses.base import Defense, DefenseContext, DefenseResult, Stage
from defenses.bound_fit import (
    bound_extras,
    check_floor,
    controller_from,
    fit_bounds,
    prepare_clean,
)
from defenses.clipping import ClippedModel, ClipPoint, clip_points

log = logging.getLogger(__name__)
checks = Checks("defense")


def stage_end_points(points: Sequence[ClipPoint], n: int) -> list[ClipPoint]:
    """The last clip point of each of the first ``n`` stages (see the module docstring), or the
    first ``n`` points when there are fewer than ``n`` stages."""
    size = [math.prod(p.spatial) for p in points]
    # A point smaller than both neighbours is a gate inside a block (squeeze-excite), not the
    # feature stream: it neither ends nor splits a stage.
    stream = [
        p
        for i, p in enumerate(points)
        if not (0 < i < len(points) - 1 and size[i] < min(size[i - 1], size[i + 1]))
    ]
    stages: list[list[ClipPoint]] = []
    last_key: tuple[str, tuple[int, ...]] | None = None
    for p in stream:
        key = (p.site.split(".")[0], p.spatial)
        if key != last_key:
            stages.append([])
            last_key = key
        stages[-1].append(p)
    if len(stages) < n:
        return list(points[:n])
    return [stage[-1] for stage in stages[:n]]


def select_points(
    points: Sequence[ClipPoint], n_sites: int, sites: Sequence[str] | None
) -> list[ClipPoint]:
    """The points to clip: every call of the named ``sites``, or the stage ends."""
    if sites is None:
        return stage_end_points(points, n_sites)
    known = list(dict.fromkeys(p.site for p in points))
    unknown = [s for s in sites if s not in known]
    if unknown:
        raise ConfigError(
            "defense.sites", f"{unknown} are not activation sites of the model; it has {known}"
        )
    return [p for p in points if p.site in set(sites)]


def l2_penalty(model: ClippedModel) -> Tensor:
    """The sum over clip points of the L2 norm of their bound vectors."""
    return torch.stack([torch.linalg.vector_norm(b) for b in model.bounds]).sum()


class MMBM(Defense):
    """MM-BM activation-bound mitigation (see the module docstring).

    Args:
        per_class: clean images per class drawn from the reserve.
        batch_size: clean batch size.
        epochs: passes over the clean data.
        lr: Adam learning rate of the bounds.
        init_bound: initial value of every bound.
        c0, c_factor, target_acc, c_start_after, c_every: the ``c`` rule (``CController``).
        n_sites: how many stage ends to clip (``sites: null``).
        sites: activation module names to clip instead of the stage ends.
        bound_floor: null = unconstrained bounds (the code); a number = projected onto >= it.
    """

    name: ClassVar[str] = "mmbm"
    stage: ClassVar[Stage] = Stage.POST_TRAINING

    def __init__(
        self,
        per_class: int = 50,
        batch_size: int = 200,
        epochs: int = 50,
        lr: float = 0.1,
        init_bound: float = 8.0,
        c0: float = 0.5,
        c_factor: float = 1.2,
        target_acc: float = 0.95,
        c_start_after: int = 10,
        c_every: int = 10,
        n_sites: int = 3,
        sites: Sequence[str] | None = None,
        bound_floor: float | None = None,
    ) -> None:
        for key, value in (
            ("per_class", per_class),
            ("batch_size", batch_size),
            ("epochs", epochs),
            ("n_sites", n_sites),
        ):
            checks.integer(value, key)
        checks.number(lr, "lr", 0.0, low_open=True)
        checks.number(init_bound, "init_bound")
        checks.require(
            sites is None or (isinstance(sites, list | tuple | ListConfig) and len(sites) > 0),
            "sites",
            "null or a list of names",
            sites,
        )
        sites = None if sites is None else [str(s) for s in sites]
        self.controller = controller_from(c0, c_factor, target_acc, c_start_after, c_every)
        self.per_class, self.batch_size, self.epochs, self.lr = per_class, batch_size, epochs, lr
        self.init_bound, self.n_sites, self.sites = float(init_bound), n_sites, sites
        self.bound_floor = check_floor(bound_floor)

    def validate(self, num_classes: int, n_train: int, n_clean: int) -> None:
        if n_clean < 1:
            raise ConfigError(
                "defense_data.clean_fraction", "mmbm needs clean data; the reserve is empty"
            )

    def run(self, ctx: DefenseContext) -> DefenseResult:
        assert ctx.model is not None, "post-training defenses receive the trained model"
        t0 = time.perf_counter()
        base = copy.deepcopy(ctx.model).to(ctx.device).eval()
        points = select_points(clip_points(base), self.n_sites, self.sites)
        model = ClippedModel(base, points, self.init_bound)
        log.info("mmbm: clipping %s", ", ".join(f"{p.site}[{p.call}]" for p in points))

        clean = prepare_clean(ctx, model, self.per_class, "mmbm")
        channels_last = use_channels_last(ctx.recipe, ctx.device)
        if channels_last:
            base.to(memory_format=torch.channels_last)

        fit = fit_bounds(
            model,
            clean.x,
            clean.y,
            clean.ref,
            lambda step: l2_penalty(model),
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            controller=self.controller,
            gen=ctx.generator("mmbm", "order"),
            channels_last=channels_last,
            bound_floor=self.bound_floor,
            desc="mmbm",
        )
        base.to(memory_format=torch.contiguous_format)
        model.eval()
        extras: dict[str, Any] = {
            **bound_extras(model, fit, clean, ctx.num_classes, self.controller.target, "mmbm"),
            "sites": ",".join(dict.fromkeys(p.site for p in points)),
            "time_s": round(time.perf_counter() - t0, 3),
        }
        log.info(
            "mmbm: c %.4g, clean agreement %.4f, mean bound %.4f",
            fit.c,
            extras["clean_agreement"],
            extras["bound_mean"],
        )
        return DefenseResult(model=model, extras=extras)
