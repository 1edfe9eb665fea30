"""``defense=ss``: Spectral Signatures, remove each class's top outliers along its top direction.

Tran, Li, Madry. "Spectral Signatures in Backdoor Attacks." NeurIPS 2018, arXiv:1811.00636.
Official code: MadryLab/backdoor_data_poisoning (commit c15096f, ``compute_corr.py``); the
benchmark port: SCLBD/BackdoorBench ``defense/spectral.py`` (commit f02e353). In-training: the
backdoored model and the unmarked training set only.

Per training label ``c`` with representations ``R`` (n_c x d): ``v`` = the top right-singular
vector of the centred ``R - mean(R)``; score ``s_i = |<v, r_i>|`` on the **uncentred** ``r_i``
(``compute_corr.py:96-102``; BackdoorBench ``spectral.py:372-384`` the same); flagged:
``s_i > percentile(s, 85)`` (strict, numpy's linear percentile), i.e. the top 15% of the class
(``config.json`` ``percentile: 85``; BackdoorBench ``config/defense/spectral/cifar10.yaml``).
A fresh model is retrained on the rest (``defenses/filter_retrain.py``).

Deviations:
- every class is scanned (BackdoorBench's default without ``--target_label``); the official code
  scans only the known target label, and the paper removes 1.5x the known poison count: both use
  what the defender does not know. ``oracle_target`` restricts the scan to one class as an
  explicitly named oracle ablation, off (null) by default.
- representation: the pooled penultimate features (``forward_features``) in eval mode without
  augmentation; the official code uses the flattened input of the last stage's 4th unit (eval),
  BackdoorBench the flattened ``layer4`` output with train augmentation.
- ``train_scores`` are ``s_i / percentile_85(class)`` so they compare across classes (an
  addition: the official code only removes); a sample is flagged iff its score is > 1 (for a
  positive percentile).
- retraining uses the run's recipe (``ctx.fit``); BackdoorBench retrains 100 epochs (SGD 0.01,
  momentum 0.9, wd 5e-4, cosine, batch 256, drop_last), the harness's default CIFAR-10 recipe
  (``conf/train/default.yaml``) the same at batch 128; the official code reruns its training.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from benchmark.checks import Checks, is_int
from defenses.filter_retrain import Detection, FilterRetrain, class_indices, joined

checks = Checks("defense")


def spectral_scores(reps: Tensor) -> tuple[Tensor, float]:
    """``|<v, r_i>|`` for the rows ``r_i`` of ``reps`` (n x d, uncentred), ``v`` the top
    right-singular vector of the centred matrix, and the top singular value. float64."""
    r = reps.double()
    centred = r - r.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    return (r @ vh[0]).abs(), float(s[0])


class SpectralSignatures(FilterRetrain):
    """Spectral Signatures on every class (or, as an oracle ablation, one known class).

    Args:
        percentile: per class, samples scoring above this percentile are removed, in (0, 100).
        oracle_target: scan only this class (the official code's known target label): an
            oracle ablation that leaks the target; null = every class (the default).
        batch_size: images per forward pass while extracting features.
    """

    name: ClassVar[str] = "ss"

    def __init__(
        self, percentile: float = 85.0, oracle_target: int | None = None, batch_size: int = 512
    ) -> None:
        super().__init__(batch_size)
        self.percentile = percentile
        self.oracle_target = oracle_target
        self._check_settings()

    def _check_settings(self) -> None:
        checks.number(self.percentile, "percentile", 0.0, 100.0, low_open=True, high_open=True)
        checks.require(
            self.oracle_target is None or (is_int(self.oracle_target) and self.oracle_target >= 0),
            "oracle_target",
            "null or a class index >= 0",
            self.oracle_target,
        )
        checks.integer(self.batch_size, "batch_size")

    def validate(self, num_classes: int, n_train: int, n_clean: int) -> None:
        self._check_settings()
        if self.oracle_target is not None:
            checks.require(
                self.oracle_target < num_classes,
                "oracle_target",
                f"a class index in [0, {num_classes})",
                self.oracle_target,
            )

    def detect(self, features: Tensor, labels: Tensor, num_classes: int, seed: int) -> Detection:
        """Per scanned class: the spectral score, flags above the percentile, and scores
        divided by the class's percentile (unscanned samples score 0)."""
        n = labels.shape[0]
        flags = torch.zeros(n, dtype=torch.bool)
        scores = torch.zeros(n, dtype=torch.float64)
        top_sv: list[float] = []
        for c, idx in enumerate(class_indices(labels, num_classes)):
            scanned = self.oracle_target is None or c == self.oracle_target
            if not scanned or idx.numel() < 2:
                top_sv.append(0.0)
                continue
            s, sv = spectral_scores(features[idx])
            cut = float(torch.quantile(s, self.percentile / 100.0))
            flags[idx] = s > cut
            scores[idx] = s / cut if cut > 0 else s
            top_sv.append(sv)
        extras = {
            "mode": "every_class" if self.oracle_target is None else "oracle_target",
            "oracle_target": self.oracle_target,
            "percentile": float(self.percentile),
            "top_sv_per_class": joined(top_sv),
            "top_sv_max": max(top_sv) if top_sv else None,
        }
        return Detection(flags, scores.float(), extras)
