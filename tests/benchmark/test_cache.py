"""The backdoored-model cache: keys, atomic entries, damage detection, reuse by the runner."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from benchmark import pipeline
from benchmark.cache import CACHE_VERSION, ModelCache, cache_key
from benchmark.io import save_checked
from tests.conftest import compose_cfg


def test_key_ignores_non_semantic_keys_and_follows_semantic_ones(make_cfg) -> None:
    base = make_cfg()
    assert cache_key(base) == cache_key(
        make_cfg("defense=undefended", "logger=wandb", "progress=true", "device=cpu")
    )
    assert cache_key(base) != cache_key(make_cfg("attack.poison_rate=0.2"))
    assert cache_key(base) != cache_key(make_cfg("seed=1"))
    assert cache_key(base) != cache_key(make_cfg("train.lr=0.02"))
    assert cache_key(base) != cache_key(make_cfg("defense_data.clean_fraction=0.1"))


def test_entry_round_trip_and_damage_detection(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    payload = {"model": {"w": torch.arange(4.0)}, "poison_index": torch.tensor([1, 2])}
    cache.save("k", payload, "a: 1\n")
    loaded = cache.load("k")
    assert loaded is not None and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    entry = cache.entry_dir("k") / "entry.pt"
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte in the middle
    entry.write_bytes(bytes(data))
    assert cache.load("k") is None
    assert not entry.exists()  # the damaged entry was discarded


def test_entry_without_checksum_is_incomplete(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    cache.save("k", {"x": torch.zeros(1)}, "")
    (cache.entry_dir("k") / "entry.sha256").unlink()  # as if killed before the last write
    assert cache.load("k") is None


class Weird:
    """Not loadable with ``weights_only=True``: torch.load raises its long UnpicklingError."""


@pytest.mark.parametrize("damage", ["flip", "no-checksum", "unpicklable"])
def test_damaged_entry_warning_is_one_short_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    cache = ModelCache(tmp_path)
    cache.save("k", {"model": {"w": torch.arange(1000.0)}}, "")
    entry = cache.entry_dir("k") / "entry.pt"
    if damage == "flip":
        data = bytearray(entry.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 200):
            data[i] ^= 0xFF
        entry.write_bytes(bytes(data))
    elif damage == "no-checksum":
        (cache.entry_dir("k") / "entry.sha256").unlink()
    else:
        save_checked({"model": Weird(), "version": CACHE_VERSION}, entry)
    with caplog.at_level(logging.WARNING, logger="benchmark.cache"):
        assert cache.load("k") is None
    (record,) = [r for r in caplog.records if r.name == "benchmark.cache"]
    message = record.getMessage()
    assert "damaged" in message and "\n" not in message
    assert "weights_only" not in message and "can still be loaded" not in message
    assert not entry.exists() and not (cache.entry_dir("k") / "entry.sha256").exists()


def test_disabled_cache_reads_and_writes_nothing(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path, enabled=False)
    cache.save("k", {"x": torch.zeros(1)}, "")
    assert cache.load("k") is None and not (tmp_path / "attacked" / "k").exists()


def test_runner_reuses_and_rebuilds_a_damaged_entry(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg()
    first = pipeline.run(cfg, run_dir=tmp_path / "r1")
    assert first["cache"]["hit"] is False
    second = pipeline.run(cfg, run_dir=tmp_path / "r2")
    assert second["cache"]["hit"] is True
    assert second["backdoored"] == first["backdoored"]
    entry = Path(cfg.paths.cache_dir) / "attacked" / first["cache"]["key"] / "entry.pt"
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    third = pipeline.run(cfg, run_dir=tmp_path / "r3")
    assert third["cache"]["hit"] is False
    assert third["backdoored"] == first["backdoored"]
    assert pipeline.run(cfg, run_dir=tmp_path / "r4")["cache"]["hit"] is True


def test_cache_entry_with_other_poison_indices_is_retrained(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg()
    first = pipeline.run(cfg, run_dir=tmp_path / "r1")
    cache = ModelCache(cfg.paths.cache_dir)
    payload = cache.load(first["cache"]["key"])
    assert payload is not None
    payload["poison_index"] = payload["poison_index"][:-1]
    payload.pop("version")
    cache.save(first["cache"]["key"], payload, "")
    with open_dict(cfg):
        cfg.progress = False
    assert pipeline.run(cfg, run_dir=tmp_path / "r2")["cache"]["hit"] is False


@pytest.mark.parametrize("enabled", [True, False])
def test_training_checkpoint_location(make_cfg, tmp_path: Path, enabled: bool) -> None:
    cfg = make_cfg(f"cache.enabled={str(enabled).lower()}")
    record = pipeline.run(cfg, run_dir=tmp_path / "run")
    entry = Path(cfg.paths.cache_dir) / "attacked" / record["cache"]["key"]
    # The per-epoch checkpoint is removed once the model is final.
    assert (
        not (entry / "train_ckpt.pt").exists() and not (tmp_path / "run" / "train_ckpt.pt").exists()
    )
    assert (entry / "entry.pt").exists() == enabled


def test_a_key_file_counts_by_content_not_path(tmp_path: Path) -> None:
    """A changed key file at the same path must not reuse a model trained on the old one; two
    paths to the same bytes are the same model."""
    a, b = tmp_path / "a" / "key.png", tmp_path / "b" / "key.png"
    for path in (a, b):
        path.parent.mkdir()
        path.write_bytes(b"one")

    def key(path: Path) -> str:
        return cache_key(compose_cfg(["attack=blend", f"attack.key_path={path}"], tmp_path))

    before = key(a)
    assert key(b) == before
    a.write_bytes(b"two")
    assert key(a) != before
