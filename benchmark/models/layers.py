"""Small building blocks the harness's models share and the tracer knows about."""

from __future__ import annotations

from torch import Tensor, nn


class Scale(nn.Module):
    """Multiply by a constant: a channel-preserving module, so the tracer
    (``benchmark/models/trace.py``) follows a conv's channels through it to their consumer.

    fastnet's ``1/9`` in front of its head is airbench's ``Mul(scaling_factor)`` after a
    bias-free linear layer moved before it: ``W (s f) = s (W f)``, the same map and gradients.
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"
