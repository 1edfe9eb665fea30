"""``fit()``: the one training loop of the harness, used by the runner and by defenses.

Data stay as uint8 tensors on the training device (airbench style); each batch is converted to
float pixels, passed through an optional ``batch_hook`` (training-controlled attacks), augmented
on the device (random crop with zero padding, horizontal flip where the dataset allows; or an
attack's own, e.g. WaNet's per-batch ``benchmark.augment.PerBatchAugment``), and fed
to the model, which normalises inside ``forward``. The loop uses the channels_last memory
layout (faster on CUDA and on CPU) and bf16 autocast where bf16 is faster than fp32 (CUDA, and
CPUs with AMX: 2.4x for fastnet on a Xeon; ``benchmark.recipe.bf16_native``). Every
random draw comes from generators derived from ``(seed, epoch)``, so a run resumed from its
per-epoch checkpoint continues exactly as an uninterrupted one would.

The recipe's optional parts (label smoothing, per-group lr, per-step schedules, lookahead,
parameters frozen after some epochs, airbench's alternating flip and reflect-padded translate,
``torch.compile``) are built in ``benchmark/recipe.py``; absent keys leave the loop as it was.
A model with a data-dependent initialisation (``needs_data_init()`` / ``init_from_data``, e.g.
fastnet's patch whitening) gets it here, once, before the first epoch of a fresh training.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from benchmark import progress as progress_bars
from benchmark import recipe as parts
from benchmark import tracking
from benchmark.augment import Augment, random_crop  # noqa: F401 - re-exported (moved)
from benchmark.data import to_float
from benchmark.errors import TrainingDiverged
from benchmark.io import DamagedFile, load_checked, save_checked, short_reason
from benchmark.predict import predict, predict_logits  # noqa: F401 - re-exported (moved)
from benchmark.recipe import autocast, place, resolve_device, use_amp, use_channels_last
from benchmark.seeding import generator, seed_everything
from benchmark.types import ImageSet

log = logging.getLogger(__name__)

BatchHook = Callable[[Tensor, Tensor, torch.Generator], tuple[Tensor, Tensor]]
# A batched augmentation ``(x, gen) -> x``: ``Augment`` (per sample) or
# ``benchmark.augment.PerBatchAugment`` (WaNet's, one parameter set per batch).
AugmentFn = Callable[[Tensor, torch.Generator], Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
# Steps between checks that the running loss is finite (each check is one device sync).
CHECK_EVERY = 20


@dataclass
class FitResult:
    """What ``fit`` reports: per-epoch training loss and accuracy, and where it started."""

    epochs: int = 0
    start_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False


def fit(
    model: nn.Module,
    data: ImageSet,
    recipe: DictConfig | Mapping[str, Any],
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    augment: AugmentFn | None = None,
    batch_hook: BatchHook | None = None,
    loss_fn: LossFn | None = None,
    params: Iterable[nn.Parameter] | None = None,
    train_mode: Callable[[nn.Module], None] | None = None,
    on_epoch_end: Callable[[int, dict[str, float]], bool] | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    desc: str = "train",
    **overrides: Any,
) -> FitResult:
    """Train ``model`` in place on ``data`` with the recipe from ``conf/train/``.

    Args:
        model: the model; moved to ``device``.
        data: uint8 images and labels.
        recipe: ``epochs``, ``batch_size``, ``lr``, ``optimizer`` and ``scheduler`` (Hydra
            ``_partial_`` configs; the scheduler steps once per epoch), optional ``amp``
            (auto = where bf16 is native|true|false), ``channels_last`` (auto = on CUDA and
            CPU), ``grad_clip`` (max norm or null), ``augment`` (bool), and the optional keys
            of ``benchmark/recipe.py`` (label smoothing, lookahead, ...). ``overrides``
            replace recipe keys (e.g. ``epochs=5``).
        device: training device.
        seed: the seed stream of this training; batch order, augmentation and dropout are
            drawn from ``(seed, epoch)``.
        augment: ``(x, gen) -> x`` on the device after the hook, e.g. ``Augment`` (skipped
            when the recipe has ``augment: false``).
        batch_hook: ``(x, y, gen) -> (x, y)`` on float pixels before augmentation (WaNet's
            on-the-fly poisoning).
        loss_fn: ``(logits, y) -> loss``; by default cross-entropy with the recipe's
            ``label_smoothing`` (negate it for unlearning).
        params: the parameters to optimise (default: all that require grad).
        train_mode: called at each epoch start instead of ``model.train()`` (e.g. to keep norm
            layers frozen).
        on_epoch_end: ``(epoch, stats) -> stop``; returning True ends training early.
        checkpoint: file for the per-epoch checkpoint; an existing one is resumed from.
        progress: show a progress bar with loss and accuracy (if the process-wide switch
            ``benchmark.progress`` is on too).
        desc: the training's name in the progress bar, the log and the tracker's per-epoch
            curves (``train/<desc>/{loss,acc,lr}``, :func:`benchmark.tracking.curve`).
    """
    if not isinstance(recipe, DictConfig):
        recipe = OmegaConf.create(dict(recipe))
    if overrides:
        recipe = OmegaConf.merge(recipe, overrides)
    device = resolve_device(device)
    epochs, batch_size = int(recipe.epochs), int(recipe.batch_size)
    amp = use_amp(recipe, device)
    channels_last = use_channels_last(recipe, device)
    grad_clip = recipe.get("grad_clip")
    augment, alternating = parts.adapt_augment(augment, recipe)

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    n = len(data)
    steps = parts.steps_per_epoch(n, batch_size, bool(recipe.get("drop_last", False)))
    optimizer, base_optimizer = parts.build_optimizer(recipe, params, model)
    scheduler, per_step = parts.build_scheduler(recipe, base_optimizer, steps * epochs)
    lookahead = recipe.get("lookahead")
    loss_fn = loss_fn or parts.train_loss(recipe)
    frozen = parts.FreezeAfter(model, recipe.get("freeze_after"))
    forward = torch.compile(model) if parts.use_compile(recipe, device) else model

    show = progress and progress_bars.enabled()
    result = FitResult(epochs=epochs)
    start = _resume(checkpoint, model, optimizer, scheduler, result)
    curve = tracking.curve(desc)  # per-epoch curves in the active tracker, if any
    curve.log_all(result.history)  # the epochs a resumed training already did
    data = place(data, device)
    if start == 0:  # a fresh training (a resumed one restored the initialised model)
        parts.init_from_data(model, data.x, seed)
    flip_start = parts.flip_starts(n, seed, data.device) if alternating else None
    t0 = time.perf_counter()
    for epoch in range(start, epochs):
        seed_everything(seed, "epoch", epoch)  # dropout and other module-internal randomness
        g_order = generator(seed, "order", epoch)
        g_aug = generator(seed, "augment", epoch, device=device)
        (train_mode or nn.Module.train)(model)
        frozen.epoch(epoch)
        order = torch.randperm(n, generator=g_order).to(data.device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        bar = progress_bars.bar(
            range(steps), desc=f"{desc} {epoch + 1}/{epochs}", unit="batch", disable=not show
        )
        for step in bar:
            idx = order[step * batch_size : (step + 1) * batch_size]
            x = to_float(data.x[idx].to(device, non_blocking=True))
            y = data.y[idx].to(device, non_blocking=True)
            if batch_hook is not None:
                x, y = batch_hook(x, y, g_aug)
            if flip_start is not None:
                x = parts.alternating_flip(x, flip_start[idx], epoch)
            if augment is not None:
                x = augment(x, g_aug)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                logits = forward(x)
                loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(params, float(grad_clip))
            if lookahead:  # the slow step size at the sync after this step
                parts.set_lookahead_alpha(
                    optimizer, lookahead, epoch * steps + step + 1, epochs * steps
                )
            optimizer.step()
            if per_step:
                scheduler.step()
            loss_sum += loss.detach() * y.shape[0]
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.shape[0]
            # A NaN/inf loss poisons every later step: stop within CHECK_EVERY steps, not at
            # the epoch's end (one sync per CHECK_EVERY steps; the sum carries any bad step).
            if step % CHECK_EVERY == CHECK_EVERY - 1 or step == steps - 1:
                _check_finite(loss_sum, desc, epoch, step)
            if show and (step % 20 == 19 or step == steps - 1):
                bar.set_postfix(
                    loss=f"{loss_sum.item() / seen:.4f}",
                    acc=f"{correct.item() / seen:.4f}",
                    refresh=False,
                )
        bar.close()
        stats = {
            "epoch": epoch + 1,
            "loss": loss_sum.item() / max(seen, 1),
            "acc": correct.item() / max(seen, 1),
            "lr": optimizer.param_groups[0]["lr"],
        }
        if scheduler is not None and not per_step:
            scheduler.step()
        if lookahead and epoch == epochs - 1:
            parts.end_lookahead(optimizer)  # the trained model is the slow weights
        result.history.append(stats)
        curve.log(stats)
        log.info(
            "%s epoch %d/%d: loss %.4f acc %.4f",
            desc,
            epoch + 1,
            epochs,
            stats["loss"],
            stats["acc"],
        )
        stop = bool(on_epoch_end(epoch, stats)) if on_epoch_end else False
        if lookahead and stop and epoch < epochs - 1:
            parts.end_lookahead(optimizer)
        if checkpoint is not None:
            save_checked(
                {
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler else None,
                    "history": result.history,
                    "stopped": stop,
                },
                checkpoint,
            )
        if stop:
            result.stopped_early = True
            break
    frozen.restore()
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    result.seconds = time.perf_counter() - t0
    return result


def _check_finite(loss_sum: Tensor, desc: str, epoch: int, step: int) -> None:
    value = loss_sum.item()
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"{desc}: the training loss became {value} in epoch {epoch + 1} (by step "
            f"{step + 1}); lower train.lr, set train.grad_clip, or check the data"
        )


def _resume(
    checkpoint: str | Path | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    result: FitResult,
) -> int:
    """Load a per-epoch checkpoint if there is one; return the epoch to start from."""
    if checkpoint is None or not Path(checkpoint).exists():
        return 0
    try:
        state = load_checked(checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
    except Exception as err:  # a damaged checkpoint only costs the epochs it held
        reason = err if isinstance(err, DamagedFile) else short_reason(err)
        log.warning(
            "ignoring damaged checkpoint %s (%s); training from scratch", checkpoint, reason
        )
        return 0
    result.history = list(state["history"])
    result.start_epoch = int(state["epoch"]) + 1
    if state.get("stopped"):
        result.stopped_early = True
        return result.epochs
    log.info("resuming %s after epoch %d", checkpoint, result.start_epoch)
    return result.start_epoch
