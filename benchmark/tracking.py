"""Experiment tracking: W&B (offline by default) or nothing (``logger=none``).

Local ``metrics.json`` is the source of truth; W&B is a viewer. ``logger=wandb`` runs in
offline mode unless ``WANDB_MODE`` says otherwise, so it works with no account and no network;
``wandb sync <run dir>/wandb/offline-run-*`` uploads a run later. The run is always finished,
also when the job fails (LHT's ``task_wrapper`` lesson), so one failing sweep job does not
break the next.

A live run is written under ``<run dir>/wandb-partial/`` and moved to ``<run dir>/wandb/`` only
once it has been finished (:mod:`benchmark.staging`); a failed cell's run too: its exit code is
1, so W&B shows it as failed, and it is tagged ``failed``. A killed job's run is never where
``wandb sync <...>/wandb/offline-run-*`` looks.

While a tracker is started it is the process's active one (:func:`active`): ``fit`` logs each
training's per-epoch loss, accuracy and learning rate to it through :func:`curve`, under
``train/<desc>/`` with its own step metric ``train/<desc>/epoch``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark.staging import new_staging, publish, remove_stale_staging

log = logging.getLogger(__name__)

CURVE_KEYS = ("loss", "acc", "lr")
_active: Tracker | None = None


def active() -> Tracker | None:
    """The started tracker of this process, if any."""
    return _active


class Curve:
    """One training's per-epoch curve in a tracker (does nothing without one)."""

    def __init__(self, tracker: Tracker | None, prefix: str) -> None:
        self.tracker, self.prefix = tracker, prefix

    def log(self, stats: Mapping[str, float]) -> None:
        """Log one epoch's ``stats`` (``epoch`` (1-based), ``loss``, ``acc``, ``lr``)."""
        if self.tracker is not None:
            self.tracker.log_curve(self.prefix, stats)

    def log_all(self, history: Iterable[Mapping[str, float]]) -> None:
        """Log several epochs (a resumed or cached training's history)."""
        for stats in history:
            self.log(stats)


def curve(desc: str) -> Curve:
    """A new curve named after a training's ``desc`` in the active tracker: each call gets its
    own prefix, ``train/<desc>``, then ``train/<desc>_2``, ... when ``desc`` repeats."""
    tracker = _active
    return Curve(tracker, tracker.curve_prefix(desc)) if tracker is not None else Curve(None, "")


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

    def log_curve(self, prefix: str, stats: Mapping[str, float]) -> None:
        """Log one epoch of a training curve under ``prefix`` (see :func:`curve`)."""

    def curve_prefix(self, desc: str) -> str:
        """A prefix for a new curve, unique in this run."""
        used = self.__dict__.setdefault("_curve_prefixes", set())
        base = "train/" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", desc).strip("_") or "train")
        prefix, n = base, 1
        while prefix in used:
            n += 1
            prefix = f"{base}_{n}"
        used.add(prefix)
        return prefix

    def finish(self, failed: bool = False) -> None:
        """Close the run; safe to call more than once."""

    def _activate(self, on: bool) -> None:
        """Make this the process's active tracker (``on``), or stop being it; a new run
        starts its curve names afresh."""
        global _active
        if on:
            _active = self
            self.__dict__["_curve_prefixes"] = set()
        elif _active is self:
            _active = None


class WandbTracker(Tracker):
    """Weights & Biases tracking.

    Args:
        project: W&B project.
        entity: W&B entity (team or user); None = the default of the login, if any.
        mode: ``offline`` (default), ``online`` or ``disabled``; ``WANDB_MODE`` wins.
        group: run group; None = the experiment's name, else the sweep folder's (a sweep's runs
            and its tables share one group).
        tags: run tags.
        dir: where the ``wandb/`` folder (and, while a run is live, ``wandb-partial/``) goes;
            None = the run directory.
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
        remove_stale_staging(folder)
        self.folder = folder
        self.staging = new_staging(folder)
        self._defined: set[str] = set()
        try:
            self.run = self._init(wandb, config, name, group, job_type)
        except BaseException:
            shutil.rmtree(self.staging, ignore_errors=True)
            raise
        self._activate(True)
        log.info("W&B run %s (%s mode)", name, self.mode)

    def _init(
        self, wandb: Any, config: dict[str, Any], name: str, group: str | None, job_type: str | None
    ) -> Any:
        # silent + console off: the harness logs what matters; Hydra already keeps the job log.
        return wandb.init(
            project=self.project,
            entity=self.entity,
            mode=self.mode,
            group=self.group or group,
            job_type=job_type,
            tags=self.tags,
            name=name,
            config=config,
            dir=str(self.staging),
            reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off"),
        )

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

    def log_curve(self, prefix: str, stats: Mapping[str, float]) -> None:
        if self.run is None:
            return
        if prefix not in self._defined:  # each training plots against its own epochs
            self.run.define_metric(f"{prefix}/epoch")
            self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/epoch")
            self._defined.add(prefix)
        row = {f"{prefix}/{k}": float(stats[k]) for k in CURVE_KEYS if k in stats}
        self.run.log({**row, f"{prefix}/epoch": int(stats["epoch"])})

    def finish(self, failed: bool = False) -> None:
        if self.run is None:
            return
        import wandb

        live = Path(self.run.dir).parent  # <staging>/wandb/offline-run-<time>-<id>
        try:
            if failed:
                with contextlib.suppress(Exception):  # a label only; never skip finish()
                    self.run.tags = (*self.run.tags, "failed")
            self.run.finish(exit_code=1 if failed else 0)
            # finish() may return before W&B's service has written everything; teardown
            # waits for it and closes its files, so the run folder can be moved.
            wandb.teardown()
        finally:
            self.run = None
            self._activate(False)
        try:
            saved = publish(live, self.staging, self.folder / "wandb")
        except OSError as err:  # the results are on disk already; only the viewer copy is lost
            log.warning("could not move the W&B run %s to %s/wandb: %s", live, self.folder, err)
            return
        if saved is not None and self.mode == "offline":
            log.info("W&B offline run saved; upload it with: wandb sync %s", saved)
