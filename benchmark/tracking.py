"""Experiment tracking: W&B (offline by default) or nothing (``logger=none``).

Local ``metrics.json`` is the source of truth; W&B is a viewer. ``logger=wandb`` runs in
offline mode unless ``WANDB_MODE`` says otherwise, so it works with no account and no network;
``wandb sync <run dir>/wandb/offline-run-*`` uploads a run later. The run is always finished,
also when the job fails (LHT's ``task_wrapper`` lesson), so one failing sweep job does not
break the next.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)


class Tracker:
    """No-op tracker (``logger=none``) and the interface of the others."""

    def start(
        self,
        config: dict[str, Any],
        run_dir: Path,
        name: str,
        group: str | None = None,
        job_type: str | None = None,
    ) -> None:
        """Open a run with the resolved config; ``group`` applies unless the tracker has one."""

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        """Log scalars (flat ``stage/metric`` keys) and store them in the run summary."""

    def log_table(self, key: str, frame: pd.DataFrame) -> None:
        """Log a table."""

    def log_image(self, key: str, path: Path, caption: str = "") -> None:
        """Log an image file."""

    def finish(self, failed: bool = False) -> None:
        """Close the run; safe to call more than once."""


class WandbTracker(Tracker):
    """Weights & Biases tracking.

    Args:
        project: W&B project.
        entity: W&B entity (team or user); None = the default of the login, if any.
        mode: ``offline`` (default), ``online`` or ``disabled``; ``WANDB_MODE`` wins.
        group: run group; None = the experiment's name, else the sweep folder's (a sweep's runs
            and its tables share one group).
        tags: run tags.
        dir: where the ``wandb/`` folder goes; None = the run directory.
    """

    def __init__(
        self,
        project: str = "backdoor-bench",
        entity: str | None = None,
        mode: str = "offline",
        group: str | None = None,
        tags: list[str] | None = None,
        dir: str | None = None,
    ) -> None:
        self.project, self.entity, self.group = project, entity, group
        self.mode = os.environ.get("WANDB_MODE") or mode
        self.tags = list(tags or [])
        self.dir = dir
        self.run: Any = None

    def start(
        self,
        config: dict[str, Any],
        run_dir: Path,
        name: str,
        group: str | None = None,
        job_type: str | None = None,
    ) -> None:
        import wandb

        folder = Path(self.dir) if self.dir else run_dir
        folder.mkdir(parents=True, exist_ok=True)
        # silent + console off: the harness logs what matters; Hydra already keeps the job log.
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            mode=self.mode,
            group=self.group or group,
            job_type=job_type,
            tags=self.tags,
            name=name,
            config=config,
            dir=str(folder),
            reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off"),
        )
        log.info("W&B run %s (%s mode)", name, self.mode)

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        if self.run is None:
            return
        scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        self.run.log(scalars)
        self.run.summary.update(scalars)

    def log_table(self, key: str, frame: pd.DataFrame) -> None:
        if self.run is None:
            return
        import wandb

        self.run.log({key: wandb.Table(dataframe=frame.reset_index())})

    def log_image(self, key: str, path: Path, caption: str = "") -> None:
        if self.run is None:
            return
        import wandb

        self.run.log({key: wandb.Image(str(path), caption=caption)})

    def finish(self, failed: bool = False) -> None:
        if self.run is None:
            return
        offline = self.mode == "offline"
        sync_dir = Path(self.run.dir).parent  # wandb/offline-run-<time>-<id>
        try:
            self.run.finish(exit_code=1 if failed else 0)
        finally:
            self.run = None
        if offline:
            log.info("W&B offline run saved; upload it with: wandb sync %s", sync_dir)
