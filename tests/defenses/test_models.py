"""Every defense runs on every model of the harness (conf/model/), at a toy size.

The defenses find their layers by tracing (last linear, activation sites, conv layers and
their consumers), so this is where an architecture they cannot handle would show up. Each
cell checks only that the defense completes and returns a model with the right output; the
algorithms are tested in the per-defense files.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from benchmark.errors import ConfigError
from benchmark.train import Augment, fit
from defenses.base import DefenseContext, Stage
from tests.benchmark.models.helpers import MODEL_NAMES, build_model
from tests.conftest import toy_set
from tests.registry import base_entry, load_entry

CONF = Path(__file__).resolve().parents[2] / "conf"
DEFENSES = sorted(p.stem for p in (CONF / "defense").glob("*.yaml"))
SIZE, CLASSES = (16, 16), 4

# A defense's toy size is its own config, conf/defense_debug/<defense>_toy.yaml (also what
# debug=toy selects); here a config-only variant without one takes its base entry's. Every defense
# needs one, except (each with its reason):
NO_TOY_SIZE: dict[str, str] = {
    "undefended": "no settings: it returns the model as it is",
}
# The cells a defense refuses, by its ``check_model`` (before any training, with one line naming
# ``model``), each with its reason. Every other cell must run.
UNSUPPORTED: dict[tuple[str, str], str] = {
    ("anp", "nin"): "ANP masks batch-norm channels; NiN has no batch norm",
}


def toy_config(name: str) -> DictConfig:
    """The defense's config with its toy size merged in."""
    cfg = load_entry("defense", name)
    for entry in (name, base_entry("defense", name)):
        path = CONF / "defense_debug" / f"{entry}_toy.yaml"
        if path.is_file():
            return OmegaConf.merge(cfg, OmegaConf.load(path).defense)  # type: ignore[return-value]
    assert name in NO_TOY_SIZE, f"conf/defense_debug/{name}_toy.yaml is missing"
    return cfg


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
    assert set(NO_TOY_SIZE) <= set(DEFENSES)  # no stale exclusion
    for name in DEFENSES:
        has = any(
            (CONF / "defense_debug" / f"{e}_toy.yaml").is_file()
            for e in (name, base_entry("defense", name))
        )
        assert has or name in NO_TOY_SIZE, f"conf/defense_debug/{name}_toy.yaml is missing"


@pytest.mark.slow
@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("defense_name", DEFENSES)
def test_defense_runs_on_model(defense_name: str, model_name: str, tmp_path: Path) -> None:
    defense = instantiate(toy_config(defense_name))
    train = toy_set(24, CLASSES, (3, *SIZE), seed=1)
    clean = toy_set(16, CLASSES, (3, *SIZE), seed=2)
    defense.validate(CLASSES, len(train), len(clean))
    new_model = functools.partial(build_model, model_name, 3, SIZE, CLASSES)
    model = new_model()
    if (defense_name, model_name) in UNSUPPORTED:
        with pytest.raises(ConfigError, match=r"^model: "):
            defense.check_model(model)
        return
    defense.check_model(model)
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
