"""ULRL against its official code (github.com/NayMyatMin/ULRL, commit 094debfd27e3), fixed input.

``fixtures/ulrl_fidelity.json`` holds what the official ``UnlearningTrainer`` and the MAD
selection block of ``defense/ulrl.py`` produced on the fixture model and clean images of
``tests/defenses/fidelity.py`` (the fixture's ``reference`` says what was adapted: the model
class, in-memory data without augmentation, the batch order the harness draws). Here
``defenses.ulrl.ULRL`` runs on the same tensors with the same batch order, and its unlearning
trajectory, row-change scores and flagged rows must match.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from benchmark.train import fit
from defenses.base import DefenseContext
from defenses.ulrl import ULRL
from tests.defenses import fidelity

pytestmark = pytest.mark.usefixtures("one_thread")
one_thread = fidelity.one_thread

FIXTURE = json.loads((fidelity.FIXTURES / "ulrl_fidelity.json").read_text())


def run_ulrl(tmp_path: Path) -> tuple[dict, dict]:
    s = FIXTURE["settings"]
    clean = fidelity.clean_set(s["per_class"], seed=s["clean_seed"], signal=s["signal"])
    model = fidelity.load_model()
    assert fidelity.model_sha256(model) == FIXTURE["inputs"]["model_sha256"], "model drifted"
    assert fidelity.sha256(clean.x, clean.y) == FIXTURE["inputs"]["clean_sha256"], "data drifted"
    recipe = OmegaConf.create({"amp": False, "channels_last": False})
    ctx = DefenseContext(
        train_set=clean,
        clean_set=clean,
        model=model,
        num_classes=10,
        fit=functools.partial(fit, device="cpu", progress=False),
        new_model=fidelity.NarrowResNet18,
        seed=s["seed"],
        device=torch.device("cpu"),
        work_dir=tmp_path,
        recipe=recipe,
    )
    # The whole reserve (fraction 1 of train + reserve > the reserve), no augmentation as in the
    # official run; relearning (random re-init, not compared) cut to one epoch.
    defense = ULRL(clean_fraction_of_train=1.0, augment=False, relearn_epochs=1)
    result = defense.run(ctx)
    saved = torch.load(tmp_path / "ulrl_scores.pt", weights_only=True)
    return result.extras, saved


def test_unlearning_scores_and_flagged_rows_match_the_official_code(tmp_path: Path) -> None:
    extras, saved = run_ulrl(tmp_path)
    # Rounding: with the fixture's thread count (1) the harness reproduces the official numbers
    # bit for bit (measured: max difference 0.0); with 2 or 3 threads the reductions run in
    # another order and 6 epochs of gradient ascent amplify that to 0.7% in the row scores and
    # 2 of 300 predictions in one epoch's accuracy (measured). The tolerances hold that; a change
    # of the algorithm (clip, weight decay, median, L1, stop rule) moves these by far more.
    history = [h["acc"] for h in saved["unlearn_history"]]
    assert history == pytest.approx(FIXTURE["unlearn_epoch_acc"], abs=0.011)
    # The same stop: after the first epoch at <= 0.2 (official epoch index 5), update kept.
    assert extras["unlearn_epochs"] == FIXTURE["unlearn_epochs_run"] == 6
    assert extras["unlearn_reached_stop_acc"] and FIXTURE["early_stop_epoch"] == 5
    # Row-change scores (L1 norm of each row's change; official 0.05 to 3.98) and the MAD rule.
    assert saved["scores"].tolist() == pytest.approx(FIXTURE["row_scores"], rel=0.02)
    assert saved["median"] == pytest.approx(FIXTURE["median"], rel=0.02)
    assert saved["mad"] == pytest.approx(FIXTURE["mad"], rel=0.02)
    assert saved["z"].tolist() == pytest.approx(FIXTURE["z"], abs=0.1)
    # The flagged rows, exactly: the target row 0 and row 6, both above z 3.5.
    assert saved["flagged"].tolist() == FIXTURE["flagged"] == [0, 6]
    assert extras["flagged_rows"] == "0,6" and extras["top_score_row"] == 0
