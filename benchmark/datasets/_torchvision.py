"""Shared plumbing of the file-backed datasets: file checks, downloads with a timeout, one error.

torchvision's loaders raise bare ``RuntimeError``/``URLError`` ("Dataset not found. You can use
download=True") that say neither where the files should be nor how to get them offline; this module
turns every such failure into one ``DatasetUnavailable`` that does.
"""

from __future__ import annotations

import http.client
import pickle
import socket
import tarfile
import zipfile
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from filelock import FileLock

from benchmark.datasets.base import Dataset
from benchmark.errors import BenchmarkError, DatasetUnavailable
from benchmark.types import ImageSet

# Connect/read timeout of a download: long enough for a slow mirror, short enough that a machine
# without network fails in seconds instead of hanging on the OS default.
DOWNLOAD_TIMEOUT_S = 20.0

# What a failed download or a damaged file can raise (URLError and timeouts are OSErrors;
# torchvision raises RuntimeError on checksum mismatches).
DOWNLOAD_ERRORS = (
    OSError,
    RuntimeError,
    ValueError,
    EOFError,
    http.client.HTTPException,
    tarfile.TarError,
    zipfile.BadZipFile,
)
READ_ERRORS = (OSError, RuntimeError, ValueError, EOFError, KeyError, pickle.UnpicklingError)


@contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """Set the default socket timeout (used by ``urllib``, hence torchvision) for the block."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def unavailable_message(name: str, missing: Sequence[Path], source: str, cause: str) -> str:
    """The one message of a missing dataset: what is missing, where to get it, how to fix it."""
    shown = ", ".join(str(p) for p in missing[:4])
    if len(missing) > 4:
        shown += f" and {len(missing) - 4} more"
    return (
        f"dataset {name!r} is not available: missing {shown} ({cause}). Get it from "
        f"{source}: either download it elsewhere and copy or unpack it so that {missing[0]} "
        "exists, or point paths.data_dir (or the BENCH_DATA_DIR environment variable, or "
        "dataset.root) at a folder that already has it, or run with dataset.download=true on "
        "a machine with network access."
    )


def one_line(err: BaseException, limit: int = 400) -> str:
    """An exception as one short line (torchvision's MNIST error spans several)."""
    text = f"{type(err).__name__}: {' '.join(str(err).split())}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class FileDataset(Dataset):
    """A dataset read from files under ``root``, downloaded by torchvision where allowed.

    Subclasses list the files they need (``required``), download them (``fetch``) and read one
    split (``read_split``). ``train_size``/``test_size`` are the official sizes, known before
    loading; after ``load_full`` they are the sizes of the files actually read.
    """

    urls: ClassVar[tuple[str, ...]]
    # " or " between mirrors of the same files, " and " between parts that are all needed.
    url_join: ClassVar[str] = " or "

    def __init__(
        self,
        root: str | Path,
        *,
        download: bool = False,
        **common: Any,
    ) -> None:
        super().__init__(**common)  # max_train, max_test, seed, hflip, crop_padding
        self.root = Path(root).expanduser().absolute()
        self.download = bool(download)

    @property
    def folder(self) -> Path:
        """Where the files go (named in the error message)."""
        return self.root

    @abstractmethod
    def required(self) -> list[Path]:
        """Every file or folder that must exist before ``load_full``."""

    @abstractmethod
    def fetch(self) -> None:
        """Download the missing files (may raise anything in ``DOWNLOAD_ERRORS``)."""

    @abstractmethod
    def read_split(self, train: bool) -> ImageSet:
        """One full split from the files."""

    def missing(self) -> list[Path]:
        return [p for p in self.required() if not p.exists()]

    def prepare(self) -> None:
        missing = self.missing()
        if not missing:
            return
        cause = "dataset.download is false"
        if self.download:
            try:
                # One download at a time per root (parallel sweep jobs share paths.data_dir);
                # a job that waited finds the files there and downloads nothing.
                self.root.mkdir(parents=True, exist_ok=True)
                with FileLock(self.root / f".{self.name}.download.lock"):
                    if self.missing():
                        with socket_timeout(DOWNLOAD_TIMEOUT_S):
                            self.fetch()
            except DOWNLOAD_ERRORS as err:
                cause = f"the download failed: {one_line(err)}"
            else:
                missing = self.missing()
                if not missing:
                    return
                cause = "the download did not produce them"
        source = self.url_join.join(self.urls)
        raise DatasetUnavailable(unavailable_message(self.name, missing, source, cause))

    def load_full(self) -> tuple[ImageSet, ImageSet]:
        try:
            train, test = self.read_split(True), self.read_split(False)
        except BenchmarkError:
            raise
        except READ_ERRORS as err:
            # Truncated or damaged files (torchvision's checksum check fails with RuntimeError).
            raise DatasetUnavailable(
                f"dataset {self.name!r}: cannot read the files in {self.folder} "
                f"({one_line(err)}). They may be incomplete or damaged: delete them and download "
                f"them again from {self.url_join.join(self.urls)}, or run with "
                "dataset.download=true on a machine with network access."
            ) from err
        self.train_size, self.test_size = len(train), len(test)
        return train, test
