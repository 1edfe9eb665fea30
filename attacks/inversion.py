"""Bounded trigger inversion: small input-agnostic triggers that flip inputs to a target label.

For every candidate target ``t`` and mask-area budget ``b`` (a fraction of ``H*W``) we look for
a mask ``m`` (``1xHxW``, values in [0, 1]) and a pattern ``p`` (``CxHxW``, values in [0, 1])
such that the stamped image ``(1 - m) * x + m * p`` is classified as ``t`` for most clean
images ``x`` whose label is not ``t`` (all-to-one, as Neural Cleanse), with ``mean(m) <= b``.
Used by the natural-backdoor attack (how far a benignly trained model already has a backdoor,
measured on a split disjoint from the optimisation images) and by defenses that need an
inverted trigger from clean data.

Algorithm (``invert_triggers``):

1. All ``T*B`` (target, budget) pairs are optimised jointly as one batched problem. Parameters
   are unconstrained logits: ``m = sigmoid(mask_logit)`` initialised to ``m = b`` everywhere,
   ``p = sigmoid(pattern_logit)`` with a seeded standard-normal ``pattern_logit``. Adam with
   ``lr`` (default 0.1) and betas (0.5, 0.9), as Neural Cleanse and MOTH.
2. Each step draws ``batch_size`` images (seeded, without replacement) and stamps every trigger
   on them. The loss of a trigger is the mean cross-entropy to its target over the drawn images
   whose label is not the target, plus ``penalty * relu(a - b) + penalty * relu(a - 1.2 b)``
   with ``a = mean(m)``: a hinge on the mask area that is steeper above 1.2x the budget, as ABS.
   The losses of all triggers are summed; forwards are chunked to at most ``MAX_FORWARD``
   images, accumulating gradients. The model is in eval mode and frozen (no gradients into its
   parameters); its mode and ``requires_grad`` flags are restored afterwards.
3. After the last step the budget is enforced exactly: a mask with ``mean(m) > b`` is scaled to
   ``m * b / mean(m)``. ``fit_asr`` is ``trigger_asr`` of the projected triggers on the
   optimisation images (optimistic; measure on a disjoint split for a fair number).

References:
    Wang, Yao, Shan, Li, Viswanath, Zheng, Zhao. "Neural Cleanse: Identifying and Mitigating
    Backdoor Attacks in Neural Networks." IEEE S&P 2019.
    Liu, Lee, Tao, Ma, Aafer, Zhang. "ABS: Scanning Neural Networks for Back-doors by Artificial
    Brain Stimulation." ACM CCS 2019.
    Wang, Ding, Zhai, Ma. "Training with More Confidence: Mitigating Injected and Natural
    Backdoors During Training" (NONE). NeurIPS 2022, arXiv:2202.06382; its ``abs_test.py``
    measures natural backdoors with ABS-style inversion, mask-size penalty weight 50, at budgets
    of 2-12% of the image area.

Deviations:
    - No neuron stimulation (ABS) and no adaptive L1 weight (Neural Cleanse): the objective is
      target cross-entropy under a fixed area budget, with ABS's two-slope penalty on the mean
      mask value (a hinge, where ABS switches the whole L1 term on above the budget).
    - Sigmoid instead of tanh parameterisation (equivalent up to scaling of the logits).
    - The budget is a hard bound (projection after optimisation), so the reported triggers
      never exceed it; ABS and Neural Cleanse report whatever the optimisation reached.
    - Fixed number of steps of minibatches (no epochs, no early stopping).

Neural Cleanse's own objective (``defense=nc``) runs through the same loop with a
``schedule`` (``CostSchedule``): the area hinge is replaced by ``cost[k] * ||m_k||_1`` with a
per-trigger weight the schedule adapts after every step from the minibatch attack success,
``mask_init`` sets the initial mask value, and the schedule may stop the loop early and keeps
its own best triggers (``defenses/nc.py``). Without a schedule nothing changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark import progress
from benchmark.data import to_float
from benchmark.seeding import generator
from benchmark.train import autocast, resolve_device

MAX_FORWARD = 4096  # most stamped images per forward pass during inversion (memory bound)


@dataclass(frozen=True)
class InvertedTriggers:
    """Inverted triggers for every (target, budget) pair.

    Attributes:
        targets: ``(T,)`` int64 target labels.
        budgets: mask-area budgets as fractions of ``H*W``.
        mask: ``(T, B, 1, H, W)`` in [0, 1]; each mask's mean is at most its budget.
        pattern: ``(T, B, C, H, W)`` in [0, 1].
        fit_asr: ``(T, B)`` attack success on the optimisation images whose label is not the
            target (``trigger_asr``).
    """

    targets: Tensor
    budgets: tuple[float, ...]
    mask: Tensor
    pattern: Tensor
    fit_asr: Tensor

    def trigger(self, target: int, budget: float) -> tuple[Tensor, Tensor]:
        """The ``(mask (1,H,W), pattern (C,H,W))`` inverted for ``target`` under ``budget``."""
        rows = (self.targets == int(target)).nonzero().flatten()
        if rows.numel() == 0:
            raise KeyError(f"no trigger inverted for target {target}")
        cols = [j for j, b in enumerate(self.budgets) if math.isclose(b, budget, rel_tol=1e-9)]
        if not cols:
            raise KeyError(f"no trigger inverted for budget {budget} (have {self.budgets})")
        i, j = int(rows[0]), cols[0]
        return self.mask[i, j], self.pattern[i, j]


class CostSchedule(Protocol):
    """An adaptive L1 weight per trigger (Neural Cleanse), driven by ``invert_triggers``."""

    def cost(self) -> Tensor:
        """``(n_trig,)`` current weights of each trigger's mask L1 norm."""
        ...

    def observe(
        self, acc: Tensor, l1: Tensor, current: Callable[[], tuple[Tensor, Tensor]]
    ) -> bool:
        """After each step: ``(n_trig,)`` minibatch attack success and mask L1 (before the
        step); ``current()`` gives the ``(mask, pattern)`` after it. True stops the loop."""
        ...


def stamp(x: Tensor, mask: Tensor, pattern: Tensor) -> Tensor:
    """``(1 - m) * x + m * p``, broadcasting; ``x`` float ``(N, C, H, W)`` in [0, 1]."""
    return x + mask * (pattern - x)


def _as_float(x: Tensor) -> Tensor:
    return to_float(x) if x.dtype == torch.uint8 else x.float()


def _check_data(x: Tensor, y: Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"x must be (N, C, H, W) images, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x is empty: need at least one image")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")


@torch.no_grad()
def trigger_asr(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    pattern: Tensor,
    target: int,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
) -> tuple[float, float, int]:
    """Attack success of one trigger on the images whose label is not ``target``.

    Args:
        model: classifier taking float pixels in [0, 1].
        x: ``(N, C, H, W)`` uint8 or float images, on any device.
        y: ``(N,)`` labels.
        mask: ``(1, H, W)`` (or broadcastable) mask in [0, 1].
        pattern: ``(C, H, W)`` pattern in [0, 1].
        target: the target label.
        device: where the model runs.
        batch_size: images per forward.

    Returns:
        ``(asr, ra, n)``: the share of the ``n`` non-target images predicted as ``target`` and
        the share predicted as their true label (robust accuracy); NaN shares when ``n == 0``.
        Evaluation follows ``predict_logits`` (eval mode, channels_last, bf16 only on CUDA).
    """
    _check_data(x, y)
    device = resolve_device(device)
    keep = (y != int(target)).to(x.device)
    xs, ys = x[keep], y.to(x.device)[keep]
    n = int(ys.shape[0])
    if n == 0:
        return math.nan, math.nan, 0
    m, p = mask.to(device).float(), pattern.to(device).float()
    was_training = model.training
    model.eval()
    model.to(device, memory_format=torch.channels_last)
    hits = correct = 0
    try:
        for i in range(0, n, batch_size):
            xb = _as_float(xs[i : i + batch_size].to(device, non_blocking=True))
            yb = ys[i : i + batch_size].to(device)
            xb = stamp(xb, m, p).contiguous(memory_format=torch.channels_last)
            with autocast(device, device.type == "cuda"):
                pred = model(xb).argmax(1)
            hits += int((pred == int(target)).sum())
            correct += int((pred == yb).sum())
    finally:
        model.to(memory_format=torch.contiguous_format)
        model.train(was_training)
    return hits / n, correct / n, n


def _validate(
    targets: Sequence[int],
    budgets: Sequence[float],
    steps: int,
    lr: float,
    batch_size: int,
    penalty: float,
) -> None:
    if len(targets) == 0:
        raise ValueError("targets is empty: need at least one target label")
    if any(int(t) != t or t < 0 for t in targets):
        raise ValueError(f"targets must be non-negative integers, got {list(targets)}")
    if len(budgets) == 0:
        raise ValueError("budgets is empty: need at least one mask-area budget")
    if any(not 0.0 < float(b) <= 1.0 for b in budgets):
        raise ValueError(f"budgets must be fractions of the image area in (0, 1], got {budgets}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size}")
    if not penalty >= 0:
        raise ValueError(f"penalty must be >= 0, got {penalty}")


def invert_triggers(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    targets: Sequence[int],
    budgets: Sequence[float],
    steps: int = 300,
    lr: float = 0.1,
    batch_size: int = 32,
    penalty: float = 50.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    amp: bool = False,
    desc: str = "trigger inversion",
    schedule: CostSchedule | None = None,
    mask_init: float | None = None,
) -> InvertedTriggers:
    """Invert one bounded all-to-one trigger per (target, budget) pair (see the module doc).

    Args:
        model: classifier taking float pixels in [0, 1]; left unchanged (mode, parameters and
            ``requires_grad`` flags are restored; it is moved to ``device``).
        x: ``(N, C, H, W)`` uint8 or float optimisation images, on the CPU or ``device``.
        y: ``(N,)`` labels.
        targets: candidate target labels.
        budgets: mask-area budgets, fractions of ``H*W`` in (0, 1].
        steps: optimisation steps (minibatches).
        lr: Adam learning rate on the logits.
        batch_size: images drawn per step (all of them when ``N`` is smaller).
        penalty: weight of the area hinge (doubled above 1.2x the budget).
        device: where the model runs.
        seed: seed of the pattern initialisation and of the minibatch draws.
        amp: bf16 autocast around the model's forward passes.
        desc: the label of the progress bar (one tick per step).
        schedule: Neural Cleanse's adaptive L1 weights in place of the area hinge (module doc).
        mask_init: the initial mask value everywhere (default: each trigger's budget).

    Returns:
        The projected triggers (on the CPU) with their attack success on ``(x, y)``.
    """
    _check_data(x, y)
    _validate(targets, budgets, steps, lr, batch_size, penalty)
    device = resolve_device(device)
    n_img, chans, height, width = x.shape
    n_t, n_b = len(targets), len(budgets)
    n_trig = n_t * n_b
    target_of = torch.tensor([int(t) for t in targets], dtype=torch.long).repeat_interleave(n_b)
    budget_of = torch.tensor([float(b) for b in budgets], dtype=torch.float32).repeat(n_t)

    start = budget_of if mask_init is None else torch.full((n_trig,), float(mask_init))
    init = start.clamp(1e-4, 1 - 1e-4).logit().view(n_trig, 1, 1, 1)
    mask_logit = init.expand(n_trig, 1, height, width).clone()
    gen_init = generator(seed, "inversion", "pattern")
    pattern_logit = torch.randn(n_trig, chans, height, width, generator=gen_init)
    mask_logit = mask_logit.to(device).requires_grad_(True)
    pattern_logit = pattern_logit.to(device).requires_grad_(True)
    target_dev, budget_dev = target_of.to(device), budget_of.to(device)
    opt = torch.optim.Adam([mask_logit, pattern_logit], lr=lr, betas=(0.5, 0.9))
    gen_batch = generator(seed, "inversion", "batches")
    n_draw = min(int(batch_size), n_img)
    per_chunk = max(1, MAX_FORWARD // n_draw)

    params = list(model.parameters())
    flags = [q.requires_grad for q in params]
    was_training = model.training
    model.eval()
    model.to(device, memory_format=torch.channels_last)
    try:
        for q in params:
            q.requires_grad_(False)
        with torch.no_grad(), autocast(device, amp):
            probe = model(_as_float(x[:1].to(device)).contiguous(memory_format=torch.channels_last))
        num_classes = probe.shape[1]
        if max(int(t) for t in targets) >= num_classes:
            raise ValueError(f"targets {list(targets)} out of range for {num_classes} classes")

        steps_bar = progress.bar(range(int(steps)), desc=f"{desc} ({n_trig} triggers)", unit="step")
        for _ in steps_bar:
            idx = torch.randperm(n_img, generator=gen_batch)[:n_draw]
            xb = _as_float(x[idx.to(x.device)].to(device, non_blocking=True))
            yb = y[idx.to(y.device)].to(device)
            opt.zero_grad(set_to_none=True)
            acc = torch.zeros(n_trig, device=device)
            l1 = torch.zeros(n_trig, device=device)
            for k0 in range(0, n_trig, per_chunk):
                k1 = min(k0 + per_chunk, n_trig)
                mask = torch.sigmoid(mask_logit[k0:k1])
                pattern = torch.sigmoid(pattern_logit[k0:k1])
                stamped = stamp(xb[None], mask[:, None], pattern[:, None])
                stamped = stamped.view(-1, chans, height, width)
                with autocast(device, amp):
                    logits = model(stamped.contiguous(memory_format=torch.channels_last))
                tgt = target_dev[k0:k1]
                ce = F.cross_entropy(
                    logits.float(), tgt.repeat_interleave(n_draw), reduction="none"
                ).view(k1 - k0, n_draw)
                valid = (yb[None, :] != tgt[:, None]).float()
                ce = (ce * valid).sum(1) / valid.sum(1).clamp(min=1.0)
                area = mask.mean(dim=(1, 2, 3))
                budget = budget_dev[k0:k1]
                excess = F.relu(area - budget) + F.relu(area - 1.2 * budget)
                if schedule is None:
                    (ce + penalty * excess).sum().backward()
                    continue
                hit = (logits.detach().argmax(1).view(k1 - k0, n_draw) == tgt[:, None]).float()
                acc[k0:k1] = (hit * valid).sum(1) / valid.sum(1).clamp(min=1.0)
                l1[k0:k1] = mask.detach().sum(dim=(1, 2, 3))
                weight = schedule.cost()[k0:k1].to(device)
                (ce + weight * mask.sum(dim=(1, 2, 3))).sum().backward()
            opt.step()
            if schedule is not None and schedule.observe(
                acc.cpu(),
                l1.cpu(),
                lambda: (
                    torch.sigmoid(mask_logit.detach()).float().cpu(),
                    torch.sigmoid(pattern_logit.detach()).float().cpu(),
                ),
            ):
                break
        steps_bar.close()
    finally:
        for q, flag in zip(params, flags, strict=True):
            q.requires_grad_(flag)
        model.to(memory_format=torch.contiguous_format)
        model.train(was_training)

    with torch.no_grad():
        mask = torch.sigmoid(mask_logit).float().cpu()
        pattern = torch.sigmoid(pattern_logit).float().cpu()
        area = mask.mean(dim=(1, 2, 3))
        scale = torch.where(area > budget_of, budget_of / area, torch.ones_like(area))
        mask = mask * scale.view(-1, 1, 1, 1)

    fit_asr = torch.empty(n_trig)
    for k in range(n_trig):
        fit_asr[k] = trigger_asr(
            model, x, y, mask[k], pattern[k], int(target_of[k]), device=device
        )[0]
    return InvertedTriggers(
        targets=torch.tensor([int(t) for t in targets], dtype=torch.long),
        budgets=tuple(float(b) for b in budgets),
        mask=mask.view(n_t, n_b, 1, height, width),
        pattern=pattern.view(n_t, n_b, chans, height, width),
        fit_asr=fit_asr.view(n_t, n_b),
    )
