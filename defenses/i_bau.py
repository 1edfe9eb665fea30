"""``defense=i_bau``: Implicit Backdoor Adversarial Unlearning.

Zeng, Chen, Park, Mao, Jin, Jia. "Adversarial Unlearning of Backdoors via Implicit
Hypergradient." ICLR 2022, arXiv:2110.03735. Official code: YiZeng623/I-BAU @ d4bfa52
(``defense.py:181-243``, ``hypergrad.py``, after prolearner/hypertorch); BackdoorBench f02e353
``defense/i-bau.py:474-548``. Post-training: the model and the clean reserve only.

The model stays in eval mode throughout (frozen BN statistics; official ``:216``). The reserve
is cut into batches once. For ``rounds`` rounds:

1. **Universal perturbation** (the inner maximisation): ``delta`` (1, C, H, W) from 0, one pass
   of SGD (lr 10) over the reserve minimising ``-CE(f(x + delta), argmax f(x)) + 0.001
   ||delta||^2`` (``perturbation``).
2. **Unlearning**: per cached batch b, one Adam step on the model with the implicit
   hypergradient of ``L_out(delta, theta) = CE(f(x_b + patch), y_b)`` (``delta`` added to
   ``int(0.01 n)`` random images of the batch) through the fixed point of the inner map
   ``delta <- delta - 0.1 grad_delta L_in``, ``L_in = mean(-CE(f(x_0 + delta), y_0)) + 0.001
   ||delta||^2`` on the first batch: ``K`` iterations ``v <- J^T v + grad_delta L_out`` from
   ``v = 0``, then ``grad_theta L_out + (d map / d theta)^T v`` (``hypergradient``).

Defaults are the official code's (``defense.py:105-130,170-193,210-230``): batch 100, Adam lr
1e-3 (no amsgrad), 5 rounds, K = 5, inner step 0.1, perturbation lr 10 and weight 0.001, 1% of
each batch patched, no augmentation, no bound on ``delta`` (the L2 projection and the [0, 1]
clamp are commented out; ``max_norm`` adds the projection). BackdoorBench takes the same
algorithm with Adam lr 1e-4 *with* amsgrad and batch 256 (its optimiser factory), on batches
augmented once. Deviations: the official code unlearns on the first 5,000 *test* images; ours
uses the reserve (as BackdoorBench). No autocast (the hypergradient differentiates twice).

**Space.** The harness's models take [0, 1] pixels and normalise inside ``forward``; ``delta``
is added to the pixels, as in the official code (its VGG has no normalisation layer), so the
penalty and any ``max_norm`` are L2 in pixel units. BackdoorBench adds ``delta`` to
*normalised* images: its ``delta_n`` is the pixel perturbation ``std * delta_n`` (~0.25x on
CIFAR-10), its penalty ``0.001 ||delta_n||^2`` is ``0.001 / std_c^2`` (~16x) per pixel unit,
and its SGD step is ``10 std_c^2`` (~0.6) per pixel unit. The normalisation is affine, so the
two parametrisations describe the same perturbations under those rescaled settings only.
Unbounded, a pixel-space ``delta`` can grow far beyond the image (measured on mnist5k's
small_cnn, std 0.31: ||delta|| ~ 800 at batch 32, which wrecked the model); ``max_norm`` bounds it.
The official outer lr 1e-3 can itself collapse a model: on the width-16 PreAct-ResNet18 of
``track=standard_cpu`` (250 reserve images) CA fell from 65.5% to 18.7%; BackdoorBench's 1e-4
kept 63.1%, and ``max_norm: 10`` did not help (17.8%; results/README.md).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.checks import Checks
from benchmark.errors import ConfigError
from benchmark.progress import bar
from benchmark.seeding import generator
from benchmark.types import ImageSet
from defenses.base import Defense, DefenseContext, DefenseResult, Stage
from defenses.linf_scores import accuracy

log = logging.getLogger(__name__)
checks = Checks("defense")
Batch = tuple[Tensor, Tensor]


def project(delta: Tensor, max_norm: float | None) -> None:
    """Scale ``delta`` in place into the L2 ball of radius ``max_norm`` (None: no bound)."""
    if max_norm is not None:
        with torch.no_grad():
            delta.mul_(min(1.0, max_norm / (float(delta.norm()) + 1e-12)))


def perturbation(
    model: nn.Module, xs: list[Tensor], lr: float = 10.0, weight: float = 1e-3,
    max_norm: float | None = None,
) -> Tensor:  # fmt: skip
    """The inner maximisation: one SGD pass over ``xs`` on ``-CE(f(x + delta), f(x)'s labels)
    + weight ||delta||^2``, ``delta`` (1, C, H, W) from 0; projected after each step."""
    delta = torch.zeros_like(xs[0][:1], requires_grad=True)
    opt = torch.optim.SGD([delta], lr=lr)
    for x in xs:
        with torch.no_grad():
            pseudo = model(x).argmax(1)
        loss = -F.cross_entropy(model(x + delta), pseudo) + weight * delta.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        project(delta, max_norm)
    return delta.detach()


def hypergradient(
    delta: Tensor, params: list[Tensor], k: int, fp_map: Callable[[Tensor], Tensor],
    outer: Callable[[Tensor], Tensor], tol: float = 1e-10,
) -> list[Tensor]:  # fmt: skip
    """The fixed-point hypergradient of ``outer`` w.r.t. ``params`` at ``delta``: ``k``
    iterations ``v <- J^T v + grad_delta outer`` (J = d fp_map / d delta; stop early when
    ``v`` moves by less than ``tol``), then ``grad_params outer + (d fp_map / d params)^T v``.
    ``fp_map`` and ``outer`` read ``params`` through the model they close over."""
    d = delta.detach().requires_grad_(True)
    out = outer(d)
    g_d, *g_p = torch.autograd.grad(out, [d, *params], allow_unused=True)
    g_d = torch.zeros_like(d) if g_d is None else g_d
    mapped = fp_map(d)
    v = torch.zeros_like(d)
    for _ in range(k):
        (jv,) = torch.autograd.grad(mapped, d, grad_outputs=v, retain_graph=True)
        v_new = jv + g_d
        moved = float((v_new - v).norm())
        v = v_new
        if moved < tol:
            break
    g_map = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
    return [
        (torch.zeros_like(p) if a is None else a) + (0 if b is None else b)
        for p, a, b in zip(params, g_map, g_p, strict=True)
    ]


def inner_map(model: nn.Module, x0: Tensor, y0: Tensor, step: float, weight: float) -> Callable:
    """``delta -> delta - step * grad_delta L_in`` (graph kept), L_in on the first batch."""

    def fp_map(d: Tensor) -> Tensor:
        loss = -F.cross_entropy(model(x0 + d), y0) + weight * d.pow(2).sum()
        (g,) = torch.autograd.grad(loss, d, create_graph=True)
        return d - step * g

    return fp_map


def outer_loss(model: nn.Module, x: Tensor, y: Tensor, patched: Tensor) -> Callable:
    """``delta -> CE(f(x + delta on the images patched), y)``."""
    mask = torch.zeros(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype)
    mask[patched] = 1.0
    return lambda d: F.cross_entropy(model(x + mask * d), y)


class IBAU(Defense):
    """I-BAU (see the module docstring).

    Args:
        rounds: perturbation + unlearning rounds (``n_rounds``).
        k: fixed-point iterations of the hypergradient (``K``).
        lr: the model's Adam learning rate. amsgrad: Adam's amsgrad (BackdoorBench: true).
        batch_size: reserve images per batch.
        inner_step: the inner map's gradient step on ``delta``.
        perturb_lr: SGD lr of the universal perturbation. perturb_weight: its L2 penalty.
        max_norm: L2 bound on ``delta`` in pixel units (null = none, as official).
        patch_fraction: share of each unlearning batch that gets ``delta``.
        augment: augment the cached batches once (BackdoorBench) or not (official).
    """

    name: ClassVar[str] = "i_bau"
    stage: ClassVar[Stage] = Stage.POST_TRAINING

    def __init__(
        self,
        rounds: int = 5,
        k: int = 5,
        lr: float = 1e-3,
        amsgrad: bool = False,
        batch_size: int = 100,
        inner_step: float = 0.1,
        perturb_lr: float = 10.0,
        perturb_weight: float = 1e-3,
        max_norm: float | None = None,
        patch_fraction: float = 0.01,
        augment: bool = False,
    ) -> None:
        checks.integer(rounds, "rounds", 0)
        checks.integer(k, "k", 0)
        checks.number(lr, "lr", 0.0, low_open=True)
        checks.boolean(amsgrad, "amsgrad")
        checks.integer(batch_size, "batch_size")
        checks.number(inner_step, "inner_step", 0.0, low_open=True)
        checks.number(perturb_lr, "perturb_lr", 0.0, low_open=True)
        checks.number(perturb_weight, "perturb_weight", 0.0)
        checks.null_or_number(max_norm, "max_norm", 0.0, low_open=True)
        checks.number(patch_fraction, "patch_fraction", 0.0, 1.0)
        checks.boolean(augment, "augment")
        self.rounds, self.k, self.lr, self.amsgrad = rounds, k, float(lr), amsgrad
        self.batch_size, self.inner_step = batch_size, float(inner_step)
        self.perturb_lr, self.perturb_weight = float(perturb_lr), float(perturb_weight)
        self.max_norm = None if max_norm is None else float(max_norm)
        self.patch_fraction, self.augment = float(patch_fraction), augment

    def validate(self, num_classes: int, n_train: int, n_clean: int) -> None:
        if n_clean < 1:
            raise ConfigError(
                "defense_data.clean_fraction", f"{self.name} needs a non-empty clean reserve"
            )

    def batches(self, ctx: DefenseContext, data: ImageSet, *names: object) -> list[Batch]:
        """The reserve in a seeded order, as float-pixel batches on the device."""
        order = torch.randperm(len(data), generator=ctx.generator(self.name, *names))
        g_aug = generator(ctx.seed, self.name, "augment", *names, device=ctx.device)
        out = []
        for i in range(0, len(data), self.batch_size):
            idx = order[i : i + self.batch_size]
            x = data.x[idx].to(ctx.device).float() / 255.0
            if self.augment and ctx.augment is not None:
                x = ctx.augment(x, g_aug)
            out.append((x, data.y[idx].to(ctx.device)))
        return out

    def unlearn_round(
        self, model: nn.Module, opt: torch.optim.Optimizer, cached: list[Batch], delta: Tensor,
        patches: list[Tensor],
    ) -> None:  # fmt: skip
        """One pass of hypergradient steps over ``cached`` at the perturbation ``delta``;
        ``patches[b]`` are the indices of batch b that get ``delta``."""
        params = [p for p in model.parameters() if p.requires_grad]
        fp_map = inner_map(model, *cached[0], self.inner_step, self.perturb_weight)
        for (x, y), patched in zip(cached, patches, strict=True):
            outer = outer_loss(model, x, y, patched.to(x.device))
            grads = hypergradient(delta, params, self.k, fp_map, outer)
            opt.zero_grad(set_to_none=True)
            for p, g in zip(params, grads, strict=True):
                p.grad = g.detach()
            opt.step()

    def patches(self, cached: list[Batch], gen: torch.Generator) -> list[Tensor]:
        """``int(n * patch_fraction)`` random indices per batch (``random.sample``)."""
        sizes = [x.shape[0] for x, _ in cached]
        return [torch.randperm(n, generator=gen)[: int(n * self.patch_fraction)] for n in sizes]

    def run(self, ctx: DefenseContext) -> DefenseResult:
        assert ctx.model is not None, "post-training defenses receive the trained model"
        model = copy.deepcopy(ctx.model).to(ctx.device).eval().requires_grad_(True)
        data = ctx.clean_set
        acc0 = accuracy(model, data, ctx.device, self.batch_size)
        cached = self.batches(ctx, data, "cache")
        opt = torch.optim.Adam(model.parameters(), lr=self.lr, amsgrad=self.amsgrad)
        g_patch = ctx.generator(self.name, "patch")
        extras: dict[str, Any] = {"n_reserve": len(data), "reserve_acc_before": acc0}
        for r in bar(range(self.rounds), desc=f"{self.name} rounds", unit="round"):
            xs = [x for x, _ in self.batches(ctx, data, "perturb", r)]
            delta = perturbation(model, xs, self.perturb_lr, self.perturb_weight, self.max_norm)
            with torch.no_grad():
                fooled = sum(
                    int((model(x + delta).argmax(1) != model(x).argmax(1)).sum()) for x in xs
                )
            self.unlearn_round(model, opt, cached, delta, self.patches(cached, g_patch))
            acc = accuracy(model, data, ctx.device, self.batch_size)
            extras[f"delta_norm_r{r}"] = float(delta.norm())
            extras[f"fooling_rate_r{r}"] = fooled / len(data)
            extras[f"reserve_acc_r{r}"] = acc
            log.info(
                "%s round %d: ||delta|| %.3f fools %.3f of the reserve; reserve acc %.4f",
                self.name, r, float(delta.norm()), fooled / len(data), acc,
            )  # fmt: skip
        model.eval()
        extras["reserve_acc_after"] = accuracy(model, data, ctx.device, self.batch_size)
        return DefenseResult(model=model, extras=extras)
