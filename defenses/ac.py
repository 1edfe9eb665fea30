"""``defense=ac``: Activation Clustering, per class 2-means on reduced activations.

Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy, Srivastava. "Detecting Backdoor Attacks
on Deep Neural Networks by Activation Clustering." arXiv:1811.03728, 2018. The authors'
implementation is IBM ART's ``ActivationDefence`` (Trusted-AI/adversarial-robustness-toolbox,
commit 23539e2, ``art/defences/detector/poison/activation_defence.py`` and
``clustering_analyzer.py``); the benchmark port is SCLBD/BackdoorBench ``defense/ac.py`` (commit
f02e353). In-training: the backdoored model and the unmarked training set only.

Per training label: the last hidden layer's activations of every sample of the class, reduced
to ``nb_dims`` = 10 dimensions by PCA (ART's class default ``reduce = "PCA"``, BackdoorBench
hard-codes PCA; ``FastICA`` with ART's ``max_iter=1000, tol=0.005`` on request), clustered by
``KMeans(nb_clusters=2)``; ``cluster_analysis = "smaller"`` (ART's and BackdoorBench's default)
flags the smaller cluster of every class, ``relative-size`` only a cluster holding under
``size_threshold`` = 0.35 of its class (ART's ``analyze_by_relative_size``, shares rounded to
2 decimals). A fresh model is retrained on the unflagged rest (``defenses/filter_retrain.py``).

Deviations:
- ART's per-class semantics, not BackdoorBench's: BackdoorBench clusters each shuffled
  mini-batch of 256 separately (cluster ids not aligned across batches) and maps the flags back
  through a second, re-shuffled pass, which scrambles the flag-to-sample mapping; here the whole
  class is clustered at once and the flags come back in ``train_set`` order.
- activations: the pooled penultimate features (``forward_features``; BackdoorBench's avgpool
  output on PreAct-ResNet18) in eval mode without augmentation (BackdoorBench: train
  augmentation); PCA, FastICA and KMeans are seeded from the defense seed (ART leaves them
  unseeded); a class with fewer samples than ``nb_dims`` is reduced to its sample count (ART
  fails there), one with fewer than ``nb_clusters`` samples is not flagged; ``relative-size``
  flags nothing in a class without a small cluster (ART's report line raises there).
- ``train_scores`` (an addition: ART and BackdoorBench give flags only): the distance to the
  largest cluster's centroid in the reduced space over the class's median distance.
- retraining uses the run's recipe (``ctx.fit``); BackdoorBench retrains 100 epochs (SGD 0.01,
  momentum 0.9, wd 5e-4, cosine, batch 256, drop_last), the harness's default CIFAR-10 recipe
  (``conf/train/default.yaml``) the same at batch 128. ART's relabel-and-continue repair and
  exclusionary reclassification are left out.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA, FastICA
from torch import Tensor

from benchmark.checks import Checks
from defenses.filter_retrain import Detection, FilterRetrain, class_indices, joined

checks = Checks("defense")
Reduce = Literal["PCA", "FastICA"]
Analysis = Literal["smaller", "relative-size"]
REDUCERS: tuple[str, ...] = ("PCA", "FastICA")
ANALYSES: tuple[str, ...] = ("smaller", "relative-size")


def reduce_activations(act: np.ndarray, nb_dims: int, reduce: str, seed: int) -> np.ndarray:
    """``act`` (n x d) reduced to ``min(nb_dims, n)`` dimensions, or as it is if ``d <= nb_dims``
    (ART's rule)."""
    if act.shape[1] <= nb_dims:
        return act
    dims = min(nb_dims, act.shape[0])
    if reduce == "FastICA":
        projector = FastICA(n_components=dims, max_iter=1000, tol=0.005, random_state=seed)
    else:
        projector = PCA(n_components=dims, random_state=seed)
    return projector.fit_transform(act)


def poison_clusters(
    clusters: np.ndarray, nb_clusters: int, analysis: str, size_threshold: float
) -> np.ndarray:
    """The ids of the clusters judged poisonous: the smallest (``smaller``, ties to the lower
    id, as ``np.argmin``), or those under ``size_threshold`` of the class (``relative-size``)."""
    sizes = np.bincount(clusters, minlength=nb_clusters)
    if analysis == "smaller":
        return np.array([int(np.argmin(sizes))])
    shares = np.round(sizes / float(sizes.sum()), 2)
    return np.nonzero(shares < round(size_threshold, 2))[0]


class ActivationClustering(FilterRetrain):
    """Activation Clustering on every class.

    Args:
        nb_dims: dimensions the activations are reduced to before clustering.
        reduce: ``PCA`` or ``FastICA``.
        nb_clusters: clusters per class (KMeans).
        cluster_analysis: ``smaller`` or ``relative-size``.
        size_threshold: the ``relative-size`` share under which a cluster is poisonous.
        batch_size: images per forward pass while extracting features.
    """

    name: ClassVar[str] = "ac"

    def __init__(
        self,
        nb_dims: int = 10,
        reduce: Reduce = "PCA",
        nb_clusters: int = 2,
        cluster_analysis: Analysis = "smaller",
        size_threshold: float = 0.35,
        batch_size: int = 512,
    ) -> None:
        super().__init__(batch_size)
        self.nb_dims = nb_dims
        self.reduce = reduce
        self.nb_clusters = nb_clusters
        self.cluster_analysis = cluster_analysis
        self.size_threshold = size_threshold
        self._check_settings()

    def _check_settings(self) -> None:
        checks.integer(self.nb_dims, "nb_dims")
        checks.one_of(self.reduce, "reduce", REDUCERS)
        checks.integer(self.nb_clusters, "nb_clusters", 2)
        checks.one_of(self.cluster_analysis, "cluster_analysis", ANALYSES)
        checks.require(
            self.cluster_analysis != "relative-size" or self.nb_clusters == 2,
            "nb_clusters",
            "2 with cluster_analysis relative-size (ART's rule)",
            self.nb_clusters,
        )
        checks.number(self.size_threshold, "size_threshold", 0.0, 1.0, low_open=True)
        checks.integer(self.batch_size, "batch_size")

    def validate(self, num_classes: int, n_train: int, n_clean: int) -> None:
        self._check_settings()

    def detect(self, features: Tensor, labels: Tensor, num_classes: int, seed: int) -> Detection:
        """Per class: reduce, cluster, judge the clusters; flags and distance scores in input
        order."""
        n = labels.shape[0]
        flags = np.zeros(n, dtype=bool)
        scores = np.zeros(n, dtype=np.float64)
        act = features.double().numpy()
        sizes_txt, n_poison_clusters = [], 0
        for c, idx_t in enumerate(class_indices(labels, num_classes)):
            idx = idx_t.numpy()
            if idx.size < self.nb_clusters:
                sizes_txt.append("-")
                continue
            class_seed = (int(seed) + c) % 2**32
            red = reduce_activations(act[idx], self.nb_dims, self.reduce, class_seed)
            km = KMeans(n_clusters=self.nb_clusters, n_init="auto", random_state=class_seed)
            clusters = km.fit_predict(red)
            sizes = np.bincount(clusters, minlength=self.nb_clusters)
            bad = poison_clusters(
                clusters, self.nb_clusters, self.cluster_analysis, self.size_threshold
            )
            flags[idx] = np.isin(clusters, bad)
            n_poison_clusters += bad.size
            main = red[clusters == int(np.argmax(sizes))].mean(axis=0)
            dist = np.linalg.norm(red - main, axis=1)
            med = float(np.median(dist))
            scores[idx] = dist / med if med > 0 else dist
            sizes_txt.append("/".join(str(int(s)) for s in sizes))
        extras = {
            "reduce": self.reduce,
            "nb_dims": self.nb_dims,
            "cluster_analysis": self.cluster_analysis,
            "suspicious_clusters": n_poison_clusters,
            "cluster_sizes_per_class": joined(sizes_txt),
        }
        return Detection(torch.from_numpy(flags), torch.from_numpy(scores).float(), extras)
