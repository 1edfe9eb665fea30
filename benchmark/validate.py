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

from benchmark.checks import Checks, in_range, is_int
from benchmark.errors import BenchmarkError, ConfigError

BOOLEAN_KEYS = ("progress", "deterministic", "resume", "fail_fast")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
CONF = Path(__file__).resolve().parents[1] / "conf"
top, recipe = Checks(""), Checks("train")


def check_run(cfg: DictConfig, choices: dict[str, Any] | None = None) -> None:
    """The top-level keys, the recipe, and the group choices' consistency with ``cell=``."""
    check_seed(cfg.get("seed"))
    for key in BOOLEAN_KEYS:
        top.boolean(cfg.get(key, False), key)
    check_device(cfg.get("device", "auto"))
    check_recipe(cfg.train)
    check_cell(choices or {})


def check_seed(seed: Any) -> None:
    # 1.5 would be truncated to 1 under another cache key: the same model trained twice.
    top.require(is_int(seed), "seed", "an integer (e.g. seed=0 or seed=0,1,2)", seed)


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


def check_recipe(train: DictConfig) -> None:
    """The training recipe's scalars (``train.*``)."""
    recipe.integer(train.get("epochs"), "epochs")
    recipe.integer(train.get("batch_size"), "batch_size")
    recipe.number(train.get("lr"), "lr", 0.0, low_open=True)
    # A negative max norm flips every gradient (clip_grad_norm_ scales by max_norm / norm).
    clip = train.get("grad_clip")
    ok = clip is None or in_range(clip, 0.0, low_open=True)
    recipe.require(ok, "grad_clip", "a max gradient norm > 0, or null for none", clip)
    recipe.boolean(train.get("augment", True), "augment")
    for key in ("amp", "channels_last", "compile"):
        value = train.get(key, "auto")
        ok = value == "auto" or isinstance(value, bool)
        recipe.require(ok, key, "auto, true or false", value)
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
    recipe.number(train.get("label_smoothing", 0.0), "label_smoothing", 0.0, 1.0, high_open=True)
    recipe.number(train.get("norm_lr_scale", 1.0), "norm_lr_scale", 0.0, low_open=True)
    for key, allowed in CHOICES.items():
        recipe.one_of(train.get(key, allowed[0]), key, allowed)
    recipe.boolean(train.get("drop_last", False), "drop_last")
    padding = train.get("crop_padding")
    ok = padding is None or (is_int(padding) and padding >= 0)
    recipe.require(ok, "crop_padding", "null (the dataset's) or an integer >= 0", padding)
    if train.get("scheduler_interval", "epoch") == "step" and not train.get("scheduler"):
        raise ConfigError("train.scheduler_interval", "= step needs a train.scheduler")
    _check_lookahead(train.get("lookahead"))
    _check_freeze_after(train.get("freeze_after"))


def _check_lookahead(spec: Any) -> None:
    if spec is None:
        return
    ok = isinstance(spec, DictConfig) and set(spec) == set(LOOKAHEAD_KEYS)
    recipe.require(ok, "lookahead", "null or {k, decay, power}", spec)
    recipe.integer(spec.k, "lookahead.k")
    recipe.number(spec.decay, "lookahead.decay", 0.0, 1.0)
    recipe.number(spec.power, "lookahead.power", 0.0)


def _check_freeze_after(spec: Any) -> None:
    if spec is None:
        return
    ok = isinstance(spec, DictConfig)
    recipe.require(ok, "freeze_after", "null or {parameter name: epochs}", spec)
    for name, epochs in spec.items():
        recipe.integer(epochs, f"freeze_after.{name}", 0)


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


def check_model(make: Callable[[], nn.Module], image_shape: Sequence[int], what: str) -> nn.Module:
    """Run a probe batch through ``make()``'s model, so a bad ``model.*`` setting fails here
    in one line instead of at the first training step (after the data load); returns the
    probe model (for ``Defense.check_model``).

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
    return model


def close_matches(name: str, options: Sequence[str], n: int = 3) -> str:
    """``"; close: a, b"`` for a misspelt name, else ``""``."""
    found = difflib.get_close_matches(name, options, n=n)
    return f"; close: {', '.join(found)}" if found else ""
