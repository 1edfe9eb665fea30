"""Hydra callbacks: make the paper tables of a sweep as soon as it ends.

Registered in ``conf/hydra/default.yaml``; every ``-m`` sweep then gets
``<sweep dir>/tables/`` (see :func:`benchmark.tables.make_tables`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from benchmark.tables import make_tables

log = logging.getLogger(__name__)

# The committed reference numbers, found from the package so the working directory does not matter.
REFERENCE_DIR = Path(__file__).resolve().parents[1] / "results" / "reference"


class TablesCallback(Callback):
    """After a multirun, write the tables of its sweep directory into ``<sweep dir>/<subdir>``."""

    def __init__(self, subdir: str = "tables", reference_dir: str | None = None) -> None:
        self.subdir = subdir
        self.reference_dir = Path(reference_dir) if reference_dir else REFERENCE_DIR

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Make the tables; log and swallow any error, so the tables never fail a sweep."""
        try:
            sweep_dir = Path(config.hydra.sweep.dir)
            written = make_tables([sweep_dir], sweep_dir / self.subdir, self.reference_dir)
            if written:
                log.info("tables of %s written to %s", sweep_dir, sweep_dir / self.subdir)
        # Broad on purpose: the jobs' results are already on disk, and a plotting or
        # formatting bug must not turn a finished sweep into a failed one.
        except Exception:
            log.exception("making the sweep's tables failed; run scripts/make_tables.py by hand")
