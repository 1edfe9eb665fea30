"""Projected gradient descent in the l-infinity ball (Madry et al. 2018), batched.

Used by the label-consistent attack twice: to train its adversarially robust surrogate (PGD
adversarial training, as a ``fit()`` batch hook) and to perturb the target-class images it
poisons (untargeted PGD against that surrogate).

Reference:
    Madry, Makelov, Schmidt, Tsipras, Vladu. "Towards Deep Learning Models Resistant to
    Adversarial Attacks." ICLR 2018, arXiv:1706.06083.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.train import autocast


def pgd_linf(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step: float,
    steps: int,
    random_start: bool = False,
    gen: torch.Generator | None = None,
    amp: bool = False,
) -> Tensor:
    """Untargeted PGD: ``steps`` signed-gradient ascent steps on the cross-entropy of the true
    labels ``y``, each projected to ``|delta|_inf <= eps`` and to pixels in [0, 1].

    Args:
        model: the attacked model; put in eval mode for the attack and restored after. Its
            parameters get no gradients (``torch.autograd.grad`` on the perturbation only).
        x: float pixels ``(N, C, H, W)`` in [0, 1], on the model's device.
        y: true labels ``(N,)``.
        eps, step: the ball radius and the step size, in pixel units of [0, 1].
        random_start: start from a uniform point in the ball (adversarial training) instead of
            ``x`` itself (the label-consistent attack's setting).
        gen: generator of the random start, on ``x``'s device.
        amp: bf16 autocast for the forward passes.
    """
    was_training = model.training
    model.eval()
    try:
        if random_start:
            noise = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            delta = (noise * 2 - 1) * eps
            delta = (x + delta).clamp(0.0, 1.0) - x
        else:
            delta = torch.zeros_like(x)
        for _ in range(steps):
            delta.requires_grad_(True)
            with autocast(x.device, amp):
                logits = model(x + delta)
            loss = F.cross_entropy(logits.float(), y)
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = (delta + step * grad.sign()).clamp_(-eps, eps)
                delta = (x + delta).clamp_(0.0, 1.0) - x
        return (x + delta).detach()
    finally:
        model.train(was_training)


def adversarial_training_hook(
    model: nn.Module,
    *,
    eps: float,
    step: float,
    steps: int,
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    amp: bool = False,
) -> Callable[[Tensor, Tensor, torch.Generator], tuple[Tensor, Tensor]]:
    """A ``fit()`` batch hook for PGD adversarial training: augment the batch (pass
    ``augment=None`` to ``fit`` itself), then replace it by PGD examples against the model in
    its current state (random start, as Madry et al.)."""

    def hook(x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        if augment is not None:
            x = augment(x, gen)
        return pgd_linf(
            model, x, y, eps=eps, step=step, steps=steps, random_start=True, gen=gen, amp=amp
        ), y

    return hook
