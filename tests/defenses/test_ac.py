"""Activation Clustering: the flags against IBM ART's ``ActivationDefence`` run end to end
(Trusted-AI/adversarial-robustness-toolbox@23539e2, ``fixtures/ac_official.json``), the
mechanism on hand-made activations (two separated blobs: the small one flagged; one blob: about
half flagged; a shuffled order: flags back in train-set order, BackdoorBench's bug), the
relative-size rule, the settings, ``run``'s retraining and (slow) BadNets on mnist5k."""

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
from defenses.ac import ActivationClustering, poison_clusters, reduce_activations
from tests.conftest import toy_set
from tests.defenses.filter_toys import FitSpy, backdoored_mnist5k, make_ctx, small_cnn

FIXTURE = Path(__file__).parent / "fixtures" / "ac_official.json"


def ac_inputs() -> tuple[np.ndarray, np.ndarray]:
    """The fixture's input (the same lines as the scratch script that ran ART): three classes,
    each two separated 32-d blobs (80/20, 70/30, 60/40), in a shuffled order."""
    rs = np.random.RandomState(20181128)
    d, sizes = 32, [(80, 20), (70, 30), (60, 40)]
    acts, labels = [], []
    for c, (ma, mb) in enumerate(sizes):
        a, b = 4.0 * rs.normal(size=d), 4.0 * rs.normal(size=d)
        acts += [a + rs.normal(size=(ma, d)), b + rs.normal(size=(mb, d))]
        labels += [np.full(ma + mb, c)]
    act, y = np.concatenate(acts), np.concatenate(labels)
    order = rs.permutation(len(y))
    return act[order], y[order]


def blobs(sizes: tuple[int, int], d: int = 20, gap: float = 8.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=gen)
    a = torch.randn(sizes[0], d, generator=gen)
    b = torch.randn(sizes[1], d, generator=gen) + gap * direction / direction.norm()
    return torch.cat([a, b])


# -- fidelity -----------------------------------------------------------------------------------
def test_flags_match_arts_activation_defence() -> None:
    """ART's end-to-end ``detect_poison`` (PCA 10, KMeans 2, smaller) on the same activations:
    the same flags in train-set order (exactly; the blobs are far apart, so neither the KMeans
    seed nor ART's unseeded run can move a point), the same cluster sizes, and the same PCA
    projection up to each component's sign (atol 1e-8: the same sklearn PCA on float64)."""
    ref = json.loads(FIXTURE.read_text())
    act, y = ac_inputs()
    digest = hashlib.sha256(act.tobytes() + y.astype(np.int64).tobytes()).hexdigest()
    assert digest == ref["inputs_sha256"], "the input drifted from the one the fixture was made on"

    det = ActivationClustering().detect(torch.from_numpy(act), torch.from_numpy(y), 3, seed=5)
    art_flags = [1 - v for v in ref["is_clean_smaller"]]
    assert det.flags.int().tolist() == art_flags
    assert det.extras["suspicious_clusters"] == ref["suspicious_clusters_smaller"] == 3
    ours = [
        sorted(map(int, s.split("/"))) for s in det.extras["cluster_sizes_per_class"].split(",")
    ]
    assert ours == [sorted(s) for s in ref["cluster_sizes"]]
    for c in range(3):
        red = reduce_activations(act[y == c], 10, "PCA", seed=5)
        want = np.asarray(ref["reduced_first_rows"][c])
        signs = np.sign(red[0]) * np.sign(want[0])
        np.testing.assert_allclose(red[:3] * signs, want, atol=1e-8)
        np.testing.assert_allclose(np.abs(red).sum(0), ref["reduced_abs_colsum"][c], rtol=1e-8)


def test_relative_size_matches_art_where_art_runs() -> None:
    """ART's ``analyze_by_relative_size`` flags the 20 and the 30; on the 60/40 class (no cluster
    under 0.35) its report line raises (``cluster_id in`` an empty array), recorded in the
    fixture: ours flags nothing there."""
    ref = json.loads(FIXTURE.read_text())
    assert ref["relative_size_end_to_end"].startswith("ValueError")
    act, y = ac_inputs()
    det = ActivationClustering(cluster_analysis="relative-size").detect(
        torch.from_numpy(act), torch.from_numpy(y), 3, seed=0
    )
    for c, art in enumerate(ref["assigned_clean_relative_size_by_class"]):
        flags = det.flags[torch.from_numpy(y == c)]
        if isinstance(art, str):
            assert art.startswith("ValueError") and not flags.any()
        else:
            assert flags.int().tolist() == [1 - v for v in art]


# -- the mechanism ------------------------------------------------------------------------------
def test_the_small_blob_is_flagged() -> None:
    act = blobs((80, 20))
    det = ActivationClustering().detect(act, torch.zeros(100, dtype=torch.long), 1, seed=0)
    assert det.flags[80:].all() and not det.flags[:80].any()
    assert det.scores[80:].min() > det.scores[:80].max()  # far from the large cluster
    assert det.extras["cluster_sizes_per_class"] in ("80/20", "20/80")


def test_one_blob_still_loses_about_half() -> None:
    """``smaller`` always flags a cluster: on a clean class KMeans halves the blob (the FPR AC
    pays on every clean class)."""
    act = torch.randn(200, 20, generator=torch.Generator().manual_seed(1))
    det = ActivationClustering().detect(act, torch.zeros(200, dtype=torch.long), 1, seed=0)
    assert 60 <= int(det.flags.sum()) <= 100


def test_flags_come_back_in_train_set_order() -> None:
    """BackdoorBench's bug (batch-wise clustering, a re-shuffled remapping) not reproduced: any
    permutation of the training set permutes the flags the same way."""
    x = torch.cat([blobs((80, 20), seed=2), blobs((60, 15), seed=3) + 30.0])
    y = torch.cat([torch.zeros(100, dtype=torch.long), torch.ones(75, dtype=torch.long)])
    planted = torch.zeros(175, dtype=torch.bool)
    planted[80:100] = planted[160:] = True
    perm = torch.randperm(175, generator=torch.Generator().manual_seed(4))
    det = ActivationClustering().detect(x[perm], y[perm], 2, seed=0)
    assert torch.equal(det.flags, planted[perm])


def test_cluster_rules() -> None:
    clusters = np.array([0, 0, 1, 1, 1, 0, 0, 0])
    assert poison_clusters(clusters, 2, "smaller", 0.35).tolist() == [1]
    assert poison_clusters(np.array([0, 1]), 2, "smaller", 0.35).tolist() == [0]  # ties: low id
    assert poison_clusters(clusters, 2, "relative-size", 0.35).tolist() == []  # 3/8 = 0.38
    assert poison_clusters(clusters, 2, "relative-size", 0.4).tolist() == [1]
    assert reduce_activations(np.ones((5, 4)), 10, "PCA", 0).shape == (5, 4)  # d <= nb_dims
    assert reduce_activations(np.random.default_rng(0).random((6, 30)), 10, "PCA", 0).shape == (
        6,
        6,
    )  # n < nb_dims


def test_fastica_and_tiny_classes() -> None:
    """FastICA runs; a one-sample class and an empty one are left unflagged."""
    act = blobs((40, 10), d=24)
    y = torch.cat([torch.zeros(50, dtype=torch.long), torch.tensor([1])])
    det = ActivationClustering(reduce="FastICA").detect(torch.cat([act, act[:1]]), y, 3, 0)
    assert not det.flags[50] and det.extras["cluster_sizes_per_class"].split(",")[1:] == ["-"] * 2
    assert 1 <= int(det.flags[:50].sum()) <= 25  # the smaller cluster: at most half


# -- settings -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value"),
    [("nb_dims", 0), ("reduce", "TSNE"), ("nb_clusters", 1), ("cluster_analysis", "distance"),
     ("size_threshold", 0.0), ("batch_size", 0)],
)  # fmt: skip
def test_bad_settings_name_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"defense\.{key}"):
        ActivationClustering(**{key: value})


def test_relative_size_needs_two_clusters_and_the_config_is_the_default() -> None:
    with pytest.raises(ConfigError, match=r"defense\.nb_clusters"):
        ActivationClustering(nb_clusters=3, cluster_analysis="relative-size")
    cfg = OmegaConf.load(Path(__file__).parents[2] / "conf" / "defense" / "ac.yaml")
    built = ActivationClustering(**{k: v for k, v in cfg.items() if k != "_target_"})
    assert vars(built) == vars(ActivationClustering())
    assert (built.nb_dims, built.reduce, built.nb_clusters, built.cluster_analysis) == (
        10,
        "PCA",
        2,
        "smaller",
    )


# -- run ----------------------------------------------------------------------------------------
def test_run_clusters_the_backdoored_features_and_retrains_once_on_the_rest(
    tmp_path: Path,
) -> None:
    train = toy_set(60, 3, (3, 8, 8))
    model = small_cnn().train()
    state = copy.deepcopy(model.state_dict())
    spy = FitSpy()
    fresh = small_cnn(1)
    result = ActivationClustering(batch_size=7).run(
        make_ctx(model, train, tmp_path, spy, lambda: fresh)
    )
    want = ActivationClustering().detect(predict_features(model, train.x), train.y, 3, 0)
    assert torch.equal(result.train_flags, want.flags)
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert len(spy.calls) == 1 and spy.calls[0]["model"] is fresh is result.model
    assert torch.equal(spy.calls[0]["data"].y, train.y[~result.train_flags])
    assert spy.calls[0]["desc"] == "ac retrain"
    extras = result.extras
    assert extras["n_removed"] == int(result.train_flags.sum()) and extras["feature_dim"] == 16
    assert extras["n_retrain"] == 60 - extras["n_removed"]
    assert all(isinstance(v, int | float | str | bool | None) for v in extras.values())


# -- it works -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_flags_badnets_poisons_on_mnist5k(tmp_path: Path) -> None:
    """BadNets 5% (target 0) on 1,500 mnist5k digits, a width-16 SmallCNN (CA ~0.9, ASR ~0.97):
    the target class's small cluster is mostly poisons and the distance score ranks them high;
    ``smaller`` also removes a cluster of every clean class, so the FPR is large by design."""
    model, poisoned = backdoored_mnist5k()
    ctx = make_ctx(model, poisoned.clean_view(), tmp_path, FitSpy(), small_cnn)
    result = ActivationClustering().run(ctx)
    det = metrics.detection(result.train_flags, poisoned.is_poison, result.train_scores)
    assert det["det_tpr"] > det["det_fpr"] + 0.1 and det["det_auroc"] > 0.75, det
    target = result.train_flags & (poisoned.y == 0)
    assert poisoned.is_poison[target].float().mean() > 0.5  # base rate 0.35
