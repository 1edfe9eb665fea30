"""UltraClean: the two denoisers against brute force and direct OpenCV calls, the L1 score on a
hand-made model, the removal rule, the settings, the run's use of the backdoored model (scored,
never retrained) and (slow) the mechanism: a dot trigger the median filter wipes out gives the
poisoned samples the highest susceptibility."""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from benchmark import metrics
from benchmark.errors import ConfigError
from benchmark.models.small_cnn import SmallCNN
from benchmark.pipeline import instantiate_entry
from benchmark.train import Augment, fit, predict
from benchmark.types import ImageSet
from defenses.base import DefenseContext
from defenses.ultraclean import (
    UNSCORED,
    UltraClean,
    from_hwc,
    median_smooth,
    nl_means,
    output_distances,
    removal_count,
    to_hwc,
    top_k_mask,
)
from tests.conftest import compose_cfg, toy_set
from tests.defenses.filter_toys import FitSpy


# -- median smoothing ---------------------------------------------------------------------------
def reflect(i: int, n: int) -> int:
    """scipy's ``reflect`` boundary (d c b a | a b c d | d c b a)."""
    if i < 0:
        return -i - 1
    if i >= n:
        return 2 * n - i - 1
    return i


def brute_median(img: np.ndarray) -> np.ndarray:
    """Per pixel and channel: sort the 2 x 2 x C window (spatial offsets -1, 0; channel offsets
    centred at C // 2, reflected) and take the value at index len // 2."""
    h, w, c = img.shape
    out = np.empty_like(img)
    dcs = range(-(c // 2), c - c // 2)
    for r in range(h):
        for q in range(w):
            for k in range(c):
                vals = sorted(
                    int(img[reflect(r + dr, h), reflect(q + dq, w), reflect(k + dc, c)])
                    for dr in (-1, 0)
                    for dq in (-1, 0)
                    for dc in dcs
                )
                assert len(vals) == 4 * c
                out[r, q, k] = vals[len(vals) // 2]
    return out


@pytest.mark.parametrize("channels", [3, 1])
def test_median_matches_a_brute_force_rank_statistic(channels: int) -> None:
    rng = np.random.default_rng(channels)
    x = rng.integers(0, 256, size=(4, 5, 6, channels), dtype=np.uint8)
    out = median_smooth(x, chunk=3)  # chunks must not change anything
    assert out.dtype == np.uint8 and out.shape == x.shape
    for i in range(len(x)):
        assert np.array_equal(out[i], brute_median(x[i]))


def test_median_by_hand_on_a_grayscale_image() -> None:
    # windows of 4 values, the 3rd smallest: (0,0) 1 1 1 1; (0,1) 1 1 2 2; (1,0) 1 1 3 3;
    # (1,1) 1 2 3 4
    x = np.array([[1, 2], [3, 4]], dtype=np.uint8)[None, :, :, None]
    assert median_smooth(x)[0, :, :, 0].tolist() == [[1, 2], [3, 3]]


def test_median_mixes_channels_and_removes_an_isolated_dot() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(2, 6, 6, 3), dtype=np.uint8)
    per_channel = np.stack(
        [np.stack([brute_median(img[:, :, k : k + 1])[:, :, 0] for k in range(3)], -1) for img in x]
    )
    assert not np.array_equal(median_smooth(x), per_channel)  # not a per-channel median
    dot = np.full((1, 8, 8, 3), 100, dtype=np.uint8)
    dot[0, 4, 4] = 255  # one white pixel: at most 3 of the 12 values of any window
    assert (median_smooth(dot) == 100).all()


# -- non-local means ----------------------------------------------------------------------------
def test_nl_means_colour_is_opencv_on_rgb_as_given_and_thread_count_free() -> None:
    """The official scripts hand OpenCV the RGB array as it is (no BGR conversion)."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(5, 10, 12, 3), dtype=np.uint8)
    x[..., 0] //= 2  # unequal channels, so the channel order matters
    before = cv2.getNumThreads()
    out = nl_means(x, workers=2)
    assert cv2.getNumThreads() == before  # OpenCV's own threading is restored
    assert out.dtype == np.uint8 and out.shape == x.shape
    for i in range(len(x)):
        ref = cv2.fastNlMeansDenoisingColored(np.ascontiguousarray(x[i]), None, 5.0, 5.0, 7, 13)
        assert np.array_equal(out[i], ref)
        bgr = np.ascontiguousarray(x[i, :, :, ::-1])
        swapped = cv2.fastNlMeansDenoisingColored(bgr, None, 5.0, 5.0, 7, 13)[:, :, ::-1]
        assert not np.array_equal(out[i], swapped)  # the order matters on this input
    assert np.array_equal(nl_means(x, workers=1), out)


def test_nl_means_grayscale_uses_the_grayscale_call() -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, size=(3, 9, 7, 1), dtype=np.uint8)
    out = nl_means(x, h=7.0, template=3, search=5, workers=2)
    assert out.dtype == np.uint8 and out.shape == x.shape
    for i in range(len(x)):
        ref = cv2.fastNlMeansDenoising(np.ascontiguousarray(x[i, :, :, 0]), None, 7.0, 3, 5)
        assert np.array_equal(out[i, :, :, 0], ref)


def test_nl_means_denoises_and_rejects_other_channel_counts() -> None:
    rng = np.random.default_rng(3)
    noisy = np.clip(128 + rng.normal(0, 4, size=(2, 16, 16, 3)), 0, 255).astype(np.uint8)
    assert nl_means(noisy).astype(float).std() < 0.5 * noisy.astype(float).std()
    with pytest.raises(ValueError, match="1 or 3 channels"):
        nl_means(np.zeros((1, 4, 4, 2), dtype=np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        nl_means(np.zeros((1, 4, 4, 3), dtype=np.float32))


def test_layout_round_trip() -> None:
    x = toy_set(3, 2, (3, 4, 5)).x
    assert to_hwc(x).shape == (3, 4, 5, 3)
    assert torch.equal(from_hwc(to_hwc(x)), x)


# -- the score ----------------------------------------------------------------------------------
class PixelLogits(nn.Module):
    """Logits = 10 x the pixels of a (N, 1, 1, K) image; dropout shows whether eval mode is on."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.9)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(10.0 * x.flatten(1))


def pixels(rows: list[list[int]]) -> Tensor:
    return torch.tensor(rows, dtype=torch.uint8)[:, None, None, :]


X = pixels([[0, 51, 102], [255, 0, 0]])
V1 = pixels([[51, 51, 102], [255, 0, 51]])
V2 = pixels([[0, 0, 0], [255, 0, 0]])


def softmax_l1(a: list[float], b: list[float]) -> float:
    pa = [math.exp(v) / sum(math.exp(u) for u in a) for v in a]
    pb = [math.exp(v) / sum(math.exp(u) for u in b) for v in b]
    return sum(abs(p - q) for p, q in zip(pa, pb, strict=True))


def test_logit_distances_by_hand() -> None:
    model = PixelLogits().train()
    d = output_distances(model, X, [V1, V2], space="logits", batch_size=1)
    # logits: x [0, 2, 4] / [10, 0, 0]; v1 [2, 2, 4] / [10, 0, 2]; v2 [0, 0, 0] / [10, 0, 0]
    assert torch.allclose(d, torch.tensor([[2.0, 6.0], [2.0, 0.0]]), atol=1e-5)
    assert model.training  # its mode is restored


def test_softmax_distances_by_hand() -> None:
    d = output_distances(PixelLogits(), X, [V1, V2], space="softmax")
    expected = [
        [softmax_l1([0, 2, 4], [2, 2, 4]), softmax_l1([0, 2, 4], [0, 0, 0])],
        [softmax_l1([10, 0, 0], [10, 0, 2]), 0.0],
    ]
    assert torch.allclose(d, torch.tensor(expected), atol=1e-6)
    assert d.shape == (2, 2) and d.dtype == torch.float32
    with pytest.raises(ValueError, match="space"):
        output_distances(PixelLogits(), X, [V1], space="probs")  # type: ignore[arg-type]


def test_distances_do_not_depend_on_the_batch_size() -> None:
    x = toy_set(23, 2, (3, 8, 8)).x
    v = toy_set(23, 2, (3, 8, 8), seed=1).x
    model = small_cnn(3)
    a = output_distances(model, x, [v, x], batch_size=5)
    b = output_distances(model, x, [v, x], batch_size=100)
    assert torch.allclose(a, b, atol=1e-6) and (a[:, 1] == 0).all()


# -- removal ------------------------------------------------------------------------------------
def test_removal_count_is_the_floor() -> None:
    assert removal_count(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996 in floating point
    assert removal_count(0.3, 10) == 3
    assert removal_count(0.3, 7) == 2
    assert removal_count(0.0, 7) == 0
    assert removal_count(0.5, 1) == 0


def test_top_k_mask_takes_the_highest_scores_ties_to_the_lower_index() -> None:
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2])
    assert torch.nonzero(top_k_mask(scores, 2)).flatten().tolist() == [1, 3]
    assert torch.nonzero(top_k_mask(scores, 3)).flatten().tolist() == [1, 2, 3]
    assert not top_k_mask(scores, 0).any()
    assert torch.nonzero(top_k_mask(torch.ones(4), 2)).flatten().tolist() == [0, 1]


def test_top_k_mask_respects_eligibility() -> None:
    scores = torch.tensor([5.0, 1.0, 4.0, 3.0])
    eligible = torch.tensor([False, True, True, False])
    assert torch.nonzero(top_k_mask(scores, 1, eligible)).flatten().tolist() == [2]
    assert torch.nonzero(top_k_mask(scores, 2, eligible)).flatten().tolist() == [1, 2]
    with pytest.raises(ValueError, match="cannot pick 3 of 2"):
        top_k_mask(scores, 3, eligible)


# -- settings -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("removal_ratio", 1.0),
        ("removal_ratio", -0.1),
        ("removal_ratio", "0.3"),
        ("score_space", "probs"),
        ("known_target", -1),
        ("known_target", 1.5),
        ("known_target", True),
        ("known_target_removal", 1.0),
        ("median_window", 0),
        ("nl_means_template", 6),
        ("nl_means_search", 0),
        ("nl_means_h", 0.0),
        ("batch_size", 0),
        ("workers", 0),
    ],
)
def test_bad_settings_name_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"defense\.{key}"):
        UltraClean(**{key: value})


def test_validate_checks_the_class_range_and_every_setting() -> None:
    UltraClean(known_target=9).validate(10, 1000, 0)  # no clean data needed
    with pytest.raises(ConfigError, match=r"defense\.known_target: must be a class index in"):
        UltraClean(known_target=10).validate(10, 1000, 0)
    defense = UltraClean()
    defense.score_space = "probs"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match=r"defense\.score_space"):
        defense.validate(10, 1000, 0)


def test_the_config_holds_the_papers_defaults() -> None:
    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/defense/ultraclean.yaml")
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "_target_"}
    defense = UltraClean(**kwargs)
    assert cfg._target_ == "defenses.ultraclean.UltraClean"
    assert (defense.removal_ratio, defense.score_space, defense.known_target) == (
        0.3,
        "softmax",
        None,
    )
    assert (defense.median_window, defense.nl_means_h, defense.nl_means_h_color) == (2, 5.0, 5.0)
    assert (defense.nl_means_template, defense.nl_means_search) == (7, 13)


@pytest.mark.parametrize(
    ("attack", "space"),
    [
        ("badnets", "logits"),  # dirty-label: the official dirty-label Denoise.py's raw outputs
        ("blend", "logits"),
        ("wanet", "logits"),
        ("sig", "softmax"),  # clean-label and the rest: the harness default (LCBD/HTBD softmax)
        ("label_consistent", "softmax"),
        ("natural", "softmax"),
    ],
)
def test_score_space_follows_the_attack_family_by_config(
    attack: str, space: str, tmp_path: Path
) -> None:
    cfg = compose_cfg([f"attack={attack}", "defense=ultraclean"], tmp_path)
    assert cfg.defense.score_space == space
    assert compose_cfg([f"attack={attack}", "defense=NONE"], tmp_path).attack == cfg.attack


# -- the defense on toy data --------------------------------------------------------------------
def small_cnn(num_classes: int, in_chans: int = 3, size: int = 8, width: int = 4) -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(num_classes, in_chans, (size, size), [0.5] * in_chans, [0.25] * in_chans, width)


class MeanColour(nn.Module):
    """Logits = 10 x each channel's mean pixel (a known, untrained scoring model)."""

    def forward(self, x: Tensor) -> Tensor:
        return 10.0 * x.mean(dim=(2, 3))


def make_ctx(
    model: nn.Module, train: ImageSet, tmp_path: Path, fit_fn: Any, new_model: Any
) -> DefenseContext:
    recipe = toy_recipe()
    return DefenseContext(
        train_set=train,
        clean_set=train.subset(torch.arange(0)),
        model=model,
        num_classes=train.num_classes,
        fit=fit_fn,
        new_model=new_model,
        seed=0,
        device=torch.device("cpu"),
        work_dir=tmp_path / "defense",
        recipe=recipe,
    )


def toy_recipe() -> Any:
    return OmegaConf.create(
        {
            "epochs": 6,
            "batch_size": 64,
            "lr": 0.05,
            "optimizer": {
                "_target_": "torch.optim.SGD",
                "_partial_": True,
                "lr": 0.05,
                "momentum": 0.9,
                "weight_decay": 5e-4,
            },
            "scheduler": {
                "_target_": "torch.optim.lr_scheduler.CosineAnnealingLR",
                "_partial_": True,
                "T_max": 6,
            },
            "augment": True,
            "amp": False,
            "channels_last": False,
            "grad_clip": None,
        }
    )


def expected_scores(model: nn.Module, x: Tensor, space: str) -> Tensor:
    """The susceptibility computed the long way: both denoisers, then three forward passes."""
    hwc = to_hwc(x)
    med, nlm = from_hwc(median_smooth(hwc)), from_hwc(nl_means(hwc, workers=1))
    with torch.no_grad():
        outs = [model(v.float() / 255.0) for v in (x, med, nlm)]
    if space == "softmax":
        outs = [o.softmax(1) for o in outs]
    return (outs[0] - outs[1]).abs().sum(1) + (outs[0] - outs[2]).abs().sum(1)


@pytest.mark.parametrize("space", ["softmax", "logits"])
def test_run_scores_with_ctx_model_and_retrains_once_on_the_rest(
    space: str, tmp_path: Path
) -> None:
    train = toy_set(40, 3, (3, 8, 8))
    scorer = MeanColour()
    fresh: list[nn.Module] = []

    def new_model() -> nn.Module:
        fresh.append(small_cnn(3))
        return fresh[-1]

    spy = FitSpy()
    ctx = make_ctx(scorer, train, tmp_path, spy, new_model)
    result = UltraClean(score_space=space, workers=1).run(ctx)

    want = expected_scores(scorer, train.x, space)
    assert torch.allclose(result.train_scores, want, atol=1e-5)
    flags = result.train_flags
    assert flags.dtype == torch.bool and int(flags.sum()) == 12  # floor(0.3 * 40)
    assert result.train_scores[flags].min() >= result.train_scores[~flags].max()
    # The scoring model is ctx.model; the only training is of one fresh model on the rest.
    assert len(spy.calls) == 1 and len(fresh) == 1
    call = spy.calls[0]
    assert call["model"] is fresh[0] is result.model and call["model"] is not scorer
    assert torch.equal(call["data"].x, train.x[~flags]) and torch.equal(
        call["data"].y, train.y[~flags]
    )
    assert call["desc"] == "ultraclean retrain"
    extras = result.extras
    assert extras["n_removed"] == 12 and extras["n_scored"] == 40 and extras["n_retrain"] == 28
    assert extras["mode"] == "whole_dataset" and extras["retrain_final_acc"] == 0.5
    assert extras["score_max"] == pytest.approx(float(want.max()), abs=1e-5)
    assert extras["score_threshold"] == pytest.approx(float(want[flags].min()), abs=1e-5)
    assert all(isinstance(v, int | float | str | bool | None) for v in extras.values())
    saved = torch.load(tmp_path / "defense" / "ultraclean_scores.pt", weights_only=True)
    assert torch.equal(saved["removed"], flags) and saved["distances"].shape == (40, 2)


def test_run_does_not_touch_the_backdoored_model(tmp_path: Path) -> None:
    train = toy_set(30, 3, (3, 8, 8))
    model = small_cnn(3).train()
    state = copy.deepcopy(model.state_dict())
    spy = FitSpy()
    ctx = make_ctx(model, train, tmp_path, spy, lambda: small_cnn(3))
    UltraClean(workers=1).run(ctx)
    assert model.training  # eval for scoring only
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert spy.calls[0]["model"] is not model


def test_known_target_mode_scores_and_removes_only_that_class(tmp_path: Path) -> None:
    train = toy_set(45, 3, (3, 8, 8))  # 15 per class
    scorer = MeanColour()
    spy = FitSpy()
    ctx = make_ctx(scorer, train, tmp_path, spy, lambda: small_cnn(3))
    result = UltraClean(known_target=1, known_target_removal=0.5, workers=1).run(ctx)

    target = train.y == 1
    flags, scores = result.train_flags, result.train_scores
    assert int(flags.sum()) == 7 and flags[target].sum() == 7  # floor(0.5 * 15), all of class 1
    assert (scores[~target] == UNSCORED).all()
    want = expected_scores(scorer, train.x[target], "softmax")
    assert torch.allclose(scores[target], want, atol=1e-5)
    assert scores[flags].min() >= scores[target & ~flags].max()
    assert result.extras["n_scored"] == 15 and result.extras["mode"] == "known_target"
    assert result.extras["removed_per_class"] == "0,7,0"
    # finite everywhere, so the runner's AUROC is defined
    assert metrics.auroc(scores, flags) is not None
    assert len(spy.calls[0]["data"]) == 38


def test_run_rejects_other_channel_counts_and_a_missing_model(tmp_path: Path) -> None:
    train = toy_set(10, 2, (2, 8, 8))
    ctx = make_ctx(small_cnn(2, 2), train, tmp_path, FitSpy(), lambda: small_cnn(2, 2))
    with pytest.raises(ConfigError, match="dataset: UltraClean's NL-means needs 1 or 3"):
        UltraClean().run(ctx)
    no_model = make_ctx(None, toy_set(10, 2), tmp_path, FitSpy(), lambda: small_cnn(2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="trained"):
        UltraClean().run(no_model)


# -- the mechanism ------------------------------------------------------------------------------
def toy_images(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Ten classes of smooth prototypes (4x4 random intensities upsampled, fixed, with a faint
    colour tint) plus mild noise, 3x16x16 uint8. Like natural images they are smooth and their
    channels correlate, so the cross-channel median barely changes them."""
    gen = torch.Generator().manual_seed(123)
    coarse = torch.rand(10, 1, 4, 4, generator=gen)
    protos = F.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)
    protos = protos + 0.05 * torch.rand(10, 3, 1, 1, generator=gen)
    y = torch.arange(n) % 10
    noise = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return (255 * (0.1 + 0.75 * protos[y] + 0.05 * noise)).round().to(torch.uint8), y


def with_dots(x: Tensor) -> Tensor:
    """Four isolated white pixels, two apart: no 2x2 window holds two of them, so the median
    filter erases them; NL-means (h 5) keeps such strong outliers."""
    x = x.clone()
    for r, c in ((10, 10), (10, 13), (13, 10), (13, 13)):
        x[:, :, r, c] = 255
    return x


@pytest.mark.slow
def test_poisoned_samples_are_the_most_susceptible(tmp_path: Path) -> None:
    """A small CNN backdoored with a dot trigger (10% of the set, dirty label, target 0): the
    poisons' outputs move most under denoising (AUROC > 0.9), the top 30% holds nearly all of
    them, and the retrained model has lost the backdoor."""
    classes = tuple(str(c) for c in range(10))
    x, y = toy_images(1200, seed=0)
    candidates = torch.nonzero(y != 0).flatten()
    pick = torch.randperm(candidates.numel(), generator=torch.Generator().manual_seed(1))[:120]
    poison = torch.zeros(1200, dtype=torch.bool)
    poison[candidates[pick]] = True
    x[poison], y[poison] = with_dots(x[poison]), 0
    train = ImageSet(x, y, classes)
    recipe = toy_recipe()
    fit_fn = functools.partial(
        fit, recipe=recipe, device="cpu", seed=0, augment=Augment(1), progress=False
    )
    model = SmallCNN(10, 3, (16, 16), [0.5] * 3, [0.25] * 3, width=8)
    fit_fn(model, train)
    xt, yt = toy_images(500, seed=999)
    keep = yt != 0
    asr = (predict(model, with_dots(xt[keep])) == 0).float().mean().item()
    assert asr > 0.9  # the backdoor is there

    def new_model() -> nn.Module:
        torch.manual_seed(1)
        return SmallCNN(10, 3, (16, 16), [0.5] * 3, [0.25] * 3, width=8)

    ctx = make_ctx(model, train, tmp_path, fit_fn, new_model)
    result = UltraClean().run(ctx)

    auroc = metrics.auroc(result.train_scores, poison)
    assert auroc is not None and auroc > 0.9
    det = metrics.detection(result.train_flags, poison, result.train_scores)
    assert det["det_tpr"] > 0.9
    acc = (predict(result.model, xt) == yt).float().mean().item()
    asr_after = (predict(result.model, with_dots(xt[keep])) == 0).float().mean().item()
    assert acc > 0.8 and asr_after < 0.2


# -- the paper experiments (compose only: the Blend cell needs helper H3's attack.formula) ---
@pytest.mark.parametrize("defense", ["undefended", "ultraclean"])
@pytest.mark.parametrize("attack", ["badnets", "blend"])
def test_dirty_label_experiment_is_the_official_setting(
    attack: str, defense: str, tmp_path: Path
) -> None:
    cfg = compose_cfg(
        [
            "experiment=ultraclean_cifar10",
            f"attack_setting=ultraclean/{attack}",
            f"defense={defense}",
            "paths.hello_kitty=/k/hello_kitty.jpeg",
        ],
        tmp_path,
    )
    assert cfg.model._target_.endswith("VGG16BN") and cfg.dataset._target_.endswith("CIFAR10")
    assert (cfg.attack.target_class, cfg.attack.poison_rate, cfg.attack.mode) == (1, 0.1, "all2one")
    assert cfg.defense_data.clean_fraction == 0.0  # all 50,000 images, as the official code
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.scheduler) == (200, 0.1, None)
    assert (cfg.train.optimizer.momentum, cfg.train.optimizer.weight_decay) == (0.9, 5e-4)
    if attack == "badnets":
        assert cfg.attack._target_ == "attacks.badnets.BadNets"
        assert (cfg.attack.pattern, cfg.attack.size, cfg.attack.position) == (
            "checker",
            3,
            "bottom_right",
        )
        instantiate_entry(cfg.attack, "attack").validate(10, (3, 32, 32), 50000)
    else:
        assert cfg.attack._target_ == "attacks.blend.Blend"
        assert (cfg.attack.formula, cfg.attack.alpha, cfg.attack.test_alpha) == (
            "additive",
            0.2,
            0.2,
        )
        assert cfg.attack.key_path == "/k/hello_kitty.jpeg"
    built = instantiate_entry(cfg.defense, "defense")  # no key meant for another defense
    if defense == "ultraclean":
        assert (built.score_space, built.removal_ratio, built.known_target) == ("logits", 0.3, None)


def test_clean_label_experiment_scores_on_softmax(tmp_path: Path) -> None:
    cfg = compose_cfg(
        ["experiment=ultraclean_cifar10_clean_label", "defense.removal_ratio=0.05"], tmp_path
    )
    built = instantiate_entry(cfg.defense, "defense")
    assert (built.score_space, built.removal_ratio) == ("softmax", 0.05)
    assert cfg.attack._target_ == "attacks.label_consistent.LabelConsistent"
    assert cfg.defense_data.clean_fraction == 0.0
