"""``defense=ultraclean``: UltraClean, denoising susceptibility filtering (arXiv 2312.10657).

Zhao and Lao. "UltraClean: A Simple Framework to Train Robust Neural Networks against Backdoor
Attacks." arXiv:2312.10657, 2023. Official code: github.com/bxz9200/UltraClean (commit eec1612),
read only for the facts collected in ``defenses-ultraclean-none-linf.md`` section 1.

Threat model and stage: in-training. The defender trains the model, sees the whole (possibly
poisoned) training set, needs no clean data and knows neither the trigger nor the poison rate;
in the optional known-target mode it also knows the target class.

Idea: a trigger is structured noise that the backdoored network amplifies. Two off-the-shelf
denoisers wipe most of it out, so the backdoored model's output moves a lot on a poisoned image
when it is denoised and little on a clean one.

1. **Scoring model.** The model trained to completion on the poisoned set: the runner's cached
   backdoored model (``ctx.model``), not trained again.
2. **Denoised variants** of every training image, on its uint8 pixels in HWC layout:
   - ``D1``, median smoothing (the Feature Squeezing squeezer): scipy's
     ``ndimage.median_filter`` with a ``2 x 2 x C`` window and ``mode="reflect"``. The window
     spans the colour channels, so each output value is a rank statistic of 12 values mixed
     across channels (for C = 3 the channel offsets are -1, 0, +1, reflected at the ends). With
     an even size scipy takes offsets -1 and 0 in each spatial axis and the upper middle value
     (index ``size // 2`` of the sorted window). Computed as one call per chunk over
     ``(N, H, W, C)`` with size ``(1, 2, 2, C)``, which is the per-image call.
   - ``D2``, non-local means: OpenCV's ``fastNlMeansDenoisingColored`` with h 5, hColor 5,
     template window 7 and search window 13, one image at a time in a thread pool (OpenCV
     releases the GIL; its own threading is set to 1 meanwhile, as 32 x 32 images are too small
     to split).
3. **Susceptibility**: ``s_i = |g(x_i) - g(D1(x_i))|_1 + |g(x_i) - g(D2(x_i))|_1`` with ``g``
   the model's softmax probabilities (``score_space: softmax``, the paper's wording and the
   LCBD/HTBD scripts; the official dirty-label and SIG scripts use the raw logits,
   ``score_space: logits``). The model is in eval mode, fp32, no augmentation.
4. **Filtering**: the top ``floor(removal_ratio * N)`` samples by score are removed (ties go to
   the lower index). In known-target mode (``known_target: <class>``) only the samples labelled
   with that class are denoised and scored, and the top ``floor(known_target_removal * n_class)``
   of them are removed.
5. **Retraining** of a fresh model from scratch (``ctx.new_model()``) on the rest, with the run's
   recipe (``ctx.fit``).

Score space in practice: softmax distances saturate on samples the model is very sure of, and
a backdoored model is surest of its poisons. When a denoiser does not flip the poison's
prediction (a solid patch survives the 2x2 median; SIG and Blend triggers are smooth), poisons
then score *below* clean samples. Measured on mnist5k/small_cnn (whole-dataset AUROC, softmax
vs logits): BadNets 0.23 vs 0.61, Blend 0.02 vs 0.94, SIG 0.03 vs 0.98. Where the official
code used logits (dirty-label attacks, SIG), ``score_space: logits`` follows it.

The result's ``train_flags`` are the removed samples and ``train_scores`` the susceptibilities.
In known-target mode the samples of other classes are not scored; they get
``UNSCORED = -1.0``, below every susceptibility (an L1 distance, >= 0), and finite, because the
runner's AUROC is undefined for non-finite scores. ``extras`` holds the counts, score statistics
and the seconds of each phase; ``work_dir/ultraclean_scores.pt`` holds every sample's two
distances, the scores and the removal mask. The denoised variants are not cached: the work
folder is per run, so a cache there would never be read again, and the denoising takes minutes.

Reference::

    @article{zhao2023ultraclean,
      title   = {UltraClean: A Simple Framework to Train Robust Neural Networks against
                 Backdoor Attacks},
      author  = {Zhao, Bingyin and Lao, Yingjie},
      journal = {arXiv preprint arXiv:2312.10657},
      year    = {2023}
    }

Deviations from the official code:

- Known-target mode removes a configured fraction of the target class
  (``known_target_removal``). The official scripts remove ``1.5 x`` (HTBD ``1.35 x``) the *true*
  number of poisons, an oracle the defender cannot have.
- One-channel data use OpenCV's grayscale NL-means (``fastNlMeansDenoising``, h 5, same
  windows); there the median window is ``2 x 2 x 1`` (4 values, the 3rd smallest). Other channel
  counts are rejected.
- Colour images are handed to OpenCV in BGR order (its NL-means converts BGR to Lab); one
  official script passes RGB. Pixels are the stored uint8 images, so no float truncation occurs.
- Softmax is the default score space (see step 3); the logits of the dirty-label/SIG scripts are
  ``score_space: logits``.
- The scoring model and the retraining use the harness's recipe (last epoch), not the official
  dirty-label script's constant lr with best-test-accuracy checkpointing.
- The bit-depth squeezer, which the official code computes but never uses to filter, is left out.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn

from benchmark.data import to_float
from benchmark.errors import ConfigError
from benchmark.io import atomic_torch_save
from defenses.base import Defense, DefenseContext, DefenseResult, Stage
from defenses.checks import as_number, is_int, require

log = logging.getLogger(__name__)

ScoreSpace = Literal["softmax", "logits"]
SCORE_SPACES: tuple[str, ...] = ("softmax", "logits")
UNSCORED = -1.0  # score of samples not scored in known-target mode: below any L1 distance


# -- denoisers, on (N, H, W, C) uint8 arrays ----------------------------------------------------
def median_smooth(x: np.ndarray, window: int = 2, chunk: int = 4096) -> np.ndarray:
    """Median filter over a ``window x window x C`` window of each ``(H, W, C)`` image.

    Args:
        x: ``(N, H, W, C)`` uint8 pixels.
        window: spatial size of the window (2 in the paper).
        chunk: images per scipy call (bounds the temporary memory).

    Returns:
        ``(N, H, W, C)`` uint8, equal to ``median_filter(x[i], size=(window, window, C),
        mode="reflect")`` for every image ``i``.
    """
    _check_images(x)
    size = (1, window, window, x.shape[-1])  # 1 along N: images never mix
    out = np.empty_like(x)
    for i in range(0, x.shape[0], chunk):
        out[i : i + chunk] = ndimage.median_filter(x[i : i + chunk], size=size, mode="reflect")
    return out


def nl_means(
    x: np.ndarray,
    *,
    h: float = 5.0,
    h_color: float = 5.0,
    template: int = 7,
    search: int = 13,
    workers: int | None = None,
) -> np.ndarray:
    """OpenCV non-local means of every image: the colour variant for ``C = 3`` (RGB input,
    handed to OpenCV as BGR), the grayscale one (``h`` only) for ``C = 1``.

    Args:
        x: ``(N, H, W, C)`` uint8 pixels, ``C`` 1 or 3.
        h, h_color: filter strengths of luminance and colour.
        template, search: template and search window sizes (odd).
        workers: threads; None = the CPUs this process may use.

    Returns:
        ``(N, H, W, C)`` uint8.
    """
    _check_images(x)
    n, c = x.shape[0], x.shape[-1]
    if c not in (1, 3):
        raise ValueError(f"NL-means needs 1 or 3 channels, got {c}")
    out = np.empty_like(x)

    def denoise(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            if c == 3:
                bgr = np.ascontiguousarray(x[i, :, :, ::-1])
                res = cv2.fastNlMeansDenoisingColored(bgr, None, h, h_color, template, search)
                out[i] = res[:, :, ::-1]
            else:
                gray = np.ascontiguousarray(x[i, :, :, 0])
                out[i, :, :, 0] = cv2.fastNlMeansDenoising(gray, None, h, template, search)

    workers = max(1, min(workers or available_cpus(), n))
    # Contiguous chunks, several per worker so an uneven share of slow images evens out.
    bounds = np.linspace(0, n, min(n, 8 * workers) + 1).astype(int)
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)  # parallel over images instead of inside one tiny image
    try:
        if workers == 1:
            denoise(0, n)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(denoise, bounds[:-1], bounds[1:]))
    finally:
        cv2.setNumThreads(previous)
    return out


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _check_images(x: np.ndarray) -> None:
    if x.dtype != np.uint8 or x.ndim != 4:
        raise TypeError(f"expected (N, H, W, C) uint8 images, got {x.dtype} {x.shape}")


def to_hwc(x: Tensor) -> np.ndarray:
    """``(N, C, H, W)`` uint8 tensor (any device) -> ``(N, H, W, C)`` uint8 array."""
    return np.ascontiguousarray(x.detach().cpu().permute(0, 2, 3, 1).numpy())


def from_hwc(a: np.ndarray) -> Tensor:
    """``(N, H, W, C)`` uint8 array -> ``(N, C, H, W)`` uint8 CPU tensor."""
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


# -- score and removal --------------------------------------------------------------------------
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
        for i in range(0, x.shape[0], batch_size):
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


# -- the defense --------------------------------------------------------------------------------
class UltraClean(Defense):
    """UltraClean: score every training sample by how much denoising moves the backdoored
    model's output, drop the most susceptible ones and retrain from scratch.

    Args:
        removal_ratio: share of the training set removed (top scores), in [0, 1).
        score_space: ``softmax`` (probabilities) or ``logits`` (raw outputs).
        known_target: a target class the defender knows (only its samples are scored and
            removed), or None.
        known_target_removal: share of the known target class removed, in [0, 1).
        median_window: spatial size of the median window (it always spans all channels).
        nl_means_h, nl_means_h_color: NL-means filter strengths (``h_color`` unused for
            one-channel images).
        nl_means_template, nl_means_search: NL-means window sizes (odd).
        batch_size: images per forward pass while scoring.
        workers: NL-means threads; None = the CPUs this process may use.
    """

    name: ClassVar[str] = "ultraclean"
    stage: ClassVar[Stage] = Stage.IN_TRAINING

    def __init__(
        self,
        removal_ratio: float = 0.3,
        score_space: ScoreSpace = "softmax",
        known_target: int | None = None,
        known_target_removal: float = 0.5,
        median_window: int = 2,
        nl_means_h: float = 5.0,
        nl_means_h_color: float = 5.0,
        nl_means_template: int = 7,
        nl_means_search: int = 13,
        batch_size: int = 512,
        workers: int | None = None,
    ) -> None:
        self.removal_ratio = removal_ratio
        self.score_space = score_space
        self.known_target = known_target
        self.known_target_removal = known_target_removal
        self.median_window = median_window
        self.nl_means_h = nl_means_h
        self.nl_means_h_color = nl_means_h_color
        self.nl_means_template = nl_means_template
        self.nl_means_search = nl_means_search
        self.batch_size = batch_size
        self.workers = workers
        self._check_settings()  # fail at instantiation already for what needs no data sizes

    def _check_settings(self) -> None:
        require(
            0.0 <= as_number(self.removal_ratio) < 1.0,
            "removal_ratio",
            "in [0, 1)",
            self.removal_ratio,
        )
        require(
            self.score_space in SCORE_SPACES,
            "score_space",
            f"one of {SCORE_SPACES}",
            self.score_space,
        )
        require(
            self.known_target is None or (is_int(self.known_target) and self.known_target >= 0),
            "known_target",
            "null or a class index >= 0",
            self.known_target,
        )
        require(
            0.0 <= as_number(self.known_target_removal) < 1.0,
            "known_target_removal",
            "in [0, 1)",
            self.known_target_removal,
        )
        for key in ("median_window", "batch_size"):
            value = getattr(self, key)
            require(is_int(value) and value >= 1, key, "an integer >= 1", value)
        for key in ("nl_means_template", "nl_means_search"):
            value = getattr(self, key)
            require(
                is_int(value) and value >= 1 and value % 2 == 1, key, "an odd integer >= 1", value
            )
        for key in ("nl_means_h", "nl_means_h_color"):
            value = getattr(self, key)
            require(as_number(value) > 0, key, "a number > 0", value)
        require(
            self.workers is None or (is_int(self.workers) and self.workers >= 1),
            "workers",
            "null or an integer >= 1",
            self.workers,
        )

    def validate(self, num_classes: int, n_train: int, n_clean: int) -> None:
        """Check every setting, and ``known_target`` against the number of classes."""
        self._check_settings()
        if self.known_target is not None:
            require(
                self.known_target < num_classes,
                "known_target",
                f"a class index in [0, {num_classes})",
                self.known_target,
            )

    def denoise(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
        """The median and NL-means variants of ``(N, C, H, W)`` uint8 images (CPU tensors) and
        the seconds each took."""
        hwc = to_hwc(x)
        t0 = time.perf_counter()
        med = median_smooth(hwc, self.median_window)
        t1 = time.perf_counter()
        nlm = nl_means(
            hwc,
            h=self.nl_means_h,
            h_color=self.nl_means_h_color,
            template=self.nl_means_template,
            search=self.nl_means_search,
            workers=self.workers,
        )
        t2 = time.perf_counter()
        seconds = {"median_s": round(t1 - t0, 3), "nl_means_s": round(t2 - t1, 3)}
        return from_hwc(med), from_hwc(nlm), seconds

    def run(self, ctx: DefenseContext) -> DefenseResult:
        if ctx.model is None:
            raise ValueError("UltraClean scores with the trained (backdoored) model; got none")
        self.validate(ctx.num_classes, len(ctx.train_set), len(ctx.clean_set))
        train = ctx.train_set
        n = len(train)
        y = train.y.cpu()
        scored = (
            torch.ones(n, dtype=torch.bool) if self.known_target is None else y == self.known_target
        )
        index = torch.nonzero(scored).flatten()
        if self.known_target is not None and index.numel() == 0:
            log.warning("UltraClean: no training sample has the known target %d", self.known_target)
        x = train.x[index.to(train.device)].cpu()
        c = x.shape[1]
        if c not in (1, 3):
            raise ConfigError("dataset", f"UltraClean's NL-means needs 1 or 3 channels, got {c}")

        # 1. Denoise (median, NL-means) and score with the backdoored model itself.
        t0 = time.perf_counter()
        med, nlm, phase_s = self.denoise(x)
        t1 = time.perf_counter()
        dist = output_distances(
            ctx.model,
            x,
            [med, nlm],
            space=self.score_space,
            device=ctx.device,
            batch_size=self.batch_size,
        )
        t2 = time.perf_counter()
        del med, nlm
        susceptibility = dist.sum(dim=1)
        scores = torch.full((n,), UNSCORED, dtype=torch.float32)
        scores[index] = susceptibility

        # 2. Remove the most susceptible share (of everything, or of the known target class).
        share = self.removal_ratio if self.known_target is None else self.known_target_removal
        n_remove = removal_count(share, index.numel())
        removed = top_k_mask(scores, n_remove, eligible=scored)
        keep = torch.nonzero(~removed).flatten()
        log.info(
            "UltraClean: scored %d samples (%s), removing %d (%.3g); denoised in %.1fs, "
            "scored in %.1fs",
            index.numel(),
            self.score_space,
            n_remove,
            share,
            t1 - t0,
            t2 - t1,
        )

        # 3. Retrain a fresh model from scratch on the rest, with the run's recipe.
        model = ctx.new_model()
        t3 = time.perf_counter()
        fit_result = ctx.fit(model, train.subset(keep.to(train.device)), desc="ultraclean retrain")
        retrain_s = time.perf_counter() - t3
        model.eval()

        atomic_torch_save(
            {
                "scores": scores,
                "distances": dist,  # (n_scored, 2): median, NL-means
                "scored_index": index,
                "removed": removed,
                "score_space": self.score_space,
            },
            ctx.work_dir / "ultraclean_scores.pt",
        )
        history = fit_result.history if fit_result is not None else []
        threshold = float(scores[removed].min()) if n_remove else None
        per_class = torch.bincount(y[removed], minlength=ctx.num_classes)
        extras: dict[str, Any] = {
            "mode": "whole_dataset" if self.known_target is None else "known_target",
            "score_space": self.score_space,
            "known_target": self.known_target,
            "n_scored": int(index.numel()),
            "n_removed": n_remove,
            "removed_share": n_remove / n if n else 0.0,
            "removed_per_class": ",".join(str(int(v)) for v in per_class),
            "n_retrain": int(keep.numel()),
            **_stats("score", susceptibility),
            "score_threshold": threshold,  # the lowest removed score
            "median_l1_mean": float(dist[:, 0].mean()) if index.numel() else None,
            "nl_means_l1_mean": float(dist[:, 1].mean()) if index.numel() else None,
            "denoise_s": round(t1 - t0, 3),
            **phase_s,
            "score_s": round(t2 - t1, 3),
            "retrain_s": round(retrain_s, 3),
            "retrain_final_acc": history[-1].get("acc") if history else None,
        }
        return DefenseResult(model=model, train_flags=removed, train_scores=scores, extras=extras)


def _stats(prefix: str, values: Tensor) -> dict[str, float | None]:
    if values.numel() == 0:
        return {f"{prefix}_{k}": None for k in ("min", "mean", "median", "max")}
    v = values.double()
    return {
        f"{prefix}_min": float(v.min()),
        f"{prefix}_mean": float(v.mean()),
        f"{prefix}_median": float(v.median()),
        f"{prefix}_max": float(v.max()),
    }
