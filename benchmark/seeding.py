"""Seed derivation: one run seed, independent generators per stage.

Every random choice in the harness draws from a generator derived from ``(seed, *names)``, never
from global RNG state, so that e.g. the poison indices do not change when the model or the
defense changes (BackdoorBench draws them from the global numpy state).
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, *names: object) -> int:
    """A 63-bit seed that depends only on ``seed`` and the ``names`` path."""
    text = "/".join([str(int(seed)), *map(str, names)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(seed: int, *names: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``derive_seed(seed, *names)``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *names))
    return g


def seed_everything(seed: int, *names: object) -> None:
    """Seed the global RNGs (python, numpy, torch) from ``(seed, *names)``.

    Only for code we do not control (weight init inside ``nn.Module`` constructors, dropout);
    the harness itself always passes explicit generators.
    """
    s = derive_seed(seed, *names)
    random.seed(s)
    np.random.seed(s % 2**32)  # noqa: NPY002 - seeds the legacy global state on purpose
    torch.manual_seed(s)
