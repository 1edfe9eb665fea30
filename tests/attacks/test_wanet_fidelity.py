"""WaNet's grids, warps and BackdoorBench's augmentation against BackdoorBench's own code.

Fixture: ``fixtures/backdoorbench_triggers.{json,npz}`` (entries ``wanet`` and
``wanet_post_tensor_transform``), produced by SCLBD/BackdoorBench at f02e353: the lines of
``attack/wanet.py`` that draw the grids (237-251), warp a batch and its cross samples (287-295,
322) executed as they stand with ``torch.manual_seed`` set before each draw; storage by
``utils/bd_dataset_v2.py:set_one_bd_sample``; and ``attack/wanet.py:PostTensorTransform``
itself, with the parameters it drew read back by replaying its draws.

Tolerances, per quantity:
- grids: 1e-6 (the same float32 ops; measured 0.0);
- float warps: 1e-5 on [0, 1] pixels (BackdoorBench warps normalised values and denormalises,
  we warp pixels: float32 rounding of the same bilinear sums, measured 1.2e-7, one ulp);
- stored uint8 warps: BackdoorBench's ``ToPILImage`` truncates, we round, so ours is theirs or
  one level above it, as the fractional part of our float value decides (measured: 50% of the
  values one level above);
- PostTensorTransform with BackdoorBench's parameters: 1e-6 in normalised space (measured 0.0).
"""

from __future__ import annotations

import torch

from attacks.wanet import WaNet
from benchmark.augment import BatchParams, PerBatchAugment
from benchmark.data import to_float
from benchmark.types import ImageSet
from tests.attacks.fixtures import inputs
from tests.attacks.fixtures.backdoorbench import assert_rounding_vs_truncation, fixture, stored

X = inputs.images()
BB_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
BB_STD = torch.tensor([0.247, 0.243, 0.261]).view(1, 3, 1, 1)


def ref(name: str) -> torch.Tensor:
    return torch.from_numpy(fixture()[1][name])


def prepared() -> WaNet:
    attack = WaNet()
    attack.validate(10, (3, 32, 32), 100)
    train = ImageSet(X, torch.arange(len(X)) % 10, tuple("abcdefghij"))
    attack.prepare(train, torch.Generator().manual_seed(inputs.GRID_SEED))
    return attack


def test_grids_are_backdoorbenchs_for_the_same_seed() -> None:
    attack = prepared()
    torch.testing.assert_close(attack.noise_grid, ref("wanet_noise_grid"), rtol=0, atol=1e-6)
    torch.testing.assert_close(attack.identity_grid, ref("wanet_identity_grid"), rtol=0, atol=1e-6)
    grid = attack.warp_grid(torch.device("cpu"), torch.float32)
    torch.testing.assert_close(grid, ref("wanet_grid"), rtol=0, atol=1e-6)


def test_warp_matches_backdoorbench() -> None:
    attack = prepared()
    xf = to_float(X)
    ours = attack.apply_trigger(xf)
    torch.testing.assert_close(ours[:1], ref("wanet_bd_float"), rtol=0, atol=1e-5)
    assert_rounding_vs_truncation(attack.trigger_uint8(X), stored("wanet_bd_stored"), ours)


def test_noise_warp_with_the_same_offsets_matches_backdoorbench() -> None:
    """BackdoorBench draws the cross offsets ``torch.rand(bs, H, H, 2) * 2 - 1`` from the global
    stream; ours from the generator handed in: the same stream for the same seed."""
    attack = prepared()
    xf = to_float(X)
    ours = attack.noise_trigger(xf, torch.Generator().manual_seed(inputs.OFFSET_SEED))
    torch.testing.assert_close(ours[:1], ref("wanet_cross_float"), rtol=0, atol=1e-5)
    stored_ours = attack.noise_uint8(X, torch.Generator().manual_seed(inputs.OFFSET_SEED))
    assert_rounding_vs_truncation(stored_ours, stored("wanet_cross_stored"), ours)


def _decode(code: torch.Tensor) -> torch.Tensor:
    """The fixture's lossless int16 code of PostTensorTransform's normalised output."""
    return torch.where(code < 0, torch.zeros(()), ((code.float() / 255) - BB_MEAN) / BB_STD)


def test_post_tensor_transform_with_backdoorbenchs_parameters() -> None:
    """Crop (pad 5, filled with 0 in normalised space = the mean colour in pixels), nearest
    rotation with its corners filled likewise, flip: our batched ops with the parameters
    BackdoorBench drew reproduce its output, in every combination of the three steps."""
    meta = fixture()[0]["attacks"]["wanet_post_tensor_transform"]
    xb = inputs.images(4, (3, 16, 16), seed=inputs.AUGMENT_SEED)
    assert inputs.sha256(xb) == meta["input_sha256"]
    aug = PerBatchAugment(fill=tuple(BB_MEAN.flatten().tolist()))
    combos = set()
    for i, case in enumerate(meta["cases"]):
        params = BatchParams(
            crop=torch.tensor(case["crop"]),
            top=torch.tensor(case.get("top", 0)),
            left=torch.tensor(case.get("left", 0)),
            rotate=torch.tensor(case["rotate"]),
            angle=torch.tensor(case.get("angle", 0.0), dtype=torch.float64),
            flip=torch.tensor(case["flip"]),
        )
        ours = (aug.apply(to_float(xb), params) - BB_MEAN) / BB_STD
        torch.testing.assert_close(ours, _decode(ref(f"augment_{i}")), rtol=0, atol=1e-6)
        combos.add((case["crop"], case["rotate"], case["flip"]))
    assert len(combos) == 8
