"""l-inf pruning: channel norms, ranking, where the masks sit, their persistence, the stop rule,
the settings, and (slow) the mechanism on a hand-made model with a planted trigger channel."""

from __future__ import annotations

import copy
import functools
import io
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from attacks.inversion import stamp
from benchmark.data import to_float, to_uint8
from benchmark.errors import ConfigError
from benchmark.models.base import ImageClassifier
from benchmark.models.nin import NiN
from benchmark.models.preact_resnet18 import PreActResNet18
from benchmark.models.resnet18 import ResNet18
from benchmark.models.small_cnn import SmallCNN
from benchmark.models.timm import TimmClassifier
from benchmark.models.vgg16_bn import VGG16BN
from benchmark.seeding import generator
from benchmark.train import fit, predict
from benchmark.types import ImageSet
from defenses.base import DefenseContext
from defenses.linf_prune import LinfPrune
from defenses.linf_scores import channel_norms, prune_count, rank_channels, site_scores
from defenses.masking import MASK_BUFFER, install_mask, restore_masks, set_pruned
from defenses.prune_sites import find_site
from tests.conftest import toy_set
from tests.defenses.toys import KW, RECIPE


def small_cnn(seed: int = 0, size: int = 12) -> SmallCNN:
    """A 4-wide SmallCNN (last conv: 16 channels) on 3x``size``x``size`` images."""
    torch.manual_seed(seed)
    return SmallCNN(4, 3, (size, size), [0.5] * 3, [0.25] * 3, width=4)


def grab(model: nn.Module, module: nn.Module, x: Tensor) -> Tensor:
    """``module``'s output during ``model(x)`` in eval mode."""
    out: list[Tensor] = []
    handle = module.register_forward_hook(lambda m, i, o: out.append(o.detach().clone()))
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return out[0]


# -- channel norms and ranking ------------------------------------------------------------------
def test_channel_norms_on_planted_maps() -> None:
    maps = torch.zeros(2, 3, 4, 4)
    maps[:, 0, 1, 2] = 5.0  # one peak: large l-inf, small l1
    maps[:, 1] = 1.0  # uniform: small l-inf, large l1
    maps[:, 2, 3, 3] = -3.0  # a negative peak counts by its magnitude
    maps[1] *= 2.0  # per image
    torch.testing.assert_close(channel_norms(maps, "linf"), torch.tensor([[5, 1, 3], [10, 2, 6.0]]))
    torch.testing.assert_close(channel_norms(maps, "l1"), torch.tensor([[5, 16, 3], [10, 32, 6.0]]))
    torch.testing.assert_close(channel_norms(maps, "l2"), torch.tensor([[5, 4, 3], [10, 8, 6.0]]))
    # The ranking the norm implies: l-inf puts the peak first, l1 the uniform channel.
    assert rank_channels(channel_norms(maps, "linf").mean(0), descending=True).tolist() == [0, 2, 1]
    assert rank_channels(channel_norms(maps, "l1").mean(0), descending=True).tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="norm"):
        channel_norms(maps, "l3")


def test_rank_channels_orders_and_breaks_ties_by_index() -> None:
    scores = torch.tensor([0.5, 0.1, 0.5, 0.9, 0.1])
    assert rank_channels(scores, descending=False).tolist() == [1, 4, 0, 2, 3]
    assert rank_channels(scores, descending=True).tolist() == [3, 0, 2, 1, 4]


def test_site_scores_average_the_per_image_max() -> None:
    model = small_cnn()
    site = find_site(model)
    x = torch.rand(5, 3, 12, 12)
    maps = grab(model, site.module, x)
    per_image = site_scores(model, site.module, x, norm="linf", batch_size=2)
    torch.testing.assert_close(per_image, maps.flatten(2).amax(2))
    assert per_image.shape == (5, 16)


# -- where the mask sits --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "site", "conv", "kind"),
    [
        (functools.partial(SmallCNN, **KW), "block3.2", "block3.0", "activation"),
        (functools.partial(VGG16BN, **KW), "features.42", "features.40", "activation"),
        (functools.partial(NiN, **KW), "features.19", "features.18", "activation"),
        (functools.partial(ResNet18, **KW), "layer4.1.relu2", "layer4.1.conv2", "activation"),
        (functools.partial(PreActResNet18, **KW), "layer4", "layer4.1.conv2", "block"),
        (
            functools.partial(TimmClassifier, **KW),
            "net.layer4.1.act2",
            "net.layer4.1.conv2",
            "activation",
        ),
    ],
    ids=["small_cnn", "vgg16_bn", "nin", "resnet18", "preact_resnet18", "timm_resnet18"],
)
def test_find_site_on_harness_models(build, site: str, conv: str, kind: str) -> None:
    if build.func is TimmClassifier:
        model = build()  # its constructor checks real logits
    else:
        with torch.device("meta"):  # shapes only: no weight init, no real compute
            model = build()
    found = find_site(model)
    assert (found.name, found.conv_name, found.kind) == (site, conv, kind)
    assert found.channels in (128, 192, 512)


def test_preact_site_masks_the_pooled_channel_shortcut_included() -> None:
    """Masking PreAct-ResNet's last conv output alone would leave the channel in the residual
    stream; the site past the add zeroes it in the pooled features."""
    torch.manual_seed(0)
    model = PreActResNet18(**{**KW, "image_size": (16, 16)}, width=8).eval()
    site = find_site(model)
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        before = model.forward_features(x)
    set_pruned(install_mask(site.module, site.channels), torch.tensor([2, 40]))
    with torch.no_grad():
        after = model.forward_features(x)
    assert (before[:, [2, 40]].abs() > 0).all()
    assert torch.equal(after[:, [2, 40]], torch.zeros(3, 2))
    keep = [c for c in range(64) if c not in (2, 40)]
    assert torch.equal(after[:, keep], before[:, keep])


def test_model_without_conv_fails_clearly() -> None:
    class Flat(ImageClassifier):
        def __init__(self) -> None:
            super().__init__(2, 1, (4, 4), [0.0], [1.0])
            self.fc = nn.Linear(16, 2)

        def forward_features(self, x: Tensor) -> Tensor:
            return self.normalize(x).flatten(1)

    with pytest.raises(ConfigError, match=r"no nn\.Conv2d") as err:
        find_site(Flat())
    assert err.value.key == "model"
    with pytest.raises(TypeError, match="ImageClassifier"):
        find_site(nn.Conv2d(1, 1, 1))


def test_masks_zero_exactly_the_pruned_channels_after_the_norm() -> None:
    model = small_cnn()
    bn = model.block3[1]
    with torch.no_grad():  # a positive BN bias: a conv-weight mask alone would leave ReLU(bias)
        bn.bias.fill_(1.0)
        bn.running_mean.uniform_(-0.1, 0.1)
    site = find_site(model)
    x = torch.rand(4, 3, 12, 12)
    before = grab(model, site.module, x)
    assert (before > 0).all()
    mask = install_mask(site.module, site.channels)
    assert install_mask(site.module, site.channels) is mask  # installed once
    pruned = torch.tensor([1, 5, 11])
    set_pruned(mask, pruned)
    after = grab(model, site.module, x)
    keep = torch.ones(16, dtype=torch.bool)
    keep[pruned] = False
    assert torch.equal(after[:, pruned], torch.zeros_like(after[:, pruned]))
    assert torch.equal(after[:, keep], before[:, keep])
    # The conv and the norm are untouched: the mask acts on the site's output only.
    assert (grab(model, bn, x)[:, pruned] > 0).all()
    set_pruned(mask, torch.tensor([2]))  # set_pruned replaces the pruned set
    assert mask.tolist() == [0.0 if i == 2 else 1.0 for i in range(16)]


def pruned_small_cnn() -> tuple[SmallCNN, Tensor]:
    model = small_cnn()
    site = find_site(model)
    pruned = torch.tensor([0, 3, 7, 8])
    set_pruned(install_mask(site.module, site.channels), pruned)
    return model, pruned


def test_masks_survive_state_dict_round_trip_and_deepcopy() -> None:
    model, pruned = pruned_small_cnn()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert f"block3.2.{MASK_BUFFER}" in state

    fresh = small_cnn(seed=1)  # other weights, no mask yet
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict(state)
    assert restore_masks(fresh, state) == ["block3.2"]
    fresh.load_state_dict(state)
    copied = copy.deepcopy(model)
    x = torch.rand(3, 3, 12, 12)
    for other in (fresh, copied):
        maps = grab(other, other.block3[2], x)
        assert torch.equal(maps[:, pruned], torch.zeros_like(maps[:, pruned]))
        torch.testing.assert_close(other.eval()(x), model.eval()(x))
    # The copy's hook reads the copy's own buffer, not the original's.
    getattr(copied.block3[2], MASK_BUFFER).fill_(1.0)
    assert (grab(model, model.block3[2], x)[:, pruned] == 0).all()
    assert (grab(copied, copied.block3[2], x)[:, pruned] > 0).any()


def test_masks_survive_fine_tuning() -> None:
    model, pruned = pruned_small_cnn()
    weights = copy.deepcopy(model.state_dict())
    data = toy_set(n=96, num_classes=4, shape=(3, 12, 12))
    fit(model, data, RECIPE, progress=False)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])]
    assert "block3.0.weight" in changed  # training did update the layer
    x = torch.rand(8, 3, 12, 12)
    maps = grab(model, model.block3[2], x)
    assert torch.equal(maps[:, pruned], torch.zeros_like(maps[:, pruned]))
    keep = torch.ones(16, dtype=torch.bool)
    keep[pruned] = False
    assert (maps[:, keep] != 0).any()


# -- the stop rule --------------------------------------------------------------------------------
def curve(values: list[float], calls: list[int]):
    def at(k: int) -> float:
        calls.append(k)
        return values[k]

    return at


def test_stop_rule_accuracy_budget() -> None:
    acc = [0.97, 0.97, 0.96, 0.95, 0.93, 0.92, 0.99]  # k = 4 is exactly the 4-point budget
    calls: list[int] = []
    assert prune_count(curve(acc, calls), acc[0], 6, 0.04) == (4, "acc_budget")
    assert calls == [1, 2, 3, 4, 5]  # stops at the first step over the budget, not later
    assert prune_count(curve(acc, []), acc[0], 6, 0.0) == (1, "acc_budget")
    # A dip that recovers still stops at the dip.
    dip = [0.9, 0.8, 0.9, 0.9]
    assert prune_count(curve(dip, []), dip[0], 3, 0.04) == (0, "acc_budget")


def test_stop_rule_fraction_cap() -> None:
    acc = [0.97, 0.97, 0.96, 0.95, 0.93, 0.92]
    assert prune_count(curve(acc, []), acc[0], 3, 0.04) == (3, "max_fraction")
    assert prune_count(curve(acc, []), acc[0], 5, 1.0) == (5, "max_fraction")
    assert prune_count(curve(acc, []), acc[0], 0, 0.04) == (0, "max_fraction")


def test_stop_rule_inverted_asr() -> None:
    acc = [0.9] * 6
    asr = [1.0, 0.9, 0.5, 0.04, 0.0, 0.0]
    assert prune_count(curve(acc, []), 0.9, 5, 0.04, curve(asr, []), 0.05) == (3, "asr")
    assert prune_count(curve(acc, []), 0.9, 5, 0.04, curve(asr, []), None) == (5, "max_fraction")
    # The accuracy budget is checked first.
    acc = [0.9, 0.9, 0.8, 0.8, 0.8, 0.8]
    assert prune_count(curve(acc, []), 0.9, 5, 0.04, curve(asr, []), 0.05) == (1, "acc_budget")


# -- settings -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"ranking": "trigger"}, "defense.ranking"),
        ({"norm": "l0"}, "defense.norm"),
        ({"max_acc_drop": -0.1}, "defense.max_acc_drop"),
        ({"max_fraction": 1.5}, "defense.max_fraction"),
        ({"reserve_share": 0.0}, "defense.reserve_share"),
        ({"ranking": "clean_asc", "stop_asr": 0.05}, "defense.stop_asr"),  # no trigger
        ({"ranking": "inverted_desc", "stop_asr": 2.0}, "defense.stop_asr"),
        ({"finetune_epochs": -1}, "defense.finetune_epochs"),
        ({"finetune_epochs": 1.5}, "defense.finetune_epochs"),
        ({"inversion_budget": 0.0}, "defense.inversion_budget"),
        ({"inversion_steps": 0}, "defense.inversion_steps"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        LinfPrune(**kwargs)
    assert err.value.key == key


def test_validate_checks_the_inversion_target() -> None:
    LinfPrune(inversion_target=3).validate(num_classes=4, n_train=100, n_clean=10)
    with pytest.raises(ConfigError) as err:
        LinfPrune(inversion_target=4).validate(num_classes=4, n_train=100, n_clean=10)
    assert err.value.key == "defense.inversion_target"


def make_ctx(model: nn.Module, clean: ImageSet, tmp_path: Path, seed: int = 0) -> DefenseContext:
    return DefenseContext(
        train_set=clean,
        clean_set=clean,
        model=model,
        num_classes=clean.num_classes,
        fit=functools.partial(fit, recipe=OmegaConf.create(RECIPE), progress=False),
        new_model=small_cnn,
        seed=seed,
        device=torch.device("cpu"),
        work_dir=tmp_path,
        recipe=OmegaConf.create(RECIPE),
    )


@pytest.mark.parametrize("finetune_epochs", [0, 1])
def test_run_prunes_a_copy_within_budget(finetune_epochs: int, tmp_path: Path) -> None:
    model = small_cnn()
    clean = toy_set(n=64, num_classes=4, shape=(3, 12, 12))
    fit(model, clean, RECIPE, progress=False)
    state = copy.deepcopy(model.state_dict())
    defense = LinfPrune(
        ranking="clean_asc", max_acc_drop=0.1, max_fraction=0.5, finetune_epochs=finetune_epochs
    )
    result = defense.run(make_ctx(model, clean, tmp_path))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # input intact
    assert not hasattr(model.block3[2], MASK_BUFFER)
    ex = result.extras
    assert all(isinstance(v, int | float | str | bool | None) for v in ex.values())
    assert (ex["layer"], ex["conv_layer"], ex["n_channels"]) == ("block3.2", "block3.0", 16)
    assert 0 <= ex["n_pruned"] <= 8 and ex["fraction_pruned"] == ex["n_pruned"] / 16
    assert ex["reserve_acc_before"] - ex["reserve_acc_pruned"] <= 0.1 + 1e-9
    mask = getattr(result.model.block3[2], MASK_BUFFER)
    assert int((mask == 0).sum()) == ex["n_pruned"]
    maps = grab(result.model, result.model.block3[2], torch.rand(4, 3, 12, 12))
    assert (maps[:, mask == 0] == 0).all()
    assert ex["inversion_target"] is None and ex["ranking"] == "clean_asc"


def test_default_run_inverts_a_trigger_and_reports_it(tmp_path: Path) -> None:
    """The default ranking (inverted_desc) inverts a trigger on the reserve first."""
    model = small_cnn()
    clean = toy_set(n=64, num_classes=4, shape=(3, 12, 12))
    fit(model, clean, RECIPE, progress=False)
    defense = LinfPrune(max_acc_drop=0.1, max_fraction=0.5, inversion_steps=3)
    assert defense.ranking == "inverted_desc"
    ex = defense.run(make_ctx(model, clean, tmp_path)).extras
    assert ex["ranking"] == "inverted_desc" and ex["inversion_target"] in range(4)
    assert 0.0 <= ex["inversion_fit_asr"] <= 1.0 and ex["inverted_asr_before"] is not None
    assert ex["rank_s"] >= 0.0


def test_the_config_default_is_the_inverted_ranking() -> None:
    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/defense/linf_prune.yaml")
    assert cfg.ranking == "inverted_desc" and cfg.norm == "linf" and cfg.max_acc_drop == 0.04


# -- the mechanism (slow) ---------------------------------------------------------------------
SIZE = 16
CHECKER = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
TRIGGER_CHANNELS = {6, 7}


class TriggerNet(ImageClassifier):
    """Hand-made 3-class model on 1x16x16 images with two planted trigger channels.

    One conv (8 channels) -> BatchNorm (identity statistics) -> Softplus (smooth, so the
    inversion's gradients reach dormant channels). Class ``c`` is a bright band of rows
    ``[4c, 4c + 4)``, read by channel 0 (local mean) averaged per 4-row cell. Channels 1-4 are
    active on clean images but unused by the head; channel 5 is dead. Channels 6 and 7 detect a
    3x3 checkerboard (+2 on its white, -3 on its black pixels, bias -5): dormant on clean images,
    large on the trigger; their max over rows 12-15 (dark on clean images) pushes class 2.
    """

    def __init__(self) -> None:
        super().__init__(3, 1, (SIZE, SIZE), [0.0], [1.0])
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.Softplus()
        self.avg = nn.AdaptiveAvgPool2d((4, 1))
        self.max = nn.AdaptiveMaxPool2d((4, 1))
        self.fc = nn.Linear(32, 3)
        w, b = torch.zeros(8, 1, 3, 3), torch.zeros(8)
        w[0] = 1.0 / 9
        w[1, 0, 1, 1] = 0.5
        w[2], b[2] = 0.5 / 9, 0.3
        w[3, 0, :, 0], b[3] = 0.3, 0.3
        w[4, 0, 0, :], b[4] = 0.3, 0.3
        b[5] = -10.0
        detector = 2.0 * CHECKER - 3.0 * (1.0 - CHECKER)
        w[6, 0], b[6] = detector, -5.0
        w[7, 0], b[7] = 0.8 * detector, -4.0
        head = torch.zeros(3, 8, 4)
        for c in range(3):
            head[c, 0, c] = 10.0
        head[2, 6, 3], head[2, 7, 3] = 3.0, 1.5
        with torch.no_grad():
            self.conv.weight.copy_(w)
            self.conv.bias.copy_(b)
            self.fc.weight.copy_(head.view(3, 32))
            self.fc.bias.zero_()

    def forward_features(self, x: Tensor) -> Tensor:
        a = self.act(self.bn(self.conv(self.normalize(x))))
        return torch.cat([self.avg(a[:, :6]), self.max(a[:, 6:])], 1).flatten(1)


def band_data(n: int, seed: int) -> ImageSet:
    gen = generator(seed, "bands")
    y = torch.arange(n) % 3
    x = 0.3 * torch.rand(n, 1, SIZE, SIZE, generator=gen)
    for c in range(3):
        sel = y == c
        x[sel, :, 4 * c : 4 * c + 4] = 0.8 + 0.2 * torch.rand(
            int(sel.sum()), 1, 4, SIZE, generator=gen
        )
    return ImageSet(to_uint8(x), y, ("a", "b", "c"))


def real_trigger_asr(model: nn.Module, data: ImageSet) -> float:
    mask = torch.zeros(1, SIZE, SIZE)
    mask[0, 13:, 13:] = 1.0
    pattern = torch.zeros(1, SIZE, SIZE)
    pattern[0, 13:, 13:] = CHECKER
    x = stamp(to_float(data.x[data.y != 2]), mask, pattern)
    return float((predict(model, x) == 2).float().mean())


@pytest.mark.slow
def test_mechanism_trigger_channels_rank_first(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the inversion's many tiny steps are slower with 2 busy threads
    try:
        model = TriggerNet().eval()
        data = band_data(150, 0)
        assert float((predict(model, data.x) == data.y).float().mean()) == 1.0
        assert real_trigger_asr(model, data) == 1.0
        site = find_site(model)
        assert (site.name, site.kind) == ("act", "activation")
        cpu = torch.device("cpu")
        args = {"num_classes": 3, "device": cpu, "seed": 0}
        inv = {"inversion_steps": 300, "inversion_batch_size": 16}

        clean = LinfPrune(ranking="clean_asc").rank(model, site, data, **args)
        assert clean.order[0] == 5  # the dead channel
        assert set(clean.order[:3].tolist()) == TRIGGER_CHANNELS | {5}  # then the dormant ones

        inverted = LinfPrune(ranking="inverted_desc", **inv).rank(model, site, data, **args)
        assert inverted.target == 2 and inverted.fit_asr == 1.0
        assert set(inverted.order[:2].tolist()) == TRIGGER_CHANNELS
        diff = LinfPrune(ranking="inverted_diff_desc", **inv).rank(model, site, data, **args)
        assert set(diff.order[:2].tolist()) == TRIGGER_CHANNELS

        # The whole defense prunes them and nothing the clean task needs (channel 0).
        result = LinfPrune(ranking="inverted_desc", **inv).run(make_ctx(model, data, tmp_path))
        mask = getattr(result.model.act, MASK_BUFFER)
        pruned = set((mask == 0).nonzero().flatten().tolist())
        assert pruned >= TRIGGER_CHANNELS and 0 not in pruned
        assert result.extras["reserve_acc_pruned"] == 1.0
        assert result.extras["inverted_asr_pruned"] < 0.1
        assert real_trigger_asr(result.model, data) == 0.0
        assert real_trigger_asr(model, data) == 1.0  # the input model is untouched
    finally:
        torch.set_num_threads(threads)


def test_smoke_size_bounds_the_inversion(tmp_path: Path) -> None:
    """debug=smoke (and smoke_all) shrink the default ranking's inversion to 30 steps of 16."""
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["defense=linf_prune", "debug=smoke"], tmp_path)
    assert (cfg.defense.inversion_steps, cfg.defense.inversion_batch_size) == (30, 16)
    cfg = compose_cfg(["defense=linf_prune"], tmp_path)  # mnist5k tuning, no smoke
    assert (cfg.defense.inversion_steps, cfg.defense.inversion_batch_size) == (100, 16)
    assert cfg.defense.inversion_target is None  # the defender does not know the target
