"""The runner end to end (in process): records, definitions, validation, threat model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from benchmark import pipeline
from benchmark.datasets.base import Dataset
from benchmark.errors import ConfigError
from benchmark.results import DEFENDED_KEYS, STAGE_KEYS


def test_smoke_run_writes_a_complete_record(make_cfg, tmp_path: Path) -> None:
    record = pipeline.run(make_cfg(), run_dir=tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["status"] == "complete" and saved["error"] is None
    assert set(STAGE_KEYS) <= set(saved["backdoored"]) and set(DEFENDED_KEYS) <= set(
        saved["defended"]
    )
    for stage in ("backdoored", "defended"):
        for key in STAGE_KEYS:
            assert 0.0 <= saved[stage][key] <= 1.0
    # undefended: the defended model is the backdoored one, and nothing is detected
    assert {k: saved["defended"][k] for k in STAGE_KEYS} == saved["backdoored"]
    assert saved["defended"]["det_tpr"] is None and saved["defended"]["der"] == 0.5
    # smoke: 600 train images, 5% clean reserve, 10% of the rest poisoned
    assert saved["data"]["n_clean_reserve"] == 30 and saved["data"]["n_train"] == 570
    assert saved["attack"]["n_poison"] == 57
    assert saved["data"]["n_backdoor_test"] == 180  # the 200 test images minus class 0
    assert {"validate_s", "data_s", "train_s", "defense_s", "total_s"} <= set(saved["timing"])
    assert saved["memory"]["peak_rss_mb"] > 0
    prov = saved["provenance"]
    assert torch.__version__.startswith(prov["versions"]["torch"]) and prov["device"] == "cpu"
    assert {"git_commit", "git_dirty", "overrides", "timestamp", "cpu_capability"} <= set(prov)
    assert isinstance(prov["bf16_native"], bool) and prov["device_name"] != "x86_64"
    assert (tmp_path / "run" / "trigger_grid.png").exists()
    idx = torch.load(tmp_path / "run" / "indices.pt", weights_only=True)
    reserve, train = set(idx["reserve_index"].tolist()), set(idx["train_index"].tolist())
    assert len(reserve) == 30 and not reserve & train and reserve | train == set(range(600))
    assert len(idx["poison_index"]) == 57 and int(idx["poison_index"].max()) < 570
    assert record["backdoored"] == saved["backdoored"]


def test_same_config_and_seed_give_the_same_numbers(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("cache.enabled=false")
    a = pipeline.run(cfg, run_dir=tmp_path / "a")
    b = pipeline.run(cfg, run_dir=tmp_path / "b")
    assert a["backdoored"] == b["backdoored"] and a["train_history"] == b["train_history"]


def test_reserve_is_disjoint_from_training_and_stratified(make_cfg) -> None:
    cfg = make_cfg()
    comp = pipeline.build(cfg)
    data = pipeline.load_data(cfg, comp)
    assert len(data.reserve) == 30
    assert torch.bincount(data.reserve.y).tolist() == [3] * 10
    # Reserve images are untouched benign images: none equals a poisoned training image's slot.
    full, _ = comp.dataset.load()
    in_train = set(range(len(full))) - set(data.reserve_index.tolist())
    assert len(in_train) == len(data.train)
    assert torch.equal(data.reserve.x, full.x[data.reserve_index])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("attack.poison_rate=1.5", "attack.poison_rate"),
        ("attack.poison_rate=0", "attack.poison_rate"),
        ("attack.target_class=10", "attack.target_class"),
        ("defense_data.clean_fraction=0.999", "defense_data.clean_fraction"),
        ("defense_data.clean_fraction=1.0", "defense_data.clean_fraction"),
        ("dataset.max_train=5", "dataset.max_train"),
        ("train.epochs=0", "train.epochs"),
        ("train.lr=-1", "train.lr"),
        ("attack.size=40", "attack.size"),
    ],
)
def test_bad_values_fail_before_any_data_is_loaded(
    make_cfg, monkeypatch, tmp_path: Path, override: str, key: str
) -> None:
    def no_loading(self: Dataset) -> None:
        raise AssertionError("data were loaded before validation")

    monkeypatch.setattr(Dataset, "load", no_loading)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        pipeline.run(make_cfg(override), run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_defense_that_cannot_run_on_the_model_fails_before_any_data_is_loaded(
    make_cfg, monkeypatch, tmp_path: Path
) -> None:
    def no_loading(self: Dataset) -> None:
        raise AssertionError("data were loaded before the defense checked the model")

    monkeypatch.setattr(Dataset, "load", no_loading)
    with pytest.raises(ConfigError, match=r"^model: defense=anp masks batch-norm"):
        pipeline.run(make_cfg("defense=anp", "model=nin"), run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda_is_a_config_error(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg()
    with open_dict(cfg):
        cfg.device = "cuda"
    with pytest.raises(ConfigError, match="device"):
        pipeline.build(cfg)


@pytest.mark.slow
def test_badnets_on_mnist5k_learns(make_cfg, tmp_path: Path) -> None:
    """The default experiment: CA >= 0.95 and ASR >= 0.95 with the default recipe."""
    record = pipeline.run(make_cfg("progress=false", smoke=False), run_dir=tmp_path / "run")
    assert record["backdoored"]["clean_acc"] >= 0.95
    assert record["backdoored"]["asr"] >= 0.95
