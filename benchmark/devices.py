"""One GPU per job for parallel local sweeps (``hydra/launcher=joblib`` on a multi-GPU box).

Every job of a local parallel sweep sees every GPU, and ``device=auto`` would put them all on
``cuda:0``. :func:`claim_gpu` gives each job a GPU of its own instead: it takes the first free
``gpu<i>.lock`` (non-blocking), and when all are taken (more jobs than GPUs) it waits for the
GPU ``job_num % count``. The lock is held for the whole job and released when it ends (also if
the process dies: the OS drops the lock). On SLURM each job sees only its own GPU, so there is
nothing to choose.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


@contextmanager
def claim_gpu(lock_dir: str | Path, count: int, job_num: int = 0) -> Iterator[int]:
    """Hold one of ``count`` GPUs for the duration of the ``with`` block; yields its index."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        lock = FileLock(str(lock_dir / f"gpu{index}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue
        try:
            yield index
        finally:
            lock.release()
        return
    index = job_num % count
    log.info("all %d GPUs are taken; waiting for cuda:%d", count, index)
    with FileLock(str(lock_dir / f"gpu{index}.lock")):
        yield index
