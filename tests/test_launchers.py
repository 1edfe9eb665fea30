"""The SLURM launcher preset (conf/hydra/launcher/slurm.yaml): the sbatch script it makes.

No cluster here: a stand-in ``srun`` on PATH lets submitit build its executor, and the test
reads the sbatch script submitit would submit. (submitit_local and joblib run real parallel
sweeps in tests/benchmark/test_sweeps.py.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_slurm_preset_asks_for_one_gpu_per_cell_and_requeues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    submitit = pytest.importorskip("submitit")
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}{os.pathsep}{os.environ['PATH']}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                f"hydra.sweep.dir={tmp_path / 'sweep'}",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    # As the plugin's launch() turns its config into submitit parameters.
    params = OmegaConf.to_container(launcher, resolve=False)
    params.pop("_target_")
    params["name"] = "backdoor-bench"
    executor = submitit.AutoExecutor(
        cluster="slurm",
        folder=str(tmp_path / "sweep" / ".submitit" / "%j"),
        slurm_max_num_timeout=params.pop("max_num_timeout"),
    )
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -m benchmark.run", "uid")
    for line in (
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --partition=gpu",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --time=720",
        "#SBATCH --signal=USR2@120",
    ):
        assert line in script, script
    assert executor._executor.max_num_timeout == 3
