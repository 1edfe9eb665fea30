"""``defense=NONE``: NON-linearity-based backdoor removal (Wang, Ding, Zhai, Ma, arXiv 2202.06382).

"Training with More Confidence: Mitigating Injected and Natural Backdoors During Training",
NeurIPS 2022. Module ``defenses/none.py``, class ``NONE``, config ``conf/defense/NONE.yaml``
(the field's spelling; nothing here is named ``none``, which a backdoor benchmark would read as
"no defense").

Threat model: the defender is the trainer. It holds the whole (possibly poisoned) training set
without poison marks, no clean reserve, and knows neither the trigger, the target nor the
poison rate. Stage: in-training.

Idea (abstract): a backdoor lives in neurons whose activation acts as a hyperplane that
separates "target-label" inputs from the input domains of every other label. NONE finds such
neurons, resets them, drops the training samples that drive them, and keeps training.

Algorithm (as the official code runs it, notes ``defenses-ultraclean-none-linf.md`` section 2):

1. Phase 1, ordinary training: the harness's cached backdoored model (``ctx.model``; a deep
   copy is changed, never the input).
2. ``rounds`` rounds of:

   a. Statistics, in eval mode over the whole training set without augmentation, in fp32: the
      softmax ``p_i`` of every sample and, for every monitored conv ``l`` and channel ``j``, the
      spatial maximum ``a_lj(x_i)`` of the conv's output (before its norm layer and activation).
      Monitored convs: ``model.monitored_conv_layers()`` (layer2-4 of the ResNets, every conv of
      VGG, the inner convs of NiN, all convs of other models).
   b. Channel score (the hyperplane test): for each class ``k``, ``H_k = {i: p_ik > lambda_high}``
      and ``L_k = {i: p_ik < lambda_low}``;
      ``d_ljk = max_{i in H_k} a_lj(x_i) - (mean_{L_k} a_lj + n_std * std_{L_k} a_lj)`` with the
      population standard deviation (numpy's default, as the official code); ``s_lj = max_k
      d_ljk``, where a class with an empty ``H_k`` (or ``L_k``) contributes 0.
   c. Reset selection: the top ``ceil(reset_fraction * C_l)`` channels of every monitored layer
      by ``s_lj``, each layer its own selection (ties: lower channel index first).
   d. Poisoned-sample detection: ``u_i = sum_l a_{l, j*_l}(x_i)`` with ``j*_l`` each layer's top
      channel (or its top ``ceil(detect_fraction * C_l)`` channels), split in two by Jenks
      natural breaks; the upper class is flagged. The flags are recomputed from the whole set
      every round (not cumulative).
   e. Reset: each selected channel's filter (and conv bias) is zeroed, so are the weight and
      bias of the norm layer fed by the conv, and the input slice of every layer that consumes
      the channel (see *Consumers*). Plain zeros, not masks: weights may regrow.
   f. Fine-tune for ``finetune_epochs`` on the unflagged samples (all samples with
      ``exclude_flagged: false``, the natural-backdoor setting) with the training augmentation,
      SGD lr ``finetune_lr`` (constant), momentum 0.9, weight decay 1e-4, batch 128, and every
      norm layer frozen: eval mode (running statistics fixed) and, with
      ``freeze_norm_affine: true``, its affine parameters excluded from training.

``train_flags`` / ``train_scores`` are the last round's flags and ``u``. ``extras``: the layer
and channel counts, ``reset_per_layer`` (``name:k`` pairs), the layers without a traced
consumer, and per round ``round<r>_*``: channels reset, samples flagged, the Jenks threshold,
classes without a confident sample, fine-tuning size and last-epoch training accuracy, and the
analysis and fine-tuning seconds; totals in ``analysis_s`` and ``finetune_s``. The per-layer
channel scores, the reset channels and the per-round flags go to ``work_dir/none_rounds.pt``.

Consumers (the "next layer's input slice"): found by tracing one forward pass with pre- and
post-forward hooks that record each module call's input and output tensors and their version
counters. From a conv's output the trace follows channel-preserving modules (norms,
activations, pooling, dropout, identity, ``nn.Flatten``) whose input is that very tensor, not
modified in place since (same version), or a contiguous flattening view of it (the functional
``x.flatten(1)`` before a head); it stops at the first ``nn.Conv2d`` (input channel ``j``,
group-aware) or ``nn.Linear`` (input columns of channel ``j``: one column after a global pool,
``H * W`` after flattening a map), and at anything else: residual additions, concatenations,
permutations and other functional operations end a path without a consumer. So:

- small_cnn, vgg16_bn, nin: the next conv in the chain; the last conv's channel is the head's
  input column (the official VGG/NiN reset of the classifier's columns).
- resnet18: ``conv1`` -> the same block's ``conv2``; ``conv2`` and the shortcut conv feed the
  residual addition and have no consumer (filter and BN are reset, the shortcut keeps carrying
  the stream's channel).
- preact_resnet18: ``conv1`` -> ``bn2`` (its norm) and ``conv2``; ``conv2`` and the shortcut conv
  have neither a norm nor a consumer (they feed the addition).
- timm models: whatever the trace finds; ``extras["layers_without_consumer"]`` counts the rest.

A model that is not a harness ``ImageClassifier``, has no monitored conv, calls a monitored conv
more than once per forward pass, or pairs a conv with a norm whose affine parameters do not
match its channels fails with a ``ConfigError`` naming ``model`` and the reason.

Reference::

    @inproceedings{wang2022none,
      title     = {Training with More Confidence: Mitigating Injected and Natural Backdoors
                   During Training},
      author    = {Wang, Zhenting and Ding, Hailun and Zhai, Juan and Ma, Shiqing},
      booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
      year      = {2022},
      note      = {arXiv:2202.06382}
    }

Deviations (official code: RU-System-Software-and-Security/NONE, commit 624b80f):

- Phase 1 is the harness's training recipe (cached model), not 200-320 epochs of SGD lr 0.1
  with a step decay every 80 epochs; the fine-tuning optimiser is a fresh SGD (no momentum
  buffers carried over from phase 1).
- ``freeze_norm_affine: true`` (the default, as the issue asks) also freezes the norm layers'
  weight and bias; the official code only puts BatchNorm in eval mode and keeps training
  gamma/beta. With frozen zeros, a reset channel of a BN'd conv stays dead (no gradient
  reaches its filter); ``false`` restores the official behaviour.
- Statistics are the conv output for every monitored conv, the ResNet shortcut (downsample)
  conv included; the official code hooks the downsample branch after its BatchNorm.
- Each layer resets its own selection; the official ResNet code does not clear the channel list
  before the four convs of layer4, so they also reset the channels chosen for earlier layers.
- ResNet ``conv2`` channels: the official code also zeroes the next block's ``conv1`` input
  slice across the residual addition; here a trace ends at the addition (the stream's channel
  also carries the shortcut, which is not the reset channel's alone).
- Flags: the upper Jenks class, i.e. ``u > t`` with ``t`` the lower class's largest value.
  The official ``u >= breaks[1]`` (jenkspy's ``breaks[1]`` is that same value) also flags the
  lower class's largest sample(s); ``flag_break_value: true`` reproduces it. The split is the
  exact two-class optimum (minimum within-class sum of squares, over splits between distinct
  values; a split inside a run of ties is never optimal) in O(n log n) by prefix sums, not
  jenkspy's O(k n^2) Fisher-Jenks. No distinct values: nothing is flagged.
- A class whose low set ``L_k`` is empty contributes 0 (the official mean of an empty set is
  NaN). Channel ties sort stably, lower index first (the official reversed argsort prefers
  higher indices).
- The summed detection activation is not multiplied by the number of classes (the official
  loop adds it once per class; a constant factor that no split depends on).
- Mixed precision in fine-tuning follows the run's recipe (``train.amp``); the analysis runs
  in fp32.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from benchmark.data import to_float
from benchmark.errors import ConfigError
from benchmark.io import atomic_torch_save
from benchmark.models.base import ACTIVATION_TYPES, NORM_TYPES, ImageClassifier
from benchmark.seeding import derive_seed
from benchmark.types import ImageSet
from defenses.base import Defense, DefenseContext, DefenseResult, Stage
from defenses.checks import as_number, is_int, require

log = logging.getLogger(__name__)

# Modules a traced channel passes through with its index unchanged (elementwise or per channel).
PASS_THROUGH: tuple[type[nn.Module], ...] = (
    *NORM_TYPES,
    *ACTIVATION_TYPES,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.Flatten,
)
# Norm layers frozen while fine-tuning (the official code freezes every BatchNorm).
FROZEN_NORMS: tuple[type[nn.Module], ...] = (*NORM_TYPES, nn.BatchNorm1d, nn.BatchNorm3d)


# -- Jenks natural breaks, two classes ----------------------------------------------------------
@dataclass(frozen=True)
class JenksSplit:
    """The optimal two-class split of a 1-D sample.

    Attributes:
        threshold: the lower class's largest value (jenkspy's inner break).
        upper_min: the upper class's smallest value (``> threshold``).
        sse: the within-class sum of squared deviations from the class means.
        n_upper: the size of the upper class.
    """

    threshold: float
    upper_min: float
    sse: float
    n_upper: int


def jenks_two_classes(values: Tensor) -> JenksSplit | None:
    """Jenks natural breaks with two classes: the split of the sorted values into a lower and an
    upper class with the least within-class sum of squares. None with fewer than two distinct
    values.

    Sort, then prefix sums of ``x`` and ``x^2`` give every split's cost in O(1): O(n log n) in
    all. Only splits between distinct values are candidates; this loses nothing, since moving a
    tied copy across a split strictly lowers the cost unless all values are equal.
    """
    v = torch.sort(values.detach().double().cpu().flatten()).values
    n = v.numel()
    if n < 2:
        return None
    distinct = v[1:] > v[:-1]  # a split after sorted position i (lower class v[: i + 1])
    if not bool(distinct.any()):
        return None
    c = v - v.mean()  # centred: smaller sums, less cancellation in sumsq - sum^2 / n
    s1, s2 = torch.cumsum(c, 0), torch.cumsum(c * c, 0)
    k = torch.arange(1, n, dtype=torch.float64)  # lower class sizes
    lo1, lo2 = s1[:-1], s2[:-1]
    hi1, hi2 = s1[-1] - lo1, s2[-1] - lo2
    cost = (lo2 - lo1 * lo1 / k) + (hi2 - hi1 * hi1 / (n - k))
    cost = torch.where(distinct, cost, torch.full_like(cost, math.inf))
    i = int(torch.argmin(cost))
    return JenksSplit(float(v[i]), float(v[i + 1]), max(float(cost[i]), 0.0), n - i - 1)


def jenks_flags(values: Tensor, *, include_break: bool = False) -> tuple[Tensor, JenksSplit | None]:
    """``(N,)`` bool flags of the upper Jenks class of ``values`` (on the CPU), and the split.

    ``include_break`` flags ``values >= threshold`` instead (the official ``>= breaks[1]``,
    which adds the lower class's largest value). No split: nothing flagged.
    """
    v = values.detach().double().cpu().flatten()
    split = jenks_two_classes(v)
    if split is None:
        return torch.zeros(v.numel(), dtype=torch.bool), None
    flags = v >= split.threshold if include_break else v > split.threshold
    return flags, split


# -- the hyperplane channel score ---------------------------------------------------------------
class HyperplaneStats:
    """Streaming statistics of the hyperplane test for one layer of ``channels`` channels.

    ``update`` takes batches of per-sample channel activations and class probabilities;
    ``scores`` gives ``max_k [max_{H_k} a - (mean_{L_k} a + n_std * std_{L_k} a)]`` per channel.
    Float64 accumulators on the device of the first batch: per class the maximum over the
    confident samples, and the count, sum and sum of squares over the unlikely ones.
    """

    def __init__(
        self, channels: int, num_classes: int, *, lambda_low: float, lambda_high: float
    ) -> None:
        self.channels, self.num_classes = int(channels), int(num_classes)
        self.lambda_low, self.lambda_high = float(lambda_low), float(lambda_high)
        self._acc: dict[str, Tensor] | None = None

    def _init(self, device: torch.device) -> dict[str, Tensor]:
        k, c, f64 = self.num_classes, self.channels, torch.float64
        return {
            "high_max": torch.full((k, c), -math.inf, dtype=f64, device=device),
            "n_high": torch.zeros(k, dtype=torch.long, device=device),
            "low_sum": torch.zeros(k, c, dtype=f64, device=device),
            "low_sq": torch.zeros(k, c, dtype=f64, device=device),
            "n_low": torch.zeros(k, dtype=torch.long, device=device),
        }

    def update(self, acts: Tensor, probs: Tensor) -> None:
        """Add a batch: ``acts (B, C)`` activations, ``probs (B, K)`` softmax outputs."""
        if acts.shape[1] != self.channels or probs.shape[1] != self.num_classes:
            raise ValueError(
                f"expected (B, {self.channels}) activations and (B, {self.num_classes}) "
                f"probabilities, got {tuple(acts.shape)} and {tuple(probs.shape)}"
            )
        if self._acc is None:
            self._acc = self._init(acts.device)
        acc = self._acc
        a = acts.to(acc["low_sum"].device, torch.float64)
        p = probs.to(a.device)
        high, low = p > self.lambda_high, p < self.lambda_low
        pairs = high.nonzero()  # (sample, class) pairs; a sample may be confident for one class
        if pairs.numel():
            index = pairs[:, 1:].expand(-1, self.channels)
            acc["high_max"].scatter_reduce_(0, index, a[pairs[:, 0]], reduce="amax")
        acc["n_high"] += high.sum(0)
        low_f = low.to(torch.float64)
        acc["low_sum"] += low_f.T @ a
        acc["low_sq"] += low_f.T @ (a * a)
        acc["n_low"] += low.sum(0)

    def class_scores(self, n_std: float) -> Tensor:
        """``(K, C)`` float64 ``d_k`` per class and channel on the CPU; 0 for a class with no
        confident (``H_k``) or no unlikely (``L_k``) sample."""
        if self._acc is None:
            return torch.zeros(self.num_classes, self.channels, dtype=torch.float64)
        acc = {k: v.cpu() for k, v in self._acc.items()}
        n = acc["n_low"].clamp_min(1).to(torch.float64)[:, None]
        mean = acc["low_sum"] / n
        std = (acc["low_sq"] / n - mean * mean).clamp_min(0.0).sqrt()  # population std
        d = acc["high_max"] - (mean + n_std * std)
        valid = (acc["n_high"] > 0) & (acc["n_low"] > 0)
        return torch.where(valid[:, None], d, torch.zeros_like(d))

    def scores(self, n_std: float) -> Tensor:
        """``(C,)`` float64 channel scores (max over classes) on the CPU."""
        return self.class_scores(n_std).amax(0)

    def classes_without_confident(self) -> int:
        """How many classes had no sample with probability above ``lambda_high``."""
        if self._acc is None:
            return self.num_classes
        return int((self._acc["n_high"] == 0).sum())


def hyperplane_scores(
    acts: Tensor,
    probs: Tensor,
    *,
    lambda_low: float = 0.1,
    lambda_high: float = 0.9,
    n_std: float = 3.0,
) -> Tensor:
    """``(C,)`` float64 hyperplane scores of channel activations ``acts (N, C)`` given the
    softmax outputs ``probs (N, K)`` (see ``HyperplaneStats``)."""
    stats = HyperplaneStats(
        acts.shape[1], probs.shape[1], lambda_low=lambda_low, lambda_high=lambda_high
    )
    stats.update(acts, probs)
    return stats.scores(n_std)


def n_reset(fraction: float, channels: int) -> int:
    """``ceil(fraction * channels)``, at least 1, robust to float error (0.03 * 100 is 3)."""
    return min(channels, max(1, math.ceil(fraction * channels - 1e-9)))


def top_channels(scores: Tensor, k: int) -> Tensor:
    """The ``k`` highest-scoring channels, best first (stable: ties keep the lower index)."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]


# -- which parameters a reset touches -----------------------------------------------------------
@dataclass(frozen=True, eq=False)
class InputSlice:
    """A layer that consumes a conv's channels.

    Attributes:
        name: the consumer's module name.
        module: an ``nn.Conv2d`` (input channel ``j``) or ``nn.Linear``.
        block: for a linear consumer, the input columns per channel (channel ``j`` is columns
            ``[j * block, (j + 1) * block)``); 1 for a conv.
    """

    name: str
    module: nn.Module
    block: int = 1


@dataclass(frozen=True, eq=False)
class ResetSite:
    """A monitored conv, the norm fed by its output, and the layers consuming its channels."""

    name: str
    conv: nn.Conv2d
    norm_name: str | None
    norm: nn.Module | None
    consumers: tuple[InputSlice, ...] = field(default_factory=tuple)

    @property
    def channels(self) -> int:
        return int(self.conv.out_channels)


@dataclass(eq=False)
class _Call:
    """One module call: its first tensor input and output, with their version counters."""

    name: str
    module: nn.Module
    input: Tensor | None
    in_version: int
    output: Tensor | None = None
    out_version: int = -1


def _trace(model: nn.Module) -> list[_Call]:
    """One eval-mode forward pass recording every leaf (and norm) module call."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[_Call] = []
    open_calls: dict[nn.Module, list[_Call]] = {}

    def pre(module: nn.Module, args: tuple) -> None:
        x = next((a for a in args if isinstance(a, Tensor)), None)
        call = _Call(names[module], module, x, x._version if x is not None else -1)
        calls.append(call)
        open_calls.setdefault(module, []).append(call)

    def post(module: nn.Module, args: tuple, output: object) -> None:
        call = open_calls[module].pop()
        if isinstance(output, Tensor):
            call.output, call.out_version = output, output._version

    handles = []
    for module in names:
        if isinstance(module, NORM_TYPES) or not any(True for _ in module.children()):
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(model.example_input(2))  # type: ignore[operator]
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return calls


def _same_data(src: Tensor, src_version: int, t: Tensor, t_version: int) -> int | None:
    """How ``t`` (a call's input) holds ``src`` (a traced tensor in NCHW or flat layout):
    0 = the same tensor/layout, ``H * W`` = ``src`` (N, C, H, W) flattened to (N, C * H * W);
    None = not the same data (or modified in place in between)."""
    if t_version != src_version:
        return None
    if t is src:
        return 0
    if not (t.is_contiguous() and src.is_contiguous()) or t.numel() != src.numel():
        return None
    if (
        t.untyped_storage().data_ptr() != src.untyped_storage().data_ptr()
        or t.storage_offset() != src.storage_offset()
    ):
        return None
    if t.shape == src.shape:
        return 0
    if src.dim() == 4 and t.dim() == 2 and t.shape[0] == src.shape[0]:
        return int(src.shape[2] * src.shape[3])
    return None


def _consumers(calls: list[_Call], start: int) -> list[InputSlice]:
    """The layers consuming the channels of ``calls[start]``'s output (a conv)."""
    conv = calls[start].module
    out = calls[start].output
    if out is None:
        return []
    channels = int(out.shape[1])
    # Frontier of (tensor, its version, block): block 0 = NCHW, b > 0 = flat, b columns/channel.
    frontier: list[tuple[Tensor, int, int]] = [(out, calls[start].out_version, 0)]
    seen_calls = {start}
    found: dict[tuple[int, int], InputSlice] = {}
    while frontier:
        src, version, block = frontier.pop()
        for i, call in enumerate(calls):
            if i in seen_calls or call.input is None or call.module is conv:
                continue
            how = _same_data(src, version, call.input, call.in_version)
            if how is None:
                continue
            b = block if how == 0 else how
            if block and how:  # a flat tensor flattened again: not a layout we follow
                continue
            seen_calls.add(i)
            m = call.module
            if isinstance(m, nn.Conv2d):
                if b == 0 and m.in_channels == channels:
                    found.setdefault((id(m), 1), InputSlice(call.name, m, 1))
                continue
            if isinstance(m, nn.Linear):
                if b > 0 and m.in_features == channels * b:
                    found.setdefault((id(m), b), InputSlice(call.name, m, b))
                continue
            if not isinstance(m, PASS_THROUGH) or call.output is None:
                continue
            y = call.output
            if isinstance(m, nn.Flatten):
                if b == 0 and call.input.dim() == 4 and y.dim() == 2 and m.start_dim == 1:
                    hw = int(call.input.shape[2] * call.input.shape[3])
                    frontier.append((y, call.out_version, hw))
                continue
            if b == 0 and y.dim() == 4 and y.shape[:2] == call.input.shape[:2]:
                frontier.append((y, call.out_version, 0))
            elif b > 0 and y.shape == call.input.shape:
                frontier.append((y, call.out_version, b))
    return list(found.values())


def reset_sites(model: nn.Module) -> list[ResetSite]:
    """The monitored convs of ``model`` with their norms and traced consumers.

    Raises ``ConfigError`` (key ``model``) when NONE cannot run on the model (see the module
    docstring).
    """
    kind = type(model).__name__
    if not isinstance(model, ImageClassifier):
        raise ConfigError(
            "model",
            f"NONE needs a harness ImageClassifier (conv_layers(), monitored_prefixes); got {kind}",
        )
    model.to(memory_format=torch.contiguous_format)  # flatten views are matched by layout
    convs = model.monitored_conv_layers()
    if not convs:
        raise ConfigError(
            "model",
            f"{kind} has no monitored nn.Conv2d (monitored_prefixes="
            f"{model.monitored_prefixes}): NONE scores and resets conv channels",
        )
    calls = _trace(model)
    sites = []
    for site in convs:
        at = [i for i, c in enumerate(calls) if c.module is site.conv]
        if len(at) != 1:
            raise ConfigError(
                "model",
                f"{kind}.{site.name} is called {len(at)} times per forward pass; NONE needs one "
                "call per monitored conv (one spatial maximum per channel and sample)",
            )
        norm = site.norm
        if norm is not None:
            for p_name in ("weight", "bias"):
                p = getattr(norm, p_name, None)
                if isinstance(p, Tensor) and p.numel() != site.conv.out_channels:
                    raise ConfigError(
                        "model",
                        f"{kind}.{site.norm_name} (the norm of {site.name}) has a {p_name} of "
                        f"{p.numel()} values for {site.conv.out_channels} channels; NONE resets "
                        "the norm's per-channel weight and bias",
                    )
        sites.append(
            ResetSite(site.name, site.conv, site.norm_name, norm, tuple(_consumers(calls, at[0])))
        )
    return sites


@torch.no_grad()
def reset_channels(site: ResetSite, channels: Tensor) -> None:
    """Zero ``channels`` of ``site`` in place: the conv's filters and biases, the norm's weight
    and bias, and each consumer's input slice. Everything else is untouched."""
    idx = channels.to(torch.long).flatten().cpu()
    if idx.numel() == 0:
        return
    conv = site.conv
    conv.weight[idx.to(conv.weight.device)] = 0.0
    if conv.bias is not None:
        conv.bias[idx.to(conv.bias.device)] = 0.0
    if site.norm is not None:
        for p_name in ("weight", "bias"):
            p = getattr(site.norm, p_name, None)
            if isinstance(p, Tensor):
                p[idx.to(p.device)] = 0.0
    for cons in site.consumers:
        m = cons.module
        if isinstance(m, nn.Conv2d):
            per_in = m.in_channels // m.groups
            per_out = m.out_channels // m.groups
            for j in idx.tolist():
                g = j // per_in  # the group that reads input channel j
                m.weight[g * per_out : (g + 1) * per_out, j % per_in] = 0.0
        elif isinstance(m, nn.Linear):
            cols = (idx[:, None] * cons.block + torch.arange(cons.block)).flatten()
            m.weight[:, cols.to(m.weight.device)] = 0.0


# -- statistics over the training set ---------------------------------------------------------
@contextmanager
def _conv_outputs(sites: list[ResetSite], fn: Callable[[int, Tensor], None]) -> Iterator[None]:
    """Call ``fn(site_index, output)`` with every monitored conv's output while active."""
    handles = [
        s.conv.register_forward_hook(lambda m, i, o, k=k: fn(k, o)) for k, s in enumerate(sites)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _batches(data: ImageSet, device: torch.device, batch_size: int) -> Iterator[tuple[int, Tensor]]:
    """``(start, float pixels)`` batches in the channels_last layout."""
    for i in range(0, len(data), batch_size):
        x = to_float(data.x[i : i + batch_size].to(device))
        yield i, x.contiguous(memory_format=torch.channels_last)


@contextmanager
def _analysis_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and the channels_last layout (NHWC convolutions are faster on CPU and CUDA,
    as in ``benchmark.train.predict_logits``); restores both afterwards."""
    was_training = model.training
    model.eval()
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)
        model.train(was_training)


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    sites: list[ResetSite],
    data: ImageSet,
    *,
    num_classes: int,
    lambda_low: float,
    lambda_high: float,
    device: torch.device,
    batch_size: int = 256,
) -> list[HyperplaneStats]:
    """One eval-mode fp32 pass over ``data``: the hyperplane statistics of every site from the
    spatial maximum of each channel of its conv output and the model's softmax outputs."""
    stats = [
        HyperplaneStats(s.channels, num_classes, lambda_low=lambda_low, lambda_high=lambda_high)
        for s in sites
    ]
    acts: dict[int, Tensor] = {}

    def grab(k: int, out: Tensor) -> None:
        acts[k] = out.float().amax(dim=(2, 3))

    with _analysis_mode(model), _conv_outputs(sites, grab):
        for _, x in _batches(data, device, batch_size):
            acts.clear()
            probs = torch.softmax(model(x).float(), dim=1)
            for k, st in enumerate(stats):
                st.update(acts[k], probs)
    return stats


@torch.no_grad()
def summed_activation(
    model: nn.Module,
    sites: list[ResetSite],
    channels: list[Tensor],
    data: ImageSet,
    *,
    device: torch.device,
    batch_size: int = 256,
) -> Tensor:
    """``(N,)`` float64 on the CPU: per sample, the sum over sites of the spatial maxima of the
    given ``channels`` of each site's conv output (eval mode, fp32)."""
    u = torch.zeros(len(data), dtype=torch.float64)
    picks = [c.to(torch.long).to(device) for c in channels]
    part: list[Tensor] = []

    def grab(k: int, out: Tensor) -> None:
        part.append(out.float()[:, picks[k]].amax(dim=(2, 3)).double().sum(1))

    with _analysis_mode(model), _conv_outputs(sites, grab):
        for i, x in _batches(data, device, batch_size):
            part.clear()
            model(x)
            u[i : i + x.shape[0]] = torch.stack(part).sum(0).cpu()
    return u


# -- frozen norm layers -----------------------------------------------------------------------
@contextmanager
def frozen_norms(model: nn.Module, *, affine: bool) -> Iterator[Callable[[nn.Module], None]]:
    """While active: the norm layers' affine parameters do not require grad (with ``affine``);
    yields the ``train_mode`` for ``fit``: train mode with every norm layer in eval mode, so
    the running statistics stay fixed. ``requires_grad`` is restored on exit."""
    norms = [m for m in model.modules() if isinstance(m, FROZEN_NORMS)]
    params = [p for m in norms for p in m.parameters(recurse=False)] if affine else []
    before = [p.requires_grad for p in params]

    def train_mode(m: nn.Module) -> None:
        m.train()
        for norm in norms:
            norm.eval()

    for p in params:
        p.requires_grad_(False)
    try:
        yield train_mode
    finally:
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)


# -- the defense --------------------------------------------------------------------------------
@dataclass
class RoundReport:
    """What one round found and did (saved to ``work_dir/none_rounds.pt``)."""

    scores: dict[str, Tensor]
    reset: dict[str, Tensor]
    detect: dict[str, Tensor]
    u: Tensor
    flags: Tensor
    threshold: float | None
    no_confident: int
    analysis_s: float
    finetune_s: float = 0.0
    n_finetune: int = 0
    finetune_acc: float | None = None


class NONE(Defense):
    """NONE: reset hyperplane-like channels, drop the samples that drive them, fine-tune.

    Args:
        reset_fraction: ``rho``, the share of each monitored layer's channels reset per round
            (``ceil(rho * C)``).
        rounds: number of analyse-reset-fine-tune rounds.
        finetune_epochs: fine-tuning epochs per round (0 = reset only).
        finetune_lr: the constant fine-tuning learning rate.
        finetune_momentum, finetune_weight_decay: the fine-tuning SGD.
        finetune_batch_size: the fine-tuning batch size.
        augment: use the training augmentation while fine-tuning.
        lambda_low, lambda_high: the probability thresholds of the unlikely (``L_k``) and
            confident (``H_k``) sets.
        n_std: standard deviations above the unlikely set's mean in the baseline.
        detect_fraction: null = each layer's top channel sums into the detection score; a
            fraction ``beta`` = its top ``ceil(beta * C)`` channels.
        exclude_flagged: fine-tune without the flagged samples (false: the natural-backdoor
            setting, where nothing is removed).
        freeze_norm_affine: also freeze the norm layers' weight and bias while fine-tuning
            (their running statistics are always frozen).
        flag_break_value: flag ``u >= t`` (the official rule) instead of ``u > t``.
        batch_size: images per forward pass of the analysis.
    """

    name: ClassVar[str] = "NONE"
    stage: ClassVar[Stage] = Stage.IN_TRAINING

    def __init__(
        self,
        reset_fraction: float = 0.03,
        rounds: int = 1,
        finetune_epochs: int = 20,
        finetune_lr: float = 1e-4,
        finetune_momentum: float = 0.9,
        finetune_weight_decay: float = 1e-4,
        finetune_batch_size: int = 128,
        augment: bool = True,
        lambda_low: float = 0.1,
        lambda_high: float = 0.9,
        n_std: float = 3.0,
        detect_fraction: float | None = None,
        exclude_flagged: bool = True,
        freeze_norm_affine: bool = True,
        flag_break_value: bool = False,
        batch_size: int = 256,
    ) -> None:
        self.reset_fraction = reset_fraction
        self.rounds = rounds
        self.finetune_epochs = finetune_epochs
        self.finetune_lr = finetune_lr
        self.finetune_momentum = finetune_momentum
        self.finetune_weight_decay = finetune_weight_decay
        self.finetune_batch_size = finetune_batch_size
        self.augment = augment
        self.lambda_low = lambda_low
        self.lambda_high = lambda_high
        self.n_std = n_std
        self.detect_fraction = detect_fraction
        self.exclude_flagged = exclude_flagged
        self.freeze_norm_affine = freeze_norm_affine
        self.flag_break_value = flag_break_value
        self.batch_size = batch_size

    # -- settings ---------------------------------------------------------------------------
    def validate(self, num_classes: int, n_train: int, n_clean: int) -> None:
        """Check every setting (``ConfigError`` naming ``defense.<key>``) and the run's sizes."""
        self._check_settings()
        if num_classes < 2:
            raise ConfigError("dataset", f"NONE needs at least 2 classes, got {num_classes}")
        if n_train < 2:
            raise ConfigError(
                "defense_data.clean_fraction",
                f"leaves {n_train} training images; NONE's Jenks split needs at least 2",
            )

    def _check_settings(self) -> None:
        _check(
            0.0 < as_number(self.reset_fraction) <= 1.0,
            "reset_fraction",
            "a number in (0, 1]",
            self,
        )
        for key in ("rounds", "finetune_batch_size", "batch_size"):
            _check(
                is_int(getattr(self, key)) and getattr(self, key) >= 1, key, "an integer >= 1", self
            )
        _check(
            is_int(self.finetune_epochs) and self.finetune_epochs >= 0,
            "finetune_epochs",
            "an integer >= 0",
            self,
        )
        _check(as_number(self.finetune_lr) > 0, "finetune_lr", "a number > 0", self)
        for key in ("finetune_momentum", "finetune_weight_decay", "n_std"):
            _check(as_number(getattr(self, key)) >= 0, key, "a number >= 0", self)
        for key in ("lambda_low", "lambda_high"):
            _check(0.0 <= as_number(getattr(self, key)) <= 1.0, key, "a number in [0, 1]", self)
        _check(
            as_number(self.lambda_low) < as_number(self.lambda_high),
            "lambda_low",
            f"below lambda_high = {self.lambda_high!r}",
            self,
        )
        _check(
            self.detect_fraction is None or 0.0 < as_number(self.detect_fraction) <= 1.0,
            "detect_fraction",
            "null or a number in (0, 1]",
            self,
        )
        for key in ("augment", "exclude_flagged", "freeze_norm_affine", "flag_break_value"):
            _check(isinstance(getattr(self, key), bool), key, "true or false", self)

    def _recipe(self, base: DictConfig) -> DictConfig:
        """The fine-tuning recipe: the official optimiser at a constant learning rate; only the
        run's hardware settings (``amp``, ``channels_last``) come from ``base``."""
        return OmegaConf.create(
            {
                "epochs": self.finetune_epochs,
                "batch_size": self.finetune_batch_size,
                "lr": float(self.finetune_lr),
                "optimizer": {
                    "_target_": "torch.optim.SGD",
                    "_partial_": True,
                    "lr": float(self.finetune_lr),
                    "momentum": float(self.finetune_momentum),
                    "weight_decay": float(self.finetune_weight_decay),
                },
                "scheduler": None,  # E2 < 80: the official step decay never fires
                "grad_clip": None,
                "augment": self.augment,
                "amp": base.get("amp", "auto"),
                "channels_last": base.get("channels_last", "auto"),
            }
        )

    # -- one round ----------------------------------------------------------------------------
    def analyse(
        self,
        model: nn.Module,
        sites: list[ResetSite],
        data: ImageSet,
        *,
        num_classes: int,
        device: torch.device,
    ) -> RoundReport:
        """Score the channels, choose the resets, score and flag the samples (no change made)."""
        t0 = time.perf_counter()
        stats = collect_statistics(
            model,
            sites,
            data,
            num_classes=num_classes,
            lambda_low=self.lambda_low,
            lambda_high=self.lambda_high,
            device=device,
            batch_size=self.batch_size,
        )
        scores, reset, detect = {}, {}, {}
        for site, st in zip(sites, stats, strict=True):
            s = st.scores(self.n_std)
            c = site.channels
            n_detect = 1 if self.detect_fraction is None else math.ceil(self.detect_fraction * c)
            scores[site.name] = s
            reset[site.name] = top_channels(s, n_reset(self.reset_fraction, c))
            detect[site.name] = top_channels(s, min(n_detect, c))
        u = summed_activation(
            model,
            sites,
            [detect[s.name] for s in sites],
            data,
            device=device,
            batch_size=self.batch_size,
        )
        flags, split = jenks_flags(u, include_break=self.flag_break_value)
        return RoundReport(
            scores=scores,
            reset=reset,
            detect=detect,
            u=u,
            flags=flags,
            threshold=split.threshold if split is not None else None,
            no_confident=stats[0].classes_without_confident() if stats else num_classes,
            analysis_s=time.perf_counter() - t0,
        )

    def run(self, ctx: DefenseContext) -> DefenseResult:
        self._check_settings()
        if ctx.model is None:
            raise ConfigError("defense", "NONE starts from the normally trained model")
        device = ctx.device
        model = copy.deepcopy(ctx.model).to(device)
        sites = reset_sites(model)
        data = ctx.train_set
        recipe = self._recipe(ctx.recipe)
        per_layer = {s.name: n_reset(self.reset_fraction, s.channels) for s in sites}
        no_consumer = [s.name for s in sites if not s.consumers]
        log.info(
            "NONE: %d monitored convs (%d channels), %d round(s); resets per layer: %s; no "
            "traced consumer: %s",
            len(sites),
            sum(s.channels for s in sites),
            self.rounds,
            per_layer,
            no_consumer or "none",
        )
        reports: list[RoundReport] = []
        for r in range(1, self.rounds + 1):
            rep = self.analyse(model, sites, data, num_classes=ctx.num_classes, device=device)
            for site in sites:
                reset_channels(site, rep.reset[site.name])
            keep = ~rep.flags if self.exclude_flagged else torch.ones_like(rep.flags)
            subset = data.subset(torch.nonzero(keep).flatten())
            rep.n_finetune = len(subset)
            log.info(
                "NONE round %d/%d: %d of %d samples flagged (Jenks threshold %s); fine-tuning "
                "on %d for %d epochs",
                r,
                self.rounds,
                int(rep.flags.sum()),
                len(data),
                rep.threshold,
                len(subset),
                self.finetune_epochs,
            )
            if self.finetune_epochs > 0:
                t0 = time.perf_counter()
                with frozen_norms(model, affine=self.freeze_norm_affine) as train_mode:
                    fitted = ctx.fit(
                        model,
                        subset,
                        recipe=recipe,
                        seed=derive_seed(ctx.seed, "NONE", "finetune", r),
                        train_mode=train_mode,
                        desc=f"NONE round {r}",
                    )
                rep.finetune_s = time.perf_counter() - t0
                if fitted.history:
                    rep.finetune_acc = float(fitted.history[-1]["acc"])
            reports.append(rep)
        model.eval()
        last = reports[-1]
        atomic_torch_save(
            {
                "layers": [s.name for s in sites],
                "rounds": [
                    {
                        "scores": rep.scores,
                        "reset": rep.reset,
                        "detect": rep.detect,
                        "u": rep.u,
                        "flags": rep.flags,
                        "threshold": rep.threshold,
                    }
                    for rep in reports
                ],
            },
            ctx.work_dir / "none_rounds.pt",
        )
        return DefenseResult(
            model=model,
            train_flags=last.flags.clone(),
            train_scores=last.u.float(),
            extras=self._extras(sites, per_layer, no_consumer, reports),
        )

    def _extras(
        self,
        sites: list[ResetSite],
        per_layer: dict[str, int],
        no_consumer: list[str],
        reports: list[RoundReport],
    ) -> dict[str, Any]:
        extras: dict[str, Any] = {
            "monitored_layers": len(sites),
            "monitored_channels": sum(s.channels for s in sites),
            "reset_per_layer": ",".join(f"{k}:{v}" for k, v in per_layer.items()),
            "layers_without_consumer": len(no_consumer),
            "layers_without_consumer_names": ",".join(no_consumer),
            "rounds": len(reports),
        }
        for r, rep in enumerate(reports, start=1):
            extras.update(
                {
                    f"round{r}_reset_channels": sum(int(v.numel()) for v in rep.reset.values()),
                    f"round{r}_n_flagged": int(rep.flags.sum()),
                    f"round{r}_jenks_threshold": rep.threshold,
                    f"round{r}_classes_without_confident": rep.no_confident,
                    f"round{r}_n_finetune": rep.n_finetune,
                    f"round{r}_finetune_acc": rep.finetune_acc,
                    f"round{r}_analysis_s": round(rep.analysis_s, 3),
                    f"round{r}_finetune_s": round(rep.finetune_s, 3),
                }
            )
        extras["n_flagged"] = int(reports[-1].flags.sum())
        extras["analysis_s"] = round(sum(rep.analysis_s for rep in reports), 3)
        extras["finetune_s"] = round(sum(rep.finetune_s for rep in reports), 3)
        return extras


def _check(ok: bool, key: str, what: str, defense: NONE) -> None:
    require(ok, key, what, getattr(defense, key))
