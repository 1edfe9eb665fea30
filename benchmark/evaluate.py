"""Evaluation of a model and a defense's detections against the ground truth (runner only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmark import metrics
from benchmark.data import to_float
from benchmark.results import save_trigger_grid
from benchmark.train import predict
from benchmark.types import ImageSet, PoisonedSet
from defenses.base import DefenseResult


def evaluate(
    model: nn.Module, test: ImageSet, backdoor_test: PoisonedSet, device: torch.device
) -> dict[str, Any]:
    """Clean accuracy on the clean test set; ASR and RA on the backdoor test set."""
    pred_clean = predict(model, test.x, device=device)
    pred_bd = predict(model, backdoor_test.x, device=device)
    return {
        "clean_acc": metrics.clean_acc(pred_clean, test.y),
        "asr": metrics.asr(pred_bd, backdoor_test.y),
        "ra": metrics.ra(pred_bd, backdoor_test.y_orig),
    }


@torch.no_grad()
def _scores(score_fn: Any, x: Tensor, device: torch.device, batch_size: int = 512) -> Tensor:
    return torch.cat(
        [
            score_fn(to_float(x[i : i + batch_size].to(device))).float().cpu()
            for i in range(0, len(x), batch_size)
        ]
    )


def detection_metrics(
    result: DefenseResult,
    is_poison: Tensor,
    test: ImageSet,
    backdoor_test: PoisonedSet,
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Detection metrics and extras.

    Training-sample flags are scored against the true poison marks ``is_poison``. Otherwise an
    input detector is scored on the clean test inputs (negatives) and the backdoor test inputs
    (positives); if it corrects flagged inputs, the detect-and-correct system's clean accuracy
    and ASR go to the extras (``system_clean_acc``, ``system_asr``).
    """
    if result.train_flags is not None:
        return metrics.detection(result.train_flags, is_poison, result.train_scores), {}
    det = result.input_detector
    if det is None:
        return {}, {}
    s_clean = _scores(det.score, test.x, device)
    s_bd = _scores(det.score, backdoor_test.x, device)
    scores = torch.cat([s_clean, s_bd])
    truth = torch.cat(
        [torch.zeros(len(s_clean), dtype=torch.bool), torch.ones(len(s_bd), dtype=torch.bool)]
    )
    extras: dict[str, Any] = {}
    if det.correct is not None:
        for name, data, s, labels in (
            ("system_clean_acc", test, s_clean, test.y),
            ("system_asr", backdoor_test, s_bd, backdoor_test.y),
        ):
            pred = predict(result.model, data.x, device=device)
            flagged = s > det.threshold
            if flagged.any():
                pred[flagged] = _scores(det.correct, data.x[flagged], device).long()
            extras[name] = metrics.accuracy(pred, labels)
    return metrics.detection(scores > det.threshold, truth, scores), extras


def trigger_grid(test: ImageSet, backdoor_test: PoisonedSet, path: Path, n: int = 8) -> Path:
    """Clean test images above the same images triggered."""
    clean = test.x[backdoor_test.src_index[:n].to(test.device)].cpu()
    return save_trigger_grid(clean, backdoor_test.x[:n].cpu(), path)
