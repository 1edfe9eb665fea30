"""The staging folder of live W&B runs: nothing half-written where ``wandb sync`` looks.

A run is written under ``<folder>/wandb-partial/<host>-<pid>-<random>/wandb/`` (one folder per
process, so concurrent jobs of the same folder never share one) and moved to
``<folder>/wandb/`` once it is finished (:func:`publish`). A killed job's folder stays in
``wandb-partial/``, where no ``<...>/wandb/offline-run-*`` pattern matches, until the next run
in ``<folder>`` removes it (:func:`remove_stale_staging`; only when its process is gone).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

STAGING = "wandb-partial"


def new_staging(folder: Path) -> Path:
    """Create and return a staging folder of this process under ``folder/wandb-partial``."""
    path = folder / STAGING / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    for attempt in range(3):  # another job may remove an empty wandb-partial/ meanwhile
        try:
            path.mkdir(parents=True)
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    return path


def publish(live: Path, staging: Path, dest: Path) -> Path | None:
    """Move the finished run folder ``live`` (inside ``staging``) into ``dest`` and remove
    ``staging``; returns the new place (None when there was no run folder, e.g. disabled)."""
    saved = None
    if live.is_dir() and staging in live.parents:
        dest.mkdir(parents=True, exist_ok=True)
        saved = dest / live.name
        os.replace(live, saved)
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):  # only when empty: another job may stage a run there
        staging.parent.rmdir()
    return saved


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(folder: Path) -> list[Path]:
    """Remove the live-run folders under ``folder/wandb-partial`` that this machine's killed
    processes left (another host's are kept: their processes cannot be checked)."""
    removed = []
    host = socket.gethostname()
    for entry in sorted((folder / STAGING).glob("*")):
        owner, _, rest = entry.name.rpartition("-")[0].rpartition("-")
        if owner != host or not rest.isdigit() or _alive(int(rest)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        log.info("removed the unfinished W&B run %s (its process is gone)", entry)
    return removed
