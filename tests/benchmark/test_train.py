"""The training loop: augmentation, determinism, resume, early stop, NaN guard."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from benchmark.augment import PerBatchAugment
from benchmark.errors import BenchmarkError, TrainingDiverged
from benchmark.io import checksum_path
from benchmark.models.small_cnn import SmallCNN
from benchmark.seeding import generator
from benchmark.train import CHECK_EVERY, Augment, fit, predict, random_crop
from tests.conftest import toy_set

RECIPE = OmegaConf.create(
    {
        "epochs": 3,
        "batch_size": 32,
        "lr": 0.05,
        "optimizer": {
            "_target_": "torch.optim.SGD",
            "_partial_": True,
            "lr": "${..lr}",
            "momentum": 0.9,
            "weight_decay": 5e-4,
        },
        "scheduler": {
            "_target_": "torch.optim.lr_scheduler.MultiStepLR",
            "_partial_": True,
            "milestones": [2],
            "gamma": 0.1,
        },
    }
)


def _model(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(4, 3, (12, 12), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), width=8)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_random_crop_matches_a_padded_window() -> None:
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float).view(2, 3, 5, 5)
    out = random_crop(x, 2, generator(0, "crop"))
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):  # each output is some 5x5 window of its own padded image
        windows = [padded[i, :, r : r + 5, c : c + 5] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert torch.equal(random_crop(x, 2, generator(0, "crop")), out)


def test_flip_only_when_allowed() -> None:
    x = torch.rand(64, 1, 4, 4)
    assert torch.equal(Augment(0, False)(x, generator(0, "a")), x)
    flipped = Augment(0, True)(x, generator(0, "a"))
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and mirrored.any() and same.any()


def test_fit_learns_and_is_deterministic() -> None:
    data = toy_set(128, 4, seed=1)
    # A learnable toy task: the label is written into the top-left pixel.
    x = data.x.clone()
    x[:, :, :3, :3] = (data.y * 60).to(torch.uint8)[:, None, None, None]
    data = type(data)(x, data.y, data.classes)
    a, b = _model(), _model()
    ra = fit(a, data, RECIPE, seed=7, augment=Augment(1, False), progress=False)
    rb = fit(b, data, RECIPE, seed=7, augment=Augment(1, False), progress=False)
    assert _same_weights(a, b)
    assert ra.history == rb.history and len(ra.history) == 3
    assert ra.history[-1]["lr"] == pytest.approx(0.005)  # the scheduler stepped per epoch
    c = _model()
    fit(c, data, RECIPE, epochs=15, scheduler=None, seed=7, progress=False)
    assert (predict(c, data.x) == data.y).float().mean() > 0.9


def test_bf16_autocast_on_cpu_learns_and_changes_the_arithmetic() -> None:
    """``amp: true`` trains under bf16 autocast on CPU too (emulated where bf16 is not native;
    ``auto`` turns it on where oneDNN reports it native, see ``benchmark.recipe``)."""
    data = toy_set(128, 4, seed=1)
    x = data.x.clone()
    x[:, :, :3, :3] = (data.y * 60).to(torch.uint8)[:, None, None, None]
    data = type(data)(x, data.y, data.classes)
    runs = {}
    for amp in (False, True):
        model = _model()
        recipe = OmegaConf.merge(RECIPE, {"amp": amp})
        runs[amp] = fit(model, data, recipe, epochs=15, scheduler=None, seed=7, progress=False)
        assert (predict(model, data.x) == data.y).float().mean() > 0.9
    assert runs[True].history != runs[False].history  # bf16 rounding: not the fp32 numbers


def test_resume_after_interruption_equals_uninterrupted(tmp_path: Path) -> None:
    data = toy_set(96, 4, seed=2)
    ckpt = tmp_path / "ckpt.pt"
    full = _model()
    fit(full, data, RECIPE, seed=3, augment=Augment(1, True), progress=False)

    class Interrupt(Exception):
        pass

    def interrupt(epoch: int, stats: dict) -> bool:
        if epoch == 1:
            raise Interrupt
        return False

    part = _model()
    with pytest.raises(Interrupt):
        fit(
            part,
            data,
            RECIPE,
            seed=3,
            augment=Augment(1, True),
            progress=False,
            checkpoint=ckpt,
            on_epoch_end=interrupt,
        )
    assert ckpt.exists()
    resumed = _model(seed=123)  # different init: everything must come from the checkpoint
    result = fit(
        resumed, data, RECIPE, seed=3, augment=Augment(1, True), progress=False, checkpoint=ckpt
    )
    assert result.start_epoch == 1
    assert _same_weights(full, resumed)


def test_damaged_checkpoint_is_ignored(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"not a checkpoint")
    result = fit(_model(), toy_set(32, 4), RECIPE, epochs=1, progress=False, checkpoint=ckpt)
    assert result.start_epoch == 0 and len(result.history) == 1


def test_flipped_checkpoint_is_detected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = tmp_path / "ckpt.pt"
    fit(_model(), toy_set(32, 4), RECIPE, epochs=1, progress=False, checkpoint=ckpt)
    assert checksum_path(ckpt).is_file()
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # may still unpickle: only the checksum catches it
    ckpt.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="benchmark.train"):
        result = fit(_model(), toy_set(32, 4), RECIPE, epochs=2, progress=False, checkpoint=ckpt)
    assert result.start_epoch == 0 and len(result.history) == 2
    assert "checksum mismatch" in caplog.text and "weights_only" not in caplog.text


def test_early_stop_and_overrides() -> None:
    result = fit(
        _model(),
        toy_set(32, 4),
        RECIPE,
        epochs=5,
        lr=0.01,
        progress=False,
        on_epoch_end=lambda epoch, stats: epoch == 1,
    )
    assert result.stopped_early and len(result.history) == 2
    assert result.history[0]["lr"] == pytest.approx(0.01)


def test_non_finite_loss_stops_with_a_clear_error() -> None:
    with pytest.raises(TrainingDiverged, match="loss became nan in epoch 1"):
        fit(
            _model(),
            toy_set(32, 4),
            RECIPE,
            epochs=1,
            progress=False,
            loss_fn=lambda logits, y: logits.sum() * float("nan"),
        )


def test_divergence_stops_within_check_every_steps_not_at_the_epoch_end() -> None:
    calls = 0

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        loss = torch.nn.functional.cross_entropy(logits, y)
        return loss * float("inf") if calls == 3 else loss

    with pytest.raises(
        TrainingDiverged, match=r"loss became (inf|nan) in epoch 1 \(by step 20\)"
    ) as err:
        fit(
            _model(),
            toy_set(400, 4),
            RECIPE,
            epochs=3,
            batch_size=2,
            progress=False,
            loss_fn=loss_fn,
        )
    assert isinstance(err.value, BenchmarkError)  # one clear line, no traceback, in the CLI
    assert calls == CHECK_EVERY  # 200 steps per epoch, but it stopped at the first check


def test_batch_hook_and_custom_loss_are_used() -> None:
    seen = []

    def hook(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        seen.append(float(x.max()))
        return torch.zeros_like(x), y

    fit(_model(), toy_set(32, 4), RECIPE, epochs=1, batch_size=16, progress=False, batch_hook=hook)
    assert len(seen) == 2 and max(seen) <= 1.0


def test_a_trailing_batch_of_one_is_dropped() -> None:
    """BatchNorm cannot train on one value per channel: with n = k * batch + 1 the last
    single-sample batch is skipped (the 1x1 maps of VGG/ResNet would fail on it)."""
    sizes = []

    def hook(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        sizes.append(len(x))
        return x, y

    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4), nn.Flatten()
    )
    net = nn.Sequential(net, nn.Linear(4, 4))
    fit(net, toy_set(17, 4), RECIPE, epochs=2, batch_size=8, progress=False, batch_hook=hook)
    assert sizes == [8, 8, 8, 8]
    sizes.clear()
    fit(_model(), toy_set(18, 4), RECIPE, epochs=1, batch_size=8, progress=False, batch_hook=hook)
    assert sizes == [8, 8, 2]


def test_an_attacks_per_batch_augmentation_runs_after_the_hook_and_is_seeded() -> None:
    """``fit`` takes any ``(x, gen) -> x`` augmentation (WaNet's PerBatchAugment): it sees the
    hooked batch, draws from the fit's seeded generator, and the run is reproducible."""
    seen = []
    aug = PerBatchAugment(fill=(0.5, 0.5, 0.5), crop_padding=2)

    def hook(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        return torch.ones_like(x), y  # a marker the augmentation must see

    def spy(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        seen.append(bool((x == 1).all()))
        return aug(x, gen)

    data = toy_set(64, 4, seed=3)
    a, b = _model(), _model()
    fit(a, data, RECIPE, epochs=2, seed=5, augment=spy, batch_hook=hook, progress=False)
    fit(b, data, RECIPE, epochs=2, seed=5, augment=aug, batch_hook=hook, progress=False)
    assert seen == [True] * 4 and _same_weights(a, b)
