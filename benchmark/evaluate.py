"""Evaluation of a model and a defense's detections against the ground truth (runner only)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmark import metrics
from benchmark.data import to_float
from benchmark.pictures import class_name, distinct_first
from benchmark.results import save_trigger_grid
from benchmark.train import predict
from benchmark.types import ImageSet, PoisonedSet
from defenses.base import DefenseResult, InputDetector


@dataclass(frozen=True)
class Predictions:
    """A model's predicted labels on the clean test set and on the backdoor test set."""

    clean: Tensor
    backdoor: Tensor


def predictions(
    model: nn.Module, test: ImageSet, backdoor_test: PoisonedSet, device: torch.device
) -> Predictions:
    return Predictions(
        predict(model, test.x, device=device), predict(model, backdoor_test.x, device=device)
    )


def stage_counts(pred: Predictions, test: ImageSet, backdoor_test: PoisonedSet) -> dict[str, int]:
    """The counts behind :func:`stage_metrics`: ``clean_correct`` of ``n_clean`` clean test
    images; ``asr_hits`` (predicted as the attack's label) and ``ra_correct`` (predicted as the
    true label) of the ``n_backdoor`` backdoor test images."""
    return {
        "clean_correct": metrics.hits(pred.clean, test.y),
        "n_clean": len(test),
        "asr_hits": metrics.hits(pred.backdoor, backdoor_test.y),
        "ra_correct": metrics.hits(pred.backdoor, backdoor_test.y_orig),
        "n_backdoor": len(backdoor_test),
    }


def stage_metrics(pred: Predictions, test: ImageSet, backdoor_test: PoisonedSet) -> dict[str, Any]:
    """Clean accuracy on the clean test set; ASR and RA on the backdoor test set (exact
    ``count / total``, see :func:`stage_counts`)."""
    c = stage_counts(pred, test, backdoor_test)
    return {
        "clean_acc": metrics.rate(c["clean_correct"], c["n_clean"]),
        "asr": metrics.rate(c["asr_hits"], c["n_backdoor"]),
        "ra": metrics.rate(c["ra_correct"], c["n_backdoor"]),
    }


@torch.no_grad()
def _batched(fn: Callable[[Tensor], Tensor], x: Tensor, device: torch.device) -> Tensor:
    """``fn`` over uint8 images ``x`` in batches of float pixels; results on the CPU."""
    return torch.cat([fn(to_float(x[i : i + 512].to(device))).cpu() for i in range(0, len(x), 512)])


def system_predictions(
    det: InputDetector, x: Tensor, scores: Tensor, fallback: Tensor, device: torch.device
) -> Tensor:
    """The detect-and-correct system's labels for uint8 images ``x`` with detector ``scores``:
    ``det.correct`` where ``scores > det.threshold``, elsewhere ``det.predict`` (or
    ``fallback``, the defended model's predictions, when the detector has none)."""
    if det.correct is None:
        raise ValueError("the detector does not correct flagged inputs")
    predict = det.predict
    out = fallback.clone() if predict is None else _batched(predict, x, device).long()
    flagged = scores > det.threshold
    if flagged.any():
        out[flagged] = _batched(det.correct, x[flagged.to(x.device)], device).long()
    return out


def detection_metrics(
    result: DefenseResult,
    is_poison: Tensor,
    test: ImageSet,
    backdoor_test: PoisonedSet,
    pred: Predictions,
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Detection metrics and extras.

    Training-sample flags are scored against the true poison marks ``is_poison``. Otherwise an
    input detector is scored on the clean test inputs (negatives) and the backdoor test inputs
    (positives); if it corrects flagged inputs, the detect-and-correct system's clean accuracy
    and ASR go to the extras (``system_clean_acc``, ``system_asr``): corrected labels where
    flagged, elsewhere the detector's ``predict`` (MMDF: the original network) or, without
    one, the defended model's predictions ``pred``.
    """
    if result.train_flags is not None:
        return metrics.detection(result.train_flags, is_poison, result.train_scores), {}
    det = result.input_detector
    if det is None:
        return {}, {}
    s_clean = _batched(det.score, test.x, device).float()
    s_bd = _batched(det.score, backdoor_test.x, device).float()
    scores = torch.cat([s_clean, s_bd])
    truth = torch.cat(
        [torch.zeros(len(s_clean), dtype=torch.bool), torch.ones(len(s_bd), dtype=torch.bool)]
    )
    extras: dict[str, Any] = {}
    if det.correct is not None:
        for name, data, s, base, labels in (
            ("system_clean_acc", test, s_clean, pred.clean, test.y),
            ("system_asr", backdoor_test, s_bd, pred.backdoor, backdoor_test.y),
        ):
            out = system_predictions(det, data.x, s, base, device)
            extras[name] = metrics.accuracy(out, labels)
    return metrics.detection(scores > det.threshold, truth, scores), extras


def trigger_grid(test: ImageSet, backdoor_test: PoisonedSet, path: Path, n: int = 8) -> Path:
    """Clean test images (of distinct classes where there are enough) above the same images
    triggered; captions: the true label, and the attack's label of the triggered image."""
    idx = distinct_first(backdoor_test.y_orig, n)
    clean = test.x[backdoor_test.src_index[idx].to(test.device)].cpu()
    name = functools.partial(class_name, backdoor_test.classes)
    true = [name(int(y)) for y in backdoor_test.y_orig[idx]]
    target = [name(int(y)) for y in backdoor_test.y[idx]]
    return save_trigger_grid(
        clean,
        backdoor_test.x[idx.to(backdoor_test.device)].cpu(),
        path,
        captions=[
            [f"true: {t}" for t in true],
            [f"true: {t}\ntarget: {a}" for t, a in zip(true, target, strict=True)],
        ],
        note=_one_class_note(backdoor_test, "triggered test image"),
    )


def poison_grid(benign: ImageSet, train: PoisonedSet, path: Path, n: int = 8) -> Path | None:
    """Training images (of distinct classes where the poisons have them) above the same images
    as poisoned; captions: the true label, and the label the poisoned image is trained with.
    None when nothing is poisoned."""
    poisons = torch.nonzero(train.is_poison.cpu()).flatten()
    if poisons.numel() == 0:
        return None
    idx = poisons[distinct_first(train.y_orig.cpu()[poisons], n)]
    name = functools.partial(class_name, train.classes)
    true = [name(int(y)) for y in train.y_orig.cpu()[idx]]
    label = [name(int(y)) for y in train.y.cpu()[idx]]
    return save_trigger_grid(
        benign.x[idx.to(benign.device)].cpu(),
        train.x[idx.to(train.device)].cpu(),
        path,
        row_labels=("training", "poisoned"),
        captions=[
            [f"true: {t}" for t in true],
            [f"true: {t}\nlabel: {a}" for t, a in zip(true, label, strict=True)],
        ],
        note=_one_class_note(train.subset(poisons), "poison"),
    )


def _one_class_note(data: PoisonedSet, kind: str) -> str | None:
    """A note when every sample of ``data`` has the same true class (a clean-label attack's
    poisons), so the picture says so instead of looking like a sampling accident."""
    classes = data.y_orig.cpu().unique()
    if len(data) < 2 or classes.numel() != 1:
        return None
    c = int(classes)
    relabelled = bool((data.y.cpu() != data.y_orig.cpu()).any())
    kept = "" if relabelled else ", labels unchanged (clean-label)"
    return f"Every {kind} is of class {class_name(data.classes, c)}{kept}."
