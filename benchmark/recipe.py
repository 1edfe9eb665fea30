"""What the training recipe's keys build for ``fit()``: optimiser, schedule, lookahead, loss,
augmentation settings, precision and memory layout.

Every key here is optional, and its default is what ``fit()`` did before the key existed, so a
recipe without it trains exactly as before (``tests/benchmark/test_recipe.py`` checks that the
explicit defaults give bit-identical weights). The keys came with ``train=fast``
(``conf/train/fast.yaml``, airbench94's recipe); ``benchmark/validate.py`` checks their values.

==================  =========  ================================================================
key                 default    meaning
==================  =========  ================================================================
label_smoothing     0.0        of the default cross-entropy loss (not of a caller's ``loss_fn``)
norm_lr_scale       1.0        lr x s and weight decay / s for the norm layers' parameters (so
                               lr x wd, the decay per step, is unchanged: airbench's
                               ``bias_scaler``)
scheduler_interval  epoch      ``step``: the scheduler steps after every optimiser step, and its
                               partial gets ``total_steps=`` (as torch's ``OneCycleLR`` names it)
lookahead           null       ``{k, decay, power}``: timm's ``Lookahead`` (every ``k`` steps
                               slow += alpha (fast - slow), fast = slow) with airbench's schedule
                               alpha_t = 1 - decay^k (t / T)^power for step t of T; at the end of
                               the training fast = slow. Unlike airbench's ``LookaheadState``
                               it averages parameters only, not BN running statistics, and
                               its slow copy starts at the first sync, not at step 0 (where
                               alpha is ~1 anyway)
freeze_after        null       ``{name: epochs}``: the parameters named ``name`` or under module
                               ``name`` train only in the first ``epochs`` epochs
drop_last           false      drop a trailing partial batch (a one-sample batch always is)
flip                random     ``alternating``: each image flipped in every other epoch, from a
                               seeded random start (where the dataset allows flips)
crop_padding        null       the random crop's padding; null = the dataset's
pad_mode            zeros      ``reflect``: the crop pads by reflection
amp                 auto       bf16 autocast; auto = where bf16 is native
channels_last       auto       NHWC layout; auto = on CUDA and CPU
compile             false      ``torch.compile`` the training forward; auto = on CUDA
==================  =========  ================================================================
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from benchmark.augment import Augment
from benchmark.models.trace import NORM_TYPES
from benchmark.seeding import generator
from benchmark.types import ImageSet

log = logging.getLogger(__name__)


# -- device, precision, layout, compilation -----------------------------------------------------
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
    """Whether ``device`` computes in bf16 faster than in fp32: CUDA GPUs that support it, and
    CPUs with AMX tiles whose oneDNN has bf16 kernels. AVX512-BF16 alone is not enough: on a Xeon
    without AMX (2026-12-03) a fastnet 32/128/128 step was 1.4-1.6x *slower* in bf16 than in fp32,
    against 2.4x faster on one with AMX (``results/README.md``); elsewhere bf16 is emulated."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            kernels = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
            # torch's own AMX probe (asks the kernel for the tile state; False without AMX).
            amx = bool(getattr(torch._C._cpu, "_init_amx", lambda: False)())
        except (AttributeError, RuntimeError):
            return False
        return kernels and amx
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


def use_compile(recipe: Mapping[str, Any], device: torch.device) -> bool:
    """The recipe's ``compile``: ``auto`` = on CUDA (on CPU it made small nets slower)."""
    value = recipe.get("compile", False)
    return device.type == "cuda" if value == "auto" else bool(value)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast (no loss scaling needed with bf16), or a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# -- loss, batches, augmentation ----------------------------------------------------------------
def batch_scaled_lr(lr: float, reference_batch: int, batch_size: int) -> float:
    """``lr`` given per ``reference_batch`` examples, for batches of ``batch_size``: the linear
    scaling rule (Goyal et al. 2017), as airbench states its lr per 1024 examples. The resolver
    ``${bench_batch_lr:lr,reference,${.batch_size}}`` of ``conf/train/fast.yaml``, so that
    ``train.batch_size=b`` (``debug=smoke``: 64) keeps the recipe's lr per example."""
    if int(reference_batch) <= 0 or int(batch_size) <= 0:
        raise ValueError(f"batch sizes must be positive, got {reference_batch} and {batch_size}")
    return float(lr) * int(batch_size) / int(reference_batch)


def train_loss(recipe: Mapping[str, Any]) -> nn.Module:
    """Cross-entropy with the recipe's ``label_smoothing`` (0 = plain cross-entropy)."""
    return nn.CrossEntropyLoss(label_smoothing=float(recipe.get("label_smoothing", 0.0)))


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches per epoch. A trailing batch of one sample is always dropped (a different sample
    each epoch, as the order is reshuffled): BatchNorm cannot train on one value per channel
    (1x1 maps of deep nets). ``drop_last`` drops any trailing partial batch, as airbench does
    (a set smaller than one batch is still one batch)."""
    if drop_last and n >= batch_size:
        return n // batch_size
    return n // batch_size if n > 1 and n % batch_size == 1 else -(-n // batch_size)


def adapt_augment(augment: Any, recipe: Mapping[str, Any]) -> tuple[Any, bool]:
    """The recipe's augmentation keys applied to the dataset's crop + flip.

    Returns the augmentation (None with ``augment: false``) and whether ``fit`` flips
    alternately. ``crop_padding``, ``pad_mode`` and ``flip`` change only the harness's own
    ``Augment`` (from the dataset's settings); an attack's own augmentation
    (WaNet's) is kept as it is. ``alternating`` needs a dataset that allows flips.
    """
    if not recipe.get("augment", True) or augment is None:
        return None, False
    if not isinstance(augment, Augment):  # e.g. WaNet's PerBatchAugment: the attack's own
        return augment, False
    changes: dict[str, Any] = {}
    if recipe.get("crop_padding") is not None:
        changes["crop_padding"] = int(recipe["crop_padding"])
    if recipe.get("pad_mode", "zeros") != "zeros":
        changes["pad_mode"] = str(recipe["pad_mode"])
    alternating = recipe.get("flip", "random") == "alternating" and bool(augment.hflip)
    if alternating:
        changes["hflip"] = False  # fit flips instead
    return (dataclasses.replace(augment, **changes) if changes else augment), alternating


def alternating_flip(x: Tensor, start: Tensor, epoch: int) -> Tensor:
    """airbench's alternating flip: image i is mirrored when ``start[i]`` xor (epoch is odd),
    so every image is seen both ways in each pair of epochs."""
    flip = start ^ bool(epoch % 2)
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)


def flip_starts(n: int, seed: int, device: torch.device) -> Tensor:
    """The seeded random orientation (bool ``(n,)``) each image starts alternating from."""
    return (torch.rand(n, generator=generator(seed, "flip")) < 0.5).to(device)


# -- optimiser, schedule, lookahead -------------------------------------------------------------
def build_optimizer(
    recipe: Mapping[str, Any], params: Sequence[nn.Parameter], model: nn.Module
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """The recipe's optimizer over ``params`` (with ``norm_lr_scale``'s group), wrapped in
    timm's ``Lookahead`` when the recipe has ``lookahead``. Returns ``(optimizer, base)``:
    ``fit`` steps the first; the scheduler drives the second (they share param groups)."""
    factory = instantiate(recipe["optimizer"])
    scale = float(recipe.get("norm_lr_scale", 1.0))
    norm_ids = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters()}
    norm = [p for p in params if id(p) in norm_ids]
    if scale == 1.0 or not norm:
        base = factory(list(params))
    else:
        lr = float(factory.keywords["lr"])
        wd = float(factory.keywords.get("weight_decay", 0.0))
        other = [p for p in params if id(p) not in norm_ids]
        base = factory(
            [{"params": other}, {"params": norm, "lr": lr * scale, "weight_decay": wd / scale}]
        )
    spec = recipe.get("lookahead")
    if not spec:
        return base, base
    from timm.optim import Lookahead

    return Lookahead(base, alpha=1.0, k=int(spec["k"])), base


def build_scheduler(
    recipe: Mapping[str, Any], optimizer: torch.optim.Optimizer, total_steps: int
) -> tuple[Any, bool]:
    """The recipe's scheduler (or None) and whether it steps per optimiser step."""
    if not recipe.get("scheduler"):
        return None, False
    if recipe.get("scheduler_interval", "epoch") == "step":
        return instantiate(recipe["scheduler"])(optimizer, total_steps=total_steps), True
    return instantiate(recipe["scheduler"])(optimizer), False


class WarmupLinear:
    """airbench's lr factor for step ``s`` of ``total``: linear from ``start`` to 1 over the
    first ``int(warmup * total)`` steps, then linear to ``end`` at step ``total``."""

    def __init__(self, total: int, warmup: float, start: float, end: float) -> None:
        self.total, self.warmup_steps = int(total), int(total * warmup)
        self.start, self.end = float(start), float(end)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start + (1.0 - self.start) * step / self.warmup_steps
        frac = (step - self.warmup_steps) / max(self.total - self.warmup_steps, 1)
        return 1.0 + (self.end - 1.0) * frac


def warmup_linear(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup: float = 0.23,
    start: float = 0.2,
    end: float = 0.07,
) -> torch.optim.lr_scheduler.LambdaLR:
    """airbench94's per-step schedule (``get_lr`` in ``airbench/utils.py`` at f1c599c) as a
    torch ``LambdaLR``: it scales each param group's own lr, so groups keep their ratio."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupLinear(total_steps, warmup, start, end)
    )


def lookahead_alpha(spec: Mapping[str, Any], step: int, total: int) -> float:
    """The slow weights' step size at the sync after optimiser step ``step`` (1-based) of
    ``total``: airbench's ``1 - decay^k (step / total)^power`` (0.95^5 and a cubic ramp)."""
    k, decay, power = int(spec["k"]), float(spec["decay"]), float(spec["power"])
    return 1.0 - decay**k * (step / total) ** power


def set_lookahead_alpha(
    optimizer: torch.optim.Optimizer, spec: Mapping[str, Any], step: int, total: int
) -> None:
    """Set the step size of the next lookahead sync (``lookahead_alpha``)."""
    for group in optimizer.param_groups:
        group["lookahead_alpha"] = lookahead_alpha(spec, step, total)


def end_lookahead(optimizer: torch.optim.Optimizer) -> None:
    """airbench's last lookahead update (decay 1): fast = slow, the slow weights unchanged."""
    for group in optimizer.param_groups:
        group["lookahead_alpha"] = 0.0
    optimizer.sync_lookahead()  # type: ignore[attr-defined]


class FreezeAfter:
    """``freeze_after``: parameters that train only in the first epochs (airbench94 trains its
    whitening bias for 3 epochs). Frozen = ``requires_grad`` off, so the optimiser skips them
    (no momentum, no decay); ``restore`` puts the flags back."""

    def __init__(self, model: nn.Module, spec: Mapping[str, int] | None) -> None:
        self.entries: list[tuple[nn.Parameter, bool, int]] = []
        for key, epochs in (spec or {}).items():
            found = [p for n, p in model.named_parameters() if n == key or n.startswith(f"{key}.")]
            if not found:
                log.warning("train.freeze_after.%s: the model has no such parameters", key)
            self.entries += [(p, p.requires_grad, int(epochs)) for p in found]

    def epoch(self, epoch: int) -> None:
        for p, trainable, epochs in self.entries:
            p.requires_grad_(trainable and epoch < epochs)

    def restore(self) -> None:
        for p, trainable, _ in self.entries:
            p.requires_grad_(trainable)


# -- data-dependent initialisation --------------------------------------------------------------
def init_from_data(model: nn.Module, x: Tensor, seed: int) -> bool:
    """Call ``model.init_from_data(x, gen)`` if the model has the hook and says it still needs
    it (``needs_data_init()``, a flag in its state_dict), with a generator seeded from
    ``(seed, "data_init")``. Returns whether it ran."""
    needs: Callable[[], bool] | None = getattr(model, "needs_data_init", None)
    if needs is None or not needs():
        return False
    model.init_from_data(x, generator(seed, "data_init"))  # type: ignore[operator]
    log.info("initialised %s from the training images", type(model).__name__)
    return True
