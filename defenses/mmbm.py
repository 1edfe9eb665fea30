"""``defense=mmbm``: MM-BM (UnivBM), activation-bound mitigation, MMAC's predecessor.

Wang, Xiang, Miller, Kesidis. "MM-BD: Post-Training Detection of Backdoor Attacks with Arbitrary
Backdoor Pattern Types Using a Maximum Margin Statistic". IEEE S&P 2024, arXiv:2205.06900.
Official code: github.com/wanghangpsu/MM-BD, ``univ_bm.py`` (commit 903338d), whose behaviour this
follows; the mitigation was runner-up of the first IEEE Trojan Removal Competition. The MMAC
paper (arXiv:2308.04617) compares against it as the activation-clipping baseline.

Threat model and stage: post-training; the trained, possibly backdoored model and a small clean
labelled set; no knowledge of the attack. The weights are never changed.

Method: per-channel upper bounds ``min(h, Z)`` at three sites (ResNet-18: after the stem ReLU,
after layer1's output, after layer2's output), initialised to ``init_bound`` = 8, trained with
Adam (lr 0.1, 50 epochs) on

    MSE(clipped logits, original logits) + c * (||Z_1||_2 + ||Z_2||_2 + ||Z_3||_2)

over ``per_class`` clean images per class that the model classifies correctly. ``c`` starts at
0.5; after epoch e (0-based) with e > 10 and e % 10 == 0 (epochs 20, 30, 40) it is multiplied by
1.2 if the epoch's running accuracy of the clipped model on the clean data (= agreement with the
original model) is >= 95%, else divided by 1.2. The clipped model is the result; there is no
input detector (the code has none).

Which sites, on any harness model (``sites: null``): the activation sites (``clip_points``) are
cut into stages, maximal runs of consecutive sites with the same top-level module (first
component of the site's name) and the same output size without the channel axis; the clip sites
are the last site of each of the first ``n_sites`` stages. That gives the official three on
``resnet18`` (``relu``, ``layer1.1.relu2``, ``layer2.1.relu2``) and the ends of the first three
stages on the others:

- small_cnn: ``block1.2``, ``block2.2``, ``block3.2`` (all its sites);
- vgg16_bn: ``features.5``, ``features.12``, ``features.22`` (the last ReLU before each of the
  first three max-pools);
- nin: ``features.5``, ``features.13``, ``features.19``;
- preact_resnet18 (no stem activation; ``layer2.0.relu1`` is the activated layer1 output, at
  layer1's resolution): ``layer1.1.relu2``, ``layer2.0.relu1``, ``layer2.1.relu2``;
- timm models (all under ``net.``): by resolution, e.g. resnet18 ``net.act1``,
  ``net.layer1.1.act2``, ``net.layer2.1.act2`` (its max-pool separates stem and layer1).

A site whose output is smaller (without the channel axis) than both its neighbours' is a gate
inside a block (squeeze-excite in timm's EfficientNet and MobileNet) and is skipped. When a model
has fewer stages than ``n_sites`` (a ViT: every site has the same token shape), the first
``n_sites`` sites are used. ``sites`` may instead name the activation modules to clip.

Deviations from the official code, and why:

1. Clean data come from the defender's clean reserve (training split), ``per_class`` seeded
   random images per class, not the first 50 per class of the test split; fewer where the
   reserve has fewer (``n_clean_selected``, ``clean_per_class_min`` in the extras).
2. Sites are chosen by the rule above so that any harness model works (the code rewrites
   ResNet-18's forward); a shared activation module gets one bound per call.
3. The bounds are ``nn.Parameter`` s in the wrapper's ``state_dict`` (the code keeps plain
   tensors); as in the code they are not constrained to be >= 0.
4. The original logits of the clean data are computed once instead of per batch (the network is
   frozen and in eval mode, so they are the same); NHWC batches where the recipe's
   ``channels_last`` is on.
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

from benchmark.errors import ConfigError
from benchmark.train import use_channels_last
from defenses.base import Defense, DefenseContext, DefenseResult, Stage
from defenses.bound_fit import (
    bound_extras,
    check_floor,
    check_positive,
    controller_from,
    fit_bounds,
    prepare_clean,
)
from defenses.clipping import ClippedModel, ClipPoint, clip_points

log = logging.getLogger(__name__)


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
            check_positive(key, value, integer=True)
        check_positive("lr", lr, integer=False)
        if isinstance(init_bound, bool) or not isinstance(init_bound, int | float):
            raise ConfigError("defense.init_bound", f"must be a number, got {init_bound!r}")
        if sites is not None:
            if not isinstance(sites, list | tuple | ListConfig) or not sites:
                raise ConfigError(
                    "defense.sites", f"must be null or a list of names, got {sites!r}"
                )
            sites = [str(s) for s in sites]
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
