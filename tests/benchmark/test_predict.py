"""benchmark/predict.py: logits, labels and features in eval mode, batch by batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmark.predict import predict, predict_features, predict_logits


class Tiny(nn.Module):
    """A conv feature map, pooled, then a linear head; dropout tells train from eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.9)
        self.fc = nn.Linear(4, 3)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.conv(x)).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def images(n: int = 7) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 5, 5), generator=torch.Generator().manual_seed(0)).to(
        torch.uint8
    )


def test_logits_features_and_labels_are_the_eval_mode_forward_batch_by_batch() -> None:
    torch.manual_seed(0)
    model = Tiny().train()
    x = images()
    xf = x.float() / 255
    with torch.no_grad():
        model.eval()
        want_feats = model.forward_features(xf)
        want_logits = model(xf)
        model.train()
    logits = predict_logits(model, x, batch_size=3)  # 3 + 3 + 1 images
    feats = predict_features(model, x, batch_size=3)
    assert feats.shape == (7, 4) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, want_feats)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(predict(model, x, batch_size=3), logits.argmax(1))
    assert model.training  # the caller's mode is restored
    assert model.conv.weight.is_contiguous()  # and the memory format


def test_features_need_a_feature_head_split() -> None:
    with pytest.raises(TypeError, match="no forward_features"):
        predict_features(nn.Sequential(nn.Flatten(), nn.Linear(75, 3)), images())


def test_no_images_give_an_empty_tensor() -> None:
    assert predict_logits(Tiny(), images(0)).numel() == 0
