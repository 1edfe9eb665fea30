"""Image files -> one ``(N, C, H, W)`` uint8 tensor, cached on disk under a key of the files.

Decoding tens of thousands of small files takes seconds to minutes; the decoded tensor of a split
is saved once (``<cache_dir>/images/<name>-<split>-<key>.pt``, its checksum beside it in
``.sha256``) and reused while the files, their labels and the decoding options are unchanged; a
damaged or incomplete entry is rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from benchmark import progress
from benchmark.errors import ConfigError, DatasetUnavailable
from benchmark.io import DamagedFile, discard_checked, load_checked, save_checked

log = logging.getLogger(__name__)

# Bump when the decoded pixels of the same files would change (decoder, resize rule).
CACHE_VERSION = 1
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# Extensions PIL can open, minus stubs and non-image formats it registers (HDF5, MPEG, EPS).
Image.init()
IMAGE_EXTENSIONS = frozenset(
    ext
    for ext, fmt in Image.registered_extensions().items()
    if fmt in Image.OPEN
    and ext not in {".bufr", ".grib", ".h5", ".hdf", ".mpeg", ".mpg", ".eps", ".ps", ".emf", ".wmf"}
)


def list_images(folder: Path, extensions: frozenset[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files below ``folder``, recursively, in torchvision ``ImageFolder``'s order."""
    found = []
    for dirpath, _, names in sorted(os.walk(folder, followlinks=True)):
        found += [
            Path(dirpath, n)
            for n in sorted(names)
            if not n.startswith(".") and os.path.splitext(n)[1].lower() in extensions
        ]
    return found


def files_key(paths: Sequence[Path], labels: Sequence[int], base: Path, *options: object) -> str:
    """A hash of the files (relative path, size, mtime), their labels and the decoding options."""
    h = hashlib.sha256(repr((CACHE_VERSION, options)).encode())
    for path, label in zip(paths, labels, strict=True):
        st = path.stat()
        h.update(f"{path.relative_to(base)}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    return h.hexdigest()[:24]


def cached(
    cache_dir: Path | None, stem: str, key: str, build: Callable[[], dict[str, Tensor]]
) -> dict[str, Tensor]:
    """``build()``'s tensors, read from the cache if there, else built and written atomically."""
    if cache_dir is None:
        return build()
    path = Path(cache_dir) / "images" / f"{stem}-{key}.pt"
    if path.is_file():
        try:
            return load_checked(path)
        except (DamagedFile, FileNotFoundError) as err:
            log.warning("cache file %s is damaged (%s); rebuilding it", path, err)
            discard_checked(path)
    data = build()
    # Atomic, checksum last: readers never see a half-written entry, and concurrent writers of
    # the same key just replace each other's identical result.
    try:
        save_checked(data, path)
    except OSError as err:  # a read-only or full cache disk must not fail the run
        log.warning("could not write the cache file %s (%s)", path, err)
    return data


def decode_images(
    paths: Sequence[Path],
    shape: tuple[int, int, int],
    *,
    resize: bool,
    strict_gray: bool = False,
    desc: str = "decoding images",
) -> Tensor:
    """``(N, C, H, W)`` uint8 pixels of the image files ``paths``, decoded by PIL.

    Args:
        shape: ``(C, H, W)`` of the result; C = 1 converts to grey ("L"), C = 3 to RGB.
        resize: resize images of another size to ``(H, W)`` (PIL bilinear, as torchvision's
            ``Resize`` on PIL images) instead of failing.
        strict_gray: with C = 1, fail on a colour image instead of converting it to grey (used
            when C was inferred from the first image).
        desc: the label of the progress bar.
    """
    out = torch.empty((len(paths), *shape), dtype=torch.uint8)
    pixels = out.numpy()  # filled in place: one copy per image
    for i, path in enumerate(progress.bar(paths, desc=desc, unit="img")):
        try:
            a = _decode(path, shape, resize, strict_gray)
        except (OSError, Image.DecompressionBombError) as err:
            raise DatasetUnavailable(
                f"cannot decode the image {path} ({err}); remove or replace the file"
            ) from err
        pixels[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return out


def _decode(path: Path, shape: tuple[int, int, int], resize: bool, strict_gray: bool) -> np.ndarray:
    """``(H, W)`` or ``(H, W, 3)`` uint8 pixels of one file."""
    c, h, w = shape
    with Image.open(path) as im:
        if strict_gray and c == 1 and im.mode not in GRAY_MODES:
            raise ConfigError(
                "dataset.channels",
                f"{path} is a colour image (mode {im.mode}) but "
                "the first training image is grey, so channels was inferred as 1; "
                "set dataset.channels=3 (or =1 to convert every image to grey)",
            )
        mode = "L" if c == 1 else "RGB"
        if im.mode != mode:  # no needless copy for the usual case
            im = im.convert(mode)
        if im.size != (w, h):
            if not resize:
                raise ConfigError(
                    "dataset.image_size",
                    f"{path} is {im.size[0]}x{im.size[1]} "
                    f"(WxH) but the first training image is {w}x{h}; the images "
                    f"must all have one size: set dataset.image_size={h} (or "
                    "[height, width]) to resize them all",
                )
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        return np.asarray(im)
