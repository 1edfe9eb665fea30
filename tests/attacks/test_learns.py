"""Slow: every attack works on mnist5k with small_cnn, undefended, with its shipped settings
(the paper's defaults plus the dataset deltas in conf/attack_tuning/): ASR >= 0.90 and clean
accuracy within 2 points of the clean model's; the natural backdoor of the clean model is
reported for every budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmark import pipeline


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The clean model (attack=natural trains on benign data), with a full budget sweep."""
    from tests.conftest import compose_cfg

    tmp = tmp_path_factory.mktemp("clean")
    cfg = compose_cfg(
        ["logger=none", "device=cpu", "progress=false", "attack=natural", "attack.steps=50"], tmp
    )
    return pipeline.run(cfg, run_dir=tmp / "run")


# Not here: label_consistent, which does not reach ASR 0.90 on mnist5k with CA within 2 points
# (measured: 0.18 at the paper's settings; 0.61 at 90% of the target class without perturbation,
# CA 0.959; 0.82 at the whole class, CA 0.878; README, Attacks). A strict xfail of it cost CI
# three minutes to confirm a known limitation; its mechanism is tested in
# test_label_consistent.py and its run in test_pipeline_attacks.py.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["blend", "sig", "wanet"])
def test_attack_learns_on_mnist5k(name: str, clean_run: dict, make_cfg, tmp_path: Path) -> None:
    record = pipeline.run(
        make_cfg(f"attack={name}", "progress=false", smoke=False), run_dir=tmp_path / "run"
    )
    assert record["backdoored"]["asr"] >= 0.90, record["backdoored"]
    assert record["backdoored"]["clean_acc"] >= clean_run["backdoored"]["clean_acc"] - 0.02


@pytest.mark.slow
def test_natural_backdoor_of_the_clean_model_grows_with_the_budget(clean_run: dict) -> None:
    report = clean_run["natural"]["backdoored"]["budgets"]
    asr = [report[b]["asr"] for b in ("0.02", "0.04", "0.06", "0.08", "0.1", "0.12")]
    assert all(0.0 <= a <= 1.0 for a in asr)
    assert asr[-1] >= asr[0]  # a larger trigger flips at least as many inputs
    assert asr[2] >= 0.5  # at 6% of the image, most digits can be flipped
    assert clean_run["attack"]["n_poison"] == 0
