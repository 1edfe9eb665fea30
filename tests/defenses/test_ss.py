"""Spectral Signatures: the score against the official code's numbers (MadryLab/
backdoor_data_poisoning@c15096f ``compute_corr.py`` and SCLBD/BackdoorBench@f02e353
``defense/spectral.py``, ``fixtures/ss_official.json``), the mechanism on hand-made
representations (shifted points get the top scores; the uncentred projection; every class
scanned; the oracle ablation), the settings, ``run``'s retraining and (slow) detection of
BadNets on mnist5k."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from benchmark import metrics
from benchmark.errors import ConfigError
from benchmark.predict import predict_features
from defenses.ss import SpectralSignatures, spectral_scores
from tests.conftest import toy_set
from tests.defenses.filter_toys import FitSpy, backdoored_mnist5k, make_ctx, small_cnn

FIXTURE = Path(__file__).parent / "fixtures" / "ss_official.json"


def ss_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fixture's input (the same lines as the scratch script that ran the official code):
    three interleaved classes of 50 around a common offset 3, six class-0 points shifted by 6u."""
    rs = np.random.RandomState(20181101)
    n, d, k = 150, 16, 3
    y = rs.permutation(np.arange(n) % k)
    reps = 3.0 + rs.normal(size=(k, d))[y] + rs.normal(size=(n, d))
    u = rs.normal(size=d)
    u /= np.linalg.norm(u)
    poison = np.nonzero(y == 0)[0][:6]
    reps[poison] += 6.0 * u
    return reps, y, poison


# -- fidelity -----------------------------------------------------------------------------------
def test_scores_and_removals_match_the_official_code() -> None:
    """Per class: the scores (rtol 1e-9: the same float64 SVD up to LAPACK rounding, |.| removes
    the sign), the 85th percentile (torch.quantile's linear rule = numpy's), the removed samples
    (exactly) and the top singular value. The official code ran once per class."""
    ref = json.loads(FIXTURE.read_text())
    reps, y, poison = ss_inputs()
    digest = hashlib.sha256(reps.tobytes() + y.astype(np.int64).tobytes()).hexdigest()
    assert digest == ref["inputs_sha256"], "the input drifted from the one the fixture was made on"
    assert ref["percentile"] == 85 and ref["poison"] == poison.tolist()
    for cls in ref["classes"]:
        idx = np.asarray(cls["index"])
        assert (np.nonzero(y == cls["label"])[0] == idx).all()
        s, sv = spectral_scores(torch.from_numpy(reps[idx]))
        np.testing.assert_allclose(s.numpy(), cls["scores"], rtol=1e-9, atol=1e-12)
        assert sv == pytest.approx(cls["top_sv"], rel=1e-9)
        cut = float(torch.quantile(s, 0.85))
        assert cut == pytest.approx(cls["p_score"], rel=1e-12)
        assert idx[(s > cut).numpy()].tolist() == cls["removed"]

    det = SpectralSignatures().detect(torch.from_numpy(reps).float(), torch.from_numpy(y), 3, 0)
    removed = sorted(i for cls in ref["classes"] for i in cls["removed"])
    assert torch.nonzero(det.flags).flatten().tolist() == removed  # train-set order, fp32 input
    assert set(poison.tolist()) <= set(removed)  # the official rule finds the planted ones
    sv = [float(v) for v in det.extras["top_sv_per_class"].split(",")]
    assert sv == pytest.approx([c["top_sv"] for c in ref["classes"]], rel=1e-3)  # fp32 input


# -- the mechanism ------------------------------------------------------------------------------
def shifted_blob(seed: int = 0, n: int = 90, k: int = 10, d: int = 20, shift: float = 5.0) -> Any:
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=gen, dtype=torch.float64)
    u /= u.norm()
    reps = torch.randn(n + k, d, generator=gen, dtype=torch.float64)
    reps[n:] += shift * u
    return reps, u


def test_shifted_points_get_the_top_scores_and_the_percentile_removes_them() -> None:
    reps, u = shifted_blob()
    _, _, vh = torch.linalg.svd(reps - reps.mean(0), full_matrices=False)
    assert abs(float(vh[0] @ u)) > 0.9  # the top direction is the shift
    s, _ = spectral_scores(reps)
    assert set(s.argsort(descending=True)[:10].tolist()) == set(range(90, 100))
    det = SpectralSignatures().detect(reps.float(), torch.zeros(100, dtype=torch.long), 1, 0)
    assert int(det.flags.sum()) == 15 and det.flags[90:].all()  # strict > the 85th percentile
    assert (det.scores[det.flags] > 1).all() and (det.scores[~det.flags] <= 1).all()


def test_the_projection_is_uncentred() -> None:
    """A common offset along the top direction: the official score projects the uncentred
    rows, which differs from the centred projection by exactly that offset."""
    reps, u = shifted_blob(seed=1)
    reps = reps + 10.0 * u
    _, _, vh = torch.linalg.svd(reps - reps.mean(0), full_matrices=False)
    v = vh[0]
    s, _ = spectral_scores(reps)
    assert torch.allclose(s, (reps @ v).abs())
    centred = ((reps - reps.mean(0)) @ v).abs()
    assert (s - centred).abs().max() > 5.0


def test_every_class_is_scanned_without_a_target() -> None:
    gen = torch.Generator().manual_seed(3)
    sizes = (40, 60, 100)
    y = torch.cat([torch.full((m,), c) for c, m in enumerate(sizes)])
    order = torch.randperm(y.numel(), generator=gen)
    y = y[order]
    reps = torch.randn(y.numel(), 12, generator=gen) + 2.0 * y[:, None]
    det = SpectralSignatures().detect(reps, y, 4, 0)  # class 3 is empty
    for c, m in enumerate(sizes):
        assert int(det.flags[y == c].sum()) == m - int(0.85 * (m - 1)) - 1  # 6, 9, 15
    assert det.extras["mode"] == "every_class" and det.extras["top_sv_per_class"].endswith(",0")


def test_the_oracle_ablation_scans_only_the_named_class() -> None:
    reps, y, poison = ss_inputs()
    det = SpectralSignatures(oracle_target=0).detect(
        torch.from_numpy(reps).float(), torch.from_numpy(y), 3, 0
    )
    assert not det.flags[torch.from_numpy(y != 0)].any()
    assert (det.scores[torch.from_numpy(y != 0)] == 0).all()
    assert det.flags[torch.from_numpy(poison)].all()
    assert det.extras["mode"] == "oracle_target" and det.extras["oracle_target"] == 0


# -- settings -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value"),
    [("percentile", 0), ("percentile", 100), ("percentile", True), ("oracle_target", -1),
     ("oracle_target", 1.5), ("batch_size", 0)],
)  # fmt: skip
def test_bad_settings_name_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"defense\.{key}"):
        SpectralSignatures(**{key: value})


def test_validate_checks_the_oracle_class_and_the_config_is_the_default() -> None:
    with pytest.raises(ConfigError, match=r"defense\.oracle_target"):
        SpectralSignatures(oracle_target=10).validate(10, 100, 10)
    cfg = OmegaConf.load(Path(__file__).parents[2] / "conf" / "defense" / "ss.yaml")
    built = SpectralSignatures(**{k: v for k, v in cfg.items() if k != "_target_"})
    default = SpectralSignatures()
    assert vars(built) == vars(default) and default.oracle_target is None


# -- run ----------------------------------------------------------------------------------------
def test_run_scores_the_backdoored_features_and_retrains_once_on_the_rest(tmp_path: Path) -> None:
    train = toy_set(60, 3, (3, 8, 8))
    model = small_cnn().train()
    state = copy.deepcopy(model.state_dict())
    spy = FitSpy()
    fresh = small_cnn(1)
    result = SpectralSignatures(batch_size=7).run(
        make_ctx(model, train, tmp_path, spy, lambda: fresh)
    )
    feats = predict_features(model, train.x)
    want = SpectralSignatures().detect(feats, train.y, 3, 0)
    assert torch.equal(result.train_flags, want.flags)  # batching does not change the flags
    assert torch.allclose(result.train_scores, want.scores)
    assert int(result.train_flags.sum()) == 3 * (20 - int(0.85 * 19) - 1)
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert len(spy.calls) == 1 and spy.calls[0]["model"] is fresh is result.model
    assert torch.equal(spy.calls[0]["data"].x, train.x[~result.train_flags])
    assert spy.calls[0]["desc"] == "ss retrain"
    extras = result.extras
    assert extras["n_removed"] == 9 and extras["n_retrain"] == 51 and extras["feature_dim"] == 16
    assert extras["removed_per_class"] == "3,3,3"
    assert all(isinstance(v, int | float | str | bool | None) for v in extras.values())


def test_run_needs_the_backdoored_model(tmp_path: Path) -> None:
    ctx = make_ctx(None, toy_set(10, 2), tmp_path, FitSpy(), small_cnn)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="trained"):
        SpectralSignatures().run(ctx)


# -- it works -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_flags_badnets_poisons_on_mnist5k(tmp_path: Path) -> None:
    """BadNets 5% (target 0) on 1,500 mnist5k digits, a width-16 SmallCNN (CA ~0.9, ASR ~0.97).
    The target class holds 75 poisons among ~215 samples, so its top 15% can hold at most ~32
    of them (TPR <= 0.43): SS removes mostly poisons there, and its TPR is well above its FPR."""
    model, poisoned = backdoored_mnist5k()
    ctx = make_ctx(model, poisoned.clean_view(), tmp_path, FitSpy(), small_cnn)
    result = SpectralSignatures().run(ctx)
    det = metrics.detection(result.train_flags, poisoned.is_poison, result.train_scores)
    assert det["det_tpr"] > 0.3 and det["det_tpr"] > 2 * det["det_fpr"], det
    target = result.train_flags & (poisoned.y == 0)
    assert poisoned.is_poison[target].float().mean() > 0.75  # base rate 0.35
