"""WaNet: the warping field, the batch hook, the static view, the saved state, bad values and
the ``augment`` option (BackdoorBench's PostTensorTransform wired into the backdoor training)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from attacks.wanet import WaNet
from benchmark import backdoored, pipeline
from benchmark.augment import PerBatchAugment
from benchmark.data import to_float
from benchmark.errors import ConfigError
from benchmark.seeding import generator
from benchmark.train import Augment
from tests.conftest import toy_set

K, SHAPE = 5, (3, 16, 16)


def prepared(seed: int = 0, n: int = 300, shape: tuple[int, int, int] = SHAPE, **kw: object):
    attack = WaNet(**kw)  # type: ignore[arg-type]
    attack.validate(K, shape, n)
    train = toy_set(n, K, shape)
    attack.prepare(train, generator(seed, "prepare"))
    return attack, train


def test_grids_follow_the_official_formula() -> None:
    attack, _ = prepared(seed=3, k=4)
    h = SHAPE[1]
    g = generator(3, "prepare")
    ins = torch.rand(1, 2, 4, 4, generator=g) * 2 - 1
    ins = ins / ins.abs().mean()
    noise = F.interpolate(ins, size=h, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    a = torch.linspace(-1, 1, h)
    xx, yy = torch.meshgrid(a, a, indexing="ij")
    identity = torch.stack((yy, xx), 2)[None]
    assert attack.noise_grid is not None and attack.identity_grid is not None
    assert attack.noise_grid.shape == attack.identity_grid.shape == (1, h, h, 2)
    assert attack.noise_grid.dtype == attack.identity_grid.dtype == torch.float32
    assert torch.equal(attack.noise_grid, noise) and torch.equal(attack.identity_grid, identity)
    grid = torch.clamp((identity + 0.5 * noise / h) * 1.0, -1, 1)
    assert torch.equal(attack.warp_grid(torch.device("cpu"), torch.float32), grid)
    x = torch.rand(4, *SHAPE)
    expected = F.grid_sample(x, grid.repeat(4, 1, 1, 1), align_corners=True).clamp(0, 1)
    assert torch.allclose(attack.apply_trigger(x), expected, atol=1e-6)


def test_identity_grid_maps_an_image_to_itself() -> None:
    attack, _ = prepared()
    assert attack.identity_grid is not None
    x = torch.rand(3, *SHAPE)
    out = F.grid_sample(x, attack.identity_grid.expand(3, -1, -1, -1), align_corners=True)
    assert (out - x).abs().max() < 1e-5


def test_warp_changes_the_image_and_keeps_shape_dtype_range() -> None:
    attack, _ = prepared()
    x = torch.rand(5, *SHAPE)
    x0 = x.clone()
    out = attack.apply_trigger(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(x, x0)
    diff = (out - x).abs()
    assert diff.max() > 0.05 and diff.mean() > 1e-3
    # a smooth image is barely changed: the warp is small
    smooth = torch.linspace(0, 1, 16).expand(1, 3, 16, 16).contiguous()
    assert (attack.apply_trigger(smooth) - smooth).abs().max() < 0.1


def test_same_seed_same_field_other_seed_other_field() -> None:
    a, _ = prepared(seed=0)
    b, _ = prepared(seed=0)
    c, _ = prepared(seed=1)
    assert torch.equal(a.noise_grid, b.noise_grid)
    assert not torch.equal(a.noise_grid, c.noise_grid)
    x = torch.rand(2, *SHAPE)
    assert torch.equal(a.apply_trigger(x), b.apply_trigger(x))
    assert not torch.equal(a.apply_trigger(x), c.apply_trigger(x))


def test_batch_hook_warps_relabels_noise_warps_and_leaves_the_rest() -> None:
    attack, _ = prepared(poison_rate=0.1, cross_ratio=2.0, target_class=2)
    x = torch.rand(64, *SHAPE)
    y = torch.arange(64) % K
    x0, y0 = x.clone(), y.clone()
    xo, yo = attack.batch_hook(x, y, generator(0, "aug"))
    assert torch.equal(x, x0) and torch.equal(y, y0)  # inputs untouched
    assert xo.shape == x.shape and xo.dtype == x.dtype and yo.dtype == torch.int64
    assert torch.equal(xo[:6], attack.apply_trigger(x[:6]))
    assert (yo[:6] == 2).all()
    assert torch.equal(yo[6:], y[6:])  # noise and clean samples keep their labels
    noise = xo[6:18]
    assert all(not torch.equal(noise[i], x[6 + i]) for i in range(12))
    assert all(
        not torch.equal(noise[i], attack.apply_trigger(x[6 + i : 7 + i])[0]) for i in range(12)
    )
    assert noise.min() >= 0 and noise.max() <= 1
    assert torch.equal(xo[18:], x[18:])  # the rest is byte-identical


def test_batch_hook_is_deterministic_for_a_generator_seed() -> None:
    attack, _ = prepared()
    x, y = torch.rand(64, *SHAPE), torch.arange(64) % K
    a = attack.batch_hook(x, y, generator(5, "aug"))
    b = attack.batch_hook(x, y, generator(5, "aug"))
    c = attack.batch_hook(x, y, generator(6, "aug"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])  # other noise offsets


def test_all2all_relabels_to_the_next_class() -> None:
    attack, _ = prepared(mode="all2all")
    x, y = torch.rand(64, *SHAPE), torch.arange(64) % K
    _, yo = attack.batch_hook(x, y, generator(0, "aug"))
    assert torch.equal(yo[:6], (y[:6] + 1) % K) and torch.equal(yo[6:], y[6:])


def test_small_batches_are_poisoned_with_the_expected_frequency() -> None:
    attack, _ = prepared(poison_rate=0.1, cross_ratio=2.0)  # bs 4: 0.4 backdoor, 0.8 noise
    gen = generator(0, "aug")
    counts = torch.tensor([attack.batch_counts(4, gen) for _ in range(4000)], dtype=torch.float)
    assert set(counts[:, 0].tolist()) == {0.0, 1.0} and set(counts[:, 1].tolist()) == {0.0, 1.0}
    assert abs(counts[:, 0].mean().item() - 0.4) < 0.03
    assert abs(counts[:, 1].mean().item() - 0.8) < 0.03
    # cross_ratio * rate * bs >= 1: BackdoorBench's floor(num_bd * cross_ratio)
    attack.cross_ratio = 3.0  # bs 4: 0.4 backdoor, 1.2 noise expected
    counts = torch.tensor([attack.batch_counts(4, gen) for _ in range(2000)], dtype=torch.float)
    assert torch.equal(counts[:, 1], 3 * counts[:, 0])
    # a tiny batch through the hook: all or nothing here, the relabelled sample first
    x, y = torch.rand(4, *SHAPE), torch.full((4,), 3)
    hits = 0
    for _ in range(200):
        xo, yo = attack.batch_hook(x, y, gen)
        if yo[0] == 0:
            hits += 1
            assert torch.equal(xo[:1], attack.apply_trigger(x[:1])) and (yo[1:] == 3).all()
            assert all(not torch.equal(xo[i], x[i]) for i in range(1, 4))
        else:
            assert torch.equal(xo, x) and torch.equal(yo, y)
    assert 55 < hits < 105


def test_counts_never_exceed_the_batch() -> None:
    attack = WaNet(poison_rate=0.5, cross_ratio=2.0)
    gen = generator(0, "aug")
    assert attack.batch_counts(10, gen) == (5, 5)
    counts = {attack.batch_counts(1, gen) for _ in range(100)}
    assert counts == {(0, 0), (1, 0)}


def test_poison_writes_backdoor_and_cover_samples() -> None:
    attack, train = prepared(n=300, poison_rate=0.1, cross_ratio=2.0, target_class=1)
    x0, y0 = train.x.clone(), train.y.clone()
    p = attack.poison(train, generator(0, "poison"))
    assert torch.equal(train.x, x0) and torch.equal(train.y, y0)  # input untouched
    idx = torch.nonzero(p.is_poison).flatten()
    cover = attack.cover_index
    assert cover is not None and cover.dtype == torch.int64 and cover.device.type == "cpu"
    assert len(idx) == 30 and len(cover) == 60
    assert torch.equal(cover, torch.sort(cover).values) and len(set(cover.tolist())) == 60
    assert not set(idx.tolist()) & set(cover.tolist())
    assert (p.y[idx] == 1).all() and torch.equal(p.y[cover], train.y[cover])
    assert torch.equal(p.y_orig, train.y) and torch.equal(p.src_index, torch.arange(300))
    assert torch.equal(p.x[idx], attack.trigger_uint8(train.x[idx]))
    assert all(not torch.equal(p.x[i], train.x[i]) for i in cover.tolist())
    assert all(
        not torch.equal(p.x[i], p_i)
        for i, p_i in zip(cover.tolist(), attack.trigger_uint8(train.x[cover]), strict=True)
    )
    untouched = torch.ones(300, dtype=torch.bool)
    untouched[idx] = False
    untouched[cover] = False
    assert torch.equal(p.x[untouched], train.x[untouched])
    assert torch.equal(p.y[untouched], train.y[untouched])
    again = attack.poison(train, generator(0, "poison"))
    assert torch.equal(again.x, p.x) and torch.equal(attack.cover_index, cover)


def test_state_dict_round_trip_reproduces_the_trigger() -> None:
    attack, _ = prepared(seed=7)
    state = attack.state_dict()
    assert set(state) == {"identity_grid", "noise_grid"}
    assert all(t.device.type == "cpu" for t in state.values())
    fresh = WaNet()
    fresh.validate(K, SHAPE, 300)
    fresh.load_state_dict(state)
    x = torch.rand(6, *SHAPE)
    assert torch.equal(fresh.apply_trigger(x), attack.apply_trigger(x))
    u = toy_set(20, K, SHAPE).x
    assert torch.equal(fresh.trigger_uint8(u), attack.trigger_uint8(u))
    d = fresh.describe(300)
    assert d["k"] == 4 and d["cross_ratio"] == 2.0 and d["n_cover"] == 60
    assert d["strength"] == 0.5 and d["grid_rescale"] == 1.0 and d["n_poison"] == 30


def test_trigger_before_prepare_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="prepare"):
        WaNet().apply_trigger(torch.rand(1, *SHAPE))


def test_uint8_images_convert_consistently() -> None:
    attack, train = prepared()
    u = train.x[:4]
    assert torch.equal(
        attack.trigger_uint8(u), (attack.apply_trigger(to_float(u)) * 255).round().to(torch.uint8)
    )


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"k": 1}, "attack.k"),
        ({"k": 2.5}, "attack.k"),
        ({"strength": 0.0}, "attack.strength"),
        ({"grid_rescale": -1.0}, "attack.grid_rescale"),
        ({"cross_ratio": -0.5}, "attack.cross_ratio"),
        ({"augment": "kornia"}, "attack.augment"),
    ],
)
def test_bad_constructor_values_name_the_key(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        WaNet(**kwargs)  # type: ignore[arg-type]


def test_bad_shapes_and_counts_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^attack: .*square.*16x12"):
        WaNet().validate(K, (3, 16, 12), 300)
    with pytest.raises(ConfigError, match=r"attack\.k"):
        WaNet(k=17).validate(K, SHAPE, 300)
    WaNet(k=16).validate(K, SHAPE, 300)
    with pytest.raises(ConfigError, match=r"attack\.cross_ratio"):
        WaNet(poison_rate=0.4, cross_ratio=2.0).validate(K, SHAPE, 300)  # 120 + 240 > 300
    WaNet(poison_rate=0.25, cross_ratio=3.0).validate(K, SHAPE, 300)  # 75 + 225 = 300


def test_augment_option_chooses_the_training_augmentation() -> None:
    """``harness``: None (the runner uses the dataset's crop + flip). ``backdoorbench``: WaNet's
    PostTensorTransform with BackdoorBench's settings, filled with the dataset's mean colour,
    flipping only where the dataset allows it; ``describe()`` records the choice."""
    cifar = SimpleNamespace(mean=(0.4914, 0.4822, 0.4465), hflip=True)
    digits_set = SimpleNamespace(mean=(0.1307,), hflip=False)
    assert WaNet().train_augment(cifar) is None
    assert WaNet().describe(100)["augment"] == "harness"
    attack = WaNet(augment="backdoorbench")
    assert attack.describe(100)["augment"] == "backdoorbench"
    aug = attack.train_augment(cifar)
    assert aug == PerBatchAugment(
        fill=cifar.mean, crop_padding=5, crop_p=0.8, degrees=10.0, rotation_p=0.5, hflip=True
    )
    digits = attack.train_augment(digits_set)
    assert digits is not None and digits.fill == (0.1307,) and not digits.hflip


@pytest.mark.parametrize("augment", ["harness", "backdoorbench"])
def test_runner_trains_the_backdoor_with_the_chosen_augmentation(
    make_cfg, tmp_path, monkeypatch: pytest.MonkeyPatch, augment: str
) -> None:
    """A small fit through the runner: with ``backdoorbench`` the backdoored model's fit gets
    WaNet's per-batch augmentation (and so not the per-sample crop + flip), which is applied
    to the hooked batches; defenses and surrogates keep the dataset's."""
    seen: list[object] = []
    calls = {"n": 0}
    real_fit = backdoored.fit

    def spy(model, data, recipe, **kw):
        aug = kw.get("augment")
        seen.append(aug)
        if isinstance(aug, PerBatchAugment):

            def counted(x, gen):
                calls["n"] += 1
                return aug(x, gen)

            kw["augment"] = counted
        return real_fit(model, data, recipe, **kw)

    monkeypatch.setattr(backdoored, "fit", spy)
    cfg = make_cfg("attack=wanet", f"attack.augment={augment}", "dataset.max_train=200")
    record = pipeline.run(cfg, run_dir=tmp_path / "run")
    assert record["attack"]["augment"] == augment
    first = seen[0]
    if augment == "harness":
        assert isinstance(first, Augment)
    else:
        assert isinstance(first, PerBatchAugment) and calls["n"] >= 1
        assert first.fill == tuple(cfg_mean(cfg))


def cfg_mean(cfg) -> tuple[float, ...]:
    """The normalisation mean of the run's dataset."""
    return tuple(pipeline.build(cfg).dataset.mean or ())
