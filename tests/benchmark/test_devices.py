"""claim_gpu: each concurrent job of a local sweep gets a GPU of its own."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from benchmark.devices import claim_gpu
from benchmark.run import gpu_for_job


def test_concurrent_claims_get_different_gpus(tmp_path: Path) -> None:
    with claim_gpu(tmp_path, 3) as a, claim_gpu(tmp_path, 3) as b, claim_gpu(tmp_path, 3) as c:
        assert sorted([a, b, c]) == [0, 1, 2]
    with claim_gpu(tmp_path, 3) as again:  # released at the end of the block
        assert again == 0


def test_a_job_beyond_the_gpu_count_waits_for_its_gpu(tmp_path: Path) -> None:
    got: list[tuple[int, float]] = []

    def late_job() -> None:
        with claim_gpu(tmp_path, 2, job_num=3) as index:  # 3 % 2 = 1
            got.append((index, time.perf_counter()))

    with claim_gpu(tmp_path, 2), claim_gpu(tmp_path, 2) as second:
        assert second == 1
        worker = threading.Thread(target=late_job)
        worker.start()
        time.sleep(0.3)
        assert not got  # still waiting
        released = time.perf_counter()
    worker.join(timeout=10)
    assert got and got[0][0] == 1 and got[0][1] >= released


def test_bad_count() -> None:
    with pytest.raises(ValueError, match="count"), claim_gpu("unused", 0):
        pass


def test_sweep_jobs_on_device_auto_get_their_own_gpu(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    hc = SimpleNamespace(job=SimpleNamespace(num=0))

    def cfg(device: str = "auto"):
        return OmegaConf.create({"device": device, "paths": {"cache_dir": str(tmp_path)}})

    a, b, c, single = cfg(), cfg(), cfg("cuda:1"), cfg()
    with gpu_for_job(a, hc, True), gpu_for_job(b, hc, True), gpu_for_job(c, hc, True):
        assert (a.device, b.device, c.device) == ("cuda:0", "cuda:1", "cuda:1")
    with gpu_for_job(single, hc, sweeping=False):  # a single run keeps device=auto
        assert single.device == "auto"
