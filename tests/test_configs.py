"""Every option of every config group composes, and every component instantiates.

Registry-wide, timm style: a new YAML in conf/<group>/ is tested without touching this file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from benchmark.datasets.base import Dataset
from benchmark.errors import ConfigError, DatasetUnavailable
from benchmark.pipeline import instantiate_entry
from benchmark.tracking import Tracker
from tests.conftest import compose_cfg
from tests.registry import assert_registered

CONF = Path(__file__).resolve().parents[1] / "conf"
FOLDER_DATASETS = ("imagefolder", "tiny_imagenet")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_required_group_exists() -> None:
    for group in (
        "dataset",
        "model",
        "attack",
        "defense",
        "train",
        "logger",
        "paths",
        "hydra",
        "experiment",
        "debug",
        "track",
    ):
        assert options(group), f"conf/{group}/ is empty"


@pytest.mark.parametrize("name", options("dataset"))
def test_dataset_options(name: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"dataset={name}"], tmp_path)
    assert OmegaConf.select(cfg, "train.epochs") is not None  # each dataset picks a recipe
    assert cfg.dataset._target_.rsplit(".", 1)[0] == f"benchmark.datasets.{name}"
    if name in FOLDER_DATASETS:  # they need an existing root; the error says which
        with pytest.raises((ConfigError, DatasetUnavailable), match=r"root|tiny-imagenet"):
            instantiate_entry(cfg.dataset, "dataset")
        return
    ds = instantiate_entry(cfg.dataset, "dataset")
    assert isinstance(ds, Dataset) and ds.name == name
    ds.validate()
    assert ds.num_classes >= 2 and len(ds.image_shape) == 3


@pytest.mark.parametrize("name", options("model"))
def test_model_options(name: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"model={name}"], tmp_path)
    model = instantiate(
        cfg.model, num_classes=10, in_chans=1, image_size=(28, 28), mean=[0.5], std=[0.5]
    )
    assert type(model).__module__ == f"benchmark.models.{name}"
    assert model.last_linear().out_features == 10


@pytest.mark.parametrize("name", options("attack"))
def test_attack_options(name: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"attack={name}"], tmp_path)
    attack = instantiate_entry(cfg.attack, "attack")
    assert_registered(attack, name, "attacks", options("attack"))


@pytest.mark.parametrize("name", options("defense"))
def test_defense_options(name: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"defense={name}"], tmp_path)
    defense = instantiate_entry(cfg.defense, "defense")
    assert_registered(defense, name, "defenses", options("defense"))


@pytest.mark.parametrize("name", options("train"))
def test_train_options_build_optimizer_and_scheduler(name: str, tmp_path: Path) -> None:
    import torch

    from benchmark.recipe import build_optimizer, build_scheduler
    from benchmark.validate import check_recipe

    cfg = compose_cfg([f"train={name}"], tmp_path)
    check_recipe(cfg.train)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    opt, base = build_optimizer(cfg.train, list(model.parameters()), model)
    assert opt.param_groups[0]["lr"] == cfg.train.lr
    # a per-step scheduler (scheduler_interval: step) also gets total_steps
    build_scheduler(cfg.train, base, total_steps=100)


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options(name: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"logger={name}"], tmp_path)
    assert isinstance(instantiate(cfg.logger), Tracker)


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_options_compose(name: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"experiment={name}"], tmp_path)
    assert cfg.attack and cfg.defense and cfg.dataset


@pytest.mark.parametrize("name", options("track"))
def test_track_options_set_a_model_and_its_recipe_over_any_dataset(
    name: str, tmp_path: Path
) -> None:
    """A track beats the dataset's default recipe; debug=smoke still shrinks it, and the fast
    recipe's lr follows the batch size (per 1024 examples)."""
    expected = {"fast": ("fastnet", "fast"), "standard": ("preact_resnet18", "default")}
    model, train = expected[name.removesuffix("_cpu")]
    for dataset in ("cifar10", "mnist5k"):
        cfg = compose_cfg([f"dataset={dataset}", f"track={name}"], tmp_path)
        reference = compose_cfg([f"dataset={dataset}", f"train={train}"], tmp_path)
        assert cfg.model._target_.split(".")[-2] == model
        assert cfg.train.optimizer == reference.train.optimizer
        smoke = compose_cfg([f"dataset={dataset}", f"track={name}", "debug=smoke"], tmp_path)
        assert smoke.train.epochs == 1 and smoke.train.batch_size == 64
        if train == "fast":
            assert smoke.train.lr == pytest.approx(cfg.train.lr * 64 / 1024)
            assert smoke.train.optimizer.lr == smoke.train.lr


@pytest.mark.parametrize("name", options("debug"))
def test_debug_options_shrink_any_run(name: str, tmp_path: Path) -> None:
    cfg = compose_cfg(["dataset=cifar10", "model=preact_resnet18", f"debug={name}"], tmp_path)
    assert cfg.dataset.max_train <= 1000 and cfg.train.epochs <= 2


def test_train_override_beats_the_dataset_default(tmp_path: Path) -> None:
    assert compose_cfg(["dataset=cifar10"], tmp_path).train.epochs == 100
    assert compose_cfg(["dataset=cifar10", "train=small"], tmp_path).train.epochs == 10
    assert compose_cfg(["dataset=mnist5k"], tmp_path).train.epochs == 10


def test_struct_mode_rejects_unknown_keys(tmp_path: Path) -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_cfg(["attack.poison_rte=0.1"], tmp_path)
    cfg = compose_cfg([], tmp_path)
    with open_dict(cfg):
        cfg.extra = 1  # open_dict is the explicit escape hatch


@pytest.mark.parametrize("path", sorted((CONF / "attack_tuning").glob("*.yaml")), ids=str)
def test_attack_tuning_files_are_deltas_of_an_existing_attack_and_dataset(
    path: Path, tmp_path: Path
) -> None:
    attack, dataset = path.stem.split("_mnist5k")[0], "mnist5k"
    assert path.stem == f"{attack}_{dataset}" and attack in options("attack")
    delta = OmegaConf.load(path)
    tuned = compose_cfg([f"attack={attack}", f"dataset={dataset}"], tmp_path)
    plain = compose_cfg([f"attack={attack}", "dataset=digits"], tmp_path)
    for key, value in delta.attack.items():
        assert tuned.attack[key] == value  # applied on its dataset
        assert plain.attack[key] != value  # and only there
    # command-line overrides still win over the delta
    key = next(iter(delta.attack))
    over = compose_cfg([f"attack={attack}", f"attack.{key}=7"], tmp_path)
    assert over.attack[key] == 7
