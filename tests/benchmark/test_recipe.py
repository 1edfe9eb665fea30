"""The optional recipe keys (benchmark/recipe.py): their defaults leave ``fit`` as it was, and each
does what it says; the data-init hook runs once, on a fresh model only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from benchmark import recipe as parts
from benchmark.errors import ConfigError
from benchmark.models.small_cnn import SmallCNN
from benchmark.train import Augment, fit
from benchmark.validate import check_recipe
from tests.benchmark.test_train import RECIPE, _model, _same_weights
from tests.conftest import toy_set

# Every optional key at its documented default.
DEFAULTS = {
    "label_smoothing": 0.0,
    "norm_lr_scale": 1.0,
    "scheduler_interval": "epoch",
    "lookahead": None,
    "freeze_after": None,
    "drop_last": False,
    "flip": "random",
    "crop_padding": None,
    "pad_mode": "zeros",
    "compile": False,
}


def _fit(recipe, model=None, **kw):
    model = model or _model()
    kw = {"seed": 4, "augment": Augment(1, True), "progress": False, **kw}
    return model, fit(model, toy_set(40, 4, seed=1), recipe, **kw)


def test_explicit_defaults_train_exactly_as_no_keys() -> None:
    a, ra = _fit(RECIPE)
    b, rb = _fit(OmegaConf.merge(RECIPE, DEFAULTS))
    assert _same_weights(a, b) and ra.history == rb.history


@pytest.mark.parametrize(
    "change",
    [
        {"label_smoothing": 0.2},
        {"norm_lr_scale": 8.0},
        {"lookahead": {"k": 2, "decay": 0.9, "power": 1}},
        {"drop_last": True},
        {"flip": "alternating"},
        {"crop_padding": 2},
        {"pad_mode": "reflect"},
        {"freeze_after": {"block1": 1}},
    ],
    ids=lambda c: next(iter(c)),
)
def test_each_key_changes_training(change: dict) -> None:
    a, _ = _fit(RECIPE)
    b, _ = _fit(OmegaConf.merge(RECIPE, change))
    assert not _same_weights(a, b)


def test_label_smoothing_is_the_default_loss() -> None:
    logits, y = torch.randn(8, 4), torch.arange(8) % 4
    smoothed = parts.train_loss({"label_smoothing": 0.2})(logits, y)
    q = torch.full((8, 4), 0.2 / 4) + 0.8 * nn.functional.one_hot(y, 4)
    expected = -(q * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(smoothed, expected)
    _, r = _fit(OmegaConf.merge(RECIPE, {"label_smoothing": 0.2}), loss_fn=nn.CrossEntropyLoss())
    _, plain = _fit(RECIPE)
    assert r.history == plain.history  # a caller's loss_fn is used as given


def test_norm_lr_scale_makes_a_norm_group() -> None:
    model = _model()
    params = list(model.parameters())
    opt, _ = parts.build_optimizer(OmegaConf.merge(RECIPE, {"norm_lr_scale": 64}), params, model)
    other, norm = opt.param_groups
    norm_ids = {
        id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()
    }
    assert {id(p) for p in norm["params"]} == norm_ids
    assert norm["lr"] == pytest.approx(64 * other["lr"])
    # The decay per step (lr x wd) is the same in both groups (airbench's bias_scaler).
    assert norm["lr"] * norm["weight_decay"] == pytest.approx(other["lr"] * other["weight_decay"])


def test_warmup_linear_is_airbenchs_schedule() -> None:
    total = 476  # airbench94 on CIFAR-10: ceil(48 * 9.9)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = parts.warmup_linear(opt, total_steps=total)
    warmup = int(total * 0.23)
    for step in range(total):
        # airbench/utils.py get_lr at f1c599c, written out
        if step < warmup:
            frac = step / warmup
            factor = 0.2 * (1 - frac) + 1.0 * frac
        else:
            frac = (step - warmup) / (total - warmup)
            factor = 1.0 * (1 - frac) + 0.07 * frac
        assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * factor), step
        opt.step()
        sched.step()


def test_per_step_scheduler_steps_every_batch() -> None:
    recipe = OmegaConf.merge(
        RECIPE,
        {"scheduler": None},  # a whole new node, not merged into MultiStepLR's
        {
            "scheduler": {"_target_": "benchmark.recipe.warmup_linear", "_partial_": True},
            "scheduler_interval": "step",
        },
    )
    _, r = _fit(recipe, epochs=2, batch_size=8)  # 5 steps per epoch, 10 in all
    lrs = [h["lr"] for h in r.history]  # the lr after each epoch's last step
    factor = parts.WarmupLinear(10, 0.23, 0.2, 0.07)
    assert lrs == pytest.approx([0.05 * factor(5), 0.05 * factor(10)])


def test_lookahead_schedule_and_final_sync() -> None:
    spec = {"k": 5, "decay": 0.95, "power": 3}
    assert parts.lookahead_alpha(spec, 5, 480) == pytest.approx(1 - 0.95**5 * (5 / 480) ** 3)
    assert parts.lookahead_alpha(spec, 480, 480) == pytest.approx(1 - 0.95**5)
    recipe = OmegaConf.merge(RECIPE, {"lookahead": {"k": 3, "decay": 0.9, "power": 1}})
    seen = {}

    def spy(epoch: int, stats: dict) -> bool:
        seen[epoch] = [p.detach().clone() for p in model.parameters()]
        return False

    model = _model()
    fit(model, toy_set(40, 4, seed=1), recipe, seed=4, progress=False, on_epoch_end=spy)
    # The trained model is the slow weights: at the end fast = slow (airbench's decay-1 update).
    # The sync before on_epoch_end of the last epoch already made it so.
    assert all(torch.equal(a, b) for a, b in zip(seen[2], model.parameters(), strict=True))


def test_steps_per_epoch() -> None:
    assert parts.steps_per_epoch(100, 32) == 4
    assert parts.steps_per_epoch(100, 32, drop_last=True) == 3
    assert parts.steps_per_epoch(10, 32, drop_last=True) == 1  # smaller than one batch
    assert parts.steps_per_epoch(33, 32) == 1  # a one-sample trailing batch is always dropped


def test_alternating_flip_mirrors_every_image_every_other_epoch() -> None:
    x = torch.rand(6, 1, 3, 3)
    start = parts.flip_starts(6, 0, torch.device("cpu"))
    e0, e1, e2 = (parts.alternating_flip(x, start, e) for e in range(3))
    assert torch.equal(e0, e2)
    for i in range(6):
        pair = (e0[i], e1[i])
        assert torch.equal(pair[0], x[i].flip(2)) != torch.equal(pair[1], x[i].flip(2))
    aug, alternating = parts.adapt_augment(Augment(4, True), {"flip": "alternating"})
    assert alternating and aug == Augment(4, False)  # fit flips; the crop no longer does
    aug, alternating = parts.adapt_augment(Augment(4, False), {"flip": "alternating"})
    assert not alternating and aug == Augment(4, False)  # the dataset forbids flips


def test_recipe_crop_settings_override_the_datasets() -> None:
    aug, _ = parts.adapt_augment(Augment(4, True), {"crop_padding": 2, "pad_mode": "reflect"})
    assert aug == Augment(2, True, "reflect")
    x = torch.arange(16.0).view(1, 1, 4, 4).expand(50, 1, 4, 4)
    out = aug(x, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) <= set(range(16))  # reflection: no zeros padded in
    assert parts.adapt_augment(Augment(4, True), {"augment": False}) == (None, False)


def test_freeze_after_trains_then_freezes_and_restores() -> None:
    model = _model()
    first = model.block1[0].weight
    snapshots = []

    def spy(epoch: int, stats: dict) -> bool:
        snapshots.append(first.detach().clone())
        return False

    recipe = OmegaConf.merge(RECIPE, {"freeze_after": {"block1": 1}})
    fit(model, toy_set(40, 4, seed=1), recipe, seed=4, progress=False, on_epoch_end=spy)
    assert not torch.equal(snapshots[0], _model().block1[0].weight)  # trained in epoch 1
    assert torch.equal(snapshots[0], snapshots[1]) and torch.equal(snapshots[1], snapshots[2])
    assert all(p.requires_grad for p in model.parameters())  # restored


class DataInitNet(SmallCNN):
    """A small CNN that records its data initialisations."""

    def __init__(self) -> None:
        super().__init__(4, 3, (12, 12), (0.5,) * 3, (0.25,) * 3, width=8)
        self.register_buffer("done", torch.zeros((), dtype=torch.bool))
        self.calls: list[torch.Tensor] = []

    def needs_data_init(self) -> bool:
        return not bool(self.done)

    def init_from_data(self, x: torch.Tensor, gen: torch.Generator) -> None:
        self.calls.append(torch.randperm(len(x), generator=gen)[:5])
        self.done.fill_(True)


def test_data_init_runs_once_seeded_and_never_on_a_trained_model(tmp_path: Path) -> None:
    data = toy_set(40, 4, seed=1)
    a, b = DataInitNet(), DataInitNet()
    fit(a, data, RECIPE, epochs=1, seed=4, progress=False)
    fit(b, data, RECIPE, epochs=1, seed=4, progress=False)
    assert len(a.calls) == 1 and torch.equal(a.calls[0], b.calls[0])  # seeded
    fit(a, data, RECIPE, epochs=1, seed=4, progress=False)  # fine-tuning a trained model
    assert len(a.calls) == 1
    copy = DataInitNet()
    copy.load_state_dict(a.state_dict())  # the flag travels with the weights (cache, copies)
    fit(copy, data, RECIPE, epochs=1, seed=4, progress=False)
    assert copy.calls == []


def test_data_init_is_skipped_on_resume(tmp_path: Path) -> None:
    data, ckpt = toy_set(40, 4, seed=1), tmp_path / "ckpt.pt"

    class Interrupt(Exception):
        pass

    def interrupt(epoch: int, stats: dict) -> bool:
        if epoch == 1:  # after the checkpoint of epoch 0
            raise Interrupt
        return False

    first = DataInitNet()
    with pytest.raises(Interrupt):
        fit(first, data, RECIPE, seed=4, progress=False, checkpoint=ckpt, on_epoch_end=interrupt)
    assert len(first.calls) == 1
    resumed = DataInitNet()  # fresh in memory, but the checkpoint holds the initialised state
    result = fit(resumed, data, RECIPE, seed=4, progress=False, checkpoint=ckpt)
    assert result.start_epoch == 1 and resumed.calls == [] and bool(resumed.done)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"label_smoothing": 1.0}, "train.label_smoothing"),
        ({"label_smoothing": "some"}, "train.label_smoothing"),
        ({"norm_lr_scale": 0}, "train.norm_lr_scale"),
        ({"scheduler_interval": "batch"}, "train.scheduler_interval"),
        ({"scheduler_interval": "step", "scheduler": None}, "train.scheduler_interval"),
        ({"lookahead": {"k": 5}}, "train.lookahead"),
        ({"lookahead": {"k": 0, "decay": 0.9, "power": 3}}, "train.lookahead.k"),
        ({"lookahead": {"k": 5, "decay": 1.5, "power": 3}}, "train.lookahead.decay"),
        ({"lookahead": {"k": 5, "decay": 0.9, "power": -1}}, "train.lookahead.power"),
        ({"freeze_after": 3}, "train.freeze_after"),
        ({"freeze_after": {"whiten": -1}}, "train.freeze_after.whiten"),
        ({"drop_last": "yes"}, "train.drop_last"),
        ({"flip": "sometimes"}, "train.flip"),
        ({"crop_padding": -1}, "train.crop_padding"),
        ({"crop_padding": 1.5}, "train.crop_padding"),
        ({"pad_mode": "edge"}, "train.pad_mode"),
        ({"compile": "fast"}, "train.compile"),
    ],
)
def test_bad_recipe_values_name_their_key(change: dict, key: str) -> None:
    check_recipe(OmegaConf.merge(RECIPE, DEFAULTS))  # the defaults are valid
    with pytest.raises(ConfigError) as err:
        check_recipe(OmegaConf.merge(RECIPE, change))
    assert err.value.key == key


def test_resume_with_every_key_equals_uninterrupted(tmp_path: Path) -> None:
    """Lookahead's slow weights and step counter, the per-step schedule, the frozen parameters
    and the flip starts all come back from the checkpoint or the seed."""
    recipe = OmegaConf.merge(
        RECIPE,
        {"scheduler": None},
        {
            "scheduler": {"_target_": "benchmark.recipe.warmup_linear", "_partial_": True},
            "scheduler_interval": "step",
            "lookahead": {"k": 2, "decay": 0.9, "power": 3},
            "freeze_after": {"block1": 1},
            "label_smoothing": 0.1,
            "norm_lr_scale": 4.0,
            "flip": "alternating",
            "drop_last": True,
        },
    )
    data, ckpt = toy_set(44, 4, seed=2), tmp_path / "ckpt.pt"
    kw = {"seed": 3, "augment": Augment(1, True), "batch_size": 8, "progress": False}
    full = _model()
    fit(full, data, recipe, **kw)

    class Interrupt(Exception):
        pass

    def interrupt(epoch: int, stats: dict) -> bool:
        if epoch == 1:
            raise Interrupt
        return False

    with pytest.raises(Interrupt):
        fit(_model(), data, recipe, checkpoint=ckpt, on_epoch_end=interrupt, **kw)
    resumed = _model(seed=123)
    result = fit(resumed, data, recipe, checkpoint=ckpt, **kw)
    assert result.start_epoch == 1
    assert _same_weights(full, resumed)


@pytest.mark.parametrize(
    ("kernels", "amx", "expected"),
    [(True, True, True), (True, False, False), (False, True, False), (False, False, False)],
)
def test_cpu_bf16_needs_onednn_kernels_and_amx(
    monkeypatch: pytest.MonkeyPatch, kernels: bool, amx: bool, expected: bool
) -> None:
    """``amp: auto`` on a CPU means bf16 only where it is faster: oneDNN's bf16 kernels *and*
    AMX tiles (AVX512-BF16 alone measured 1.4-1.6x slower than fp32 on a Xeon without AMX)."""

    class _Mkldnn:
        @staticmethod
        def _is_mkldnn_bf16_supported() -> bool:
            return kernels

    class _Ops:
        mkldnn = _Mkldnn()

    monkeypatch.setattr(parts.torch, "ops", _Ops())
    monkeypatch.setattr(parts.torch._C._cpu, "_init_amx", lambda: amx, raising=False)
    cpu = torch.device("cpu")
    assert parts.bf16_native(cpu) is expected
    assert parts.use_amp({"amp": "auto"}, cpu) is expected
    assert parts.use_amp({"amp": True}, cpu) is True  # an explicit setting is kept
