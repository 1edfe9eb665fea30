"""Persistent channel masks, shared by the channel-pruning defenses.

A mask is a ``(C,)`` buffer ``channel_mask`` registered on the masked module plus a forward hook
that multiplies the module's output by it along dim 1. The buffer is part of ``state_dict``
(``restore_masks`` re-attaches hooks to a fresh model before loading), the hook survives
``copy.deepcopy`` and pickling (a module-level function reading the buffer of the module it is
called on), and fine-tuning cannot revive a pruned channel: its output is multiplied by 0 after
the module, whatever the weights before it learn. The names are neutral on purpose: a model
pruned by any defense carries the same buffer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

MASK_BUFFER = "channel_mask"


def _apply_mask(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    """Forward hook: zero the masked channels of ``output`` ``(N, C, ...)``."""
    mask = getattr(module, MASK_BUFFER)
    shape = (1, -1) + (1,) * (output.dim() - 2)
    return output * mask.to(output.dtype).view(shape)


def install_mask(module: nn.Module, channels: int) -> Tensor:
    """Give ``module`` a ``(channels,)`` mask buffer of ones and the hook applying it (once).

    Returns the buffer; write zeros into it to prune.
    """
    existing = getattr(module, MASK_BUFFER, None)
    if existing is not None:
        if existing.shape != (channels,):
            raise ValueError(f"{MASK_BUFFER} has shape {tuple(existing.shape)}, not ({channels},)")
        return existing
    device = next(iter(module.buffers()), next(iter(module.parameters()), torch.empty(0))).device
    module.register_buffer(MASK_BUFFER, torch.ones(channels, device=device))
    module.register_forward_hook(_apply_mask)
    return getattr(module, MASK_BUFFER)


def restore_masks(model: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Install a mask wherever ``state_dict`` (of a pruned model) has one, so that
    ``model.load_state_dict(state_dict)`` then restores the pruning. Returns the module names."""
    suffix = "." + MASK_BUFFER
    names = [k[: -len(suffix)] for k in state_dict if k.endswith(suffix)]
    for name in names:
        install_mask(model.get_submodule(name), int(state_dict[name + suffix].numel()))
    return names


def set_pruned(mask: Tensor, channels: Tensor) -> None:
    """Mask exactly ``channels`` (int64 indices): zeros there, ones elsewhere."""
    mask.fill_(1.0)
    mask[channels.to(mask.device)] = 0.0
