"""Metrics on hand-computed tensors."""

from __future__ import annotations

import pytest
import torch

from benchmark import metrics


def test_rates_on_hand_computed_predictions() -> None:
    pred = torch.tensor([0, 0, 1, 2, 0])
    assert metrics.clean_acc(pred, torch.tensor([0, 1, 1, 2, 2])) == pytest.approx(3 / 5)
    # Backdoor set: target 0 for every sample; true labels 1, 2, 3, 1, 2.
    target, y_orig = torch.zeros(5, dtype=torch.long), torch.tensor([1, 2, 3, 2, 2])
    assert metrics.asr(pred, target) == pytest.approx(3 / 5)
    assert metrics.ra(pred, y_orig) == pytest.approx(1 / 5)


def test_empty_sets_give_none_not_zero() -> None:
    empty = torch.empty(0, dtype=torch.long)
    assert metrics.asr(empty, empty) is None


def test_detection_counts() -> None:
    truth = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    flags = torch.tensor([1, 1, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    det = metrics.detection(flags, truth)
    assert det["det_tpr"] == pytest.approx(2 / 3)
    assert det["det_fpr"] == pytest.approx(1 / 5)
    assert det["det_precision"] == pytest.approx(2 / 3)
    assert det["det_auroc"] is None
    assert (det["det_flagged"], det["det_positives"]) == (3, 3)


def test_detection_without_flags_has_no_precision() -> None:
    det = metrics.detection(torch.zeros(4, dtype=torch.bool), torch.tensor([1, 0, 0, 0]).bool())
    assert det["det_tpr"] == 0.0
    assert det["det_precision"] is None


def test_auroc_hand_computed_with_ties() -> None:
    # Positives 0.9, 0.5; negatives 0.5, 0.1: pairs (0.9>0.5, 0.9>0.1, 0.5=0.5, 0.5>0.1) -> 3.5/4
    scores = torch.tensor([0.9, 0.5, 0.5, 0.1])
    truth = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    assert metrics.auroc(scores, truth) == pytest.approx(3.5 / 4)
    assert metrics.auroc(scores, torch.ones(4, dtype=torch.bool)) is None


def test_der_matches_backdoorbench_formula() -> None:
    before = {"clean_acc": 0.90, "asr": 0.95}
    assert metrics.der(before, {"clean_acc": 0.88, "asr": 0.05}) == pytest.approx(
        (0.90 - 0.02 + 1) / 2
    )
    # A defense that raises CA and ASR gets 0.5 (no gain, no loss counted).
    assert metrics.der(before, {"clean_acc": 0.95, "asr": 0.99}) == pytest.approx(0.5)
    assert metrics.der(before, {"clean_acc": None, "asr": 0.1}) is None


def test_rates_are_exact_fractions_of_counts() -> None:
    # float32 would give 0.9679999947547913.
    y = torch.zeros(1000, dtype=torch.long)
    pred = torch.cat([torch.zeros(968, dtype=torch.long), torch.ones(32, dtype=torch.long)])
    assert metrics.hits(pred, y) == 968
    assert metrics.accuracy(pred, y) == 0.968
    assert metrics.rate(1, 3) == 1 / 3 and metrics.rate(0, 0) is None


def test_detection_rates_are_exact_and_come_with_counts() -> None:
    truth = torch.zeros(1000, dtype=torch.bool)
    truth[:100] = True
    flags = truth.clone()
    flags[97:100] = False  # 97 of 100 poisons found
    flags[100:107] = True  # 7 of 900 clean samples flagged
    det = metrics.detection(flags, truth)
    assert det["det_tpr"] == 0.97 and det["det_fpr"] == 7 / 900
    assert det["det_precision"] == 97 / 104
    counts = {k: det[k] for k in ("det_tp", "det_fp", "det_flagged", "det_positives")}
    assert counts == {"det_tp": 97, "det_fp": 7, "det_flagged": 104, "det_positives": 100}
    assert det["det_negatives"] == 900
