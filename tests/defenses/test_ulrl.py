"""ULRL: the MAD selection, the row re-initialisation and the cosine term on hand-made tensors;
the official recipes of both phases; the clean subset; and (slow) the mechanism: on a model
backdoored towards a non-zero target, unlearning moves the target's row most and ULRL flags
it."""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from benchmark.errors import ConfigError
from benchmark.models.base import ImageClassifier
from benchmark.models.small_cnn import SmallCNN
from benchmark.train import Augment, fit, predict
from benchmark.types import ImageSet
from defenses.base import DefenseContext
from defenses.ulrl import ULRL
from defenses.ulrl_parts import (
    cosine_penalty,
    find_last_linear,
    reinit_rows,
    robust_z,
    row_change_scores,
    select_rows,
)
from tests.conftest import toy_set

S = 1.4826


# -- scores and selection -----------------------------------------------------------------------
def test_row_change_scores_are_l1_norms_of_the_row_changes() -> None:
    before = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    after = torch.tensor([[1.5, 1.0, 3.0], [-1.0, 2.0, 0.5]])
    assert torch.equal(row_change_scores(before, after), torch.tensor([1.5, 3.5]))


def test_robust_z_uses_median_and_scaled_mad() -> None:
    z, median, mad = robust_z(torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0]))
    assert median == 3.0 and mad == 1.0  # deviations 2, 1, 0, 1, 97
    assert torch.allclose(z, torch.tensor([2.0, 1.0, 0.0, 1.0, 97.0]) / S)


def test_robust_z_takes_the_lower_median_of_an_even_count() -> None:
    # torch's (and the official code's) convention; numpy would give 2.5 and 1.0
    _, median, mad = robust_z(torch.tensor([4.0, 1.0, 3.0, 2.0]))
    assert median == 2.0 and mad == 1.0  # deviations 2, 1, 1, 0 -> lower median 1


def base_scores() -> torch.Tensor:
    """Ten rows with a spread around 1.0 (median 1.0, MAD 0.02)."""
    return torch.tensor([1.00, 0.98, 1.02, 0.99, 1.01, 0.97, 1.03, 1.00, 0.96, 1.04])


def test_one_outlier_is_flagged() -> None:
    scores = base_scores()
    scores[7] = 3.0
    sel = select_rows(scores)
    assert sel.rows.tolist() == [7] and sel.candidates.tolist() == [7]
    assert sel.z[7] > 3.5 and (sel.z[torch.arange(10) != 7] <= 3.5).all()


def test_z_just_at_the_threshold_is_not_flagged() -> None:
    # median 3 (the lower middle of six), MAD 1; with scale 1, a score of 6.5 has z = 3.5
    at = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.5])
    assert select_rows(at, scale=1.0).rows.numel() == 0  # the rule is strict
    above = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.51])
    assert select_rows(above, scale=1.0).rows.tolist() == [5]


def test_low_outliers_are_not_flagged() -> None:
    # a row that barely moved is far from the median too, but below it
    scores = base_scores()
    scores[2] = 0.0
    sel = select_rows(scores)
    assert sel.z[2] > 3.5 and sel.rows.numel() == 0 and sel.candidates.numel() == 0


@pytest.mark.parametrize(
    ("order", "expected"), [("index", [1, 5]), ("score", [5, 8])], ids=["index", "score"]
)
def test_at_most_two_rows_index_or_score_order(order: str, expected: list[int]) -> None:
    scores = base_scores()
    scores[1], scores[5], scores[8] = 5.0, 9.0, 7.0
    sel = select_rows(scores, order=order)
    assert sel.candidates.tolist() == [1, 5, 8]
    assert sel.rows.tolist() == expected


def test_score_order_breaks_ties_by_lower_index() -> None:
    scores = base_scores()
    scores[[2, 4, 9]] = 5.0
    assert select_rows(scores, order="score").rows.tolist() == [2, 4]


def test_max_flagged_is_the_cap() -> None:
    scores = base_scores()
    scores[[1, 5, 8]] = torch.tensor([5.0, 9.0, 7.0])
    assert select_rows(scores, max_flagged=1).rows.tolist() == [1]
    assert select_rows(scores, max_flagged=1, order="score").rows.tolist() == [5]
    assert select_rows(scores, max_flagged=3).rows.tolist() == [1, 5, 8]


def test_empty_selection() -> None:
    sel = select_rows(base_scores())
    assert sel.rows.numel() == 0 and sel.candidates.numel() == 0
    assert sel.rows.dtype == torch.long


def test_mad_zero_flags_rows_above_the_median_without_dividing_by_zero() -> None:
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 3.0, 0.5])
    sel = select_rows(scores)
    assert sel.mad == 0.0 and sel.median == 1.0
    assert not torch.isnan(sel.z).any()
    assert math.isinf(sel.z[7]) and math.isinf(sel.z[8]) and math.isinf(sel.z[9])
    assert (sel.z[:7] == 0).all()
    assert sel.rows.tolist() == [7, 8]  # row 9 is below the median
    # more than two above the median: the cap and the order still apply
    scores[0] = 5.0
    assert select_rows(scores).rows.tolist() == [0, 7]
    assert select_rows(scores, order="score").rows.tolist() == [0, 8]


def test_mad_zero_with_identical_scores_flags_nothing() -> None:
    sel = select_rows(torch.full((10,), 0.3))
    assert sel.rows.numel() == 0 and sel.mad == 0.0 and (sel.z == 0).all()


def test_unknown_order_is_rejected() -> None:
    with pytest.raises(ValueError, match="order"):
        select_rows(base_scores(), order="top")  # type: ignore[arg-type]


# -- re-initialisation and the cosine term ------------------------------------------------------
def test_reinit_touches_only_the_flagged_rows() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 5)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    rows = torch.tensor([1, 3])
    reinit_rows(layer, rows, torch.Generator().manual_seed(0))
    others = torch.tensor([0, 2, 4])
    assert torch.equal(layer.weight[others], w0[others])
    assert torch.equal(layer.bias[others], b0[others])
    assert (layer.weight[rows] != w0[rows]).all()
    assert torch.equal(layer.bias[rows], torch.zeros(2))
    bound = math.sqrt(2.0 / 8)
    assert layer.weight[rows].abs().max() <= bound
    # seeded: the same generator state gives the same rows
    again = nn.Linear(8, 5)
    reinit_rows(again, rows, torch.Generator().manual_seed(0))
    assert torch.equal(again.weight[rows], layer.weight[rows])


def test_reinit_of_no_rows_and_without_bias() -> None:
    layer = nn.Linear(4, 3, bias=False)
    w0 = layer.weight.detach().clone()
    reinit_rows(layer, torch.tensor([], dtype=torch.long), torch.Generator().manual_seed(0))
    assert torch.equal(layer.weight, w0)
    reinit_rows(layer, torch.tensor([2]), torch.Generator().manual_seed(0))
    assert torch.equal(layer.weight[:2], w0[:2]) and not torch.equal(layer.weight[2], w0[2])


def test_cosine_penalty_by_hand() -> None:
    original = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    weight = torch.tensor([[9.0, 9.0], [3.0, 0.0], [0.0, -1.0]])
    rows = torch.tensor([1, 2])
    # row 1 (3, 0) vs (1, 0): cos 1; row 2 (0, -1) vs (0, 2): cos -1
    assert cosine_penalty(weight, rows, original).item() == pytest.approx(0.0)
    assert cosine_penalty(weight, torch.tensor([1]), original[:1]).item() == pytest.approx(1.0)
    no_rows = torch.tensor([], dtype=torch.long)
    assert cosine_penalty(weight, no_rows, original[:0]).item() == 0.0


def test_minimising_the_cosine_term_moves_rows_away_from_their_originals() -> None:
    original = torch.tensor([[1.0, 1.0, 0.0]])
    weight = torch.tensor([[1.0, 0.5, 0.2], [5.0, 5.0, 5.0]], requires_grad=True)
    rows = torch.tensor([0])
    before = cosine_penalty(weight, rows, original).item()
    cosine_penalty(weight, rows, original).backward()
    assert torch.equal(weight.grad[1], torch.zeros(3))  # unflagged rows get no gradient
    with torch.no_grad():
        weight -= 0.1 * weight.grad
    assert cosine_penalty(weight, rows, original).item() < before


# -- the final linear layer ---------------------------------------------------------------------
def small_cnn(num_classes: int = 5, in_chans: int = 3, size: int = 8) -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(num_classes, in_chans, (size, size), [0.5] * in_chans, [0.25] * in_chans, 4)


def test_finds_the_harness_models_last_linear() -> None:
    model = small_cnn()
    assert find_last_linear(model, 5) == ("fc", model.fc)


def test_finds_a_timm_models_classifier() -> None:
    from benchmark.models.timm import TimmClassifier

    model = TimmClassifier(10, 1, (28, 28), [0.5], [0.5], name="resnet18")
    name, layer = find_last_linear(model, 10)
    assert name == "net.fc" and layer is model.net.get_classifier()


def test_plain_module_uses_its_last_linear() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
    assert find_last_linear(model, 3) == ("3", model[3])


def test_a_model_without_a_final_linear_layer_fails_clearly() -> None:
    conv_only = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ConfigError, match=r"model: ULRL .* rows of the final nn.Linear"):
        find_last_linear(conv_only, 4)

    class ConvHead(ImageClassifier):
        head_name = "head"

        def __init__(self) -> None:
            super().__init__(4, 3, (8, 8), [0.5] * 3, [0.25] * 3)
            self.head = nn.Conv2d(3, 4, 1)

    with pytest.raises(ConfigError, match=r"ConvHead has none.*not nn\.Linear"):
        find_last_linear(ConvHead(), 4)
    embedding = nn.Sequential(nn.Flatten(), nn.Linear(12, 16))
    with pytest.raises(ConfigError, match="16 outputs for 4 classes"):
        find_last_linear(embedding, 4)


# -- settings -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("order", "top"),
        ("source", "test"),
        ("max_flagged", 0),
        ("clean_fraction_of_train", 0.0),
        ("z_threshold", -1.0),
        ("stop_acc", 1.5),
        ("unlearn_epochs", 2.5),
        ("reinit", "yes"),
        ("unlearn_milestones", [0, 10]),
    ],
)
def test_bad_settings_name_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"defense\.{key}"):
        ULRL(**{key: value})


def test_validate_needs_clean_data() -> None:
    with pytest.raises(ConfigError, match=r"defense_data\.clean_fraction"):
        ULRL().validate(10, 1000, 0)
    with pytest.raises(ConfigError, match=r"defense\.clean_fraction_of_train"):
        ULRL().validate(10, 90, 9)  # 1% of 99 images is no image
    ULRL().validate(10, 95, 5)


# -- the defense on toy data --------------------------------------------------------------------
def toy_recipe() -> Any:
    """A training recipe like train=small (its nesterov must not leak into ULRL's phases)."""
    return OmegaConf.create(
        {
            "epochs": 1,
            "batch_size": 32,
            "lr": 0.05,
            "optimizer": {
                "_target_": "torch.optim.SGD",
                "_partial_": True,
                "lr": 0.05,
                "momentum": 0.9,
                "nesterov": True,
            },
            "scheduler": None,
            "augment": True,
            "amp": False,
            "channels_last": False,
            "grad_clip": None,
        }
    )


def make_ctx(
    model: nn.Module, train: ImageSet, clean: ImageSet, tmp_path: Path, fit_fn: Any = None
) -> DefenseContext:
    recipe = toy_recipe()
    return DefenseContext(
        train_set=train,
        clean_set=clean,
        model=model,
        num_classes=train.num_classes,
        fit=fit_fn
        or functools.partial(
            fit, recipe=recipe, device="cpu", seed=0, augment=Augment(1), progress=False
        ),
        new_model=lambda: small_cnn(train.num_classes),
        seed=0,
        device=torch.device("cpu"),
        work_dir=tmp_path / "defense",
        recipe=recipe,
    )


def test_clean_subset_is_one_percent_of_the_training_split_stratified(tmp_path: Path) -> None:
    train, reserve = toy_set(380, 5), toy_set(120, 5, seed=1)
    ctx = make_ctx(small_cnn(), train, reserve, tmp_path)
    subset, info = ULRL().clean_subset(ctx)
    assert len(subset) == 5 and info == {
        "clean_source": "reserve",
        "n_clean_wanted": 5,
        "clean_reserve_too_small": False,
        "n_clean_used": 5,
    }
    assert torch.bincount(subset.y, minlength=5).tolist() == [1] * 5
    again, _ = ULRL().clean_subset(ctx)
    assert torch.equal(again.x, subset.x)  # seeded


def test_source_train_draws_from_the_delivered_training_set(tmp_path: Path) -> None:
    train, reserve = toy_set(380, 5), toy_set(120, 5, seed=1)
    ctx = make_ctx(small_cnn(), train, reserve, tmp_path)
    subset, info = ULRL(source="train").clean_subset(ctx)
    assert len(subset) == 5 and info["clean_source"] == "train" and info["n_clean_used"] == 5
    # every image is one of the training set's (none of the reserve's)
    flat = train.x.flatten(1)
    assert all(bool((flat == img.flatten()).all(1).any()) for img in subset.x)
    assert ULRL().clean_subset(ctx)[1]["clean_source"] == "reserve"
    ULRL(source="train").validate(5, 380, 0)  # no reserve needed


def test_a_small_reserve_is_used_whole_and_recorded(tmp_path: Path) -> None:
    train, reserve = toy_set(380, 5), toy_set(20, 5, seed=1)
    ctx = make_ctx(small_cnn(), train, reserve, tmp_path)
    subset, info = ULRL(clean_fraction_of_train=0.1).clean_subset(ctx)
    assert subset is reserve
    assert info == {
        "clean_source": "reserve",
        "n_clean_wanted": 40,
        "clean_reserve_too_small": True,
        "n_clean_used": 20,
    }


class FitSpy:
    """Records every ``fit`` call and checks the relearning start; trains one epoch."""

    def __init__(self, original: nn.Module, alpha: float) -> None:
        self.original = copy.deepcopy(original)
        self.alpha = alpha
        self.calls: list[dict[str, Any]] = []

    def __call__(self, model: nn.Module, data: ImageSet, **kw: Any) -> Any:
        self.calls.append({"model": model, "n": len(data), **kw})
        if kw["desc"] == "ulrl relearn":
            self.check_relearn_start(model, data, kw["loss_fn"])
        recipe = OmegaConf.merge(kw.pop("recipe"), {"epochs": 1})
        kw.pop("desc")
        return fit(model, data, recipe, device="cpu", augment=Augment(1), progress=False, **kw)

    def check_relearn_start(self, model: nn.Module, data: ImageSet, loss_fn: Any) -> None:
        ref = self.original.state_dict()
        state = model.state_dict()
        flagged = self.calls[0]["flagged"] = torch.nonzero(
            (state["fc.weight"] != ref["fc.weight"]).any(1)
        ).flatten()
        # restarted from the original weights (not the unlearned ones), BN statistics included
        for k, v in state.items():
            if k not in ("fc.weight", "fc.bias"):
                assert torch.equal(v, ref[k]), k
        kept = torch.ones(len(ref["fc.bias"]), dtype=torch.bool)
        kept[flagged] = False
        assert torch.equal(state["fc.weight"][kept], ref["fc.weight"][kept])
        assert torch.equal(state["fc.bias"][kept], ref["fc.bias"][kept])
        assert (state["fc.bias"][flagged] == 0).all()
        # the loss is CE + alpha * sum of the flagged rows' cosines to their originals
        logits, y = torch.randn(8, len(kept)), data.y[:8]
        extra = (loss_fn(logits, y) - F.cross_entropy(logits, y)).item()
        cos = F.cosine_similarity(
            state["fc.weight"][flagged], ref["fc.weight"][flagged], dim=1
        ).sum()
        assert extra == pytest.approx(self.alpha * cos.item(), abs=1e-5)


def test_phases_use_the_official_recipes_and_relearn_from_the_original(tmp_path: Path) -> None:
    train, reserve = toy_set(450, 5, (3, 8, 8)), toy_set(50, 5, (3, 8, 8), seed=1)
    model = small_cnn()
    spy = FitSpy(model, alpha=0.7)
    ctx = make_ctx(model, train, reserve, tmp_path, fit_fn=spy)
    defense = ULRL(clean_fraction_of_train=0.1, z_threshold=1e-6, alpha=0.7)
    state = copy.deepcopy(model.state_dict())
    result = defense.run(ctx)

    assert [c["desc"] for c in spy.calls] == ["ulrl unlearn", "ulrl relearn"]
    unlearn, relearn = spy.calls
    assert unlearn["n"] == relearn["n"] == 50
    assert unlearn["model"] is not model and relearn["model"] is result.model
    r = unlearn["recipe"]
    assert (r.epochs, r.batch_size, r.grad_clip, r.augment) == (20, 128, 20.0, True)
    assert OmegaConf.to_container(r.optimizer) == {
        "_target_": "torch.optim.SGD",
        "_partial_": True,
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 5e-4,
    }
    assert r.scheduler._target_.endswith("MultiStepLR")
    assert list(r.scheduler.milestones) == [10, 20] and r.scheduler.gamma == 0.1
    logits, y = torch.randn(6, 5), torch.arange(6) % 5
    assert unlearn["loss_fn"](logits, y).item() == pytest.approx(-F.cross_entropy(logits, y))
    stop = unlearn["on_epoch_end"]
    assert stop(0, {"acc": 0.2}) and not stop(0, {"acc": 0.21})
    r = relearn["recipe"]
    assert (r.epochs, r.batch_size, r.grad_clip, r.augment) == (20, 128, None, True)
    assert r.optimizer.lr == 0.001 and r.optimizer.weight_decay == 0.0
    assert r.optimizer.momentum == 0.9 and "nesterov" not in r.optimizer
    assert r.scheduler._target_.endswith("CosineAnnealingLR") and r.scheduler.T_max == 20
    assert relearn["seed"] != unlearn["seed"]

    extras = result.extras
    flagged = [int(i) for i in extras["flagged_rows"].split(",")]
    assert flagged == unlearn["flagged"].tolist() and extras["n_flagged"] == len(flagged) == 2
    assert extras["unlearn_epochs"] == 1 and extras["layer"] == "fc"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    saved = torch.load(tmp_path / "defense" / "ulrl_scores.pt", weights_only=True)
    assert saved["flagged"].tolist() == flagged and saved["scores"].shape == (5,)


def test_empty_selection_is_plain_fine_tuning_and_says_so(tmp_path: Path) -> None:
    train, reserve = toy_set(450, 5, (3, 8, 8)), toy_set(50, 5, (3, 8, 8), seed=1)
    model = small_cnn()
    spy = FitSpy(model, alpha=0.7)
    ctx = make_ctx(model, train, reserve, tmp_path, fit_fn=spy)
    result = ULRL(clean_fraction_of_train=0.1, z_threshold=1e9, alpha=0.7).run(ctx)
    extras = result.extras
    assert extras["flagged_rows"] == "" and extras["n_flagged"] == 0
    assert extras["nothing_flagged"] is True and extras["relearn_mean_cos"] is None
    assert spy.calls[0]["flagged"].numel() == 0  # relearning started from the original model
    assert result.model is not model


# -- the mechanism ------------------------------------------------------------------------------
def toy_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten classes of smooth colour prototypes (fixed) plus per-image noise, 3x16x16 uint8."""
    protos = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(123))
    protos = F.avg_pool2d(protos, 3, 1, 1)
    y = torch.arange(n) % 10
    noise = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return (255 * (0.6 * protos[y] + 0.4 * noise)).round().to(torch.uint8), y


def with_patch(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, :, -3:, -3:] = 255
    return x


@pytest.mark.slow
@pytest.mark.parametrize("target", [2, 6])
def test_ulrl_flags_the_target_row_of_a_backdoored_model(target: int, tmp_path: Path) -> None:
    """A small CNN trained with a 3x3 patch backdoor (10% poisoned) towards ``target``: the
    target's classifier row is the one gradient ascent on clean data changes most, ULRL flags
    it, and relearning removes most of the backdoor."""
    classes = tuple(str(c) for c in range(10))
    x, y = toy_digits(1200, seed=0)
    poison = torch.randperm(1200, generator=torch.Generator().manual_seed(1))[:120]
    x[poison], y[poison] = with_patch(x[poison]), target
    train = ImageSet(x, y, classes)
    recipe = toy_recipe()
    recipe.epochs, recipe.batch_size, recipe.optimizer.nesterov = 6, 64, False
    recipe.optimizer.weight_decay = 5e-4
    recipe.scheduler = {
        "_target_": "torch.optim.lr_scheduler.CosineAnnealingLR",
        "_partial_": True,
        "T_max": 6,
    }
    torch.manual_seed(0)
    model = SmallCNN(10, 3, (16, 16), [0.5] * 3, [0.25] * 3, width=8)
    fit(model, train, recipe, seed=0, augment=Augment(1), progress=False)
    xt, yt = toy_digits(500, seed=999)
    keep = yt != target
    asr = (predict(model, with_patch(xt[keep])) == target).float().mean().item()
    assert asr > 0.9  # the backdoor is there

    xc, yc = toy_digits(100, seed=555)
    ctx = make_ctx(model, train, ImageSet(xc, yc, classes), tmp_path)
    result = ULRL(clean_fraction_of_train=100 / 1300).run(ctx)

    extras = result.extras
    assert extras["n_clean_used"] == 100
    assert extras["top_score_row"] == target
    assert target in [int(i) for i in extras["flagged_rows"].split(",")]
    assert extras["max_z"] > 3.5
    asr_after = (predict(result.model, with_patch(xt[keep])) == target).float().mean().item()
    assert asr_after < 0.5
