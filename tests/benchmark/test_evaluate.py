"""Runner-side evaluation of input detectors (detect-and-correct) on hand-made sets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmark.evaluate import Predictions, detection_metrics
from benchmark.types import ImageSet, PoisonedSet
from defenses.base import DefenseResult, InputDetector


def _sets() -> tuple[ImageSet, PoisonedSet]:
    # Clean images are dark (value 10), triggered ones bright (250), except one dark backdoor
    # image the detector must miss. Labels: clean 1, 2, 1, 2; backdoor target 0, true 1, 2, 1.
    clean = torch.full((4, 1, 2, 2), 10, dtype=torch.uint8)
    bd = torch.full((3, 1, 2, 2), 250, dtype=torch.uint8)
    bd[2] = 10
    test = ImageSet(clean, torch.tensor([1, 2, 1, 2]), ("a", "b", "c"))
    backdoor = PoisonedSet(
        bd,
        torch.zeros(3, dtype=torch.long),
        ("a", "b", "c"),
        is_poison=torch.ones(3, dtype=torch.bool),
        y_orig=torch.tensor([1, 2, 1]),
        src_index=torch.arange(3),
    )
    return test, backdoor


def test_input_detector_rates_and_detect_and_correct_system() -> None:
    test, backdoor = _sets()
    detector = InputDetector(
        score=lambda x: x.mean(dim=(1, 2, 3)),
        threshold=0.5,
        correct=lambda x: torch.full((len(x),), 2),
    )
    result = DefenseResult(model=nn.Identity(), input_detector=detector)
    # The defended model predicts every clean image right and every backdoor image as target 0.
    pred = Predictions(clean=torch.tensor([1, 2, 1, 2]), backdoor=torch.zeros(3, dtype=torch.long))
    det, extras = detection_metrics(
        result, torch.zeros(0, dtype=torch.bool), test, backdoor, pred, torch.device("cpu")
    )
    assert det["det_tpr"] == pytest.approx(2 / 3) and det["det_fpr"] == 0.0
    # AUROC: 8 of 12 (positive, negative) pairs ordered right, 4 ties (the dark backdoor image).
    assert det["det_precision"] == 1.0 and det["det_auroc"] == pytest.approx(10 / 12)
    # Clean images are never flagged: system CA = 1. Two backdoor images are corrected to 2,
    # one stays at the target: system ASR = 1/3.
    assert extras == {"system_clean_acc": 1.0, "system_asr": pytest.approx(1 / 3)}


def test_no_detection_gives_no_rates() -> None:
    test, backdoor = _sets()
    pred = Predictions(clean=test.y, backdoor=backdoor.y)
    det, extras = detection_metrics(
        DefenseResult(model=nn.Identity()),
        torch.zeros(0).bool(),
        test,
        backdoor,
        pred,
        torch.device("cpu"),
    )
    assert det == {} and extras == {}
