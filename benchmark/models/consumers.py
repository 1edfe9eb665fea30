"""The layers that read a conv's channels, found in the tracer's records (``trace.Call``).

Part of the model tracer (``benchmark/models/trace.py``): NONE's reset (``defenses/none_reset.py``)
zeroes a channel's filter, its norm and these input slices together.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from benchmark.models.trace import Call, pass_through_types


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


def consumers(calls: list[Call], start: int) -> list[InputSlice]:
    """The layers consuming the channels of ``calls[start]``'s output (a conv).

    From the conv's output the search follows ``pass_through_types()`` modules whose input is that
    very tensor, not modified in place since (same version), or a contiguous flattening view of it;
    it stops at the first ``nn.Conv2d`` (input channel ``j``) or ``nn.Linear`` (input columns of
    channel ``j``), and at anything else (residual additions, concatenations, permutations and
    other functional operations end a path without a consumer).
    """
    conv = calls[start].module
    out = calls[start].output
    if out is None:
        return []
    channels = int(out.shape[1])
    # Frontier of (tensor, its version, block): block 0 = NCHW, b > 0 = flat, b columns/channel.
    frontier: list[tuple[Tensor, int, int]] = [(out, calls[start].out_version, 0)]
    passing = pass_through_types()
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
            if not isinstance(m, passing) or call.output is None:
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
