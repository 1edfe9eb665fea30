"""Score -> flag -> remove -> retrain: what the feature-space data filters share (AC, SS).

``FilterRetrain`` is an in-training defense that (1) takes the pooled penultimate features of
every training sample from the backdoored model (``benchmark.predict.predict_features``:
``ImageClassifier.forward_features``, the harness's feature/head split; eval mode, no
augmentation, fp32), (2) hands them with the training labels to the subclass's ``detect``
(per-class flags and scores, in ``train_set`` order), (3) retrains a fresh model
(``ctx.new_model()``) on the unflagged samples with ``ctx.fit``, i.e. the run's own training
recipe, as UltraClean does. The threat model is the unmarked training set and the backdoored
model: no test data, no poison marks, no target.
"""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from benchmark.io import atomic_torch_save
from benchmark.predict import predict_features
from defenses.base import Defense, DefenseContext, DefenseResult, Stage

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Detection:
    """What ``detect`` returns.

    Attributes:
        flags: ``(N,)`` bool, True = flagged (removed before retraining), in input order.
        scores: ``(N,)`` float, higher = more suspicious (the runner's AUROC).
        extras: plain scalars (per-class summaries as comma-joined strings).
    """

    flags: Tensor
    scores: Tensor
    extras: dict[str, Any] = field(default_factory=dict)


def class_indices(y: Tensor, num_classes: int) -> list[Tensor]:
    """For each class, the positions of its samples in ``y`` (ascending)."""
    return [torch.nonzero(y == c).flatten() for c in range(num_classes)]


def joined(values: list[Any] | Tensor) -> str:
    """Per-class values as one plain string for the extras (``"3,0,5"``)."""
    items = values.tolist() if isinstance(values, Tensor) else values
    return ",".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in items)


class FilterRetrain(Defense):
    """Base of the defenses that flag training samples on the backdoored model's features and
    retrain from scratch on the rest. Subclasses set ``name`` and implement ``detect``.

    Args:
        batch_size: images per forward pass while extracting features (throughput only).
    """

    stage: ClassVar[Stage] = Stage.IN_TRAINING

    def __init__(self, batch_size: int = 512) -> None:
        self.batch_size = batch_size

    @abstractmethod
    def detect(self, features: Tensor, labels: Tensor, num_classes: int, seed: int) -> Detection:
        """Flags and scores of ``(N, D)`` features with training labels ``(N,)``, same order."""

    def run(self, ctx: DefenseContext) -> DefenseResult:
        if ctx.model is None:
            raise ValueError(f"{self.name} scores with the trained (backdoored) model; got none")
        self.validate(ctx.num_classes, len(ctx.train_set), len(ctx.clean_set))
        train = ctx.train_set
        y = train.y.cpu()
        t0 = time.perf_counter()
        feats = predict_features(ctx.model, train.x, device=ctx.device, batch_size=self.batch_size)
        t1 = time.perf_counter()
        det = self.detect(feats, y, ctx.num_classes, ctx.seed)
        t2 = time.perf_counter()
        flags = det.flags.to(torch.bool).cpu()
        keep = torch.nonzero(~flags).flatten()
        n_removed = int(flags.sum())
        log.info("%s: flagged %d of %d training samples; retraining", self.name, n_removed, len(y))

        model = ctx.new_model()
        fit_result = ctx.fit(
            model, train.subset(keep.to(train.device)), desc=f"{self.name} retrain"
        )
        t3 = time.perf_counter()
        model.eval()
        atomic_torch_save(
            {"flags": flags, "scores": det.scores.cpu(), "features_dim": feats.shape[1]},
            ctx.work_dir / f"{self.name}_scores.pt",
        )
        history = fit_result.history if fit_result is not None else []
        per_class = torch.bincount(y[flags], minlength=ctx.num_classes)
        extras: dict[str, Any] = {
            "feature_dim": int(feats.shape[1]) if feats.dim() == 2 else 0,
            "n_removed": n_removed,
            "removed_share": n_removed / len(y) if len(y) else 0.0,
            "removed_per_class": joined(per_class),
            "n_retrain": int(keep.numel()),
            **det.extras,
            "features_s": round(t1 - t0, 3),
            "detect_s": round(t2 - t1, 3),
            "retrain_s": round(t3 - t2, 3),
            "retrain_final_acc": history[-1].get("acc") if history else None,
        }
        return DefenseResult(
            model=model, train_flags=flags, train_scores=det.scores.float().cpu(), extras=extras
        )
