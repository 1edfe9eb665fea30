"""What the runner lends an attack: services while poisoning (``AttackContext``) and, per
evaluated stage, for its backdoor test set (``StageContext``, answered with a ``StageTest``).
Re-exported by ``attacks.base``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmark.types import PoisonedSet


@dataclass(frozen=True, eq=False)
class AttackContext:
    """What the runner lends an attack that needs more than the data (``prepare(..., ctx)``).

    Attributes:
        device: the training device.
        surrogate: ``(kind, adversarial) -> model``: a model of the run's architecture trained
            on the benign training set with the run's recipe, ``kind`` ``"clean"`` (normal
            training) or ``"adversarial"`` (PGD adversarial training with the settings in the
            ``adversarial`` dict). Trained once and cached like the backdoored model.
        memo: ``(name, spec, compute) -> tensors``: runs ``compute()`` once per ``(run data,
            name, spec)`` and caches its dict of tensors (e.g. perturbed images).
        amp: whether bf16 autocast is used on this device (the run's recipe).
    """

    device: torch.device
    surrogate: Callable[[str, dict[str, Any] | None], nn.Module]
    memo: Callable[[str, dict[str, Any], Callable[[], dict[str, Tensor]]], dict[str, Tensor]]
    amp: bool = False


@dataclass(frozen=True, eq=False)
class StageContext:
    """What the runner lends an attack for the backdoor test set of one evaluated stage
    (``stage_backdoor_test``); only an attack whose test set depends on the model
    (``model_dependent``) needs more than the test set.

    Attributes:
        stage: ``"backdoored"`` or ``"defended"``.
        seed: the run seed (an attack derives its own streams from it).
        device: the evaluation device.
        out_dir: the run folder, for the stage's files.
        memo: ``(compute) -> (payload, hit)``: ``compute()`` once, its payload cached with the
            backdoored model on the ``backdoored`` stage (not cached on ``defended``, whose
            model each defense makes anew); ``hit`` says whether it came from the cache.
        amp: whether bf16 autocast is used on this device (the run's recipe).
    """

    stage: str
    seed: int
    device: torch.device
    out_dir: Path
    memo: Callable[[Callable[[], dict[str, Any]]], tuple[dict[str, Any], bool]]
    amp: bool = False


@dataclass(frozen=True, eq=False)
class StageTest:
    """The backdoor test set of one stage, and what the attack reports about it.

    Attributes:
        backdoor_test: the triggered test images; ``src_index`` indexes the clean test set.
        report: goes to the record under ``<attack name>.<stage>`` (None: nothing to report).
        scalars: logged to the tracker as ``<stage>/<name>``.
    """

    backdoor_test: PoisonedSet
    report: dict[str, Any] | None = None
    scalars: dict[str, float] = field(default_factory=dict)
