"""CLP (defenses/clp.py): the channel bound, the threshold, the pairs, the masks, and the official
code's numbers on a fixed conv+BN net (fixtures/clp_official.json)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from benchmark.errors import ConfigError
from benchmark.models.base import ImageClassifier
from benchmark.models.preact_resnet18 import PreActResNet18
from defenses.clp import CLP, channel_bounds, outlier_channels, score_layers
from defenses.masking import MASK_BUFFER

FIXTURE = Path(__file__).parent / "fixtures" / "clp_official.json"


class FixedNet(ImageClassifier):
    """A plain conv -> BN -> ReLU net (one grouped conv, one max-pool before a BN) with seeded
    weights and BN statistics, some channels planted as outliers. Registration order equals
    execution order, so the official code's pairing and the tracer's agree."""

    head_name = "fc"

    def __init__(self) -> None:
        super().__init__(4, 3, (8, 8), [0.0] * 3, [1.0] * 3)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1, groups=2, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn2 = nn.BatchNorm2d(24)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(24, 12, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(12)
        self.relu3 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 4)
        g = torch.Generator().manual_seed(2208)
        with torch.no_grad():
            for conv, bn in (
                (self.conv1, self.bn1),
                (self.conv2, self.bn2),
                (self.conv3, self.bn3),
            ):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
                c = bn.num_features
                bn.weight.copy_(torch.randn(c, generator=g))  # some negative: |gamma| counts
                bn.bias.copy_(torch.randn(c, generator=g) * 0.1)
                bn.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
                bn.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            self.conv1.weight[5] *= 6.0  # planted outliers
            self.conv2.weight[[3, 17]] *= 5.0
            self.bn3.weight[7] = -8.0
            self.fc.weight.copy_(torch.randn(self.fc.weight.shape, generator=g))
            self.fc.bias.zero_()

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(self.normalize(x))))
        x = self.relu2(self.bn2(self.pool(self.conv2(x))))
        return self.gap(self.relu3(self.bn3(self.conv3(x)))).flatten(1)


def weights_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def conv_bn(weight: Tensor, gamma: Tensor, var: Tensor) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    c_out, c_in, kh, kw = weight.shape
    conv = nn.Conv2d(c_in, c_out, (kh, kw), bias=False)
    bn = nn.BatchNorm2d(c_out)
    with torch.no_grad():
        conv.weight.copy_(weight)
        bn.weight.copy_(gamma)
        bn.running_var.copy_(var)
    return conv, bn


# -- the channel bound ------------------------------------------------------------------------
def test_bound_of_a_one_input_kernel_is_its_l2_norm() -> None:
    w = torch.zeros(3, 1, 3, 3)
    w[0, 0, 1, 1] = 10.0  # one-hot kernel of value 10
    w[1, 0] = torch.arange(9.0).view(3, 3)  # norm sqrt(204)
    w[2, 0, 0, :] = torch.tensor([3.0, 4.0, 0.0])  # norm 5
    conv, bn = conv_bn(w, torch.ones(3), torch.ones(3))
    assert torch.allclose(
        channel_bounds(conv, bn), torch.tensor([10.0, math.sqrt(204), 5.0]).double()
    )


def test_bound_of_a_two_input_kernel_is_the_spectral_norm() -> None:
    # Rows a = (1, 0, ..., 0) * 3 and b = (0, 1, 0, ...) * 4 are orthogonal: sigma_max = 4.
    # Rows a = b = (1, 1, 0, ...): rank one, sigma_max = ||a|| * sqrt(2) = 2.
    w = torch.zeros(2, 2, 3, 3)
    w[0, 0, 0, 0], w[0, 1, 0, 1] = 3.0, 4.0
    w[1, :, 0, :2] = 1.0
    conv, bn = conv_bn(w, torch.ones(2), torch.ones(2))
    assert torch.allclose(channel_bounds(conv, bn), torch.tensor([4.0, 2.0]).double())


def test_bound_scales_by_abs_gamma_over_sigma_and_ignores_eps() -> None:
    w = torch.zeros(3, 1, 1, 1)
    w[:, 0, 0, 0] = 2.0
    # gamma 2, var 4: factor 1; gamma -3, var 1: factor 3; gamma 1, var 0.25: factor 2.
    conv, bn = conv_bn(w, torch.tensor([2.0, -3.0, 1.0]), torch.tensor([4.0, 1.0, 0.25]))
    assert torch.allclose(channel_bounds(conv, bn), torch.tensor([2.0, 6.0, 4.0]).double())


# -- the threshold ----------------------------------------------------------------------------
def test_threshold_prunes_the_outlier_of_sixteen() -> None:
    bounds = torch.tensor([10.0] + [1.0] * 15)
    # mean 1.5625, unbiased std 2.25: threshold 8.3125 at u = 3.
    assert float(bounds.mean()) == pytest.approx(1.5625)
    assert float(bounds.std()) == pytest.approx(2.25)
    assert outlier_channels(bounds, 3.0).tolist() == [0]
    assert outlier_channels(bounds, 4.0).tolist() == []  # 1.5625 + 9 > 10


def test_threshold_never_prunes_a_layer_of_ten_or_fewer_at_u3() -> None:
    for n in range(2, 11):
        assert outlier_channels(torch.tensor([1e6] + [1.0] * (n - 1)), 3.0).numel() == 0, n
    assert outlier_channels(torch.tensor([1e6] + [1.0] * 10), 3.0).tolist() == [0]


def test_channels_above_the_threshold_are_masked_to_zero() -> None:
    model = FixedNet().eval()
    defended = CLP(u=2.0).run(_ctx(model)).model.eval()
    layers = score_layers(model, 2.0)
    x = torch.rand(3, 3, 8, 8)
    outs: dict[str, Tensor] = {}
    hooks = [
        defended.get_submodule(layer.norm_name).register_forward_hook(
            lambda m, i, o, n=layer.norm_name: outs.__setitem__(n, o)
        )
        for layer in layers
    ]
    with torch.no_grad():
        defended(x)
    for h in hooks:
        h.remove()
    assert sum(len(layer.pruned) for layer in layers) > 0
    for layer in layers:
        bounds = layer.bounds
        expected = torch.nonzero(bounds > bounds.mean() + 2.0 * bounds.std()).flatten()
        assert torch.equal(layer.pruned, expected)
        kept = torch.ones(len(bounds), dtype=torch.bool)
        kept[expected] = False
        out = outs[layer.norm_name]
        assert torch.all(out[:, ~kept] == 0)
        assert torch.all(out[:, kept].abs().sum((0, 2, 3)) > 0)


# -- the mechanism on a planted backdoor ------------------------------------------------------
CHECKER = (torch.arange(3)[:, None] + torch.arange(3)[None, :]) % 2 == 0  # 5 white, 4 black


class PlantedNet(ImageClassifier):
    """3 classes on 1x16x16 images: class c is a bright band of rows ``[4c, 4c + 4)``, read by
    channel 0 (a 3x3 mean, spectral norm 1/3). Channels 1-14: seeded kernels of norm 0.3-0.5
    the head ignores. Channel 15 detects a 3x3 checkerboard (+2 white, -3 black, bias -5: norm
    sqrt(56), dormant on clean images); its maximum in rows 12-15 pushes class 2. BN has
    identity statistics, so the bounds are the kernels' norms."""

    def __init__(self) -> None:
        super().__init__(3, 1, (16, 16), [0.0], [1.0])
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.ReLU()
        self.avg = nn.AdaptiveAvgPool2d((4, 1))
        self.max = nn.AdaptiveMaxPool2d((4, 1))
        self.fc = nn.Linear(8, 3)
        g = torch.Generator().manual_seed(0)
        w, b = torch.zeros(16, 1, 3, 3), torch.zeros(16)
        w[0] = 1.0 / 9
        for k in range(1, 15):
            r = torch.randn(3, 3, generator=g)
            w[k, 0] = r / r.norm() * (0.3 + 0.2 * k / 14)
        w[15, 0], b[15] = torch.where(CHECKER, 2.0, -3.0), -5.0
        head = torch.zeros(3, 8)
        for c in range(3):
            head[c, c] = 10.0
        head[2, 7] = 3.0
        with torch.no_grad():
            self.conv.weight.copy_(w)
            self.conv.bias.copy_(b)
            self.fc.weight.copy_(head)
            self.fc.bias.zero_()

    def forward_features(self, x: Tensor) -> Tensor:
        a = self.act(self.bn(self.conv(self.normalize(x))))
        return torch.cat([self.avg(a[:, :1]), self.max(a[:, 15:])], 1).flatten(1)


def bands(n: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % 3
    x = 0.3 * torch.rand(n, 1, 16, 16, generator=g)
    for c in range(3):
        x[y == c, :, 4 * c : 4 * c + 4] = 0.8 + 0.2 * torch.rand(
            int((y == c).sum()), 1, 4, 16, generator=g
        )
    return x, y


def test_mechanism_the_planted_trigger_channel_is_pruned_and_asr_falls() -> None:
    model = PlantedNet().eval()
    x, y = bands(90)
    xt = x[y != 2].clone()
    xt[:, 0, 13:, 13:] = CHECKER.float()

    def rates(m: nn.Module) -> tuple[float, float]:
        with torch.no_grad():
            return float((m(x).argmax(1) == y).float().mean()), float(
                (m(xt).argmax(1) == 2).float().mean()
            )

    assert rates(model) == (1.0, 1.0)
    layers = score_layers(model, 3.0)
    assert layers[0].bounds[15] == pytest.approx(math.sqrt(56))
    assert layers[0].bounds[0] == pytest.approx(1 / 3)
    result = CLP().run(_ctx(model))  # type: ignore[arg-type]
    assert result.extras["pruned"] == "bn:15"
    assert rates(result.model) == (1.0, 0.0)


# -- the pairs and the run --------------------------------------------------------------------
def test_preact_pairs_are_the_traced_conv_bn_pairs() -> None:
    model = PreActResNet18(10, 3, (32, 32), [0.5] * 3, [0.25] * 3, width=4)
    pairs = [(layer.conv_name, layer.norm_name) for layer in score_layers(model, 3.0)]
    blocks = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert pairs == [("conv1", "layer1.0.bn1")] + [(f"{b}.conv1", f"{b}.bn2") for b in blocks]


def _ctx(model: nn.Module):  # only what CLP reads: the model
    class Ctx:
        pass

    ctx = Ctx()
    ctx.model = model  # type: ignore[attr-defined]
    return ctx


def test_run_masks_a_copy_and_reports() -> None:
    model = FixedNet().eval()
    state = copy.deepcopy(model.state_dict())
    result = CLP().run(_ctx(model))  # type: ignore[arg-type]
    assert result.model is not model
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(MASK_BUFFER in k for k in model.state_dict())
    masks = {k: v for k, v in result.model.state_dict().items() if k.endswith(MASK_BUFFER)}
    assert masks, "the planted outliers are pruned at u = 3"
    zeros = sum(int((v == 0).sum()) for v in masks.values())
    assert result.extras["channels_pruned"] == zeros
    assert result.extras["layers_scored"] == 3 and result.extras["channels_scored"] == 52
    assert all(isinstance(v, int | float | str) for v in result.extras.values())


def test_bad_u_names_its_key() -> None:
    for bad in ("3", None, True, float("nan")):
        with pytest.raises(ConfigError, match=r"defense\.u"):
            CLP(u=bad)  # type: ignore[arg-type]


# -- the official code's numbers --------------------------------------------------------------
def test_matches_the_official_code_on_the_fixed_net() -> None:
    """Bounds and pruned channels of rkteddy/channel-Lipschitzness-based-pruning's ``CLP`` and
    BackdoorBench's ``CLP_prune``, run on ``FixedNet`` (``/work/scratch/clp/run_official.py``)."""
    ref = json.loads(FIXTURE.read_text())
    model = FixedNet().eval()
    assert weights_sha256(model) == ref["weights_sha256"], "the fixed net drifted"
    for u, official in ref["runs"].items():
        layers = score_layers(model, float(u))
        assert [layer.norm_name for layer in layers] == list(official)
        for layer in layers:
            want = official[layer.norm_name]
            assert torch.allclose(layer.bounds, torch.tensor(want["bounds"]).double(), rtol=1e-5)
            assert layer.pruned.tolist() == want["pruned"], (u, layer.norm_name)
            assert want["pruned"] == want["pruned_backdoorbench"]


@pytest.mark.slow
def test_works_on_mnist5k(make_cfg, tmp_path: Path) -> None:
    """A BadNets small_cnn on mnist5k (smoke size, 4 epochs) through the whole cell: every
    conv -> BN pair of small_cnn is scored, the record holds the defended metrics, and pruning
    the outlier channels costs little clean accuracy."""
    from benchmark import pipeline

    record = pipeline.run(make_cfg("defense=clp", "train.epochs=4"), run_dir=tmp_path / "run")
    assert record["status"] == "complete", record.get("error")
    extras = record["defense_extras"]
    assert extras["layers_scored"] == 3 and extras["channels_scored"] == 32 + 64 + 128
    assert 0 <= extras["channels_pruned"] <= 0.1 * extras["channels_scored"]
    drop = record["backdoored"]["clean_acc"] - record["defended"]["clean_acc"]
    assert drop <= 0.1, record["defended"]
