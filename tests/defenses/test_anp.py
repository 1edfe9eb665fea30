"""ANP: the perturbed batch-norm algebra, the noise ascent, the masks against the official
code's on a fixed input, threshold pruning and its reserve-only selection, and (slow) that it
removes a BadNets backdoor on mnist5k."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from benchmark import pipeline
from benchmark.errors import ConfigError
from defenses.anp import ANP, NeuronMasks, anp_step, norm_layers, prune, select_threshold
from defenses.anp import thresholds as grid

FIXTURE = Path(__file__).parent / "fixtures" / "anp_official.json"
CPU = torch.device("cpu")


def tiny_net() -> nn.Sequential:
    """The fixture's net (scratch make_fixture.py): conv-BN-ReLU twice, pool, linear."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )  # fmt: skip


def bn_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = tiny_net()
    with torch.no_grad():
        for _, bn in norm_layers(net):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.1, 0.1)
    return net


def test_the_perturbed_bn_is_gamma_times_mask_plus_noise_and_beta_times_one_plus_noise() -> None:
    net = bn_net().eval()
    masks = NeuronMasks(net, CPU)
    (name, bn), x = norm_layers(net)[0], torch.randn(5, 3, 6, 6)
    a = net[0](x)
    with torch.no_grad():
        masks.mask[0].copy_(torch.tensor([0.0, 0.5, 1.0, 0.25]))
        masks.noise[0].copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        masks.noise_bias[0].copy_(torch.tensor([0.4, 0.0, -0.1, 0.2]))
    for perturbed in (False, True):
        p = masks.params(perturbed)
        w = bn.weight * (masks.mask[0] + (masks.noise[0] if perturbed else 0))
        b = bn.bias * (1 + (masks.noise_bias[0] if perturbed else 0))
        expected = F.batch_norm(a, bn.running_mean, bn.running_var, w, b, False, 0.0, bn.eps)
        got = functional_call(net[1], {"weight": p[f"{name}.weight"], "bias": p[f"{name}.bias"]}, a)
        assert torch.allclose(got, expected, atol=1e-6)
    # mask 0, no noise: the channel is the constant beta (pruning keeps the bias)
    clean = functional_call(net[1], {"weight": masks.params(False)[f"{name}.weight"]}, a)
    assert torch.allclose(clean[:, 0], bn.bias[0].expand_as(clean[:, 0]), atol=1e-6)


def test_one_signed_ascent_step_moves_every_noise_by_exactly_eps() -> None:
    net, eps = bn_net().train(), 0.4
    for p in net.parameters():
        p.requires_grad_(False)
    masks = NeuronMasks(net, CPU)
    x, y = torch.rand(8, 3, 6, 6), torch.randint(0, 3, (8,))
    mask_opt = torch.optim.SGD(masks.mask, lr=0.2, momentum=0.9)
    noise_opt = torch.optim.SGD([*masks.noise, *masks.noise_bias], lr=eps)
    start = NeuronMasks(net, CPU)
    start.reset(eps, torch.Generator().manual_seed(5))
    anp_step(
        lambda p: functional_call(net, p, (x,)), masks, y, (mask_opt, noise_opt), eps, 1, 0.2,
        torch.Generator().manual_seed(5),
    )  # fmt: skip
    pairs = zip((*start.noise, *start.noise_bias), (*masks.noise, *masks.noise_bias), strict=True)
    for before, after in pairs:
        assert before.abs().max() <= eps
        moved = (after - before).abs()
        assert torch.allclose(moved[moved > 0], torch.full_like(moved[moved > 0], eps))
    assert all(((m >= 0) & (m <= 1)).all() for m in masks.mask)


def test_masks_match_the_official_code_on_a_fixed_input() -> None:
    """csdongxian/ANP_backdoor's mask_train with its NoisyBatchNorm2d, run in a scratch folder
    on the fixture's net and batches (commit and setting in the fixture): ours gives the same
    mask values when it draws the same noises."""
    ref = json.loads(FIXTURE.read_text())
    assert ref["source"].startswith("csdongxian/ANP_backdoor@ec7b179")
    net = tiny_net()
    net.load_state_dict({k: torch.tensor(v) for k, v in ref["state_dict"].items()})
    for p in net.parameters():
        p.requires_grad_(False)
    net.train()
    masks = NeuronMasks(net, CPU)
    mask_opt = torch.optim.SGD(masks.mask, lr=0.2, momentum=0.9)
    noise_opt = torch.optim.SGD([*masks.noise, *masks.noise_bias], lr=0.4)
    gen = torch.Generator().manual_seed(123)  # the official run's torch.manual_seed(123)
    losses = []
    for batch in ref["batches"]:
        x, y = torch.tensor(batch["x"]), torch.tensor(batch["y"])
        loss, _ = anp_step(
            lambda p, x=x: functional_call(net, p, (x,)), masks, y, (mask_opt, noise_opt), 0.4,
            1, 0.2, gen,
        )  # fmt: skip
        losses.append(loss)
    for ours, theirs in zip(masks.values(), ref["masks"], strict=True):
        assert torch.allclose(ours, torch.tensor(theirs), atol=1e-5), (ours, theirs)
    assert sum(losses) / len(losses) == pytest.approx(ref["loss"], abs=1e-5)
    assert any((torch.tensor(m) < 1).any() for m in ref["masks"])  # the masks did move


def test_threshold_pruning_zeroes_the_bn_weight_of_low_masks_only() -> None:
    net = bn_net()
    bias = [bn.bias.clone() for _, bn in norm_layers(net)]
    values = [torch.tensor([0.10, 0.15, 0.30, 0.90]), torch.ones(6)]
    assert prune(net, values, 0.2) == 2
    first = norm_layers(net)[0][1]
    assert first.weight[:2].eq(0).all() and first.weight[2:].ne(0).all()
    assert all(torch.equal(b, bn.bias) for b, (_, bn) in zip(bias, norm_layers(net), strict=True))
    counts = [prune(bn_net(), values, t) for t in grid(0.9, 0.05)]
    assert counts == sorted(counts) and counts[-1] == 4


def test_the_grid_and_the_reserve_only_selection() -> None:
    assert grid(0.9, 0.05)[-1] == 0.9 and len(grid(0.9, 0.05)) == 19 and grid(0.9, 0.05)[3] == 0.15
    curve = [(0.0, 0.90), (0.05, 0.89), (0.1, 0.85), (0.15, 0.80), (0.2, 0.70), (0.25, 0.82)]
    # |acc - 0.9| / 0.9 < 0.1 <=> acc > 0.81: 0.25 is admissible again (the largest wins)
    assert select_threshold(curve, 0.90, 0.1) == 0.25
    assert select_threshold([(0.0, 0.5), (0.05, 0.4)], 0.90, 0.1) == 0.0


def test_bad_settings_name_their_key() -> None:
    with pytest.raises(ConfigError, match=r"defense\.select"):
        ANP(select="test_asr")
    with pytest.raises(ConfigError, match=r"defense\.alpha"):
        ANP(alpha=1.5)
    with pytest.raises(ConfigError, match="batch-norm"):
        NeuronMasks(nn.Sequential(nn.Conv2d(1, 1, 1)), CPU)


@pytest.mark.slow
def test_anp_removes_a_badnets_backdoor_on_mnist5k(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        "defense=anp", "dataset.max_train=2000", "train.epochs=5", "defense.iterations=300",
        smoke=True,
    )  # fmt: skip
    record = pipeline.run(cfg, run_dir=tmp_path / "run")
    before, after = record["backdoored"], record["defended"]
    assert before["asr"] >= 0.9, before
    extras = record["defense_extras"]
    assert extras["n_pruned"] > 0 and extras["select"] == "reserve_acc"
    assert after["asr"] <= before["asr"] - 0.3, (before, after, extras)
    assert after["clean_acc"] >= before["clean_acc"] - 0.15, (before, after)
