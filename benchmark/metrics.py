"""Metrics, computed by the runner alone from ground truth the defenses never see.

All rates are fractions in [0, 1], computed as Python ``count / total`` from integer counts (so
968 of 1000 is exactly 0.968, not float32's 0.9679999...); a rate over an empty set is ``None``
(JSON null), never 0.

- ``clean_acc``: accuracy on the clean test set.
- ``asr``: share of the backdoor test set (test images whose true label is not the target,
  with the trigger) predicted as the attack's target label.
- ``ra`` (robust accuracy): share of the same images still predicted as their true label.
- ``det_tpr`` (the detection rate), ``det_fpr``, ``det_precision``: from a defense's boolean
  flags against the true poison marks; ``det_auroc`` from its continuous scores.
- ``der``: BackdoorBench's defense effectiveness rating,
  ``(max(0, asr_before - asr_after) - max(0, ca_before - ca_after) + 1) / 2``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rate(count: int, total: int) -> float | None:
    """``count / total`` as a Python float; None when ``total`` is 0."""
    return count / total if total else None


def hits(pred: Tensor, y: Tensor) -> int:
    """Number of ``pred == y``."""
    pred, y = pred.cpu(), y.cpu()
    if pred.shape != y.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} and labels {tuple(y.shape)} differ")
    return int((pred == y).sum())


def accuracy(pred: Tensor, y: Tensor) -> float | None:
    """Share of ``pred == y``."""
    return rate(hits(pred, y), y.numel())


def clean_acc(pred: Tensor, y: Tensor) -> float | None:
    """Clean accuracy on the clean test set."""
    return accuracy(pred, y)


def asr(pred: Tensor, y_target: Tensor) -> float | None:
    """Attack success rate on the backdoor test set (``y_target`` = the attack's labels)."""
    return accuracy(pred, y_target)


def ra(pred: Tensor, y_orig: Tensor) -> float | None:
    """Robust accuracy on the backdoor test set (``y_orig`` = the true labels)."""
    return accuracy(pred, y_orig)


def detection(
    flags: Tensor, truth: Tensor, scores: Tensor | None = None
) -> dict[str, float | None]:
    """Detection metrics of boolean ``flags`` against boolean ``truth`` (True = poisoned).

    Returns ``det_tpr`` (recall on the poisoned samples: the detection rate), ``det_fpr`` (share
    of clean samples flagged), ``det_precision`` (share of flagged samples that are poisoned),
    ``det_auroc`` (from ``scores``, higher = more suspicious; None without scores or when only
    one kind of sample exists), and the counts behind the rates: ``det_tp``, ``det_fp``,
    ``det_flagged`` (tp + fp), ``det_positives`` and ``det_negatives``.
    """
    flags, truth = flags.bool().cpu(), truth.bool().cpu()
    if flags.shape != truth.shape:
        raise ValueError(f"flags {tuple(flags.shape)} and truth {tuple(truth.shape)} differ")
    tp = int((flags & truth).sum())
    fp = int((flags & ~truth).sum())
    pos, neg = int(truth.sum()), int((~truth).sum())
    return {
        "det_tpr": rate(tp, pos),
        "det_fpr": rate(fp, neg),
        "det_precision": rate(tp, tp + fp),
        "det_auroc": auroc(scores, truth) if scores is not None else None,
        "det_tp": tp,
        "det_fp": fp,
        "det_flagged": tp + fp,
        "det_positives": pos,
        "det_negatives": neg,
    }


def auroc(scores: Tensor, truth: Tensor) -> float | None:
    """Area under the ROC curve of ``scores`` for ``truth`` (ties count half); None if a class
    is missing or a score is not finite."""
    scores, truth = scores.detach().double().cpu(), truth.bool().cpu()
    if truth.all() or not truth.any() or not torch.isfinite(scores).all():
        return None
    from sklearn.metrics import roc_auc_score  # here: its import costs ~1.5 s per CLI call

    return float(roc_auc_score(truth.numpy(), scores.numpy()))


def der(before: dict[str, float | None], after: dict[str, float | None]) -> float | None:
    """BackdoorBench's defense effectiveness rating from the backdoored and defended metrics."""
    keys = ("asr", "clean_acc")
    if any(before.get(k) is None or after.get(k) is None for k in keys):
        return None
    d_asr = before["asr"] - after["asr"]  # type: ignore[operator]
    d_ca = before["clean_acc"] - after["clean_acc"]  # type: ignore[operator]
    return (max(0.0, d_asr) - max(0.0, d_ca) + 1.0) / 2.0
