"""Atomic file writes: a file either holds its whole new content or its old one, never half.

Every write goes to a temporary file in the same folder, is flushed to disk, then renamed over
the target (``os.replace`` is atomic on POSIX), so a process killed at any moment leaves no
half-written result, checkpoint or cache entry behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _write_temp(path: Path, data: bytes) -> Path:
    """``data`` in a new temporary file beside ``path`` (flushed to disk); its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _replace(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, creating parent folders."""
    path = Path(path)
    _replace(_write_temp(path, data), path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def torch_bytes(obj: Any) -> bytes:
    """``torch.save`` into memory (to hash and write the same bytes)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def atomic_torch_save(obj: Any, path: str | Path) -> str:
    """``torch.save`` atomically; returns the sha256 of the written bytes."""
    data = torch_bytes(obj)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- checksummed files: every on-disk cache ------------------------------------------------------
# A cache file ``x.pt`` is complete only when its checksum ``x.sha256`` exists and agrees with it:
# damage (flipped bytes, truncation) and a write killed half-way are both caught before
# ``torch.load`` sees the bytes. The checksum is written just before the new file is renamed into
# place (the last step), so a file never shows without its checksum; a write killed between the
# two leaves no file (a new entry) or the old file with the new checksum (a mismatch): rebuilt.


class DamagedFile(Exception):
    """A checked file that lacks its checksum, disagrees with it, or cannot be read."""


def checksum_path(path: str | Path) -> Path:
    """Where the checksum of ``path`` lives (``entry.pt`` -> ``entry.sha256``)."""
    return Path(path).with_suffix(".sha256")


def save_checked(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically with its checksum (see above for the order of the writes)."""
    path, data = Path(path), torch_bytes(obj)
    tmp = _write_temp(path, data)
    try:
        atomic_write_text(checksum_path(path), hashlib.sha256(data).hexdigest() + "\n")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _replace(tmp, path)


def load_checked(path: str | Path) -> Any:
    """``torch.load`` (``weights_only=True``) of a file written by :func:`save_checked`.

    Raises ``FileNotFoundError`` if ``path`` does not exist and :class:`DamagedFile` (with a
    short reason) if it is incomplete, damaged or unreadable.
    """
    path, digest = Path(path), checksum_path(path)
    if not path.exists():
        raise FileNotFoundError(path)
    if not digest.exists():
        raise DamagedFile("no checksum file: incomplete write")
    try:
        if sha256_file(path) != digest.read_text().strip():
            raise DamagedFile("checksum mismatch")
        return torch.load(path, map_location="cpu", weights_only=True)
    except DamagedFile:
        raise
    except Exception as err:
        raise DamagedFile(short_reason(err)) from err


def discard_checked(path: str | Path) -> None:
    """Remove a checked file and its checksum (checksum first: never a valid-looking half)."""
    checksum_path(path).unlink(missing_ok=True)
    Path(path).unlink(missing_ok=True)


# Phrases of torch.load's errors that start advice (to load unsafely, to allowlist globals); a
# reason is cut before them.
_ADVICE = (
    "This file can still be loaded",
    "In PyTorch 2.6",
    "Re-running",
    "weights_only",
    "Please use",
    "Please file",
)


def short_reason(err: BaseException) -> str:
    """An error as its type and first line, cut before any advice to load unsafely."""
    text = str(err)
    if "WeightsUnpickler error:" in text:  # torch's own reason, after paragraphs of advice
        text = text.split("WeightsUnpickler error:", 1)[1]
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    for phrase in _ADVICE:
        line = line.split(phrase, 1)[0]
    line = line.strip(" .,;:")
    return f"{type(err).__name__}: {line}" if line else type(err).__name__
