"""Run-level settings, checked before anything is built or loaded.

Every check raises :class:`~benchmark.errors.ConfigError` naming the key and what to do, so a bad
value costs one line and exit status 2, never a traceback or a half-run cell. The entries'
own settings are checked by their ``validate()`` (datasets, attacks, defenses) and by
:func:`check_model`, which builds the model once on a probe batch.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from benchmark.errors import BenchmarkError, ConfigError

BOOLEAN_KEYS = ("progress", "deterministic", "resume", "fail_fast")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
CONF = Path(__file__).resolve().parents[1] / "conf"


def check_run(cfg: DictConfig, choices: dict[str, Any] | None = None) -> None:
    """The top-level keys, the recipe, and the group choices' consistency with ``cell=``."""
    check_seed(cfg.get("seed"))
    for key in BOOLEAN_KEYS:
        value = cfg.get(key, False)
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
    check_device(cfg.get("device", "auto"))
    check_recipe(cfg.train)
    check_cell(choices or {})


def check_seed(seed: Any) -> None:
    # 1.5 would be truncated to 1 under another cache key: the same model trained twice.
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError("seed", f"must be an integer, got {seed!r}; e.g. seed=0 or seed=0,1,2")


def check_device(device: Any) -> None:
    """``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:<index>`` that this machine has."""
    text = str(device)
    if not DEVICE.fullmatch(text):
        raise ConfigError(
            "device", f"= {device!r} is not a device; use auto, cpu, cuda, cuda:<index> or mps"
        )
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                "device", f"= {text} but CUDA is not available; use device=cpu or device=auto"
            )
        index = int(text.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(
                "device",
                f"= {text} but this machine has {torch.cuda.device_count()} GPU(s); "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}",
            )
    if text == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device", "= mps but MPS is not available; use device=cpu or auto")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_recipe(train: DictConfig) -> None:
    """The training recipe's scalars (``train.*``)."""
    for key, low in (("epochs", 1), ("batch_size", 1)):
        value = train.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"train.{key}", f"must be an integer >= {low}, got {value!r}")
    lr = train.get("lr")
    if not _number(lr) or lr <= 0:
        raise ConfigError("train.lr", f"must be a number > 0, got {lr!r}")
    clip = train.get("grad_clip")
    # A negative max norm flips every gradient (clip_grad_norm_ scales by max_norm / norm).
    if clip is not None and (not _number(clip) or clip <= 0):
        raise ConfigError(
            "train.grad_clip", f"must be a max gradient norm > 0, or null for none; got {clip!r}"
        )
    augment = train.get("augment", True)
    if not isinstance(augment, bool):
        raise ConfigError("train.augment", f"must be true or false, got {augment!r}")
    for key in ("amp", "channels_last", "compile"):
        value = train.get(key, "auto")
        if value != "auto" and not isinstance(value, bool):
            raise ConfigError(f"train.{key}", f"must be auto, true or false, got {value!r}")
    check_recipe_parts(train)


# The optional keys of benchmark/recipe.py: key -> allowed strings.
CHOICES = {
    "scheduler_interval": ("epoch", "step"),
    "flip": ("random", "alternating"),
    "pad_mode": ("zeros", "reflect"),
}
LOOKAHEAD_KEYS = ("k", "decay", "power")


def check_recipe_parts(train: DictConfig) -> None:
    """The optional recipe keys (``benchmark/recipe.py``); absent = their defaults."""
    smoothing = train.get("label_smoothing", 0.0)
    if not _number(smoothing) or not 0.0 <= smoothing < 1.0:
        raise ConfigError("train.label_smoothing", f"must be in [0, 1), got {smoothing!r}")
    scale = train.get("norm_lr_scale", 1.0)
    if not _number(scale) or scale <= 0:
        raise ConfigError("train.norm_lr_scale", f"must be a number > 0, got {scale!r}")
    for key, allowed in CHOICES.items():
        value = train.get(key, allowed[0])
        if value not in allowed:
            raise ConfigError(f"train.{key}", f"must be {' or '.join(allowed)}, got {value!r}")
    drop_last = train.get("drop_last", False)
    if not isinstance(drop_last, bool):
        raise ConfigError("train.drop_last", f"must be true or false, got {drop_last!r}")
    padding = train.get("crop_padding")
    if padding is not None and (isinstance(padding, bool) or not isinstance(padding, int)):
        raise ConfigError("train.crop_padding", f"must be null or an integer, got {padding!r}")
    if padding is not None and padding < 0:
        raise ConfigError(
            "train.crop_padding", f"must be >= 0 (null = the dataset's), got {padding}"
        )
    if train.get("scheduler_interval", "epoch") == "step" and not train.get("scheduler"):
        raise ConfigError("train.scheduler_interval", "= step needs a train.scheduler")
    _check_lookahead(train.get("lookahead"))
    _check_freeze_after(train.get("freeze_after"))


def _check_lookahead(spec: Any) -> None:
    if spec is None:
        return
    if not isinstance(spec, DictConfig) or set(spec) != set(LOOKAHEAD_KEYS):
        raise ConfigError("train.lookahead", f"must be null or {{k, decay, power}}, got {spec!r}")
    k, decay, power = (spec[key] for key in LOOKAHEAD_KEYS)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError("train.lookahead.k", f"must be an integer >= 1, got {k!r}")
    if not _number(decay) or not 0.0 <= decay <= 1.0:
        raise ConfigError("train.lookahead.decay", f"must be in [0, 1], got {decay!r}")
    if not _number(power) or power < 0:
        raise ConfigError("train.lookahead.power", f"must be a number >= 0, got {power!r}")


def _check_freeze_after(spec: Any) -> None:
    if spec is None:
        return
    if not isinstance(spec, DictConfig):
        raise ConfigError(
            "train.freeze_after", f"must be null or {{parameter name: epochs}}, got {spec!r}"
        )
    for name, epochs in spec.items():
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ConfigError(
                f"train.freeze_after.{name}", f"must be a number of epochs >= 0, got {epochs!r}"
            )


def cell_entries(cell: str) -> dict[str, str]:
    """The attack and defense that ``conf/cell/<cell>.yaml``, or the generated ConfigStore cell
    of that name (benchmark/grid.py), selects (its defaults overrides)."""
    path = CONF / "cell" / f"{cell}.yaml"
    if path.is_file():
        defaults = OmegaConf.load(path).get("defaults") or []
    else:
        from hydra.core.config_store import ConfigStore
        from hydra.plugins.config_source import ConfigLoadError

        try:
            node = ConfigStore.instance().load(f"cell/{cell}.yaml").node
        except ConfigLoadError:  # not a stored cell either
            return {}
        defaults = OmegaConf.create(dict(node)).get("defaults") or []
    found = {}
    for entry in defaults:
        for key, value in entry.items() if isinstance(entry, DictConfig) else []:
            group = str(key).removeprefix("override ").strip().lstrip("/")
            if group in ("attack", "defense"):
                found[group] = str(value)
    return found


def check_cell(choices: dict[str, Any]) -> None:
    """``cell=<attack>__<defense>`` names both entries: ``attack=``/``defense=`` may not name
    others (the command line's choice would run under the cell's name)."""
    cell = choices.get("cell")
    if not cell:
        return
    for group, wanted in cell_entries(str(cell)).items():
        chosen = choices.get(group)
        if chosen is not None and str(chosen) != wanted:
            raise ConfigError(
                "cell",
                f"cell={cell} is {group}={wanted}, but {group}={chosen} was also given; "
                f"drop {group}=... or pick another cell",
            )


def check_model(make: Callable[[], nn.Module], image_shape: Sequence[int], what: str) -> None:
    """Run a probe batch through ``make()``'s model, so a bad ``model.*`` setting fails here
    in one line instead of at the first training step (after the data load).

    The global RNG is restored afterwards: the real models are seeded when they are built.
    """
    c, h, w = (int(v) for v in image_shape)
    with torch.random.fork_rng(devices=[]):
        try:
            model = make()
            with torch.no_grad():
                model.eval()(torch.zeros(2, c, h, w))
        except BenchmarkError:
            raise
        except Exception as err:
            first = (str(err).strip().splitlines() or [""])[0]
            raise ConfigError(
                "model",
                f"{what} cannot be built for {c}x{h}x{w} images ({type(err).__name__}: "
                f"{first}); check the model.* settings",
            ) from None


def close_matches(name: str, options: Sequence[str], n: int = 3) -> str:
    """``"; close: a, b"`` for a misspelt name, else ``""``."""
    found = difflib.get_close_matches(name, options, n=n)
    return f"; close: {', '.join(found)}" if found else ""
