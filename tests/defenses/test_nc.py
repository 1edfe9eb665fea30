"""Neural Cleanse: the MAD test against the official code's and BackdoorBench's numbers
(bolunwang/backdoor@e857774 ``mad_outlier_detection.py`` and SCLBD/BackdoorBench@f02e353
``defense/nc.py`` ``outlier_detection``, ``fixtures/nc_official.json``), the MAD test on known
norms, the cost schedule and early stop, the unlearning set's composition, the settings, ``run``
on a model without a flagged class, and (slow) detection and unlearning of BadNets on mnist5k."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from attacks.badnets import BadNets
from attacks.inversion import stamp
from benchmark.data import to_float, to_uint8
from benchmark.errors import ConfigError
from benchmark.train import fit, predict
from defenses.nc import NCCost, NeuralCleanse, mad_test, unlearning_set
from tests.conftest import toy_set
from tests.defenses.filter_toys import FitSpy, backdoored_mnist5k, make_ctx, small_cnn

FIXTURE = Path(__file__).parent / "fixtures" / "nc_official.json"


# -- fidelity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(json.loads(FIXTURE.read_text())["cases"]))
def test_mad_test_matches_the_official_code_and_backdoorbench(case: str) -> None:
    """``median: average`` is the official np.median rule, ``lower`` BackdoorBench's torch.median:
    median, MAD, anomaly index (rel 1e-12) and the flagged classes in norm order (exactly)."""
    ref = json.loads(FIXTURE.read_text())["cases"][case]
    norms = torch.tensor(ref["norms"], dtype=torch.float64)
    for rule, key in (("average", "official"), ("lower", "backdoorbench")):
        got, want = mad_test(norms, 2.0, rule), ref[key]
        assert got.median == pytest.approx(want["median"], rel=1e-12)
        assert got.mad == pytest.approx(want["mad"], rel=1e-12)
        assert got.anomaly_index == pytest.approx(want["anomaly_index"], rel=1e-12)
        assert got.flagged == want["flagged"]


# -- the MAD test ------------------------------------------------------------------------------
def test_mad_test_on_known_norms() -> None:
    """[10, 10, 11, 9, 2]: median 10, |l1 - 10| = [0, 0, 1, 1, 8], MAD 1.4826 x 1; class 4's
    index 8 / 1.4826 = 5.396 > 2 is flagged; class 2 (above the median) never is."""
    t = mad_test(torch.tensor([10.0, 10, 11, 9, 2]))
    assert (t.median, t.mad) == (10.0, pytest.approx(1.4826))
    assert t.anomaly_index == pytest.approx(8 / 1.4826)
    assert t.index.tolist() == pytest.approx([0, 0, 1 / 1.4826, 1 / 1.4826, 8 / 1.4826])
    assert t.flagged == [4]
    high = mad_test(torch.tensor([10.0, 10, 30, 9, 11]))  # a large norm is not a backdoor
    assert high.flagged == [] and high.anomaly_index == pytest.approx(1 / 1.4826)


def test_mad_test_threshold_and_zero_mad() -> None:
    norms = torch.tensor([10.0, 10, 11, 9, 2])
    assert mad_test(norms, threshold=6.0).flagged == []
    flat = mad_test(torch.tensor([5.0, 5, 5, 5, 1]))  # MAD 0: infinite index off the median
    assert flat.mad == 0 and math.isinf(flat.anomaly_index) and flat.flagged == [4]
    assert flat.index[0] == 0


# -- the cost schedule ---------------------------------------------------------------------------
def schedule(n: int = 1, **kw: object) -> NCCost:
    return NCCost(n, 2, NeuralCleanse(**kw))  # type: ignore[arg-type]


def feed(s: NCCost, acc: float, l1: float, epochs: int, mask: float = 0.5) -> bool:
    """``epochs`` epochs of two steps at minibatch success ``acc`` and mask norm ``l1``."""
    cur = (torch.full((1, 1, 2, 2), mask), torch.zeros(1, 3, 2, 2))
    stop = False
    for _ in range(2 * epochs):
        stop = s.observe(torch.tensor([acc]), torch.tensor([l1]), lambda: cur)
    return stop


def test_cost_goes_up_after_five_successful_epochs_and_down_after_five_failures() -> None:
    s = schedule()
    feed(s, 1.0, 3.0, 4)
    assert float(s.weight[0]) == pytest.approx(1e-3)  # 4 successes: unchanged
    feed(s, 1.0, 3.0, 1)
    assert float(s.weight[0]) == pytest.approx(2e-3)  # the 5th: x2
    feed(s, 0.5, 3.0, 5)
    assert float(s.weight[0]) == pytest.approx(2e-3 / 2**1.5)
    assert bool(s.went_up[0]) and bool(s.went_down[0])
    feed(s, 0.97, 3.0, 5)  # below the 98% threshold counts as a failure
    assert float(s.weight[0]) == pytest.approx(2e-3 / 2**3)


def test_best_trigger_is_the_smallest_successful_epoch_mean() -> None:
    s = schedule()
    feed(s, 0.5, 1.0, 1, mask=0.1)  # small but unsuccessful: not kept
    assert s.best is None
    feed(s, 0.99, 8.0, 1, mask=0.8)
    feed(s, 0.99, 4.0, 1, mask=0.4)
    feed(s, 0.99, 6.0, 1, mask=0.6)  # larger: not kept
    assert s.best is not None and float(s.reg_best[0]) == 4.0
    assert torch.allclose(s.best[0], torch.full((1, 1, 2, 2), 0.4))


def test_early_stop_needs_both_cost_moves_and_25_epochs_without_gain() -> None:
    s = schedule()
    assert not feed(s, 1.0, 4.0, 30)  # only ever up: no stop
    feed(s, 0.0, 4.0, 5)  # down once
    assert bool(s.stopped[0]) is False
    assert feed(s, 1.0, 4.0, 1)  # the counter had reached 25 long ago
    off = schedule(early_stop=False)
    feed(off, 1.0, 4.0, 30), feed(off, 0.0, 4.0, 5)
    assert not feed(off, 1.0, 4.0, 30)


class StubSchedule:
    """Zero L1 weight; records each step's statistics and stops after ``stop`` steps."""

    def __init__(self, n: int, stop: int) -> None:
        self.n, self.stop, self.seen = n, stop, []  # type: ignore[var-annotated]

    def cost(self) -> torch.Tensor:
        return torch.zeros(self.n)

    def observe(self, acc: torch.Tensor, l1: torch.Tensor, current: object) -> bool:
        mask, pattern = current()  # type: ignore[operator]
        self.seen.append((acc.clone(), l1.clone(), mask.shape, pattern.shape))
        return len(self.seen) >= self.stop


def test_inversion_drives_the_schedule_and_stops_when_it_says_so() -> None:
    """``invert_triggers`` with a schedule: one ``observe`` per step with per-trigger minibatch
    success in [0, 1] and mask L1 (the first = mask_init x H x W), stopped at its request."""
    from attacks.inversion import invert_triggers

    data = toy_set(24, 3, (3, 8, 8))
    sched = StubSchedule(3, stop=4)
    inv = invert_triggers(
        small_cnn(0).eval(), data.x, data.y, targets=[0, 1, 2], budgets=(1.0,), steps=50,
        batch_size=8, schedule=sched, mask_init=0.8808,
    )  # fmt: skip
    assert len(sched.seen) == 4 and inv.mask.shape == (3, 1, 1, 8, 8)
    acc, l1, mshape, pshape = sched.seen[0]
    assert ((acc >= 0) & (acc <= 1)).all() and mshape == (3, 1, 8, 8) and pshape == (3, 3, 8, 8)
    assert l1.tolist() == pytest.approx([0.8808 * 64] * 3, rel=1e-3)


# -- the unlearning set --------------------------------------------------------------------------
def test_unlearning_set_stamps_a_share_of_the_reserve_per_trigger_with_true_labels() -> None:
    clean = toy_set(50, 5, (3, 6, 6))
    masks = [torch.zeros(1, 6, 6), torch.zeros(1, 6, 6)]
    masks[0][:, :2, :2], masks[1][:, -1] = 1.0, 0.5
    triggers = [(m, torch.ones(3, 6, 6)) for m in masks]
    out, chosen = unlearning_set(clean, triggers, 0.2, torch.Generator().manual_seed(0))
    assert chosen.numel() == 10 and len(out) == 40 + 2 * 10
    rest = torch.tensor(sorted(set(range(50)) - set(chosen.tolist())))
    assert torch.equal(out.x[:40], clean.x[rest]) and torch.equal(out.y[:40], clean.y[rest])
    for k, (m, p) in enumerate(triggers):
        block = slice(40 + 10 * k, 50 + 10 * k)
        assert torch.equal(out.y[block], clean.y[chosen])  # true labels kept
        assert torch.equal(out.x[block], to_uint8(stamp(to_float(clean.x[chosen]), m, p)))
    again, _ = unlearning_set(clean, triggers, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(again.x, out.x)


# -- settings and run ----------------------------------------------------------------------------
def test_config_defaults_are_the_class_defaults() -> None:
    conf = OmegaConf.load(Path(__file__).parents[2] / "conf" / "defense" / "nc.yaml")
    nc = NeuralCleanse()
    for key, value in conf.items():
        if key != "_target_":
            want = getattr(nc, key, None)
            if want is None:
                want = getattr(nc.unlearner, key.removeprefix("unlearn_"))
            assert want == pytest.approx(value) if isinstance(value, float) else want == value, key


@pytest.mark.parametrize(
    ("key", "value"),
    [("epochs", 0), ("mad_threshold", -1.0), ("median", "mean"), ("unlearning_share", 0.0),
     ("attack_threshold", 1.5), ("unlearn_epochs", -1), ("unlearn_cosine_t_max", 0)],
)  # fmt: skip
def test_bad_settings_name_their_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"defense.{key}"):
        NeuralCleanse(**{key: value})  # type: ignore[arg-type]


def test_no_flag_returns_the_model_unchanged(tmp_path: Path) -> None:
    """An untrained model on random images: no class stands out, no unlearning, the same model;
    the extras hold the per-class indices and norms."""
    data = toy_set(40, 3, (3, 8, 8))
    model = small_cnn(0).eval()
    spy = FitSpy()
    ctx = make_ctx(model, data, tmp_path, spy, small_cnn)
    ctx = dataclasses.replace(ctx, clean_set=data)
    result = NeuralCleanse(epochs=3, batch_size=16, mad_threshold=1e9).run(ctx)
    assert result.model is model and not spy.calls
    ex = result.extras
    assert ex["flagged"] is False and ex["n_flagged"] == 0 and ex["flagged_classes"] == ""
    assert len(ex["anomaly_index_per_class"].split(",")) == 3
    assert len(ex["mask_l1_per_class"].split(",")) == 3
    assert (tmp_path / "defense" / "nc_triggers.pt").exists()


# -- it works -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_finds_and_unlearns_badnets_on_mnist5k(tmp_path: Path) -> None:
    """BadNets (3x3 white square, 5%, target 0) on mnist5k (the shared cached model), NC on 64
    random clean training digits: the target's reversed mask is the smallest, about the
    trigger's 9 pixels. On this small model classes 8 and 3 have naturally small masks too, so
    the target's anomaly index stays near 1 (below the paper's 2: seen at 1.09-1.48 with these
    settings), and the test flags with ``mad_threshold`` 0.5 to check the unlearning: the
    target is flagged first (by norm) and the trigger's ASR falls."""
    model, poisoned = backdoored_mnist5k()
    ok = torch.nonzero(~poisoned.is_poison).flatten()
    ok = ok[torch.randperm(len(ok), generator=torch.Generator().manual_seed(0))[:64]]
    clean = poisoned.clean_view().subset(ok)

    def fit_fn(m: torch.nn.Module, data: object, **kw: object) -> object:
        return fit(m, data, kw.pop("recipe"), progress=False, **kw)  # type: ignore[arg-type]

    ctx = make_ctx(model, poisoned.clean_view(), tmp_path, fit_fn, small_cnn)
    ctx = dataclasses.replace(ctx, clean_set=clean)
    nc = NeuralCleanse(
        epochs=40, batch_size=16, init_cost=1e-2, patience=2, mad_threshold=0.5,
        unlearning_share=0.5, unlearn_epochs=10, unlearn_batch_size=16, unlearn_augment=False,
    )  # fmt: skip
    result = nc.run(ctx)
    norms = [float(v) for v in result.extras["mask_l1_per_class"].split(",")]
    assert min(range(10), key=norms.__getitem__) == 0 and norms[0] < 18, result.extras
    assert result.extras["flagged_classes"].split(",")[0] == "0", result.extras
    probe = poisoned.subset(torch.nonzero(~poisoned.is_poison & (poisoned.y != 0)).flatten())
    probe = probe.subset(torch.arange(0, len(probe), 4))
    bad = BadNets(poison_rate=0.05).apply_trigger(to_float(probe.x))
    asr_before = float((predict(model, bad) == 0).float().mean())
    asr_after = float((predict(result.model, bad) == 0).float().mean())
    assert asr_before > 0.8 and asr_after < 0.3, (asr_before, asr_after)
    acc = float((predict(result.model, probe.x) == probe.y).float().mean())
    assert acc > 0.8, acc
