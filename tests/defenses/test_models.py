"""Every defense runs on every model of the harness (conf/model/), at a toy size.

The defenses find their layers by tracing (last linear, activation sites, conv layers and
their consumers), so this is where an architecture they cannot handle would show up. Each
cell checks only that the defense completes and returns a model with the right output; the
algorithms are tested in the per-defense files.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from benchmark.train import Augment, fit
from defenses.base import DefenseContext, Stage
from tests.benchmark.models.helpers import MODEL_NAMES, build_model
from tests.conftest import toy_set

CONF = Path(__file__).resolve().parents[2] / "conf"
DEFENSES = sorted(p.stem for p in (CONF / "defense").glob("*.yaml") if p.stem != "undefended")
SIZE, CLASSES = (16, 16), 4

# Toy sizes: one or two epochs, a few synthetic inputs, short inversions.
TOY: dict[str, dict[str, Any]] = {
    "ulrl": {
        "unlearn_epochs": 1,
        "relearn_epochs": 1,
        "batch_size": 8,
        "clean_fraction_of_train": 0.25,
    },
    "mmac": {
        "per_class": 2,
        "epochs": 2,
        "batch_size": 8,
        "synth_per_class": 2,
        "synth_steps": 2,
        "synth_every": 1,
        "c_start_after": 0,
        "c_every": 1,
    },
    "mmbm": {"per_class": 2, "epochs": 2, "batch_size": 8},
    "linf_prune": {
        "finetune_epochs": 1,
        "max_fraction": 0.05,
        "inversion_steps": 2,
        "inversion_batch_size": 8,
    },
    "ultraclean": {"batch_size": 8, "workers": 1},
    "NONE": {"rounds": 1, "finetune_epochs": 1, "finetune_batch_size": 8},
}

RECIPE = OmegaConf.create(
    {
        "epochs": 1,
        "batch_size": 8,
        "lr": 0.01,
        "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.01},
        "scheduler": None,
        "augment": False,
        "amp": False,
        "channels_last": False,
        "grad_clip": None,
    }
)


def test_every_defense_has_a_toy_size() -> None:
    assert set(TOY) == set(DEFENSES)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("defense_name", DEFENSES)
def test_defense_runs_on_model(defense_name: str, model_name: str, tmp_path: Path) -> None:
    cfg = OmegaConf.merge(
        OmegaConf.load(CONF / "defense" / f"{defense_name}.yaml"), TOY[defense_name]
    )
    defense = instantiate(cfg)
    train = toy_set(24, CLASSES, (3, *SIZE), seed=1)
    clean = toy_set(16, CLASSES, (3, *SIZE), seed=2)
    defense.validate(CLASSES, len(train), len(clean))
    new_model = functools.partial(build_model, model_name, 3, SIZE, CLASSES)
    model = new_model()
    ctx = DefenseContext(
        train_set=train,
        clean_set=clean,
        model=None if defense.stage == Stage.PRE_TRAINING else model,
        num_classes=CLASSES,
        fit=functools.partial(
            fit, recipe=RECIPE, device="cpu", seed=0, augment=Augment(1), progress=False
        ),
        new_model=new_model,
        seed=0,
        device=torch.device("cpu"),
        work_dir=tmp_path / "defense",
        recipe=RECIPE,
    )
    result = defense.run(ctx)
    result.model.eval()
    with torch.no_grad():
        assert result.model(torch.rand(2, 3, *SIZE)).shape == (2, CLASSES)
    if result.train_flags is not None:
        assert result.train_flags.shape == (len(train),)
