"""Every ``conf/dataset/*.yaml``: naming rule, keys, defaults list, and Hydra instantiation."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from benchmark.datasets.base import Dataset

CONF = Path(__file__).resolve().parents[3] / "conf" / "dataset"
NAMES = sorted(p.stem for p in CONF.glob("*.yaml"))
SMALL = {"mnist5k", "digits", "mnist", "fashion_mnist"}
FILE_BACKED = {"mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "gtsrb"}


def test_all_datasets_have_configs() -> None:
    assert set(NAMES) >= SMALL | FILE_BACKED | {"imagefolder", "tiny_imagenet"}


@pytest.mark.parametrize("name", NAMES)
def test_config_follows_the_naming_rule(name: str) -> None:
    raw = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    recipe = "small" if name in SMALL else "default"
    assert raw["defaults"] == [{"/train@_global_.train": recipe}, "_self_"]
    target = raw["_target_"]
    assert target.startswith(f"benchmark.datasets.{name}.")
    cls = get_class(target)
    assert issubclass(cls, Dataset)
    assert cls.name == name
    assert cls.__module__ == importlib.import_module(f"benchmark.datasets.{name}").__name__
    params = set(inspect.signature(cls).parameters)
    if "common" in params:  # ``**common`` forwards the base class's keyword arguments
        params |= set(inspect.signature(Dataset.__init__).parameters) - {"self"}
    keys = set(raw) - {"defaults", "_target_"}
    assert keys <= set(params), f"keys the constructor does not take: {keys - set(params)}"
    assert {"max_train", "max_test", "seed"} <= keys
    assert raw["max_train"] is None
    assert raw["max_test"] is None
    assert raw["seed"] == 0
    if name in FILE_BACKED:
        assert raw["root"] == "${paths.data_dir}"
        assert raw["download"] is True


@pytest.mark.parametrize("name", sorted(SMALL | FILE_BACKED))
def test_config_instantiates_without_files(name: str, tmp_path: Path) -> None:
    """Construction is cheap: no files needed, nothing downloaded or decoded."""
    node = OmegaConf.load(CONF / f"{name}.yaml")
    del node["defaults"]
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path), "cache_dir": str(tmp_path)}})
    cfg.dataset = node
    ds = instantiate(cfg.dataset)
    assert ds.name == name
    ds.validate()
    assert ds.n_train == ds.train_size > 0
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_imagefolder_config_instantiates(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (5, 4)).save(tmp_path / split / c / "0.png")
    for name in ("imagefolder", "tiny_imagenet"):
        node = OmegaConf.load(CONF / f"{name}.yaml")
        del node["defaults"]
        cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path), "cache_dir": str(tmp_path)}})
        cfg.dataset = node
        cfg.dataset.root = str(tmp_path)
        ds = instantiate(cfg.dataset)
        assert ds.num_classes == 2
        assert ds.image_shape == (3, 4, 5)
