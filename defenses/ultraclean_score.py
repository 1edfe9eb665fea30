"""UltraClean's susceptibility score and removal rule (bxz9200/UltraClean eec1612).

The official dirty-label ``Denoise.py`` L1-compares the model's raw outputs on an image and on
its two denoised variants (``LA.norm(a - b, ord=1, axis=1)``), sums the two distances
(``distance_mix``) and removes ``distance_mix.argsort()[-int(0.3 * N):]``; the LCBD and HTBD
scripts do the same on softmax probabilities. Checked on a fixed input in
``tests/defenses/test_ultraclean_fidelity.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark import progress
from benchmark.data import to_float

ScoreSpace = Literal["softmax", "logits"]
SCORE_SPACES: tuple[str, ...] = ("softmax", "logits")


@torch.no_grad()
def output_distances(
    model: nn.Module,
    x: Tensor,
    variants: Sequence[Tensor],
    *,
    space: ScoreSpace = "softmax",
    device: str | torch.device = "cpu",
    batch_size: int = 512,
) -> Tensor:
    """L1 distance between the model's outputs on ``x`` and on each variant.

    Args:
        model: the scoring model; run in eval mode (its mode is restored) in fp32.
        x: ``(N, C, H, W)`` uint8 images.
        variants: tensors like ``x`` (the denoised images).
        space: ``softmax`` (probabilities) or ``logits`` (raw outputs).
        device: where the model runs.
        batch_size: images per forward pass (the original and its variants go together).

    Returns:
        ``(N, len(variants))`` float32 CPU distances.
    """
    if space not in SCORE_SPACES:
        raise ValueError(f"space must be one of {SCORE_SPACES}, got {space!r}")
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    out: list[Tensor] = []
    try:
        starts = range(0, x.shape[0], batch_size)
        for i in progress.bar(starts, desc="UltraClean scoring", unit="batch"):
            views = [x[i : i + batch_size], *(v[i : i + batch_size] for v in variants)]
            batch = torch.cat([to_float(v.to(device)) for v in views])
            g = model(batch).float()
            if space == "softmax":
                g = F.softmax(g, dim=1)
            g = g.view(len(views), -1, g.shape[1])
            out.append((g[:1] - g[1:]).abs().sum(dim=2).T.cpu())
    finally:
        model.train(was_training)
    if not out:
        return torch.zeros(0, len(variants))
    return torch.cat(out)


def removal_count(fraction: float, n: int) -> int:
    """``floor(fraction * n)``, robust to float error (0.29 * 100 is 28.999999999999996)."""
    return math.floor(fraction * n + 1e-9)


def top_k_mask(scores: Tensor, k: int, eligible: Tensor | None = None) -> Tensor:
    """``(N,)`` bool mask of the ``k`` highest ``scores`` among the ``eligible`` samples (all by
    default); ties go to the lower index."""
    scores = scores.detach().double().cpu()
    eligible = torch.ones_like(scores, dtype=torch.bool) if eligible is None else eligible.cpu()
    if not 0 <= k <= int(eligible.sum()):
        raise ValueError(f"cannot pick {k} of {int(eligible.sum())} eligible samples")
    ranked = scores.masked_fill(~eligible, -math.inf)
    order = torch.sort(-ranked, stable=True).indices
    mask = torch.zeros(scores.shape[0], dtype=torch.bool)
    mask[order[:k]] = True
    return mask
