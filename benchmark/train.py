"""``fit()``: the one training loop of the harness, used by the runner and by defenses.

Data stay as uint8 tensors on the training device (airbench style); each batch is converted to
float pixels, passed through an optional ``batch_hook`` (training-controlled attacks), augmented
on the device (random crop with zero padding, horizontal flip where the dataset allows; or an
attack's own, e.g. WaNet's per-batch ``benchmark.augment.PerBatchAugment``), and fed
to the model, which normalises inside ``forward``. The loop uses the channels_last memory
layout (faster on CUDA and on CPU) and bf16 autocast where bf16 is native (CUDA, and CPUs with
AVX512-BF16/AMX; measured 1.5x for small_cnn on two such EPYC cores, same accuracy). Every
random draw comes from generators derived from ``(seed, epoch)``, so a run resumed from its
per-epoch checkpoint continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from benchmark import progress as progress_bars
from benchmark import tracking
from benchmark.data import to_float
from benchmark.errors import TrainingDiverged
from benchmark.io import DamagedFile, load_checked, save_checked, short_reason
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


@dataclass(frozen=True)
class Augment:
    """Batched augmentation settings: zero-padded random crop and horizontal flip."""

    crop_padding: int = 0
    hflip: bool = False

    def __call__(self, x: Tensor, gen: torch.Generator) -> Tensor:
        if self.crop_padding > 0:
            x = random_crop(x, self.crop_padding, gen)
        if self.hflip:
            flip = torch.rand(x.shape[0], generator=gen, device=gen.device) < 0.5
            x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)
        return x


def random_crop(x: Tensor, pad: int, gen: torch.Generator) -> Tensor:
    """Per-sample random crop of a zero-padded batch (torchvision ``RandomCrop(padding=pad)``).

    One gather over the padded batch instead of a Python loop over samples.
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    wp = w + 2 * pad
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    flat_index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w)
    return padded.flatten(2).gather(2, flat_index.expand(n, c, h * w)).view(n, c, h, w)


@dataclass
class FitResult:
    """What ``fit`` reports: per-epoch training loss and accuracy, and where it started."""

    epochs: int = 0
    start_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def place(data: ImageSet, device: torch.device, budget_fraction: float = 0.3) -> ImageSet:
    """Move the images to ``device`` when they take less than ``budget_fraction`` of its free
    memory; otherwise keep them on the CPU and copy each batch."""
    if device.type != "cuda":
        return data.to(device)
    if data.device == device:
        return data
    free, _ = torch.cuda.mem_get_info(device)
    if data.x.numel() < budget_fraction * free:
        return data.to(device)
    return data.to("cpu")


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively: CUDA GPUs that support it, and CPUs whose
    oneDNN has bf16 kernels (AVX512-BF16 or AMX). Elsewhere bf16 would be emulated and slow."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def use_amp(recipe: Mapping[str, Any], device: torch.device) -> bool:
    """The recipe's ``amp``: ``auto`` = bf16 autocast wherever bf16 is native."""
    amp = recipe.get("amp", "auto")
    return bf16_native(device) if amp == "auto" else bool(amp)


def use_channels_last(recipe: Mapping[str, Any], device: torch.device) -> bool:
    """The recipe's ``channels_last``: ``auto`` = on CUDA and CPU, where NHWC convolutions are
    faster (cuDNN; oneDNN measured 1.4-1.7x on two EPYC cores for small_cnn and
    PreAct-ResNet18)."""
    value = recipe.get("channels_last", "auto")
    return device.type in ("cuda", "cpu") if value == "auto" else bool(value)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast (no loss scaling needed with bf16), or a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


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
            CPU), ``grad_clip`` (max norm or null), ``augment`` (bool). ``overrides``
            replace recipe keys (e.g. ``epochs=5``).
        device: training device.
        seed: the seed stream of this training; batch order, augmentation and dropout are
            drawn from ``(seed, epoch)``.
        augment: ``(x, gen) -> x`` on the device after the hook, e.g. ``Augment`` (skipped
            when the recipe has ``augment: false``).
        batch_hook: ``(x, y, gen) -> (x, y)`` on float pixels before augmentation (WaNet's
            on-the-fly poisoning).
        loss_fn: ``(logits, y) -> loss``; cross-entropy by default (negate it for unlearning).
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
    if not recipe.get("augment", True):
        augment = None

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    optimizer = instantiate(recipe.optimizer)(params)
    scheduler = instantiate(recipe.scheduler)(optimizer) if recipe.get("scheduler") else None
    loss_fn = loss_fn or nn.CrossEntropyLoss()

    show = progress and progress_bars.enabled()
    result = FitResult(epochs=epochs)
    start = _resume(checkpoint, model, optimizer, scheduler, result)
    curve = tracking.curve(desc)  # per-epoch curves in the active tracker, if any
    curve.log_all(result.history)  # the epochs a resumed training already did
    data = place(data, device)
    n = len(data)
    # A trailing batch of one sample is dropped (a different sample each epoch, as the order is
    # reshuffled): BatchNorm cannot train on one value per channel (1x1 maps of deep nets).
    steps = n // batch_size if n > 1 and n % batch_size == 1 else math.ceil(n / batch_size)
    t0 = time.perf_counter()
    for epoch in range(start, epochs):
        seed_everything(seed, "epoch", epoch)  # dropout and other module-internal randomness
        g_order = generator(seed, "order", epoch)
        g_aug = generator(seed, "augment", epoch, device=device)
        (train_mode or nn.Module.train)(model)
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
            if augment is not None:
                x = augment(x, g_aug)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                logits = model(x)
                loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(params, float(grad_clip))
            optimizer.step()
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
        if scheduler is not None:
            scheduler.step()
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
