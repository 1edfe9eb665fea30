"""Hydra integration of sweeps: where a sweep lives, and what happens when it ends.

Registered in ``conf/hydra/default.yaml``. :class:`SweepCallback`

- names the sweep folder after the command, ``<log_dir>/sweeps/<experiment>[-<overrides>]``, so
  running the same command again finds the same folder and skips the complete cells (an
  explicit ``hydra.sweep.dir=...`` wins);
- when the sweep ends, writes ``<sweep dir>/tables/`` (:func:`benchmark.tables.make_tables`),
  logs the tables and heatmaps once to W&B (a run of ``job_type=tables`` in the sweep's group;
  not again while they are unchanged, so rerunning a finished sweep adds no run), and reports
  the failed cells; the command then exits with status 1 if any cell failed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from benchmark.collect import find_records
from benchmark.io import atomic_write_text
from benchmark.tables import PIVOTS, make_tables

log = logging.getLogger(__name__)

# The committed reference numbers, found from the package so the working directory does not matter.
REFERENCE_DIR = Path(__file__).resolve().parents[1] / "results" / "reference"
# Command-line overrides that do not change any cell's result, left out of the sweep's name.
NAME_EXCLUDE = ("experiment", "logger", "progress", "resume", "fail_fast")
# Longest job folder name (file systems allow 255 bytes per path component).
MAX_DIRNAME = 200
# In the tables folder: the digest of the tables last logged to the tracker.
LOGGED_DIGEST = "wandb_logged.sha256"


def _short(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{text[: limit - 9]}-{digest}"


def cell_dirname(override_dirname: str) -> str:
    """A job's folder name from its overrides: no slashes, at most :data:`MAX_DIRNAME` chars
    (longer ones keep a prefix and gain a hash, so they stay unique)."""
    return _short(override_dirname.replace("/", "_") or "default", MAX_DIRNAME)


def register_resolvers() -> None:
    """``${bench_dirname:...}``, used by ``hydra.sweep.subdir``; ``${bench_options:...}`` and
    ``${bench_cells:...}``, the experiments' grids derived from the config groups
    (:mod:`benchmark.grid`), whose generated ``cell=<attack>__<defense>`` options are
    registered here too (a launcher worker composes them without resolving the sweep);
    ``${bench_batch_lr:lr,reference,batch}``, a recipe's lr scaled to its batch size."""
    from benchmark import grid
    from benchmark.recipe import batch_scaled_lr

    if not OmegaConf.has_resolver("bench_batch_lr"):
        OmegaConf.register_new_resolver("bench_batch_lr", batch_scaled_lr)
    if not OmegaConf.has_resolver("bench_dirname"):
        OmegaConf.register_new_resolver("bench_dirname", cell_dirname)
    if not OmegaConf.has_resolver("bench_options"):
        OmegaConf.register_new_resolver("bench_options", grid.options_resolver)
    if not OmegaConf.has_resolver("bench_cells"):
        OmegaConf.register_new_resolver("bench_cells", grid.cells_resolver)
        grid.register_all_cells()


def _sorted_values(override: str) -> str:
    """``key=b,a`` -> ``key=a,b`` for plain value lists (the same cells in another order)."""
    key, _, value = override.partition("=")
    if re.fullmatch(r"[\w.\-/:]+(,[\w.\-/:]+)+", value):
        return f"{key}={','.join(sorted(value.split(',')))}"
    return override


def sweep_name(experiment: str | None, overrides: list[str]) -> str:
    """``<experiment>`` (or ``sweep``), plus ``-<the other overrides>-<hash>`` when there are any.

    The same command gives the same name whatever the order of its overrides.
    """
    kept = sorted(
        _sorted_values(o) for o in overrides if o.split("=", 1)[0].lstrip("+~") not in NAME_EXCLUDE
    )
    name = experiment or "sweep"
    if not kept:
        return name
    joined = " ".join(kept)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", joined).strip("_")
    digest = hashlib.sha256(joined.encode()).hexdigest()[:8]
    return f"{name}-{_short(slug, 80)}-{digest}"


def failed_cells(sweep_dir: Path) -> list[tuple[Path, str]]:
    """``(folder, error)`` of every cell under ``sweep_dir`` whose ``metrics.json`` failed."""
    failed = []
    for path in find_records([sweep_dir]):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            failed.append((path.parent, "unreadable metrics.json"))
            continue
        if record.get("status") != "complete":
            failed.append((path.parent, str(record.get("error"))))
    return failed


class SweepCallback(Callback):
    """Name the sweep folder at the start; tables, W&B and the failure report at the end.

    Args:
        subdir: the tables' folder inside the sweep folder.
        reference_dir: reference numbers (default: the committed ``results/reference``).
        name_sweeps: name the folder after the command (False: keep ``hydra.sweep.dir``).
        exit_on_failure: exit with status 1 after the tables when any cell failed.
    """

    def __init__(
        self,
        subdir: str = "tables",
        reference_dir: str | None = None,
        name_sweeps: bool = True,
        exit_on_failure: bool = True,
    ) -> None:
        self.subdir = subdir
        self.reference_dir = Path(reference_dir) if reference_dir else REFERENCE_DIR
        self.name_sweeps = name_sweeps
        self.exit_on_failure = exit_on_failure

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.name_sweeps:
            return
        hydra_overrides = list(config.hydra.overrides.hydra)
        if any(o.split("=", 1)[0].lstrip("+") == "hydra.sweep.dir" for o in hydra_overrides):
            return  # the user chose the folder
        choices = config.hydra.runtime.choices
        name = sweep_name(choices.get("experiment"), list(config.hydra.overrides.task))
        folder = str(Path(str(config.paths.log_dir)) / "sweeps" / name)
        quoted = folder.replace("\\", "\\\\").replace("'", "\\'")
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.sweep.dir = folder
            # Every job's config is composed again from these overrides (also in launcher
            # workers), so the folder must travel as one.
            config.hydra.overrides.hydra.append(f"hydra.sweep.dir='{quoted}'")
        log.info("sweep folder: %s (the same command resumes it)", folder)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        tables = self._tables(sweep_dir)
        if tables:
            self._log_to_wandb(config, sweep_dir, tables)
        failed = failed_cells(sweep_dir)
        if not failed:
            return
        log.error(
            "%d cell(s) of %s failed; run the same command again to retry them:\n%s",
            len(failed),
            sweep_dir,
            "\n".join(f"  {p.name}: {err}" for p, err in failed),
        )
        if self.exit_on_failure:
            sys.exit(1)

    def _tables(self, sweep_dir: Path) -> list[Path]:
        """Make the tables; log and swallow any error, so the tables never fail a sweep."""
        try:
            written = make_tables([sweep_dir], sweep_dir / self.subdir, self.reference_dir)
            if written:
                log.info("tables of %s written to %s", sweep_dir, sweep_dir / self.subdir)
            return written
        # Broad on purpose: the jobs' results are already on disk, and a plotting or
        # formatting bug must not turn a finished sweep into a failed one.
        except Exception:
            log.exception("making the sweep's tables failed; run scripts/make_tables.py by hand")
            return []

    def _log_to_wandb(self, config: DictConfig, sweep_dir: Path, written: list[Path]) -> None:
        """One tracker run per sweep with the pivots and heatmaps (the cells log their own).

        Skipped when the same tables were already logged (a rerun whose cells were all
        complete): the digest of what was logged is kept in ``<tables>/wandb_logged.sha256``."""
        if not config.get("logger"):
            return
        by_name = {p.name: p for p in written}
        tables = [(f"table/{n}", by_name[f"{n}.csv"]) for n in PIVOTS if f"{n}.csv" in by_name]
        if "reference_comparison.csv" in by_name:
            tables.append(("table/reference_comparison", by_name["reference_comparison.csv"]))
        images = [(f"heatmap/{n}", by_name[f"heatmap_{n}.png"])
                  for n in ("asr", "ca") if f"heatmap_{n}.png" in by_name]  # fmt: skip
        stamp = sweep_dir / self.subdir / LOGGED_DIGEST
        digest = logged_digest(
            [p for _, p in tables + images], OmegaConf.to_yaml(config.logger, resolve=False)
        )
        if stamp.is_file() and stamp.read_text().strip() == digest:
            log.info("the tables of %s are already logged to the tracker; not again", sweep_dir)
            return
        try:
            tracker = instantiate(config.logger)
            try:
                choices = config.hydra.runtime.choices
                group = config.logger.get("group") or choices.get("experiment") or sweep_dir.name
                tracker.start(
                    {"sweep_dir": str(sweep_dir), "overrides": list(config.hydra.overrides.task)},
                    sweep_dir,
                    name=f"{group}-tables",
                    group=str(group),
                    job_type="tables",
                )
                for key, path in tables:
                    tracker.log_table(key, pd.read_csv(path))
                for key, path in images:
                    tracker.log_image(key, path)
            finally:
                tracker.finish()
            atomic_write_text(stamp, digest + "\n")
        # Broad on purpose, as for the tables: tracking must never fail a finished sweep.
        except Exception:
            log.exception("logging the sweep's tables to the tracker failed")


def logged_digest(paths: list[Path], logger_yaml: str) -> str:
    """sha256 of the files logged to the tracker (names and bytes) and the logger's config."""
    h = hashlib.sha256(logger_yaml.encode())
    for path in sorted(paths, key=lambda p: p.name):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()
