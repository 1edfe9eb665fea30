"""STRIP (defenses/strip.py): the entropy, the blend, the threshold at the chosen FPR on the
reserve, a trigger-dominated model, and the official code's / BackdoorBench's numbers on fixed
logits and images (fixtures/strip_official.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from benchmark import pipeline
from benchmark.data import to_float
from benchmark.errors import ConfigError
from benchmark.models.base import ImageClassifier
from benchmark.seeding import generator
from benchmark.types import ImageSet
from defenses.base import Stage
from defenses.strip import STRIP, entropy, entropy_threshold, mean_entropy, superimpose

FIXTURE = Path(__file__).parent / "fixtures" / "strip_official.json"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)


class LinearNet(ImageClassifier):
    """Logits = a seeded linear map of the normalised image (3x32x32, 10 classes)."""

    head_name = "fc"

    def __init__(self, mean=CIFAR_MEAN, std=CIFAR_STD, scale: float = 0.05) -> None:
        super().__init__(10, 3, (32, 32), list(mean), list(std))
        self.fc = nn.Linear(3 * 32 * 32, 10)
        g = torch.Generator().manual_seed(1902)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(10, 3 * 32 * 32, generator=g) * scale)
            self.fc.bias.copy_(torch.randn(10, generator=g))

    def forward_features(self, x: Tensor) -> Tensor:
        return self.normalize(x).flatten(1)


def fixed_images() -> tuple[Tensor, Tensor]:
    """``(clean, inspected)`` uint8 images ``(12, 3, 32, 32)`` and ``(8, 3, 32, 32)``; the last
    four inspected images carry a white 8x8 corner patch."""
    g = torch.Generator().manual_seed(531)
    clean = torch.randint(0, 256, (12, 3, 32, 32), generator=g, dtype=torch.uint8)
    inspected = torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8)
    inspected[4:, :, :8, :8] = 255
    return clean, inspected


class ConstantNet(ImageClassifier):
    """Logits that ignore the input: all zeros (entropy ln K for every input)."""

    def __init__(self, k: int = 10) -> None:
        super().__init__(k, 1, (8, 8), [0.5], [0.5])
        self.fc = nn.Linear(1, k)

    def forward_features(self, x: Tensor) -> Tensor:
        return torch.zeros(len(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros(len(x), self.num_classes)


class TriggerNet(ImageClassifier):
    """Class 0 with probability ~1 when the 2x2 top-left corner's mean exceeds 0.9 (a white
    patch survives superposition with dark images, pixels <= 0.4, which stay below 0.8); else
    nearly uniform logits that move with the image (high entropy)."""

    def __init__(self) -> None:
        super().__init__(10, 1, (8, 8), [0.0], [1.0])
        self.fc = nn.Linear(64, 10)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(10, 64, generator=g) * 0.3)
            self.fc.bias.zero_()

    def forward_features(self, x: Tensor) -> Tensor:
        return x.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        corner = x[:, 0, :2, :2].mean((1, 2))
        on = torch.sigmoid(100 * (corner - 0.9))
        logits = self.fc(x.flatten(1))
        return logits + 40 * on[:, None] * torch.nn.functional.one_hot(
            torch.zeros(len(x), dtype=torch.long), 10
        )


def dark_set(n: int, seed: int, trigger: bool = False) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 103, (n, 1, 8, 8), generator=g, dtype=torch.uint8)  # <= 0.4
    if trigger:
        x[:, :, :2, :2] = 255
    return ImageSet(x, torch.arange(n) % 10, tuple(str(i) for i in range(10)))


def strip_ctx(model: nn.Module, reserve: ImageSet, seed: int = 0) -> SimpleNamespace:
    """What STRIP reads of a ``DefenseContext``."""
    return SimpleNamespace(
        model=model,
        clean_set=reserve,
        train_set=reserve,
        num_classes=model.num_classes,
        device=torch.device("cpu"),
        generator=lambda *names: generator(seed, *names),
    )


# -- entropy and blend ------------------------------------------------------------------------
def test_entropy_of_a_constant_output_model_is_ln_k() -> None:
    x = torch.rand(5, 1, 8, 8)
    h = mean_entropy(ConstantNet(), x, torch.rand(3, 1, 8, 8), "pixel")
    assert torch.allclose(h, torch.full((5,), math.log(10)))  # 2.302585
    assert float(entropy(torch.tensor([[0.0, 0.0]]))) == pytest.approx(math.log(2))
    assert float(entropy(torch.tensor([[1000.0, 0.0, 0.0]]))) == pytest.approx(0.0, abs=1e-6)


def test_constant_output_model_flags_nothing() -> None:
    reserve = dark_set(40, 1)
    result = STRIP(n_overlays=4).run(strip_ctx(ConstantNet(), reserve))  # type: ignore[arg-type]
    det = result.input_detector
    assert det is not None
    scores = det.score(to_float(dark_set(20, 2).x))
    assert torch.allclose(scores, torch.full((20,), -math.log(10)))
    assert result.extras["entropy_std"] == 0.0
    assert result.extras["entropy_threshold"] == pytest.approx(math.log(10))
    assert not bool((scores > det.threshold).any())


def test_blends() -> None:
    x, o = torch.rand(2, 3, 4, 4), torch.rand(3, 4, 4)
    mean = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)
    assert torch.equal(superimpose(x, o, "pixel"), x + o)  # official: unclipped x + x'
    assert torch.allclose(superimpose(x, o, "normalized", mean), x + o - mean)
    # BackdoorBench's x + x' on normalised tensors is the model's normalisation of x + x' - mean.
    net = LinearNet(mean=(0.2, 0.4, 0.6), std=(0.3, 0.2, 0.1))
    x, o = torch.rand(2, 3, 32, 32), torch.rand(3, 32, 32)
    bb = net.fc((net.normalize(x) + net.normalize(o[None])).flatten(1))
    ours = net(superimpose(x, o, "normalized", net.mean))
    assert torch.allclose(ours, bb, atol=1e-4)


# -- the threshold ----------------------------------------------------------------------------
def test_normal_threshold_is_the_mle_fit_quantile() -> None:
    h = torch.tensor([1.0, 2.0, 3.0, 4.0])  # mu 2.5, MLE sigma sqrt(1.25)
    want = 2.5 - 2.3263478740408408 * math.sqrt(1.25)
    assert entropy_threshold(h, "normal", 0.01) == pytest.approx(want)
    scipy_stats = pytest.importorskip("scipy.stats")
    mu, sigma = scipy_stats.norm.fit(h.numpy().astype("float64"))
    assert entropy_threshold(h, "normal", 0.01) == pytest.approx(
        scipy_stats.norm.ppf(0.01, loc=mu, scale=sigma)
    )


def test_quantile_threshold_flags_the_chosen_fpr() -> None:
    h = torch.randperm(100, generator=torch.Generator().manual_seed(0)).float()
    thr = entropy_threshold(h, "quantile", 0.1)
    assert thr == 10.0
    assert int((h < thr).sum()) == 10  # exactly fpr * n, strictly below
    assert entropy_threshold(h, "quantile", 0.999) == 99.0  # the index is clamped


def test_threshold_is_set_on_the_reserve_at_the_fpr() -> None:
    net = LinearNet(scale=0.01)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (200, 3, 32, 32), generator=g, dtype=torch.uint8)
    reserve = ImageSet(x, torch.arange(200) % 10, tuple(str(i) for i in range(10)))
    strip = STRIP(n_overlays=8, threshold_rule="quantile", fpr=0.1)
    result = strip.run(strip_ctx(net, reserve))  # type: ignore[arg-type]
    pool, calib = strip.split(200, generator(0, "strip", "split"))
    assert len(pool) == 100 and len(calib) == 100
    assert not set(pool.tolist()) & set(calib.tolist())
    det = result.input_detector
    assert det is not None
    flagged = det.score(to_float(x[calib])) > det.threshold
    assert int(flagged.sum()) == 10  # 10% of the calibration images
    assert result.extras["calib_flag_rate"] == pytest.approx(0.1)
    assert result.model is net


def test_scores_do_not_depend_on_batching() -> None:
    net = LinearNet()
    clean, inspected = fixed_images()
    reserve = ImageSet(clean, torch.arange(12) % 10, tuple(str(i) for i in range(10)))
    det = STRIP(n_overlays=4, batch_size=3).run(strip_ctx(net, reserve)).input_detector  # type: ignore[arg-type]
    assert det is not None
    x = to_float(inspected)
    together = det.score(x)
    alone = torch.cat([det.score(x[i : i + 1]) for i in range(len(x))])
    assert torch.allclose(together, alone, atol=1e-5)


# -- the mechanism ----------------------------------------------------------------------------
def test_triggered_inputs_are_flagged_and_clean_ones_pass() -> None:
    net = TriggerNet().eval()
    reserve = dark_set(200, 1)
    result = STRIP(n_overlays=20).run(strip_ctx(net, reserve))  # type: ignore[arg-type]
    det = result.input_detector
    assert det is not None
    s_clean, s_bd = (
        det.score(to_float(dark_set(100, 2).x)),
        det.score(to_float(dark_set(100, 3, True).x)),
    )
    assert -float(s_bd.max()) < 0.01 and -float(s_clean.min()) > 1.0  # entropy ~0 vs high
    assert bool((s_bd > det.threshold).all())
    assert float((s_clean > det.threshold).float().mean()) <= 0.05


def test_bad_settings_name_their_key() -> None:
    for kwargs, key in (
        ({"n_overlays": 0}, "n_overlays"),
        ({"overlay_share": 1.0}, "overlay_share"),
        ({"blend": "alpha"}, "blend"),
        ({"threshold_rule": "max"}, "threshold_rule"),
        ({"fpr": 0.0}, "fpr"),
        ({"batch_size": 0}, "batch_size"),
    ):
        with pytest.raises(ConfigError, match=rf"defense\.{key}"):
            STRIP(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"defense_data\.clean_fraction"):
        STRIP().validate(10, 100, 1)
    assert STRIP.stage == Stage.INFERENCE


# -- the official code's numbers --------------------------------------------------------------
def test_matches_backdoorbench_and_the_official_code() -> None:
    """BackdoorBench's ``STRIP.check``/``cleanse`` and the official notebook's ``entropyCal``,
    run on ``fixed_images`` and ``LinearNet`` (``/work/scratch/strip/run_official.py``)."""
    ref = json.loads(FIXTURE.read_text())
    net = LinearNet().eval()
    clean, inspected = fixed_images()
    assert int(clean.sum()) == ref["clean_sum"] and int(inspected.sum()) == ref["inspected_sum"]
    xc, xi = to_float(clean), to_float(inspected)
    bb = ref["backdoorbench"]
    # Every clean image is an overlay (N = the clean set), so BB's random order does not matter.
    h_clean = mean_entropy(net, xc, xc, "normalized")
    h_insp = mean_entropy(net, xi, xc, "normalized")
    assert torch.allclose(h_clean, torch.tensor(bb["clean_entropy"]), atol=1e-5)
    assert torch.allclose(h_insp, torch.tensor(bb["inspected_entropy"]), atol=1e-5)
    thr = entropy_threshold(h_clean, "quantile", bb["defense_fpr"])
    assert torch.nonzero(h_insp < thr).flatten().tolist() == bb["suspicious"]
    official = ref["official"]
    overlays = xc[torch.tensor(official["overlay_index"])]
    h_off = mean_entropy(net, xi, overlays, "pixel") / math.log(2)  # bits
    assert torch.allclose(h_off, torch.tensor(official["mean_entropy_bits"]), atol=1e-4)
    assert entropy_threshold(h_clean, "normal", 0.01) == pytest.approx(
        official["normal_threshold_of_bb_clean_entropy"], abs=1e-5
    )


# -- end to end -------------------------------------------------------------------------------
@pytest.mark.slow
def test_works_on_mnist5k(make_cfg, tmp_path: Path) -> None:
    """A BadNets small_cnn on mnist5k (smoke size, 20% poison, 5 epochs) and STRIP: detection
    metrics in the record, the calibration flag rate at the chosen FPR, triggered inputs scored
    as more suspicious than clean ones (measured: AUROC 0.83, TPR 0.61 at FPR 0.14)."""
    cfg = make_cfg(
        "defense=strip",
        "attack.poison_rate=0.2",
        "train.epochs=5",
        "model.width=8",
        "defense.n_overlays=5",
        "defense.threshold_rule=quantile",
        "defense.fpr=0.1",
    )
    record = pipeline.run(cfg, run_dir=tmp_path / "run")
    assert record["status"] == "complete", record.get("error")
    d = record["defended"]
    assert d["clean_acc"] == record["backdoored"]["clean_acc"]  # the model is unchanged
    assert record["backdoored"]["asr"] > 0.8, record["backdoored"]
    assert d["det_auroc"] is not None and d["det_auroc"] > 0.7, d
    assert d["det_tpr"] > d["det_fpr"] and d["det_fpr"] < 0.3, d
    assert 0.0 < record["defense_extras"]["calib_flag_rate"] <= 0.15
