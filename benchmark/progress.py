"""Progress bars of the long stages, behind one process-wide switch.

The runner sets the switch from the config key ``progress`` at the start of each cell
(``set_enabled(bool(cfg.progress))``); every long stage (training, decoding an image folder,
PGD poisoning, trigger inversion, a defense's loops) wraps its loop in :func:`bar`. A bar only
writes to stderr: it never changes a computation or a random draw.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_enabled = True


def set_enabled(flag: bool) -> None:
    """Show (True) or hide (False) every later progress bar of this process."""
    global _enabled
    _enabled = bool(flag)


def enabled() -> bool:
    return _enabled


def bar(
    iterable: Iterable[T] | None = None,
    *,
    total: float | None = None,
    desc: str,
    unit: str = "it",
    disable: bool = False,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar over ``iterable`` (or updated by hand, with ``total``), labelled ``desc``.

    Hidden when the switch is off or ``disable`` is True. Bars do not stay on screen once done
    (``leave=False``) and refresh at most twice a second; ``kwargs`` go to tqdm.
    """
    options: dict[str, Any] = {"leave": False, "mininterval": 0.5, "dynamic_ncols": True}
    options.update(kwargs)
    return tqdm(
        iterable, total=total, desc=desc, unit=unit, disable=disable or not _enabled, **options
    )
