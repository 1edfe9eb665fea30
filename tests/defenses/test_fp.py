"""Fine-Pruning: the signed mean-activation ranking, the step schedule, the reserve-accuracy stop
rule, masks that survive fine-tuning, the mechanism on a hand-made model with planted trigger
channels, the settings, BackdoorBench's own numbers on the fixed fidelity input
(``fixtures/fp_backdoorbench.json``), and (slow) BadNets on mnist5k."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import defenses.fp as fp_module
from benchmark.errors import ConfigError
from benchmark.models.preact_resnet18 import PreActResNet18
from benchmark.train import fit
from defenses.fp import FP, mean_activations, prune_steps, stop_step
from defenses.linf_scores import accuracy, rank_channels
from defenses.masking import MASK_BUFFER, install_mask, set_pruned
from defenses.prune_sites import find_site
from tests.conftest import toy_set
from tests.defenses import fidelity, test_ft
from tests.defenses.test_ft import works_record
from tests.defenses.test_linf_prune import (
    TRIGGER_CHANNELS,
    TriggerNet,
    band_data,
    grab,
    make_ctx,
    real_trigger_asr,
    small_cnn,
)
from tests.defenses.toys import KW, RECIPE

CPU = torch.device("cpu")
CONF = Path(__file__).resolve().parents[2] / "conf"
FIXTURE = json.loads((fidelity.FIXTURES / "fp_backdoorbench.json").read_text())


# -- ranking, schedule, stop rule ---------------------------------------------------------------
def test_mean_activations_are_the_channel_means_of_the_site() -> None:
    model = small_cnn().eval()
    data = toy_set(n=40, num_classes=4, shape=(3, 12, 12))
    site = find_site(model)
    scores = mean_activations(model, site, data, CPU, batch_size=16)
    maps = grab(model, site.module, data.x.float() / 255)
    torch.testing.assert_close(scores, maps.mean(dim=(0, 2, 3)))


def test_ranking_is_signed_and_masking_the_site_zeroes_backdoorbenchs_column() -> None:
    """PreAct-ResNet's site is the layer4 output (the residual stream: signed). The lowest,
    negative means rank first (BackdoorBench's ``argsort`` of the signed mean), and masking a
    channel there gives the logits of BackdoorBench's pruning, a zeroed ``linear`` column."""
    torch.manual_seed(0)
    model = PreActResNet18(**{**KW, "image_size": (16, 16)}, width=8).eval()
    data = toy_set(n=24, num_classes=4, shape=(3, 16, 16))
    site = find_site(model)
    assert (site.name, site.kind) == ("layer4", "block")
    scores = mean_activations(model, site, data, CPU, batch_size=8)
    with torch.no_grad():
        pooled = model.forward_features(data.x.float() / 255)
    torch.testing.assert_close(scores, pooled.mean(0), rtol=1e-5, atol=1e-6)
    assert (scores < 0).any()
    order = rank_channels(scores, descending=False)
    assert scores[order[0]] == scores.min() and scores[order[0]] < 0

    x = torch.rand(5, 3, 16, 16)
    pruned = order[:7]
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.linear.weight[:, pruned] = 0.0
        expected = zeroed(x)
    set_pruned(install_mask(site.module, site.channels), pruned)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)


def test_prune_steps() -> None:
    assert prune_steps(512, 0.01)[:3] == [6, 12, 18] and prune_steps(512, 0.01)[-1] == 510
    assert prune_steps(32, 0.01) == list(range(1, 32))  # ceil(0.32) = 1
    assert prune_steps(32, 0.1) == [4, 8, 12, 16, 20, 24, 28]
    assert prune_steps(10, 0.5) == [5] and prune_steps(1, 0.01) == []  # one channel stays


def test_stop_rule_keeps_the_last_step_above_the_relative_budget() -> None:
    curve = {0: 0.8, 2: 0.8, 4: 0.76, 6: 0.73, 8: 0.70, 10: 0.2}
    seen: list[int] = []

    def acc_at(k: int) -> float:
        seen.append(k)
        return curve[k]

    # 0.76: 5% below 0.8, 0.73: 8.75%, 0.70: 12.5% -> stop there, keep 6.
    assert stop_step(acc_at, 0.8, [2, 4, 6, 8, 10], 0.1) == (
        6,
        "acc_budget",
        [(2, 0.8), (4, 0.76), (6, 0.73), (8, 0.70)],
    )
    assert seen == [2, 4, 6, 8]  # nothing after the failing step is tried
    assert stop_step(acc_at, 0.8, [2, 4], 0.1)[:2] == (4, "all_steps")
    assert stop_step(lambda k: 0.95, 0.8, [2, 4], 0.1)[:2] == (4, "all_steps")  # a rise is kept
    assert stop_step(lambda k: 0.0, 0.0, [2, 4], 0.1)[:2] == (0, "acc_budget")  # acc0 = 0


# -- the run --------------------------------------------------------------------------------------
def test_run_prunes_a_copy_on_the_reserve_only_then_fine_tunes(tmp_path: Path, monkeypatch) -> None:
    model = small_cnn()
    clean = toy_set(n=64, num_classes=4, shape=(3, 12, 12))
    fit(model, clean, RECIPE, progress=False)
    state = copy.deepcopy(model.state_dict())
    ctx = make_ctx(model, clean, tmp_path)
    object.__setattr__(ctx, "train_set", toy_set(n=32, num_classes=4, shape=(3, 12, 12), seed=5))
    calls: list[dict] = []
    real_fit = ctx.fit
    object.__setattr__(
        ctx, "fit", lambda m, d, **kw: calls.append({"d": d, **kw}) or real_fit(m, d, **kw)
    )
    evaluated: list[object] = []
    real_accuracy = fp_module.accuracy

    def spy_accuracy(m, data, device, batch_size):
        evaluated.append(data)
        return real_accuracy(m, data, device, batch_size)

    monkeypatch.setattr(fp_module, "accuracy", spy_accuracy)
    result = FP(max_relative_acc_drop=0.2, step_fraction=0.125, epochs=1, batch_size=16).run(ctx)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # input intact
    assert not hasattr(model.block3[2], MASK_BUFFER)
    assert evaluated and all(d is ctx.clean_set for d in evaluated)  # the stop rule: reserve
    assert len(calls) == 1 and calls[0]["d"] is ctx.clean_set
    assert (calls[0]["recipe"].epochs, calls[0]["recipe"].batch_size) == (1, 16)
    ex = result.extras
    assert (ex["layer"], ex["n_channels"], ex["prune_step"]) == ("block3.2", 16, 2)
    assert ex["n_pruned"] % 2 == 0 and ex["n_pruned"] < 16
    assert ex["reserve_acc_pruned"] > (1 - 0.2) * ex["reserve_acc_before"]
    mask = getattr(result.model.block3[2], MASK_BUFFER)
    assert int((mask == 0).sum()) == ex["n_pruned"]
    maps = grab(result.model, result.model.block3[2], torch.rand(4, 3, 12, 12))
    assert (maps[:, mask == 0] == 0).all()  # fine-tuning did not revive a pruned channel


def test_mechanism_prunes_the_dormant_trigger_channels(tmp_path: Path) -> None:
    """TriggerNet: channel 0 carries the task, 1-4 are active but unused, 5 is dead, 6-7 fire
    only on the trigger. The dormant ones rank first; pruning stops before channel 0."""
    model = TriggerNet().eval()
    data = band_data(150, 0)
    site = find_site(model)
    order = rank_channels(mean_activations(model, site, data, CPU, 64), descending=False)
    assert set(order[:3].tolist()) == TRIGGER_CHANNELS | {5}
    result = FP(epochs=0).run(make_ctx(model, data, tmp_path))
    pruned = set((getattr(result.model.act, MASK_BUFFER) == 0).nonzero().flatten().tolist())
    assert pruned >= TRIGGER_CHANNELS and 0 not in pruned
    assert result.extras["stop_reason"] == "acc_budget"  # pruning channel 0 failed
    assert result.extras["reserve_acc_pruned"] == 1.0
    assert real_trigger_asr(result.model, data) == 0.0
    assert real_trigger_asr(model, data) == 1.0  # the input model is untouched


# -- against BackdoorBench ----------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    "run", FIXTURE["runs"], ids=lambda r: f"{r['once_prune_ratio']}-{r['acc_ratio']}"
)
def test_matches_backdoorbench_fine_prune(run: dict, tmp_path: Path) -> None:
    """BackdoorBench's ``FinePrune.defense`` (f02e353) on the stored narrow ResNet-18 and clean
    images (its "test set" = the reserve): the same activations and order; at each of its steps
    (``num_pruned`` masks ``num_pruned - 1`` channels) the same reserve accuracy; the same stop
    decision, except that BackdoorBench keeps the failing step (in-place aliasing) where we keep
    the last passing one."""
    inputs = FIXTURE["inputs"]
    model = fidelity.load_model()
    clean = fidelity.clean_set(inputs["per_class"], seed=inputs["seed"], signal=inputs["signal"])
    assert fidelity.model_sha256(model) == inputs["model_sha256"], "model drifted"
    assert fidelity.sha256(clean.x, clean.y) == inputs["clean_sha256"], "data drifted"
    site = find_site(model)
    assert (site.name, site.channels) == ("layer4.1.relu2", 32)  # its pooled map: BB's input
    scores = mean_activations(model, site, clean, CPU, 64)
    torch.testing.assert_close(scores, torch.tensor(run["activation"]), rtol=1e-5, atol=1e-6)
    order = rank_channels(scores, descending=False)
    assert order.tolist() == run["seq_sort"]

    mask = install_mask(site.module, site.channels)
    bb_curve = []
    for step in run["steps"]:
        k = max(step["num_pruned"] - 1, 0)  # BackdoorBench's off-by-one
        set_pruned(mask, order[:k])
        assert accuracy(model, clean, CPU, 64) == pytest.approx(step["test_acc"], abs=1e-9)
        bb_curve.append((k, step["test_acc"]))
    acc0, ratio = run["steps"][0]["test_acc"], run["acc_ratio"]
    # BackdoorBench's break step (the last it evaluated) and what it hands to fine-tuning.
    failing = run["steps"][-1]["num_pruned"] - 1
    assert (acc0 - run["steps"][-1]["test_acc"]) / acc0 >= ratio
    assert run["final_pruned_columns"] == sorted(run["seq_sort"][:failing])
    # Our rule on its curve stops at the same step and keeps the one before.
    table = dict(bb_curve)
    kept, reason, _ = stop_step(table.__getitem__, acc0, [k for k, _ in bb_curve[1:]], ratio)
    assert reason == "acc_budget" and kept == bb_curve[-2][0]


@pytest.mark.usefixtures("one_thread")
def test_run_on_the_fixture_keeps_the_step_before_backdoorbenchs(tmp_path: Path) -> None:
    """Steps of one channel (ceil(0.01 * 32)): BackdoorBench stops at 9 pruned channels
    (0.88 < 0.9 * 1.0) and keeps them; ``fp`` keeps 8, the last within the budget."""
    run = FIXTURE["runs"][0]
    assert (run["once_prune_ratio"], run["acc_ratio"]) == (0.01, 0.1)
    inputs = FIXTURE["inputs"]
    model = fidelity.load_model()
    clean = fidelity.clean_set(inputs["per_class"], seed=inputs["seed"], signal=inputs["signal"])
    result = FP(epochs=0, batch_size=64).run(make_ctx(model, clean, tmp_path))
    mask = getattr(result.model.get_submodule("layer4.1.relu2"), MASK_BUFFER)
    pruned = sorted((mask == 0).nonzero().flatten().tolist())
    assert len(run["final_pruned_columns"]) == 9
    assert pruned == sorted(run["seq_sort"][:8])
    assert result.extras["reserve_acc_pruned"] == pytest.approx(run["steps"][-2]["test_acc"])


one_thread = fidelity.one_thread
works_cache = test_ft.works_cache  # the session's shared cache of the works cell


# -- settings -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"max_relative_acc_drop": 0.0}, "defense.max_relative_acc_drop"),
        ({"max_relative_acc_drop": 1.5}, "defense.max_relative_acc_drop"),
        ({"step_fraction": 0.0}, "defense.step_fraction"),
        ({"step_fraction": 2.0}, "defense.step_fraction"),
        ({"epochs": -1}, "defense.epochs"),
        ({"lr": 0.0}, "defense.lr"),
        ({"batch_size": 0}, "defense.batch_size"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        FP(**kwargs)
    assert err.value.key == key


def test_validate_needs_a_clean_reserve() -> None:
    with pytest.raises(ConfigError, match="fp needs") as err:
        FP().validate(num_classes=4, n_train=100, n_clean=0)
    assert err.value.key == "defense_data.clean_fraction"


def test_the_config_is_the_class_defaults() -> None:
    cfg = OmegaConf.load(CONF / "defense/fp.yaml")
    defense = FP(**{k: v for k, v in cfg.items() if k != "_target_"})
    assert vars(defense) == vars(FP())
    assert (cfg.max_relative_acc_drop, cfg.step_fraction, cfg.epochs) == (0.1, 0.01, 100)


# -- works (slow) ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_fp_lowers_badnets_asr_on_mnist5k_and_keeps_clean_accuracy(
    tmp_path: Path, works_cache: Path
) -> None:
    record = works_record("fp", tmp_path, works_cache)
    bd, df = record["backdoored"], record["defended"]
    assert bd["asr"] > 0.9 and bd["clean_acc"] > 0.6  # the backdoor is there
    assert df["asr"] < bd["asr"] - 0.3
    assert df["clean_acc"] > bd["clean_acc"] - 0.05
    assert record["defense_extras"]["n_pruned"] > 0
