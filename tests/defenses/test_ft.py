"""Fine-tuning on the clean reserve: the recipe it hands to ``fit`` (BackdoorBench's), that it
trains a copy on the reserve only, what fine-tuning on clean data can and cannot change (a
planted trigger weight moves by weight decay alone), the settings, and (slow) BadNets on
mnist5k: ASR drops while clean accuracy is kept."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from benchmark.errors import ConfigError
from benchmark.models.base import ImageClassifier
from benchmark.train import fit
from benchmark.types import ImageSet
from defenses.base import DefenseContext
from defenses.ft import FT
from tests.conftest import toy_set
from tests.defenses.toys import RECIPE

CONF = Path(__file__).resolve().parents[2] / "conf"
BASE = OmegaConf.create({**RECIPE, "amp": False, "channels_last": False})


def make_ctx(
    model: nn.Module, clean: ImageSet, tmp_path: Path, train: ImageSet | None = None
) -> tuple[DefenseContext, list[dict[str, Any]]]:
    """A context whose ``fit`` records each call (the data's identity and the overrides)."""
    calls: list[dict[str, Any]] = []

    def spy(m: nn.Module, data: ImageSet, **kw: Any) -> Any:
        calls.append({"data": data, **kw})
        return fit(m, data, **{"recipe": BASE, "progress": False, **kw})

    ctx = DefenseContext(
        train_set=train if train is not None else toy_set(40, 4, (3, 8, 8), seed=9),
        clean_set=clean,
        model=model,
        num_classes=clean.num_classes,
        fit=spy,
        new_model=lambda: model,
        seed=0,
        device=torch.device("cpu"),
        work_dir=tmp_path,
        recipe=BASE,
    )
    return ctx, calls


class Linear(ImageClassifier):
    """A linear classifier on the raw pixels (mean 0, std 1: no normalisation)."""

    def __init__(self, shape: tuple[int, int, int] = (1, 4, 4), classes: int = 2) -> None:
        super().__init__(classes, shape[0], shape[1:], [0.0] * shape[0], [1.0] * shape[0])
        self.fc = nn.Linear(shape[0] * shape[1] * shape[2], classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.normalize(x).flatten(1)


def test_run_hands_fit_backdoorbenchs_recipe_on_the_reserve_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Linear((3, 8, 8), 4)
    clean = toy_set(48, 4, (3, 8, 8), seed=1)
    state = copy.deepcopy(model.state_dict())
    ctx, calls = make_ctx(model, clean, tmp_path)
    defense = FT(epochs=2)  # the defaults but the epochs
    result = defense.run(ctx)
    assert len(calls) == 1 and calls[0]["data"] is ctx.clean_set  # never the training set
    r = calls[0]["recipe"]
    assert (r.epochs, r.batch_size, r.lr, r.augment, r.grad_clip) == (2, 256, 0.01, True, None)
    assert r.optimizer._target_ == "torch.optim.SGD"
    assert (r.optimizer.lr, r.optimizer.momentum, r.optimizer.weight_decay) == (0.01, 0.9, 5e-4)
    assert "nesterov" not in r.optimizer  # nothing of the attack's recipe leaks in
    sched = r.scheduler
    assert sched._target_ == "torch.optim.lr_scheduler.CosineAnnealingLR" and sched.T_max == 100
    assert (r.amp, r.channels_last) == (False, False)  # the run's hardware settings
    # A trained copy; the input model is intact.
    assert result.model is not model
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not torch.equal(result.model.fc.weight, model.fc.weight)
    ex = result.extras
    assert ex["n_reserve"] == 48 and ex["finetune_epochs"] == 2
    assert ex["finetune_last_acc"] is not None and 0.0 <= ex["reserve_acc_after"] <= 1.0


def test_cosine_t_max_null_follows_the_epochs() -> None:
    assert FT(epochs=7, cosine_t_max=None).recipe(BASE).scheduler.T_max == 7


def test_zero_epochs_returns_an_untrained_copy(tmp_path: Path) -> None:
    model = Linear()
    ctx, calls = make_ctx(model, toy_set(10, 2, (1, 4, 4)), tmp_path)
    result = FT(epochs=0).run(ctx)
    assert calls == [] and result.model is not model
    assert torch.equal(result.model.fc.weight, model.fc.weight)
    assert result.extras["reserve_acc_after"] == result.extras["reserve_acc_before"]


def test_a_trigger_only_weight_moves_by_weight_decay_alone(tmp_path: Path) -> None:
    """Pixel 15 is 0 on every clean image and carries a large "trigger" weight to class 1:
    clean data give it no gradient, so SGD with momentum changes it exactly as weight decay
    alone would (w <- w - lr * b, b <- mu * b + wd * w), and not at all without decay. This is
    why fine-tuning removes a backdoor only through the features clean data share with it."""
    g = torch.Generator().manual_seed(0)
    n = 40
    x = torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8)
    x[:, 0, 3, 3] = 0  # the trigger pixel: never set on clean data
    y = (x[:, 0, 0, 0] > 127).long()
    clean = ImageSet(x, y, ("a", "b"))
    for wd in (0.0, 5e-4):
        torch.manual_seed(0)
        model = Linear()
        with torch.no_grad():
            model.fc.weight[:, 15] = torch.tensor([-4.0, 6.0])
        before = model.fc.weight.detach().clone()
        ctx, _ = make_ctx(model, clean, tmp_path / str(wd))
        defense = FT(epochs=3, batch_size=8, lr=0.05, weight_decay=wd, augment=False)
        after = defense.run(ctx).model.fc.weight.detach()
        w, b = before[:, 15].double().clone(), torch.zeros(2, dtype=torch.float64)
        lr0 = 0.05
        for epoch in range(3):  # 5 steps an epoch, the cosine lr of that epoch
            lr = lr0 * (1 + torch.cos(torch.tensor(torch.pi * epoch / 100))).item() / 2
            for _ in range(5):
                b = 0.9 * b + wd * w  # torch's SGD: the gradient is wd * w alone
                w = w - lr * b
        torch.testing.assert_close(after[:, 15].double(), w, rtol=1e-5, atol=1e-6)
        if wd == 0.0:
            assert torch.equal(after[:, 15], before[:, 15])
        assert not torch.equal(after[:, :15], before[:, :15])  # the clean features did move


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"epochs": -1}, "defense.epochs"),
        ({"batch_size": 0}, "defense.batch_size"),
        ({"lr": 0.0}, "defense.lr"),
        ({"momentum": 1.0}, "defense.momentum"),
        ({"weight_decay": -1e-4}, "defense.weight_decay"),
        ({"cosine_t_max": 0}, "defense.cosine_t_max"),
        ({"augment": "yes"}, "defense.augment"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        FT(**kwargs)
    assert err.value.key == key


def test_validate_needs_a_clean_reserve() -> None:
    FT().validate(num_classes=4, n_train=100, n_clean=1)
    with pytest.raises(ConfigError, match="ft needs") as err:
        FT().validate(num_classes=4, n_train=100, n_clean=0)
    assert err.value.key == "defense_data.clean_fraction"


def test_the_config_is_the_class_defaults() -> None:
    cfg = OmegaConf.load(CONF / "defense/ft.yaml")
    defense = FT(**{k: v for k, v in cfg.items() if k != "_target_"})
    assert vars(defense) == vars(FT())
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.cosine_t_max) == (100, 256, 0.01, 100)


# -- works (slow) ------------------------------------------------------------------------------
# A small BadNets cell on mnist5k: 1,200 training images (20% poisoned), a 300-image reserve
# (defense_data.clean_fraction 0.2), a width-8 small_cnn trained 5 epochs (clean accuracy ~0.73,
# ASR 1.0), the defense fine-tuning 10 epochs of batch 32. Measured (CA / ASR): ft 0.75 / 1.00
# -> 0.85 / 0.32, fp 0.75 / 1.00 -> 0.79 / 0.51. On two cores at load ~8 the model took 54 s and
# each defense 20-30 s; the second test reuses the first's cached model.
WORKS = [
    "dataset.max_train=1500",
    "dataset.max_test=200",
    "defense_data.clean_fraction=0.2",
    "model.width=8",
    "train.batch_size=32",
    "train.epochs=5",
    "attack.poison_rate=0.2",
    "defense.epochs=10",
    "defense.batch_size=32",
    "device=cpu",
    "progress=false",
]


def works_record(defense: str, tmp_path: Path, cache: Path) -> dict[str, Any]:
    """The cell's record; ``cache`` is shared, so the ft and fp tests train the model once."""
    from benchmark import pipeline
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["logger=none", f"defense={defense}", *WORKS], tmp_path)
    cfg.paths.cache_dir = str(cache)
    return pipeline.run(cfg, run_dir=tmp_path / "run")


@pytest.fixture(scope="session")
def works_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("works-cache")


@pytest.mark.slow
def test_ft_lowers_badnets_asr_on_mnist5k_and_keeps_clean_accuracy(
    tmp_path: Path, works_cache: Path
) -> None:
    record = works_record("ft", tmp_path, works_cache)
    bd, df = record["backdoored"], record["defended"]
    assert bd["asr"] > 0.9 and bd["clean_acc"] > 0.6  # the backdoor is there
    assert df["asr"] < bd["asr"] - 0.3
    assert df["clean_acc"] > bd["clean_acc"] - 0.05
