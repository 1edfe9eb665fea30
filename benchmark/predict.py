"""Predictions of a trained model: logits and labels for a batch of images, in eval mode."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from benchmark.data import to_float
from benchmark.recipe import autocast, resolve_device


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: Tensor, *, device: str | torch.device = "cpu", batch_size: int = 512
) -> Tensor:
    """Logits ``(N, K)`` float32 on the CPU for uint8 or float images ``x`` (eval mode)."""
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    # channels_last as in training (2x faster forward on CPU too); bf16 only on CUDA, so CPU
    # evaluation stays in fp32.
    model.to(device, memory_format=torch.channels_last)
    amp = device.type == "cuda"
    out = []
    try:
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(device, non_blocking=True)
            xb = to_float(xb) if xb.dtype == torch.uint8 else xb.float()
            with autocast(device, amp):
                out.append(model(xb.contiguous(memory_format=torch.channels_last)).float().cpu())
    finally:
        model.to(memory_format=torch.contiguous_format)
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


def predict(
    model: nn.Module, x: Tensor, *, device: str | torch.device = "cpu", batch_size: int = 512
) -> Tensor:
    """Predicted labels ``(N,)`` int64 on the CPU."""
    return predict_logits(model, x, device=device, batch_size=batch_size).argmax(1)
