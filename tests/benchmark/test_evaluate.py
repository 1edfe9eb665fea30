"""Runner-side evaluation of input detectors (detect-and-correct) on hand-made sets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmark.evaluate import Predictions, detection_metrics, system_predictions
from benchmark.types import ImageSet, PoisonedSet
from defenses.base import DefenseResult, InputDetector
from defenses.mmac import mmdf_correct, mmdf_statistic


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


def test_detect_and_correct_follows_mmdf_defense_net() -> None:
    """MMDF's system (official mmdf.py ``Defense_Net.forward``, MMAC repo dd1c79ed1e9f): an
    unflagged input gets the ORIGINAL network's prediction, a flagged one the clipped
    network's best class other than the original prediction. Hand-made logits: channel 0 of
    each 2x1x3 image holds the original logits x 10, channel 1 the clipped ones."""

    def original(x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0, :] * 25.5  # uint8 v -> float v / 255 -> logit v / 10

    def clipped(x: torch.Tensor) -> torch.Tensor:
        return x[:, 1, 0, :] * 25.5

    def image(orig: list[float], clip: list[float]) -> torch.Tensor:
        return torch.tensor([[orig], [clip]]).mul(10).to(torch.uint8)

    # (original logits, clipped logits): statistic d = margin_orig - margin_clip of the
    # original prediction, threshold 2.
    cases = {
        "kept, both right": ([5, 1, 0], [4.5, 1, 0]),  # d 0.5: original 0
        "kept, clipped wrong": ([2, 3, 0], [2.4, 2, 0]),  # d 1.4: original 1 (clipped: 0)
        "flagged a": ([1, 5, 0], [3, 2, 0]),  # d 5: best clipped class other than 1 -> 0
        "flagged b": ([0, 1, 6], [0, 2, 1]),  # d 6: best clipped class other than 2 -> 1
    }
    x = torch.stack([image(*v) for v in cases.values()])
    test = ImageSet(x[:2], torch.tensor([0, 1]), ("a", "b", "c"))
    backdoor = PoisonedSet(
        x[2:],
        torch.ones(2, dtype=torch.long),  # target 1
        ("a", "b", "c"),
        is_poison=torch.ones(2, dtype=torch.bool),
        y_orig=torch.tensor([1, 2]),
        src_index=torch.arange(2),
    )
    detector = InputDetector(
        score=lambda x: mmdf_statistic(original(x), clipped(x)),
        threshold=2.0,
        correct=lambda x: mmdf_correct(original(x), clipped(x)),
        predict=lambda x: original(x).argmax(1),
    )
    # The defended model is the clipped one: its predictions are what the runner passes.
    pred = Predictions(clean=torch.tensor([0, 0]), backdoor=torch.tensor([0, 2]))
    result = DefenseResult(model=nn.Identity(), input_detector=detector)
    cpu = torch.device("cpu")
    det, extras = detection_metrics(
        result, torch.zeros(0, dtype=torch.bool), test, backdoor, pred, cpu
    )
    assert det["det_tpr"] == 1.0 and det["det_fpr"] == 0.0
    s_clean = detector.score(x[:2].float() / 255)
    assert s_clean.tolist() == pytest.approx([0.5, 1.4], abs=1e-5)
    assert system_predictions(detector, test.x, s_clean, pred.clean, cpu).tolist() == [0, 1]
    s_bd = detector.score(x[2:].float() / 255)
    assert system_predictions(detector, backdoor.x, s_bd, pred.backdoor, cpu).tolist() == [0, 1]
    # Official: CA 2/2, ASR 1/2. The clipped-model hybrid would give CA 1/2 (the second clean
    # input answered by the clipped net's 0).
    assert extras == {"system_clean_acc": 1.0, "system_asr": 0.5}
    hybrid = InputDetector(detector.score, detector.threshold, detector.correct)
    _, extras = detection_metrics(
        DefenseResult(model=nn.Identity(), input_detector=hybrid),
        torch.zeros(0, dtype=torch.bool),
        test,
        backdoor,
        pred,
        cpu,
    )
    assert extras["system_clean_acc"] == 0.5  # without predict: the defended model's labels


def test_stage_metrics_are_exact_and_their_counts_reach_the_json(tmp_path) -> None:
    import json

    from benchmark.evaluate import stage_counts, stage_metrics
    from benchmark.results import empty_record, write_record

    n = 1000
    test = ImageSet(torch.zeros(n, 1, 1, 1, dtype=torch.uint8), torch.zeros(n).long(), ("a", "b"))
    backdoor = PoisonedSet(
        torch.zeros(n, 1, 1, 1, dtype=torch.uint8),
        torch.zeros(n).long(),
        ("a", "b"),
        is_poison=torch.ones(n, dtype=torch.bool),
        y_orig=torch.ones(n).long(),
        src_index=torch.arange(n),
    )
    clean_pred = torch.zeros(n).long()
    clean_pred[968:] = 1  # 968 of 1000 right
    bd_pred = torch.ones(n).long()
    bd_pred[:123] = 0  # 123 hits of the target, 877 still right
    pred = Predictions(clean=clean_pred, backdoor=bd_pred)
    record = empty_record({}, 0)
    record["backdoored"] = stage_metrics(pred, test, backdoor)
    record["counts"] = {"backdoored": stage_counts(pred, test, backdoor)}
    saved = json.loads(write_record(tmp_path, record).read_text())
    assert saved["backdoored"] == {"clean_acc": 0.968, "asr": 0.123, "ra": 0.877}
    assert saved["counts"]["backdoored"] == {
        "clean_correct": 968,
        "n_clean": 1000,
        "asr_hits": 123,
        "ra_correct": 877,
        "n_backdoor": 1000,
    }
    assert '"clean_acc": 0.968,' in write_record(tmp_path, record).read_text()
