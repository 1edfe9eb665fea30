"""MMAC / MMDF (defenses/mmac.py) and the shared clipping pieces (defenses/clipping.py), on
hand-made models and tensors; one slow mechanism test on a small_cnn with a patch backdoor."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from benchmark import metrics
from benchmark.data import to_float, to_uint8
from benchmark.errors import ConfigError
from benchmark.models.base import ImageClassifier
from benchmark.models.small_cnn import SmallCNN
from benchmark.train import fit
from benchmark.types import ImageSet
from defenses.base import DefenseContext
from defenses.bound_fit import CController, fit_bounds
from defenses.clipping import ClippedModel, clip_points, margins, synthesize_max_margin
from defenses.mmac import MMAC, mmdf_correct, mmdf_statistic, mmdf_threshold


class Toy(ImageClassifier):
    """1x4x4 images, 3 classes. One ReLU module ``act`` is shared by a 2-channel conv map (4-D)
    and the 3-wide hidden layer (2-D); ``act_cl`` follows a Linear applied channels-last."""

    def __init__(self) -> None:
        super().__init__(3, 1, (4, 4), [0.0], [1.0])
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.act = nn.ReLU()
        self.mix = nn.Linear(2, 2, bias=False)  # on (N, H, W, C)
        self.act_cl = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.hidden = nn.Linear(2, 3, bias=False)
        self.fc = nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
            self.mix.weight.copy_(torch.eye(2))
            self.hidden.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
            self.fc.weight.copy_(torch.eye(3))

    def forward_features(self, x: Tensor) -> Tensor:
        h = self.act(self.conv(self.normalize(x)))  # (N, 2, 4, 4), call 0 of act
        h = self.act_cl(self.mix(h.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.act(self.hidden(self.pool(h).flatten(1)))  # (N, 3), call 1 of act


def test_clip_points_find_every_call_with_its_channel_axis() -> None:
    points = clip_points(Toy())
    got = [(p.site, p.call, p.channels, p.axis, p.shape) for p in points]
    assert got == [
        ("act", 0, 2, 1, (2, 4, 4)),
        ("act_cl", 0, 2, -1, (4, 4, 2)),
        ("act", 1, 3, -1, (3,)),
    ]
    assert [p.spatial for p in points] == [(4, 4), (4, 4), ()]


def test_no_activation_sites_is_a_clear_error() -> None:
    class Linear(ImageClassifier):
        def __init__(self) -> None:
            super().__init__(2, 1, (2, 2), [0.0], [1.0])
            self.fc = nn.Linear(4, 2)

        def forward_features(self, x: Tensor) -> Tensor:
            return x.flatten(1)

    with pytest.raises(ConfigError, match="no activation modules"):
        clip_points(Linear())
    with pytest.raises(TypeError, match="ImageClassifier"):
        clip_points(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


def test_bounds_are_in_the_state_dict_and_clip_exactly_their_sites() -> None:
    base = Toy().eval()
    points = clip_points(base)
    model = ClippedModel(copy.deepcopy(base), [points[0], points[2]], init=1.0)  # not act_cl
    state = model.state_dict()
    assert set(k for k in state if k.startswith("bounds.")) == {"bounds.0", "bounds.1"}
    assert torch.equal(state["bounds.0"], torch.ones(2))
    assert torch.equal(state["bounds.1"], torch.ones(3))
    with torch.no_grad():
        model.bounds[0].copy_(torch.tensor([0.5, 10.0]))
        model.bounds[1].copy_(torch.tensor([0.2, 100.0, 0.3]))

    seen: dict[str, Tensor] = {}
    model.base.mix.register_forward_hook(lambda m, i, o: seen.__setitem__("mix_in", i[0]))
    model.base.pool.register_forward_hook(lambda m, i, o: seen.__setitem__("pool_in", i[0]))
    model.base.fc.register_forward_hook(lambda m, i, o: seen.__setitem__("fc_in", i[0]))
    # act call 0 (4-D, per channel): conv = (0.9, 1.8) clipped at (0.5, 10).
    x = torch.full((1, 1, 4, 4), 0.9)
    logits = model(x)
    assert torch.allclose(seen["mix_in"][0, 0, 0], torch.tensor([0.5, 1.8]))
    # act_cl is not clipped: its output (pool input) equals its input.
    assert torch.allclose(seen["pool_in"][0, :, 0, 0], torch.tensor([0.5, 1.8]))
    # act call 1 (2-D, per feature): hidden = (0.5, 1.8, 2.3) clipped at (0.2, 100, 0.3).
    assert torch.allclose(seen["fc_in"][0], torch.tensor([0.2, 1.8, 0.3]))
    assert torch.allclose(logits[0], torch.tensor([0.2, 1.8, 0.3]))
    # The original network is unclipped, and no hook outlives the forward pass.
    assert torch.allclose(model.original(x)[0], torch.tensor([0.9, 1.8, 2.7]))
    assert all(not m._forward_hooks for m in (model.base.act, model.base.act_cl))
    # A copy (and a reload of the state dict) clips the same way.
    clone = copy.deepcopy(model)
    assert torch.equal(clone(x), logits.detach())
    fresh = ClippedModel(copy.deepcopy(base), [points[0], points[2]], init=1.0)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), logits.detach())


def test_base_is_frozen_in_eval_mode_and_only_bounds_train() -> None:
    torch.manual_seed(0)
    net = SmallCNN(3, 1, (8, 8), [0.5], [0.5], width=4)
    net.train()  # BN in training mode: the wrapper must switch it off
    before = copy.deepcopy(net.state_dict())
    model = ClippedModel(net, clip_points(net), init=0.5)
    model.train()
    assert not model.base.training and all(not m.training for m in model.base.modules())
    assert all(not p.requires_grad for p in model.base.parameters())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "bounds.0",
        "bounds.1",
        "bounds.2",
    ]
    x = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8)
    y = torch.arange(12) % 3
    with torch.no_grad():
        ref = model.original(to_float(x))
    fit = fit_bounds(
        model,
        x,
        y,
        ref,
        lambda step: sum(b.sum() for b in model.bounds),
        epochs=3,
        lr=0.1,
        batch_size=5,
        controller=CController(1.0, 1.2, 0.95, 0, 1),
        gen=torch.Generator().manual_seed(0),
    )
    assert len(fit.history) == 3
    assert all(torch.equal(before[k], v) for k, v in model.base.state_dict().items())
    assert not torch.equal(model.bound_values(), torch.full_like(model.bound_values(), 0.5))


def test_margins_on_hand_made_logits() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, -1.0], [1.0, 1.0, 1.0]])
    assert torch.equal(margins(logits, torch.tensor([0, 0, 2])), torch.tensor([1.0, -5.0, 0.0]))
    assert torch.equal(margins(logits, torch.tensor([2, 1, 1])), torch.tensor([-1.0, 5.0, 0.0]))


def test_c_controller_rule() -> None:
    ctl = CController(0.002, 1.2, 0.95, start_after=30, every=10)
    updates = [e for e in range(300) if ctl.update(1.0, 1.0, e) != 1.0]
    assert updates == list(range(40, 300, 10))  # epoch > 30 and epoch % 10 == 0
    assert ctl.update(1.0, 0.95, 40) == pytest.approx(1.2)  # >= target: up
    assert ctl.update(1.0, 0.949, 40) == pytest.approx(1 / 1.2)  # below: down
    assert ctl.update(1.0, 0.0, 30) == 1.0  # not after 30
    mmbm = CController(0.5, 1.2, 0.95, start_after=10, every=10)
    assert [e for e in range(50) if mmbm.update(1.0, 1.0, e) != 1.0] == [20, 30, 40]


def test_fit_bounds_applies_the_controller_to_the_epoch_accuracy() -> None:
    net = Toy().eval()
    model = ClippedModel(net, clip_points(net), init=100.0)  # no clipping: agreement 1
    x = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8)
    with torch.no_grad():
        ref = net(to_float(x))
    fit = fit_bounds(
        model,
        x,
        ref.argmax(1),
        ref,
        lambda step: torch.zeros(()),
        epochs=5,
        lr=1e-6,
        batch_size=4,
        controller=CController(0.5, 2.0, 0.95, start_after=1, every=2),
        gen=torch.Generator().manual_seed(0),
    )
    assert [h["acc"] for h in fit.history] == [1.0] * 5
    assert fit.c == 0.5 * 2.0 * 2.0  # epochs 2 and 4


def test_bound_floor_projects_the_bounds_after_every_step() -> None:
    """A penalty that pushes every bound down: unconstrained (the code) they go negative;
    with ``bound_floor=0`` they stop at 0."""
    net = Toy().eval()
    x = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8)
    with torch.no_grad():
        ref = net(to_float(x))
    mins = {}
    for floor in (None, 0.0):
        model = ClippedModel(net, clip_points(net), init=0.5)
        fit_bounds(
            model,
            x,
            ref.argmax(1),
            ref,
            lambda step, m=model: sum(b.sum() for b in m.bounds),
            epochs=20,
            lr=0.1,
            batch_size=6,
            controller=CController(10.0, 1.2, 0.95, start_after=100, every=10),
            gen=torch.Generator().manual_seed(0),
            bound_floor=floor,
        )
        mins[floor] = float(model.bound_values().min())
    assert mins[None] < -0.5
    assert mins[0.0] == 0.0


def test_bound_floor_must_be_null_or_a_number() -> None:
    assert MMAC(bound_floor=0).bound_floor == 0.0 and MMAC().bound_floor is None
    with pytest.raises(ConfigError, match="bound_floor"):
        MMAC(bound_floor="zero")


def test_synthesis_is_plain_sgd_on_the_margin_in_pixel_space() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(1)
    x1, y1 = synthesize_max_margin(
        net, 3, 2, (1, 2, 2), steps=1, lr=0.01, gen=g, device=torch.device("cpu")
    )
    u = torch.rand(6, 1, 2, 2, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    (grad,) = torch.autograd.grad(-margins(net(u.clamp(0, 1)), y).sum(), u)
    assert torch.equal(y1, y)
    assert torch.allclose(x1, (u - 0.01 * grad).clamp(0, 1))
    x300, _ = synthesize_max_margin(
        net,
        3,
        2,
        (1, 2, 2),
        steps=300,
        lr=0.01,
        gen=torch.Generator().manual_seed(1),
        device=torch.device("cpu"),
        chunk=4,  # chunking changes nothing
    )
    with torch.no_grad():
        assert (margins(net(x300), y) >= margins(net(u), y) - 1e-6).all()
        assert x300.min() >= 0 and x300.max() <= 1


def test_mmdf_statistic_threshold_and_correction_on_hand_made_logits() -> None:
    original = torch.tensor([[5.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 4.0]])
    clipped = torch.tensor([[1.0, 3.0, 2.0], [0.0, 2.0, 0.5], [1.0, 0.5, 3.0]])
    # margins of the original prediction (0, 1, 2): original (4, 1, 3), clipped (-2, 1.5, 2)
    assert torch.allclose(mmdf_statistic(original, clipped), torch.tensor([6.0, -0.5, 1.0]))
    # the clipped network's best class other than the original prediction
    assert torch.equal(mmdf_correct(original, clipped), torch.tensor([1, 2, 0]))
    d = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert mmdf_threshold(d, 2.576) == pytest.approx(2.5 + 2.576 * math.sqrt(5 / 3))
    assert mmdf_threshold(d, 0.0) == pytest.approx(2.5)


def toy_context(tmp_path: Path, model: nn.Module, clean: ImageSet | None = None) -> DefenseContext:
    """A CPU context; the clean set defaults to 18 random 1x4x4 images labelled by ``model``."""
    if clean is None:
        x = torch.randint(0, 256, (18, 1, 4, 4), generator=torch.Generator().manual_seed(0))
        x = x.to(torch.uint8)
        with torch.no_grad():
            y = model(to_float(x)).argmax(1)  # labels the model gets right
        clean = ImageSet(x, y, tuple(f"c{i}" for i in range(3)))
    return DefenseContext(
        train_set=clean,
        clean_set=clean,
        model=model,
        num_classes=clean.num_classes,
        fit=None,  # type: ignore[arg-type]
        new_model=None,  # type: ignore[arg-type]
        seed=0,
        device=torch.device("cpu"),
        work_dir=tmp_path,
        recipe=OmegaConf.create({"channels_last": False}),
    )


def test_run_returns_the_clipped_model_and_detector_without_touching_the_input(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    net = Toy().eval()
    with torch.no_grad():
        net.fc.weight.add_(torch.randn(3, 3))
    before = copy.deepcopy(net.state_dict())
    ctx = toy_context(tmp_path, net)
    defense = MMAC(per_class=4, epochs=3, synth_per_class=2, synth_steps=2, synth_every=2)
    result = defense.run(ctx)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert isinstance(result.model, ClippedModel) and result.model.base is not net
    assert result.model(torch.rand(2, 1, 4, 4)).shape == (2, 3)
    det = result.input_detector
    assert det is not None and det.correct is not None
    x = torch.rand(5, 1, 4, 4)
    assert det.score(x).shape == (5,) and det.correct(x).shape == (5,)
    assert torch.allclose(
        det.score(x), mmdf_statistic(result.model.original(x), result.model(x)).detach()
    )
    ex = result.extras
    assert all(isinstance(v, int | float | str | bool | None) for v in ex.values())
    assert ex["n_sites"] == 2 and ex["n_clip_points"] == 3 and ex["n_bound_params"] == 7
    assert ex["epochs"] == 3 and ex["n_clean_selected"] <= 12
    # The threshold is mean + z std of the statistic over the drawn clean images.
    assert ex["mmdf_threshold"] == pytest.approx(det.threshold)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("per_class", 0),
        ("epochs", 1.5),
        ("lr", -1.0),
        ("c0", 0),
        ("target_acc", 1.5),
        ("c_every", 0),
        ("synth_steps", -1),
        ("synthesize_on", "both"),
        ("mmdf_z", "x"),
    ],
)
def test_bad_settings_are_config_errors(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"defense.{key}"):
        MMAC(**{key: value})


def bars(n: int, gen: torch.Generator, trigger: bool = False) -> tuple[Tensor, Tensor]:
    """4 classes of 1x12x12 images: class c is a bright bar at rows 2c+1..2c+2 on faint noise;
    the trigger is a white 3x3 square in the bottom-right corner."""
    y = torch.arange(n) % 4
    x = torch.rand(n, 1, 12, 12, generator=gen) * 0.3
    for c in range(4):
        x[y == c, :, 2 * c + 1 : 2 * c + 3, 1:8] = 0.8
    if trigger:
        x[:, :, 9:12, 9:12] = 1.0
    return to_uint8(x), y


@pytest.mark.slow
def test_mmac_lowers_the_target_margin_and_mmdf_separates_triggered_inputs(
    tmp_path: Path,
) -> None:
    """A small_cnn trained with a BadNets-style patch (10% of the data, target 0): clipping
    lowers the target class's maximum achievable margin, and MMDF scores triggered inputs
    above clean ones."""
    g = torch.Generator().manual_seed(0)
    x, y = bars(800, g)
    xp, _ = bars(80, g, trigger=True)
    train = ImageSet(
        torch.cat([x, xp]), torch.cat([y, torch.zeros(80, dtype=torch.long)]), tuple("abcd")
    )
    torch.manual_seed(0)
    net = SmallCNN(4, 1, (12, 12), [0.5], [0.5], width=8)
    recipe = {
        "epochs": 15,
        "batch_size": 64,
        "lr": 0.05,
        "augment": False,
        "amp": False,
        "optimizer": {
            "_target_": "torch.optim.SGD",
            "_partial_": True,
            "lr": 0.05,
            "momentum": 0.9,
        },
        "scheduler": None,
    }
    fit(net, train, recipe, progress=False)
    net.eval()
    x_test, y_test = bars(400, g)
    x_bd, y_bd = bars(400, g, trigger=True)
    x_bd = x_bd[y_bd != 0]
    with torch.no_grad():
        assert (net(to_float(x_test)).argmax(1) == y_test).float().mean() > 0.95
        assert (net(to_float(x_bd)).argmax(1) == 0).float().mean() > 0.95  # backdoored

    x_clean, y_clean = bars(200, g)
    ctx = toy_context(tmp_path, net, ImageSet(x_clean, y_clean, tuple("abcd")))
    ctx = dataclasses.replace(ctx, train_set=train)
    defense = MMAC(epochs=60, synth_per_class=20, synth_steps=50, synth_every=30, c_start_after=10)
    result = defense.run(ctx)
    clipped = result.model

    def max_margins(f: Callable[[Tensor], Tensor]) -> Tensor:
        """Per class, the largest margin of 20 inputs after 100 ascent steps on ``f``."""
        s, sy = synthesize_max_margin(
            f,
            4,
            20,
            (1, 12, 12),
            steps=100,
            lr=0.01,
            gen=torch.Generator().manual_seed(5),
            device=torch.device("cpu"),
        )
        with torch.no_grad():
            return margins(f(s), sy).view(4, 20).amax(1)

    before, after = max_margins(clipped.original), max_margins(clipped)
    assert before.argmax() == 0  # the backdoor target has the largest maximum margin
    assert after[0] < 0.5 * before[0]
    assert result.extras["clean_agreement"] >= 0.95

    det = result.input_detector
    assert det is not None
    with torch.no_grad():
        s_clean, s_bd = det.score(to_float(x_test)), det.score(to_float(x_bd))
    assert s_bd.mean() > s_clean.mean()
    scores = torch.cat([s_clean, s_bd])
    truth = torch.cat([torch.zeros(len(s_clean)), torch.ones(len(s_bd))]).bool()
    report = metrics.detection(scores > det.threshold, truth, scores)
    assert report["det_auroc"] > 0.95 and report["det_tpr"] > 0.9 and report["det_fpr"] < 0.05
