"""UltraClean's two denoisers on ``(N, H, W, C)`` uint8 arrays, and the layout helpers.

The official functions are ``median_filter_np`` and ``mean_filter_np`` of bxz9200/UltraClean
(eec1612; ``dirty-label attacks/Denoise.py`` and the clean-label scripts):
``ndimage.filters.median_filter(x, size=(2, 2, 3), mode='reflect')`` on one ``(H, W, C)`` image
in 0-255, and ``cv2.fastNlMeansDenoisingColored(x.astype(uint8), None, 5, 5, 7, 13)``. Both are
checked against those functions on a fixed input in ``tests/defenses/test_ultraclean_fidelity.py``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from benchmark import progress


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
    with progress.bar(total=x.shape[0], desc="UltraClean median filter", unit="img") as done:
        for i in range(0, x.shape[0], chunk):
            out[i : i + chunk] = ndimage.median_filter(x[i : i + chunk], size=size, mode="reflect")
            done.update(out[i : i + chunk].shape[0])
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
    """OpenCV non-local means of every image: the colour variant for ``C = 3``, the grayscale
    one (``h`` only) for ``C = 1``. Colour images are handed to OpenCV in their RGB order, as
    all four official UltraClean scripts do (OpenCV takes them for BGR, so its Lab conversion weighs
    red as blue; the official numbers come from that call).

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
    done = progress.bar(total=n, desc="UltraClean NL-means denoising", unit="img")

    def denoise(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            if c == 3:
                rgb = np.ascontiguousarray(x[i])  # RGB as is, as the official scripts
                out[i] = cv2.fastNlMeansDenoisingColored(rgb, None, h, h_color, template, search)
            else:
                gray = np.ascontiguousarray(x[i, :, :, 0])
                out[i, :, :, 0] = cv2.fastNlMeansDenoising(gray, None, h, template, search)
        done.update(hi - lo)  # tqdm's update is thread-safe

    workers = max(1, min(workers or available_cpus(), n))
    # Contiguous chunks, several per worker so an uneven share of slow images evens out.
    bounds = np.linspace(0, n, min(n, 8 * workers) + 1).astype(int)
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)  # parallel over images instead of inside one tiny image
    try:
        if workers == 1:
            list(map(denoise, bounds[:-1], bounds[1:]))  # the same chunks, in order
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(denoise, bounds[:-1], bounds[1:]))
    finally:
        cv2.setNumThreads(previous)
        done.close()
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
