"""Checksummed files: round trip, a write killed before its last step, short error reasons."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from benchmark import io
from benchmark.io import DamagedFile, checksum_path, load_checked, save_checked, short_reason


def test_round_trip_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.pt"
    save_checked({"a": torch.arange(3)}, path)
    assert checksum_path(path) == tmp_path / "sub" / "x.sha256"
    assert torch.equal(load_checked(path)["a"], torch.arange(3))
    with pytest.raises(FileNotFoundError):
        load_checked(tmp_path / "absent.pt")


def test_a_write_killed_before_the_rename_never_passes_as_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "x.pt"
    real = os.replace

    def killed(src: str | Path, dst: str | Path) -> None:
        if Path(dst) == path:
            raise KeyboardInterrupt  # as a kill right after the checksum was written
        real(src, dst)

    monkeypatch.setattr(io.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checked({"a": torch.zeros(2)}, path)
    assert not path.exists() and not list(tmp_path.glob(".*tmp"))  # a new entry: just absent
    monkeypatch.setattr(io.os, "replace", real)
    save_checked({"a": torch.zeros(2)}, path)
    monkeypatch.setattr(io.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checked({"a": torch.ones(2)}, path)
    with pytest.raises(DamagedFile, match="checksum mismatch"):  # old file, new checksum
        load_checked(path)


class Weird:
    """Not loadable with ``weights_only=True``."""


def test_reasons_are_short_and_never_advise_unsafe_loading(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    save_checked({"w": Weird()}, path)
    with pytest.raises(DamagedFile) as err:
        load_checked(path)
    reason = str(err.value)
    assert reason.startswith("UnpicklingError: ") and "Weird" in reason
    assert "weights_only" not in reason and "\n" not in reason and "Please" not in reason
    assert short_reason(RuntimeError("bad zip\nmore detail")) == "RuntimeError: bad zip"
    assert short_reason(EOFError()) == "EOFError"
