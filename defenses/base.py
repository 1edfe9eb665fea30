"""The defense interface: a stage, a context of what the threat model allows, a result.

A defense is a config entry (``defense=<name>`` -> ``conf/defense/<name>.yaml`` ->
``defenses/<name>.py``) with one entry point, ``run(ctx) -> DefenseResult``.

The context holds only what a defender may see: the (possibly poisoned) training set *without*
its poison marks, the defender's clean reserve (carved from benign training data before
poisoning), the backdoored model where the stage gives one, the harness's ``fit`` and a fresh
model builder, a seed and a device. Never the test set, never the ground truth. The runner
computes every metric from the result (trojanzoo's idea): defenses never compute ASR.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from benchmark.seeding import generator
from benchmark.train import FitResult
from benchmark.types import ImageSet


class Stage(StrEnum):
    """When a defense acts. It decides what the context holds (``model`` is None before
    training) and how the runner treats the result."""

    PRE_TRAINING = "pre_training"  # filters or transforms the training data; trains nothing yet
    IN_TRAINING = "in_training"  # controls training (e.g. retrains on a filtered set)
    POST_TRAINING = "post_training"  # repairs a trained, possibly backdoored model
    INFERENCE = "inference"  # detects (and maybe corrects) triggered inputs at test time


FitFn = Callable[..., FitResult]


@dataclass(frozen=True, eq=False)
class DefenseContext:
    """Everything a defense may use.

    Attributes:
        train_set: the training set as delivered (possibly poisoned), without poison marks.
        clean_set: the defender's clean reserve.
        model: the trained (possibly backdoored) model; None for pre-training defenses. The
            defense must not modify it: ``copy.deepcopy`` before repairing.
        num_classes: number of classes.
        fit: ``fit(model, data, **overrides) -> FitResult``, the harness's loop with the run's
            recipe, device and augmentation; keyword overrides replace recipe keys.
        new_model: builds a freshly initialised model of the configured architecture.
        seed: the defense's seed stream; draw randomness from ``generator(...)``.
        device: the training device.
        work_dir: a folder of the defense's own (checkpoints, artifacts).
        recipe: the training recipe (read only).
        augment: the run's training augmentation, ``(x, gen) -> x`` on float pixels on the
            device (``gen`` a generator on the device), for defenses with loops of their
            own; None where the data have none.
    """

    train_set: ImageSet
    clean_set: ImageSet
    model: nn.Module | None
    num_classes: int
    fit: FitFn
    new_model: Callable[[], nn.Module]
    seed: int
    device: torch.device
    work_dir: Path
    recipe: DictConfig
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None

    def generator(self, *names: object) -> torch.Generator:
        """A CPU generator derived from the defense's seed and ``names``."""
        return generator(self.seed, *names)


@dataclass(eq=False)
class InputDetector:
    """A test-time input detector, possibly part of a detect-and-correct system.

    The runner scores the detector (flags against the ground truth) and, when it corrects,
    the system's output: ``correct(x)`` for flagged inputs, ``predict(x)`` for the others.

    Attributes:
        score: float pixels ``(N, C, H, W)`` -> ``(N,)`` scores, higher = more suspicious.
        threshold: inputs with ``score > threshold`` are flagged.
        correct: optional ``(N, C, H, W)`` -> ``(N,)`` labels the system outputs for flagged
            inputs (detect-and-correct); None means flagged inputs are only rejected.
        predict: optional ``(N, C, H, W)`` -> ``(N,)`` labels the system outputs for inputs
            it does not flag; None = the defended model's (``DefenseResult.model``)
            predictions. MMDF passes its original network here: it answers unflagged inputs
            with the unclipped model (official ``mmdf.py``).
    """

    score: Callable[[Tensor], Tensor]
    threshold: float
    correct: Callable[[Tensor], Tensor] | None = None
    predict: Callable[[Tensor], Tensor] | None = None


@dataclass(eq=False)
class DefenseResult:
    """What a defense returns.

    Attributes:
        model: the model to evaluate (the input model itself when unchanged).
        train_flags: ``(N_train,)`` bool, True = flagged as poisoned, in ``train_set`` order.
        train_scores: ``(N_train,)`` float, higher = more suspicious (for AUROC).
        input_detector: a test-time detector, evaluated by the runner.
        extras: defense-specific diagnostics (plain scalars), reported as they are.
    """

    model: nn.Module
    train_flags: Tensor | None = None
    train_scores: Tensor | None = None
    input_detector: InputDetector | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class Defense(ABC):
    """Base class of every defense; subclasses set ``name`` and ``stage`` and implement ``run``."""

    name: ClassVar[str]
    stage: ClassVar[Stage]

    def validate(self, num_classes: int, n_train: int, n_clean: int) -> None:
        """Check the settings against the run's sizes before any data is loaded; raise
        ``benchmark.errors.ConfigError`` naming the key. Default: nothing to check."""

    def check_model(self, model: nn.Module) -> None:
        """Check that the defense can run on this architecture (a freshly built model of the
        run, before any training); raise ``ConfigError("model", ...)`` if it cannot.
        Default: every model."""

    @abstractmethod
    def run(self, ctx: DefenseContext) -> DefenseResult:
        """Apply the defense."""
