"""Content-addressed cache of backdoored models, shared by every defense of a sweep.

An entry lives in ``<cache_dir>/attacked/<key>/`` where ``key`` hashes the resolved dataset,
model, attack, train, defense-data and seed settings, minus keys that do not change the result
(audiocraft/dora's exclude list idea), with files named by path (a Blend key) counted by their
content. It holds:

- ``entry.pt``: the model ``state_dict``, the poison and clean-reserve indices, the attack's
  trigger state and the training history (loaded with ``weights_only=True``);
- ``entry.sha256``: the checksum of ``entry.pt`` (written just before ``entry.pt`` is renamed
  into place): an entry is complete only when both exist and agree, so a process killed
  mid-write leaves an entry that is simply rebuilt;
- ``config.yaml``: the settings that made it, for people;
- ``train_ckpt.pt`` (and its ``train_ckpt.sha256``) while training: the per-epoch checkpoint
  that an interrupted run resumes.

Every cache file of the harness is written and read through ``benchmark.io.save_checked`` /
``load_checked`` (the image cache and training checkpoints too).

Concurrent jobs that need the same entry serialise on ``<key>.lock``, so it is trained once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from benchmark.io import (
    DamagedFile,
    atomic_write_text,
    discard_checked,
    load_checked,
    save_checked,
    sha256_file,
)

log = logging.getLogger(__name__)

# Bump when the entry format or anything that changes trained models changes meaning.
CACHE_VERSION = 1
# Keys that never change the trained model: where files live, download switches, progress bars.
EXCLUDE_KEYS = frozenset({"download", "cache_dir", "progress"})


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in sorted(node.items()) if k not in EXCLUDE_KEYS}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def _by_content(node: Any) -> Any:
    """Paths of files (a Blend key, a trigger image) replaced by their content's sha256, so a
    changed file at the same path is another key, and two paths to one file are the same."""
    if isinstance(node, dict):
        return {k: _by_content(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_by_content(v) for v in node]
    if isinstance(node, str) and "/" in node and Path(node).is_file():
        return f"sha256:{sha256_file(node)}"
    return node


def cache_key(
    cfg: DictConfig,
    groups: tuple[str, ...] = ("dataset", "model", "attack", "train", "defense_data", "seed"),
) -> str:
    """A short hash of the resolved settings that determine the backdoored model."""
    payload = {
        g: _by_content(_strip(OmegaConf.to_container(cfg[g], resolve=True)))
        if OmegaConf.is_config(cfg[g])
        else cfg[g]
        for g in groups
    }
    payload["version"] = CACHE_VERSION
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# Top-level keys that do not make a cell another cell: where files go, tracking, progress
# bars, the sweep's own switches, and the device (a sweep hands out GPUs per job).
RUN_EXCLUDE_KEYS = frozenset({"paths", "logger", "progress", "resume", "fail_fast", "device"})


def config_digest(cfg: DictConfig) -> str:
    """A hash of a cell's resolved config (minus :data:`RUN_EXCLUDE_KEYS`): a rerun of the same
    cell has the same digest, so a complete ``metrics.json`` with it can be skipped."""
    return cache_key(cfg, groups=tuple(k for k in sorted(cfg) if k not in RUN_EXCLUDE_KEYS))


def run_settings(cfg: DictConfig) -> dict[str, Any]:
    """The resolved settings that define a cell (the config minus :data:`RUN_EXCLUDE_KEYS` and
    :data:`EXCLUDE_KEYS`), as plain values: recorded in ``metrics.json`` so tables can tell
    unlike runs apart and match published settings."""
    return {
        k: _strip(OmegaConf.to_container(cfg[k], resolve=True))
        if OmegaConf.is_config(cfg[k])
        else cfg[k]
        for k in sorted(cfg)
        if k not in RUN_EXCLUDE_KEYS
    }


class ModelCache:
    """The folder of cached backdoored models.

    Args:
        root: the cache folder (``paths.cache_dir``).
        enabled: when False, nothing is read or written; ``entry_dir`` is still usable as a
            scratch folder of the run.
    """

    def __init__(self, root: str | Path, enabled: bool = True) -> None:
        self.root = Path(root) / "attacked"
        self.enabled = enabled

    def entry_dir(self, key: str) -> Path:
        return self.root / key

    def lock(self, key: str) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / f"{key}.lock"))

    def load(self, key: str) -> dict[str, Any] | None:
        """The entry's payload, or None when missing, incomplete or damaged (then removed)."""
        if not self.enabled:
            return None
        folder = self.entry_dir(key)
        entry = folder / "entry.pt"
        if not entry.exists():
            return None
        try:
            payload = load_checked(entry)
            version = payload.get("version") if isinstance(payload, dict) else None
            if version != CACHE_VERSION:
                raise DamagedFile(f"version {version} != {CACHE_VERSION}")
        except DamagedFile as err:  # a short reason, never torch's advice to load unsafely
            log.warning("cache entry %s is damaged (%s); rebuilding it", folder, err)
            self._discard(folder)
            return None
        return payload

    def save(self, key: str, payload: dict[str, Any], config_yaml: str) -> None:
        """Write an entry atomically: ``entry.pt`` first, its checksum last."""
        if not self.enabled:
            return
        folder = self.entry_dir(key)
        atomic_write_text(folder / "config.yaml", config_yaml)
        save_checked({**payload, "version": CACHE_VERSION}, folder / "entry.pt")

    @staticmethod
    def _discard(folder: Path) -> None:
        # Keep an in-progress training checkpoint: it is still valid for resuming.
        discard_checked(folder / "entry.pt")

    def clear(self, key: str) -> None:
        shutil.rmtree(self.entry_dir(key), ignore_errors=True)
