"""NONE: the exact Jenks split, the hyperplane score, the traced reset slices, frozen norms while
fine-tuning, monitored layers per model, the settings, and (slow) the mechanism on a hand-made
model with a planted trigger "switch" channel."""

from __future__ import annotations

import copy
import functools
import itertools
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from benchmark.data import to_float, to_uint8
from benchmark.errors import ConfigError
from benchmark.models.base import ImageClassifier
from benchmark.models.nin import NiN
from benchmark.models.preact_resnet18 import PreActResNet18
from benchmark.models.resnet18 import ResNet18
from benchmark.models.small_cnn import SmallCNN
from benchmark.models.vgg16_bn import VGG16BN
from benchmark.pipeline import instantiate_entry
from benchmark.seeding import generator
from benchmark.train import fit, predict
from benchmark.types import ImageSet
from defenses.base import DefenseContext
from defenses.none import NONE
from defenses.none_passes import frozen_norms, summed_activation
from defenses.none_reset import reset_channels, reset_sites
from defenses.none_scores import (
    HyperplaneStats,
    hyperplane_scores,
    jenks_flags,
    jenks_two_classes,
    n_reset,
    top_channels,
)
from tests.conftest import compose_cfg, toy_set
from tests.defenses.toys import KW, RECIPE


def small_cnn(seed: int = 0, size: int = 12, num_classes: int = 4) -> SmallCNN:
    """A 4-wide SmallCNN (convs of 4, 8, 16 channels) on 3x``size``x``size`` images."""
    torch.manual_seed(seed)
    return SmallCNN(num_classes, 3, (size, size), [0.5] * 3, [0.25] * 3, width=4)


def make_ctx(model: nn.Module, data: ImageSet, tmp_path: Path, seed: int = 0) -> DefenseContext:
    return DefenseContext(
        train_set=data,
        clean_set=data.subset(torch.arange(0)),
        model=model,
        num_classes=data.num_classes,
        fit=functools.partial(fit, recipe=OmegaConf.create(RECIPE), progress=False),
        new_model=small_cnn,
        seed=seed,
        device=torch.device("cpu"),
        work_dir=tmp_path,
        recipe=OmegaConf.create(RECIPE),
    )


# -- Jenks natural breaks -------------------------------------------------------------------------
def brute_force_sse(values: Tensor) -> float:
    """The least within-class sum of squares over every split point of the sorted values."""
    v = sorted(values.double().tolist())
    best = math.inf
    for s in range(1, len(v)):
        lo = torch.tensor(v[:s], dtype=torch.float64)
        hi = torch.tensor(v[s:], dtype=torch.float64)
        cost = float(((lo - lo.mean()) ** 2).sum() + ((hi - hi.mean()) ** 2).sum())
        best = min(best, cost)
    return best


def sse_of(values: Tensor, flags: Tensor) -> float:
    v = values.double()
    lo, hi = v[~flags], v[flags]
    return float(((lo - lo.mean()) ** 2).sum() + ((hi - hi.mean()) ** 2).sum())


@pytest.mark.parametrize(("seed", "kind"), list(itertools.product(range(12), ["ties", "normal"])))
def test_jenks_is_the_exact_two_class_optimum(seed: int, kind: str) -> None:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 60, (1,), generator=g))
    if kind == "ties":  # few distinct values: many ties, splits inside runs of ties exist
        values = torch.randint(0, 5, (n,), generator=g).double()
        values[0], values[-1] = 0.0, 4.0  # at least two distinct values
    else:
        values = torch.cat([torch.randn(n, generator=g), 4 + torch.randn(n // 4, generator=g)])
    split = jenks_two_classes(values)
    assert split is not None
    brute = brute_force_sse(values)
    assert split.sse == pytest.approx(brute, rel=1e-9, abs=1e-9)
    flags, same = jenks_flags(values)
    assert same == split
    # The flags are a threshold split and realise the optimal cost.
    assert int(flags.sum()) == split.n_upper and 0 < split.n_upper < len(values)
    assert bool((values[flags] > split.threshold).all())
    assert bool((values[~flags] <= split.threshold).all())
    assert split.upper_min == float(values[flags].min()) > split.threshold
    assert split.threshold == float(values[~flags].max())
    assert sse_of(values, flags) == pytest.approx(brute, rel=1e-9, abs=1e-9)


def test_jenks_on_a_hand_made_sample() -> None:
    values = torch.tensor([11.0, 1.0, 3.0, 12.0, 2.0, 10.0, 3.0])
    split = jenks_two_classes(values)
    assert split is not None
    assert (split.threshold, split.upper_min, split.n_upper) == (3.0, 10.0, 3)
    assert split.sse == pytest.approx(2.75 + 2.0)  # {1, 2, 3, 3}: 2.75; {10, 11, 12}: 2
    flags, _ = jenks_flags(values)
    assert flags.tolist() == [True, False, False, True, False, True, False]
    # The official rule (u >= breaks[1]) also flags the lower class's largest value(s).
    official, _ = jenks_flags(values, include_break=True)
    assert official.tolist() == [True, False, True, True, False, True, True]


def test_jenks_without_two_distinct_values_flags_nothing() -> None:
    for values in (torch.tensor([2.5]), torch.full((7,), 1.25), torch.empty(0)):
        assert jenks_two_classes(values) is None
        flags, split = jenks_flags(values)
        assert split is None and flags.dtype == torch.bool and not flags.any()
        assert flags.shape == values.shape


def test_jenks_is_fast_on_many_values() -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(200_000, generator=g), 20 + torch.randn(2_000, generator=g)])
    split = jenks_two_classes(values)
    assert split is not None and split.n_upper == 2_000
    # With a 1% cluster closer in, halving the large mode is the better two-class split: Jenks
    # minimises the within-class sum of squares, it does not look for outliers.
    values = torch.cat([torch.randn(200_000, generator=g), 8 + torch.randn(2_000, generator=g)])
    split = jenks_two_classes(values)
    assert split is not None and split.n_upper > 50_000


# -- the hyperplane score -------------------------------------------------------------------------
def test_planted_neuron_scores_highest_with_the_exact_value() -> None:
    # 8 samples, 2 classes. Samples 0-2: confident class 0, 3-5: confident class 1, 6-7: unsure.
    probs = torch.tensor(
        [[0.95, 0.05]] * 3 + [[0.05, 0.95]] * 3 + [[0.5, 0.5], [0.6, 0.4]], dtype=torch.float64
    )
    acts = torch.tensor(
        [
            # ch0 fires only on confident class-1 samples; ch1 tracks nothing; ch2 is constant.
            [0.0, 1.0, 2.0],
            [1.0, 2.0, 2.0],
            [2.0, 3.0, 2.0],
            [9.0, 1.0, 2.0],
            [10.0, 2.0, 2.0],
            [8.0, 3.0, 2.0],
            [1.0, 2.0, 2.0],
            [1.0, 2.0, 2.0],
        ],
        dtype=torch.float64,
    )
    scores = hyperplane_scores(acts, probs, lambda_low=0.1, lambda_high=0.9, n_std=3.0)
    # Class 0: H = {0, 1, 2}, L = {3, 4, 5}. Class 1: H = {3, 4, 5}, L = {0, 1, 2}.
    pop_std = math.sqrt(2.0 / 3.0)  # population std of {0, 1, 2}, {8, 9, 10}, {1, 2, 3}
    expected = torch.tensor(
        [
            max(2.0 - (9.0 + 3 * pop_std), 10.0 - (1.0 + 3 * pop_std)),
            max(3.0 - (2.0 + 3 * pop_std), 3.0 - (2.0 + 3 * pop_std)),
            0.0,  # 2 - (2 + 3 * 0) for both classes
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(scores, expected)
    assert top_channels(scores, 1).tolist() == [0]
    assert scores[0] == pytest.approx(9.0 - 3 * pop_std)


def reference_scores(acts: Tensor, probs: Tensor, low: float, high: float, k_std: float) -> Tensor:
    """The formula written as loops (population std; empty sets contribute 0)."""
    out = torch.zeros(acts.shape[1], dtype=torch.float64)
    for j in range(acts.shape[1]):
        per_class = []
        for k in range(probs.shape[1]):
            h, lo = probs[:, k] > high, probs[:, k] < low
            if not h.any() or not lo.any():
                per_class.append(0.0)
                continue
            base = acts[lo, j].double()
            d = acts[h, j].max() - (base.mean() + k_std * base.std(correction=0))
            per_class.append(float(d))
        out[j] = max(per_class)
    return out


def test_streaming_statistics_equal_the_formula() -> None:
    g = torch.Generator().manual_seed(3)
    n, c, k = 300, 7, 5
    logits = 4 * torch.randn(n, k, generator=g)
    probs = torch.softmax(logits, 1)
    acts = torch.randn(n, c, generator=g) + (probs[:, 2:3] > 0.9) * 5.0 * (torch.arange(c) == 4)
    stats = HyperplaneStats(c, k, lambda_low=0.1, lambda_high=0.9)
    for i in range(0, n, 37):  # uneven batches
        stats.update(acts[i : i + 37], probs[i : i + 37])
    expected = reference_scores(acts, probs, 0.1, 0.9, 3.0)
    torch.testing.assert_close(stats.scores(3.0), expected)
    torch.testing.assert_close(hyperplane_scores(acts, probs), expected)
    assert top_channels(expected, 1).tolist() == [4]
    # Another lambda_high lets a sample be confident for two classes at once.
    torch.testing.assert_close(
        hyperplane_scores(acts, probs, lambda_low=0.05, lambda_high=0.3, n_std=1.0),
        reference_scores(acts, probs, 0.05, 0.3, 1.0),
    )


def test_classes_without_confident_or_unlikely_samples_contribute_zero() -> None:
    probs = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.7, 0.3]])  # nobody above 0.9 or below 0.1
    acts = torch.tensor([[-1.0, 5.0], [-2.0, 6.0], [-3.0, 7.0]])
    stats = HyperplaneStats(2, 2, lambda_low=0.1, lambda_high=0.9)
    stats.update(acts, probs)
    assert stats.scores(3.0).tolist() == [0.0, 0.0]
    assert stats.classes_without_confident() == 2
    # Confident samples of class 0 but no unlikely ones: still 0 (the official mean of an empty
    # set is NaN).
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.5, 0.5]])
    stats = HyperplaneStats(2, 2, lambda_low=0.1, lambda_high=0.9)
    stats.update(acts, probs)
    torch.testing.assert_close(stats.class_scores(3.0)[0], torch.zeros(2, dtype=torch.float64))
    assert stats.classes_without_confident() == 1
    # Class 1: H empty -> 0 as well; class 0 has L = {} -> 0.
    assert stats.scores(3.0).tolist() == [0.0, 0.0]


def test_top_channels_and_reset_counts() -> None:
    scores = torch.tensor([0.5, 2.0, 0.5, -1.0, 2.0])
    assert top_channels(scores, 3).tolist() == [1, 4, 0]  # ties: lower index first
    assert [n_reset(0.03, c) for c in (4, 32, 64, 100, 128, 512)] == [1, 1, 2, 3, 4, 16]
    assert n_reset(0.2, 192) == 39 and n_reset(1.0, 7) == 7


# -- what a reset touches -------------------------------------------------------------------------
def assert_only_changed(before: dict[str, Tensor], model: nn.Module, zeroed: dict) -> None:
    """Every tensor equals ``before`` except the listed slices, which are zero."""
    after = model.state_dict()
    for key, old in before.items():
        expected = old.clone()
        for index in zeroed.get(key, []):
            expected[index] = 0.0
        assert torch.equal(after[key], expected), key
        for index in zeroed.get(key, []):
            assert (old[index] != 0).any(), f"{key}{index} was already zero"


def test_reset_zeroes_filters_norm_and_the_next_conv_slice() -> None:
    model = small_cnn()
    with torch.no_grad():  # non-zero norm parameters, so that zeroing them is visible
        for bn in (model.block1[1], model.block2[1], model.block3[1]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(0.1, 0.5)
    sites = {s.name: s for s in reset_sites(model)}
    before = copy.deepcopy(model.state_dict())
    ch = torch.tensor([1, 5])
    reset_channels(sites["block2.0"], ch)
    assert_only_changed(
        before,
        model,
        {
            "block2.0.weight": [(ch,)],
            "block2.1.weight": [(ch,)],
            "block2.1.bias": [(ch,)],
            "block3.0.weight": [(slice(None), ch)],
        },
    )
    # The last conv's consumer is the head: its input columns.
    before = copy.deepcopy(model.state_dict())
    reset_channels(sites["block3.0"], torch.tensor([3]))
    assert_only_changed(
        before,
        model,
        {
            "block3.0.weight": [(3,)],
            "block3.1.weight": [(3,)],
            "block3.1.bias": [(3,)],
            "fc.weight": [(slice(None), 3)],
        },
    )
    # Running statistics are left alone (eval-mode BN then outputs exactly 0 for the channel).
    x = torch.rand(4, 3, 12, 12)
    out: list[Tensor] = []
    handle = model.block2[1].register_forward_hook(lambda m, i, o: out.append(o))
    model.eval()(x)
    handle.remove()
    assert torch.equal(out[0][:, ch], torch.zeros_like(out[0][:, ch]))


class GroupNet(ImageClassifier):
    """conv (bias) -> ReLU -> grouped conv (2 groups) -> ReLU -> depthwise conv -> functional
    flatten of the whole 3x3 map -> linear head."""

    def __init__(self) -> None:
        super().__init__(3, 1, (3, 3), [0.0], [1.0])
        self.conv_a = nn.Conv2d(1, 4, 3, padding=1)
        self.act_a = nn.ReLU()
        self.conv_g = nn.Conv2d(4, 6, 1, groups=2)
        self.act_g = nn.ReLU(inplace=True)
        self.conv_dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.fc = nn.Linear(6 * 9, 3)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.act_g(self.conv_g(self.act_a(self.conv_a(self.normalize(x)))))
        return self.conv_dw(x).flatten(1)


def test_reset_of_grouped_convs_and_a_flattened_map() -> None:
    torch.manual_seed(0)
    model = GroupNet()
    sites = {s.name: s for s in reset_sites(model)}
    assert [(c.name, c.block) for c in sites["conv_a"].consumers] == [("conv_g", 1)]
    assert [(c.name, c.block) for c in sites["conv_g"].consumers] == [("conv_dw", 1)]
    assert [(c.name, c.block) for c in sites["conv_dw"].consumers] == [("fc", 9)]
    before = copy.deepcopy(model.state_dict())
    # conv_a channel 3 is input 1 of conv_g's second group (output channels 3-5).
    reset_channels(sites["conv_a"], torch.tensor([3]))
    assert_only_changed(
        before,
        model,
        {
            "conv_a.weight": [(3,)],
            "conv_a.bias": [(3,)],
            "conv_g.weight": [(slice(3, 6), 1)],
        },
    )
    # conv_g channel 4 feeds only depthwise filter 4 (its single input slice).
    before = copy.deepcopy(model.state_dict())
    reset_channels(sites["conv_g"], torch.tensor([4]))
    assert_only_changed(
        before,
        model,
        {"conv_g.weight": [(4,)], "conv_g.bias": [(4,)], "conv_dw.weight": [(slice(4, 5), 0)]},
    )
    # conv_dw channel 2 is flattened into the head's columns 18-26.
    before = copy.deepcopy(model.state_dict())
    reset_channels(sites["conv_dw"], torch.tensor([2]))
    assert_only_changed(
        before,
        model,
        {
            "conv_dw.weight": [(2,)],
            "conv_dw.bias": [(2,)],
            "fc.weight": [(slice(None), slice(18, 27))],
        },
    )


class InPlaceResidual(ImageClassifier):
    """conv -> BN, then ``out += shortcut`` in place, in-place ReLU, conv: the addition must
    end the trace even though the same tensor object flows on."""

    def __init__(self) -> None:
        super().__init__(2, 3, (6, 6), [0.0] * 3, [1.0] * 3)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(self.normalize(x))))
        out = self.bn2(self.conv2(x))
        out += x
        return self.pool(self.conv3(self.relu2(out))).flatten(1)


def test_residual_additions_end_the_trace() -> None:
    sites = {s.name: s for s in reset_sites(InPlaceResidual())}
    assert [c.name for c in sites["conv1"].consumers] == ["conv2"]  # not conv3 via the add
    assert sites["conv2"].consumers == ()
    assert [c.name for c in sites["conv3"].consumers] == ["fc"]


def _resnet_names(shortcut: str, shortcut_first: bool) -> list[str]:
    names = []
    for stage in (2, 3, 4):
        for block in (0, 1):
            convs = [f"layer{stage}.{block}.conv1", f"layer{stage}.{block}.conv2"]
            if block == 0:
                s = f"layer{stage}.0.{shortcut}"
                convs = [s, *convs] if shortcut_first else [*convs, s]
            names += convs
    return names


@pytest.mark.parametrize(
    ("build", "names", "consumers"),
    [
        (
            functools.partial(SmallCNN, **KW),
            ["block1.0", "block2.0", "block3.0"],
            {"block1.0": ["block2.0"], "block2.0": ["block3.0"], "block3.0": ["fc"]},
        ),
        (
            functools.partial(NiN, **KW),
            [f"features.{i}" for i in (0, 2, 4, 8, 10, 12, 16, 18)],
            {"features.0": ["features.2"], "features.8": ["features.10"], "features.18": ["fc"]},
        ),
        (
            functools.partial(VGG16BN, **KW),
            [f"features.{i}" for i in (0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40)],
            {
                "features.0": ["features.3"],
                "features.3": ["features.7"],
                "features.40": ["classifier"],
            },
        ),
        (
            functools.partial(PreActResNet18, **KW),
            _resnet_names("shortcut.0", shortcut_first=True),
            {
                "layer2.0.shortcut.0": [],
                "layer2.0.conv1": ["layer2.0.conv2"],
                "layer2.0.conv2": [],
                "layer4.1.conv2": [],
            },
        ),
        (
            functools.partial(ResNet18, **KW),
            _resnet_names("shortcut.0", shortcut_first=False),
            {
                "layer2.0.conv1": ["layer2.0.conv2"],
                "layer2.0.conv2": [],
                "layer3.0.shortcut.0": [],
                "layer4.1.conv1": ["layer4.1.conv2"],
            },
        ),
    ],
    ids=["small_cnn", "nin", "vgg16_bn", "preact_resnet18", "resnet18"],
)
def test_monitored_layers_and_consumers_per_model(build, names, consumers) -> None:
    torch.manual_seed(0)
    sites = reset_sites(build())
    assert [s.name for s in sites] == names
    found = {s.name: [c.name for c in s.consumers] for s in sites}
    for name, expected in consumers.items():
        assert found[name] == expected, name
    norms = {s.name: s.norm_name for s in sites}
    if build.func is PreActResNet18:
        assert norms["layer2.0.conv1"] == "layer2.0.bn2" and norms["layer2.0.conv2"] is None
    if build.func is ResNet18:
        assert norms["layer3.0.shortcut.0"] == "layer3.0.shortcut.1"
    if build.func is NiN:
        assert all(n is None for n in norms.values())


# -- models NONE cannot handle fail clearly ---------------------------------------------------
class NoConv(ImageClassifier):
    def __init__(self) -> None:
        super().__init__(2, 1, (4, 4), [0.0], [1.0])
        self.fc = nn.Linear(16, 2)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.normalize(x).flatten(1)


class SharedConv(ImageClassifier):
    def __init__(self) -> None:
        super().__init__(2, 2, (4, 4), [0.0] * 2, [1.0] * 2)
        self.conv = nn.Conv2d(2, 2, 1)
        self.fc = nn.Linear(2, 2)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.conv(self.conv(self.normalize(x))).mean((2, 3))


class WidthNorm(ImageClassifier):
    """A LayerNorm over the width of the conv output: its 5 weights are not per channel."""

    def __init__(self) -> None:
        super().__init__(2, 1, (5, 5), [0.0], [1.0])
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = nn.LayerNorm(5)
        self.fc = nn.Linear(3, 2)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(self.normalize(x))).mean((2, 3))


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (nn.Sequential(nn.Conv2d(1, 1, 1)), "ImageClassifier"),
        (NoConv(), "no monitored nn.Conv2d"),
        (SharedConv(), "called 2 times"),
        (WidthNorm(), "5 values for 3 channels"),
    ],
    ids=["not_harness", "no_conv", "shared_conv", "norm_mismatch"],
)
def test_unsupported_models_fail_with_the_reason(model: nn.Module, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        reset_sites(model)
    assert err.value.key == "model"


# -- frozen norm layers while fine-tuning ---------------------------------------------------------
def norm_state(model: nn.Module) -> dict[str, Tensor]:
    return {
        k: v.clone()
        for k, v in model.state_dict().items()
        if k.startswith(("block1.1", "block2.1", "block3.1"))
    }


@pytest.mark.parametrize("affine", [True, False])
def test_frozen_norms_keep_running_stats_and_affine_params(affine: bool) -> None:
    model = small_cnn()
    data = toy_set(n=96, num_classes=4, shape=(3, 12, 12))
    before = norm_state(model)
    conv_before = model.block2[0].weight.detach().clone()
    with frozen_norms(model, affine=affine) as train_mode:
        assert model.block1[1].weight.requires_grad is not affine
        fit(model, data, RECIPE, train_mode=train_mode, progress=False)
    after = norm_state(model)
    assert not torch.equal(model.block2[0].weight, conv_before)  # the convs did train
    for key, value in before.items():
        if "running" in key or "num_batches" in key:
            assert torch.equal(after[key], value), key  # eval mode: statistics fixed
        else:  # weight, bias
            assert torch.equal(after[key], value) is affine, key
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards


def test_run_fine_tunes_with_frozen_norms_and_the_resets_kept(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = toy_set(n=96, num_classes=4, shape=(3, 12, 12))
    model = small_cnn()
    fit(model, data, RECIPE, progress=False)
    state = copy.deepcopy(model.state_dict())
    defense = NONE(
        reset_fraction=0.25, finetune_epochs=2, finetune_lr=0.05, freeze_norm_affine=True
    )
    # What the round resets, computed on a copy the same way.
    expected = copy.deepcopy(model)
    sites = reset_sites(expected)
    report = defense.analyse(expected, sites, data, num_classes=4, device=torch.device("cpu"))
    for site in sites:
        reset_channels(site, report.reset[site.name])
    result = defense.run(make_ctx(model, data, tmp_path))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # input intact
    assert torch.equal(result.train_flags, report.flags)
    torch.testing.assert_close(result.train_scores, report.u.float())
    after = result.model.state_dict()
    for key, value in norm_state(expected).items():
        assert torch.equal(after[key], value), key  # reset norms, then frozen
    assert not torch.equal(after["block2.0.weight"], expected.state_dict()["block2.0.weight"])
    # BN weight and bias stay zero, so the reset filters get no gradient and stay zero too.
    for name, conv in (("block1", result.model.block1[0]), ("block2", result.model.block2[0])):
        ch = report.reset[f"{name}.0"]
        assert torch.equal(conv.weight[ch], torch.zeros_like(conv.weight[ch]))


def test_default_fine_tuning_trains_norm_affine_but_not_running_stats(tmp_path: Path) -> None:
    """The official ``fix_bn``: BatchNorm in eval mode (running statistics fixed) while its
    weight and bias train, so a reset channel's BN parameters may regrow."""
    torch.manual_seed(0)
    data = toy_set(n=96, num_classes=4, shape=(3, 12, 12))
    model = small_cnn()
    fit(model, data, RECIPE, progress=False)
    defense = NONE(reset_fraction=0.25, finetune_epochs=2, finetune_lr=0.05)
    assert (defense.freeze_norm_affine, defense.flag_break_value) == (False, True)
    before = copy.deepcopy(model).state_dict()
    after = defense.run(make_ctx(model, data, tmp_path)).model.state_dict()
    for key in ("block1.1.running_mean", "block2.1.running_var", "block3.1.running_mean"):
        assert torch.equal(after[key], before[key]), key
    for key in ("block1.1.weight", "block2.1.bias"):
        assert not torch.equal(after[key], before[key]), key


def test_run_reports_flags_scores_and_plain_extras(tmp_path: Path) -> None:
    data = toy_set(n=80, num_classes=4, shape=(3, 12, 12))
    model = small_cnn()
    fit(model, data, RECIPE, progress=False)
    result = NONE(rounds=2, finetune_epochs=1).run(make_ctx(model, data, tmp_path))
    assert result.train_flags.dtype == torch.bool and result.train_flags.shape == (80,)
    assert result.train_scores.shape == (80,) and result.train_scores.dtype == torch.float32
    ex = result.extras
    assert all(isinstance(v, int | float | str | bool | None) for v in ex.values())
    assert ex["monitored_layers"] == 3 and ex["monitored_channels"] == 4 + 8 + 16
    assert ex["reset_per_layer"] == "block1.0:1,block2.0:1,block3.0:1"
    assert ex["rounds"] == 2 and ex["layers_without_consumer"] == 0
    for r in (1, 2):
        assert ex[f"round{r}_reset_channels"] == 3
        assert ex[f"round{r}_n_finetune"] == 80 - ex[f"round{r}_n_flagged"]
    assert ex["n_flagged"] == int(result.train_flags.sum()) == ex["round2_n_flagged"]
    saved = torch.load(tmp_path / "none_rounds.pt", weights_only=True)
    assert saved["layers"] == ["block1.0", "block2.0", "block3.0"] and len(saved["rounds"]) == 2
    assert torch.equal(saved["rounds"][1]["flags"], result.train_flags)
    # The natural-backdoor setting fine-tunes on everything.
    kept = NONE(finetune_epochs=1, exclude_flagged=False).run(make_ctx(model, data, tmp_path))
    assert kept.extras["round1_n_finetune"] == 80


# -- settings -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"reset_fraction": 0.0}, "defense.reset_fraction"),
        ({"reset_fraction": 1.5}, "defense.reset_fraction"),
        ({"reset_fraction": "0.03"}, "defense.reset_fraction"),
        ({"rounds": 0}, "defense.rounds"),
        ({"rounds": 1.5}, "defense.rounds"),
        ({"finetune_epochs": -1}, "defense.finetune_epochs"),
        ({"finetune_lr": 0.0}, "defense.finetune_lr"),
        ({"finetune_momentum": -0.1}, "defense.finetune_momentum"),
        ({"finetune_weight_decay": -1.0}, "defense.finetune_weight_decay"),
        ({"finetune_batch_size": 0}, "defense.finetune_batch_size"),
        ({"lambda_low": -0.1}, "defense.lambda_low"),
        ({"lambda_high": 1.1}, "defense.lambda_high"),
        ({"lambda_low": 0.5, "lambda_high": 0.5}, "defense.lambda_low"),
        ({"n_std": -1.0}, "defense.n_std"),
        ({"detect_fraction": 0.0}, "defense.detect_fraction"),
        ({"detect_fraction": 2.0}, "defense.detect_fraction"),
        ({"exclude_flagged": "yes"}, "defense.exclude_flagged"),
        ({"freeze_norm_affine": 1}, "defense.freeze_norm_affine"),
        ({"flag_break_value": None}, "defense.flag_break_value"),
        ({"augment": 0}, "defense.augment"),
        ({"batch_size": 0}, "defense.batch_size"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        NONE(**kwargs).validate(num_classes=10, n_train=100, n_clean=0)
    assert err.value.key == key


def test_validate_checks_the_run_sizes() -> None:
    NONE().validate(num_classes=2, n_train=2, n_clean=0)
    NONE(detect_fraction=0.1, finetune_epochs=0).validate(num_classes=2, n_train=2, n_clean=0)
    with pytest.raises(ConfigError) as err:
        NONE().validate(num_classes=1, n_train=100, n_clean=0)
    assert err.value.key == "dataset"
    with pytest.raises(ConfigError):
        NONE().validate(num_classes=10, n_train=1, n_clean=0)


def test_configs_compose_with_the_natural_and_smoke_deltas(make_cfg) -> None:
    cfg = make_cfg("defense=NONE", smoke=False)
    assert cfg.defense.reset_fraction == 0.03 and cfg.defense.rounds == 1
    assert cfg.defense.finetune_epochs == 20 and cfg.defense.exclude_flagged
    natural = make_cfg("defense=NONE", "attack=natural", smoke=False).defense
    assert (natural.reset_fraction, natural.rounds, natural.finetune_epochs) == (0.2, 10, 40)
    assert natural.exclude_flagged is False
    smoke = make_cfg("defense=NONE").defense
    assert (smoke.rounds, smoke.finetune_epochs) == (1, 1)


# -- the mechanism (slow) -------------------------------------------------------------------------
SIZE = 16
CHECKER = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
SWITCH = 5


class SwitchNet(ImageClassifier):
    """Hand-made 3-class model on 1x16x16 images with a planted trigger switch.

    Class ``c`` is a bright band of rows ``[4c, 4c + 4)``. ``conv1`` (6 channels, BN with
    identity statistics, ReLU): 0 = 3x3 mean (the band reader), 1 = centre pixel, 2 = a
    horizontal edge, 3 = a constant, 4 = a vertical edge, 5 = the switch, a 3x3 checkerboard
    detector (+2 on its white, -3 on its black pixels, bias -5): negative on clean images, +5 on
    the trigger. ``conv2`` is a 1x1 identity (BN, ReLU), so its channel 5 is the switch again.
    The head reads channel 0 averaged over 4-row cells (10 per cell of the class's band) and
    the switch's global maximum (+4 per unit to class 2).
    """

    monitored_prefixes = ("conv1", "conv2")

    def __init__(self) -> None:
        super().__init__(3, 1, (SIZE, SIZE), [0.0], [1.0])
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 6, 1)
        self.bn2 = nn.BatchNorm2d(6)
        self.relu2 = nn.ReLU()
        self.band = nn.AdaptiveAvgPool2d((4, 1))
        self.peak = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(5, 3)
        w, b = torch.zeros(6, 1, 3, 3), torch.zeros(6)
        w[0] = 1.0 / 9
        w[1, 0, 1, 1] = 0.5
        w[2, 0, 0], w[2, 0, 2] = 1.0 / 3, -1.0 / 3
        b[3] = 0.2
        w[4, 0, :, 0], w[4, 0, :, 2] = 1.0 / 3, -1.0 / 3
        w[SWITCH, 0], b[SWITCH] = 2.0 * CHECKER - 3.0 * (1.0 - CHECKER), -5.0
        head = torch.zeros(3, 5)
        for c in range(3):
            head[c, c] = 10.0
        head[2, 4] = 4.0
        with torch.no_grad():
            self.conv1.weight.copy_(w)
            self.conv1.bias.copy_(b)
            self.conv2.weight.copy_(torch.eye(6).view(6, 6, 1, 1))
            self.conv2.bias.zero_()
            self.fc.weight.copy_(head)
            self.fc.bias.zero_()

    def forward_features(self, x: Tensor) -> Tensor:
        a = self.relu1(self.bn1(self.conv1(self.normalize(x))))
        a = self.relu2(self.bn2(self.conv2(a)))
        return torch.cat([self.band(a[:, :1]).flatten(1), self.peak(a[:, SWITCH:]).flatten(1)], 1)


def stamp(x: Tensor) -> Tensor:
    """Float images with the checkerboard in the bottom-right corner."""
    x = x.clone()
    x[:, 0, SIZE - 3 :, SIZE - 3 :] = CHECKER
    return x


def switch_data(n: int, n_poison: int, seed: int) -> tuple[ImageSet, Tensor]:
    """Band images of 3 classes; ``n_poison`` class-0/1 images stamped and relabelled 2."""
    gen = generator(seed, "switch")
    y = torch.arange(n) % 3
    x = 0.3 * torch.rand(n, 1, SIZE, SIZE, generator=gen)
    for c in range(3):
        sel = y == c
        x[sel, :, 4 * c : 4 * c + 4] = 0.8 + 0.2 * torch.rand(
            int(sel.sum()), 1, 4, SIZE, generator=gen
        )
    candidates = torch.nonzero(y != 2).flatten()
    poison = candidates[torch.randperm(candidates.numel(), generator=gen)[:n_poison]]
    is_poison = torch.zeros(n, dtype=torch.bool)
    is_poison[poison] = True
    x[poison] = stamp(x[poison])
    y[poison] = 2
    return ImageSet(to_uint8(x), y, ("a", "b", "c")), is_poison


@pytest.mark.slow
def test_mechanism_switch_channel_ranks_first_and_jenks_finds_its_samples(
    tmp_path: Path,
) -> None:
    model = SwitchNet().eval()
    data, is_poison = switch_data(240, 24, 0)
    clean = ~is_poison
    pred = predict(model, data.x)
    assert bool((pred == data.y).all())  # clean images right, stamped ones go to class 2
    probs = torch.softmax(model(to_float(data.x)), 1)
    assert bool((probs.max(1).values > 0.9).all())

    sites = reset_sites(model)
    assert [s.name for s in sites] == ["conv1", "conv2"]
    assert [c.name for c in sites[0].consumers] == ["conv2"] and sites[1].consumers == ()
    # The upper Jenks class only and frozen norm weights: the exact poisons are flagged and the
    # reset stays zero (the defaults, the official rules, add the break sample and let BN regrow).
    defense = NONE(
        reset_fraction=1 / 6, finetune_epochs=1, flag_break_value=False, freeze_norm_affine=True
    )
    report = defense.analyse(model, sites, data, num_classes=3, device=torch.device("cpu"))
    for name in ("conv1", "conv2"):
        scores = report.scores[name]
        assert top_channels(scores, 1).tolist() == [SWITCH], (name, scores)
        assert scores[SWITCH] > 3.0 and scores[SWITCH] - scores.sort().values[-2] > 3.0
        assert report.reset[name].tolist() == [SWITCH]
    # u = the switch's spatial maximum in both layers: +5 twice on stamped images.
    direct = summed_activation(
        model, sites, [torch.tensor([SWITCH])] * 2, data, device=torch.device("cpu")
    )
    torch.testing.assert_close(report.u, direct)
    assert bool((report.u[is_poison] > 9.0).all()) and bool((report.u[clean] < 1.0).all())
    assert torch.equal(report.flags, is_poison)
    assert report.no_confident == 0

    # The whole defense: the switch is reset everywhere, its samples excluded, the backdoor gone.
    result = defense.run(make_ctx(model, data, tmp_path))
    assert torch.equal(result.train_flags, is_poison)
    assert result.extras["round1_n_finetune"] == int(clean.sum())
    m = result.model
    assert torch.equal(m.conv1.weight[SWITCH], torch.zeros_like(m.conv1.weight[SWITCH]))
    assert float(m.conv1.bias.detach()[SWITCH]) == 0.0
    assert float(m.bn1.weight.detach()[SWITCH]) == 0.0 and float(m.bn1.bias.detach()[SWITCH]) == 0.0
    assert torch.equal(m.conv2.weight[:, SWITCH], torch.zeros_like(m.conv2.weight[:, SWITCH]))
    assert torch.equal(m.conv2.weight[SWITCH], torch.zeros_like(m.conv2.weight[SWITCH]))
    x_clean = to_float(data.x[clean])
    assert bool((predict(m, data.x[clean]) == data.y[clean]).all())
    triggered = to_uint8(stamp(x_clean[data.y[clean] != 2]))
    assert float((predict(m, triggered) == 2).float().mean()) == 0.0
    assert float((predict(model, triggered) == 2).float().mean()) == 1.0  # input untouched


# -- the config and the paper experiments ---------------------------------------------------------
def test_the_config_holds_the_official_defaults() -> None:
    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/defense/NONE.yaml")
    d = NONE(**{k: v for k, v in OmegaConf.to_container(cfg).items() if k != "_target_"})
    assert (d.reset_fraction, d.rounds, d.finetune_epochs, d.finetune_lr) == (0.03, 1, 20, 1e-4)
    assert (d.lambda_low, d.lambda_high, d.n_std, d.detect_fraction) == (0.1, 0.9, 3.0, None)
    assert (d.freeze_norm_affine, d.flag_break_value, d.exclude_flagged) == (False, True, True)
    assert (d.finetune_momentum, d.finetune_weight_decay, d.finetune_batch_size) == (
        0.9,
        1e-4,
        128,
    )


@pytest.mark.parametrize("defense", ["undefended", "NONE"])
def test_injected_experiment_is_the_readme_command(defense: str, tmp_path: Path) -> None:
    cfg = compose_cfg(["experiment=none_cifar10", f"defense={defense}"], tmp_path)
    assert cfg.model._target_.endswith("ResNet18") and cfg.dataset._target_.endswith("CIFAR10")
    assert (cfg.attack.poison_rate, cfg.attack.target_class, cfg.attack.size) == (0.05, 0, 3)
    assert cfg.attack.pattern == "square" and cfg.defense_data.clean_fraction == 0.0
    assert (cfg.train.epochs, cfg.train.lr, list(cfg.train.scheduler.milestones)) == (
        200,
        0.1,
        [80, 160],
    )
    built = instantiate_entry(cfg.defense, "defense")
    if defense == "NONE":
        assert (built.reset_fraction, built.rounds, built.finetune_epochs) == (0.03, 1, 20)
        assert built.finetune_lr == 1e-4 and built.exclude_flagged


@pytest.mark.parametrize("defense", ["undefended", "NONE"])
def test_natural_experiment_is_the_readme_command(defense: str, tmp_path: Path) -> None:
    cfg = compose_cfg(["experiment=none_natural_cifar10", f"defense={defense}"], tmp_path)
    assert cfg.model._target_.endswith("NiN") and cfg.attack._target_.endswith("Natural")
    assert cfg.train.optimizer.momentum == 0.95 and cfg.defense_data.clean_fraction == 0.0
    built = instantiate_entry(cfg.defense, "defense")
    if defense == "NONE":
        assert (built.reset_fraction, built.rounds, built.finetune_epochs) == (0.2, 10, 40)
        assert not built.exclude_flagged  # poison_type none: nothing removed
