"""fastnet: airbench94's patch whitening (set from data once, deterministic, never on a trained
model) and a short learning check with train=fast. The shared contract is in test_models.py."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from benchmark.models.fastnet import FastNet
from benchmark.seeding import generator
from benchmark.train import Augment, fit, predict
from benchmark.types import ImageSet
from benchmark.validate import check_recipe

from .helpers import MODEL_CONF

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
FAST = MODEL_CONF.parent / "train" / "fast.yaml"


def _net(seed: int = 0, **kw) -> FastNet:
    torch.manual_seed(seed)
    return FastNet(4, 3, (16, 16), MEAN, STD, widths=(8, 16, 16), **kw)


def smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """uint8 images with strongly correlated neighbouring pixels (upsampled noise), so the
    raw patch covariance is far from the identity."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8)


def _patch_moment(model: FastNet, x: torch.Tensor, whiten: bool) -> torch.Tensor:
    """Uncentred second moment of the first layer's positive-half outputs (bias removed), or
    of the raw normalised 2x2 patches."""
    with torch.no_grad():
        xn = model.normalize(x.float() / 255)
        if whiten:
            out = model.whiten(xn) - model.whiten.bias.view(1, -1, 1, 1)
            out = out[:, : out.shape[1] // 2]
        else:
            out = xn.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 1, 4, 5, 2, 3).flatten(1, 3)
        flat = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1]).double()
    return flat.T @ flat / len(flat)


def test_whitening_makes_the_first_layer_output_covariance_the_identity() -> None:
    x = smooth_images(300)
    model = _net()
    raw = _patch_moment(model, x, whiten=False)
    assert (raw - torch.eye(12, dtype=raw.dtype)).abs().max() > 0.5  # correlated input
    assert model.needs_data_init()
    model.init_from_data(x, torch.Generator().manual_seed(0))
    moment = _patch_moment(model, x, whiten=True)
    # In the eigenbasis: lambda_i / (lambda_i + eps) on the diagonal (eps = 5e-4, airbench's;
    # below 1 only for the flattest directions), 0 elsewhere.
    lam = torch.linalg.eigvalsh(raw).flip(0)
    torch.testing.assert_close(moment, torch.diag(lam / (lam + 5e-4)), atol=1e-4, rtol=0)
    assert (moment.diagonal() > 0.8).all() and (moment.diagonal() > 0.99).sum() >= 9
    w = model.whiten.weight
    torch.testing.assert_close(w[12:], -w[:12])  # the negated copies
    assert not model.needs_data_init() and not w.requires_grad


def test_whitening_is_deterministic_and_uses_a_seeded_subset() -> None:
    x = smooth_images(300)
    a, b, c = _net(0, whiten_samples=100), _net(1, whiten_samples=100), _net(0, whiten_samples=100)
    a.init_from_data(x, torch.Generator().manual_seed(5))
    b.init_from_data(x, torch.Generator().manual_seed(5))  # other init, same draw
    c.init_from_data(x, torch.Generator().manual_seed(6))
    assert torch.equal(a.whiten.weight, b.whiten.weight)
    assert not torch.equal(a.whiten.weight, c.whiten.weight)
    float_x = _net(0, whiten_samples=100)
    float_x.init_from_data(x.float() / 255, torch.Generator().manual_seed(5))
    torch.testing.assert_close(float_x.whiten.weight, a.whiten.weight)


def test_fit_whitens_a_fresh_model_once_and_never_a_trained_one() -> None:
    data = ImageSet(smooth_images(64), torch.arange(64) % 4, ("a", "b", "c", "d"))
    recipe = OmegaConf.merge(OmegaConf.load(FAST), {"epochs": 1, "batch_size": 16})
    model = _net()
    fit(model, data, recipe, seed=3, augment=Augment(2, True), progress=False)
    whitened = model.whiten.weight.detach().clone()
    expect = _net()
    expect.init_from_data(data.x, generator(3, "data_init"))  # fit's seeded stream
    assert torch.equal(whitened, expect.whiten.weight)
    assert not model.needs_data_init() and model.state_dict()["data_initialised"]
    other = ImageSet(smooth_images(64, seed=9), data.y, data.classes)
    fit(model, other, recipe, seed=3, progress=False)  # e.g. a defense's fine-tuning
    assert torch.equal(model.whiten.weight, whitened)
    copy = _net(seed=2)
    copy.load_state_dict(model.state_dict())  # e.g. the model cache
    fit(copy, other, recipe, seed=3, progress=False)
    assert torch.equal(copy.whiten.weight, whitened)


def test_fast_recipe_is_valid_and_pinned_to_the_commit_read() -> None:
    check_recipe(OmegaConf.load(FAST))
    assert "cifar10-airbench@f1c599c" in FAST.read_text()


@pytest.mark.slow
def test_fastnet_with_train_fast_learns_a_tiny_task() -> None:
    """fastnet + train=fast, both from their YAML, through the same fit() as every model
    (batch and widths shrunk for two CPU cores): well above chance on a 4-class toy task."""
    y = torch.arange(256) % 4
    x = smooth_images(256, seed=1)
    x[:, :, 4:8, 4:8] = (y * 60 + 20).to(torch.uint8)[:, None, None, None]  # the class marker
    data = ImageSet(x, y, ("a", "b", "c", "d"))
    cfg = OmegaConf.merge(OmegaConf.load(MODEL_CONF / "fastnet.yaml"), {"widths": [16, 32, 32]})
    torch.manual_seed(0)
    model = instantiate(cfg, num_classes=4, in_chans=3, image_size=(16, 16), mean=MEAN, std=STD)
    recipe = OmegaConf.merge(OmegaConf.load(FAST), {"batch_size": 64, "epochs": 8})
    result = fit(model, data, recipe, seed=0, augment=Augment(4, True), progress=False)
    acc = (predict(model, data.x) == data.y).float().mean().item()
    assert acc > 0.6, (acc, result.history)
