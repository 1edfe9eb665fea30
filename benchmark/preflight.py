"""Writability of the run's folders, probed before Hydra creates any of them.

Registered as a Hydra callback in ``conf/hydra/default.yaml`` (after the sweep callback, which
names the sweep folder). A read-only mount or a path below a file would otherwise fail in
Hydra's own folder creation or log set-up with chained tracebacks, or — for the model cache —
only after the data load and the training. Each folder is created if missing and a temporary
file is written into it and removed; a failure prints one line naming the setting and exits
with status 2.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

# (config key, environment variable) of each folder a run writes.
OUTPUT = ("paths.log_dir", "BENCH_OUTPUT_DIR")
CACHE = ("paths.cache_dir", "BENCH_CACHE_DIR")


def probe(folder: str | Path) -> str | None:
    """None if ``folder`` can be created and written, else the reason it cannot."""
    try:
        path = Path(folder).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".write-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        return err.strerror or type(err).__name__
    return None


def folders(config: DictConfig, job_dir: str) -> list[tuple[str, str, str]]:
    """``(key, variable, folder)`` of every folder the run will write."""
    # The job folder's parent: Hydra names the folder itself again (``${now:...}``).
    found = [(*OUTPUT, str(Path(job_dir).parent))]
    if config.get("cache") is None or config.cache.get("enabled", True):
        found.append((*CACHE, str(config.paths.cache_dir)))
    logger = config.get("logger")
    if logger and logger.get("dir"):
        found.append(("logger.dir", "", str(logger.dir)))
    return found


def check(config: DictConfig, job_dir: str) -> None:
    """Exit with status 2 and one line if a folder of the run cannot be written."""
    for key, variable, folder in folders(config, job_dir):
        reason = probe(folder)
        if reason is None:
            continue
        hint = f"{key}=<folder>" + (f" or the {variable} variable" if variable else "")
        print(
            f"Error: {key}: cannot write to {folder} ({reason}); point {hint} at a writable folder",
            file=sys.stderr,
        )
        sys.exit(2)


class PreflightCallback(Callback):
    """Probe the output, cache and tracker folders before the run or sweep starts."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check(config, str(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check(config, str(config.hydra.sweep.dir))
