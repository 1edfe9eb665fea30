"""Shared fixtures: composed configs with every output in a temp dir, W&B kept offline there."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# One arithmetic on every CI machine: oneDNN's AVX2 kernels, which produced the fidelity fixtures.
# Its AVX-512 kernels sum in another order, and MMAC's 30-step margin synthesis amplifies that to
# 5e-3 in the margins (measured on a Xeon with AVX-512 and AMX); on such a CPU oneDNN would also
# report bf16 as native, so `train.amp: auto` would train every smoke test in bf16 (fastnet on
# mnist5k then diverges at smoke size). Set before the first oneDNN primitive; subprocesses inherit.
os.environ.setdefault("DNNL_MAX_CPU_ISA", "AVX2")

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from benchmark.callbacks import register_resolvers
from benchmark.types import ImageSet

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
# As benchmark.run does at import: the grids' resolvers and the generated cell=<a>__<d> options.
register_resolvers()


@pytest.fixture(autouse=True, scope="session")
def _isolated_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test writes W&B files, caches or outputs outside a temp dir, or goes online."""
    root = tmp_path_factory.mktemp("env")
    saved = dict(os.environ)
    os.environ.update(
        {
            "WANDB_MODE": "offline",
            "WANDB_SILENT": "true",
            "WANDB_DIR": str(root / "wandb"),
            "WANDB_CACHE_DIR": str(root / "wandb-cache"),
            "WANDB_DATA_DIR": str(root / "wandb-data"),
            "WANDB_CONFIG_DIR": str(root / "wandb-config"),
            "BENCH_DATA_DIR": str(root / "data"),
            "BENCH_CACHE_DIR": str(root / "cache"),
            "BENCH_OUTPUT_DIR": str(root / "outputs"),
        }
    )
    # Two cores in CI: two threads in one process, or one each in pytest-xdist's workers (and in
    # the CLI subprocesses they start, through OMP_NUM_THREADS).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = max(1, min(2, os.cpu_count() or 1) // workers)
    if workers > 1:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    yield
    os.environ.clear()
    os.environ.update(saved)


# Files whose tests share no module or session fixture (tests/test_scheduling.py checks), so
# pytest-xdist may run them test by test on any worker: the sweeps of test_experiments.py alone
# are half of the slow suite. Every other file runs whole on one worker, its fixtures built once.
SPREAD = frozenset(
    {
        "tests/test_experiments.py",
        "tests/benchmark/test_sweeps.py",
        "tests/defenses/test_models.py",
    }
)


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook; absent under -p no:xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile`` (``make test``), except that the ``SPREAD`` files' tests go one by
    one. (pytest-xdist's own ``loadgroup`` marks do not reach the scheduler under pytest 9.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return nodeid if path in SPREAD else path

    return Scheduling(config, log)


def compose_cfg(overrides: list[str], tmp_path: Path) -> DictConfig:
    """The real config with ``overrides``, all paths in ``tmp_path``, resolvable outside a run."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=False)
    with open_dict(cfg):
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.paths.cache_dir = str(tmp_path / "cache")
        cfg.paths.log_dir = str(tmp_path / "outputs")
        cfg.paths.output_dir = str(tmp_path / "run")
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_cfg("attack=badnets", ...)``: the smoke config plus overrides, W&B off."""

    def make(*overrides: str, smoke: bool = True) -> DictConfig:
        base = ["debug=smoke", "logger=none", "device=cpu"] if smoke else ["logger=none"]
        return compose_cfg([*base, *overrides], tmp_path)

    return make


def toy_set(
    n: int = 200, num_classes: int = 4, shape: tuple[int, int, int] = (3, 12, 12), seed: int = 0
) -> ImageSet:
    """Random uint8 images with balanced labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % num_classes
    return ImageSet(x, y, tuple(f"c{i}" for i in range(num_classes)))
