"""The one exception class and the one warning class that relumon raises and issues."""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType
from typing import Optional

__all__ = ["RelumonError", "RelumonWarning", "DeadUnitsWarning", "STRICT_ENV", "is_strict", "warn"]

#: Environment variable that makes an error inside relumon's per-step hooks propagate instead of disabling the call
#: site (``RELUMON_STRICT=1``). relumon's own test suite runs strict.
STRICT_ENV = "RELUMON_STRICT"


class RelumonError(RuntimeError):
    """A failure of relumon itself, or an alert raised by ``on_dead="raise"``.

    Bad arguments raise `ValueError` or `TypeError` instead.
    """


class RelumonWarning(UserWarning):
    """Base class of relumon's warnings: bad input that relumon skips rather than crash on."""


class DeadUnitsWarning(RelumonWarning):
    """Every unit of a watched layer was dead (or stuck negative) over a whole window.

    Issued at most once per layer and monitor. Filter it like any warning::

        import warnings
        warnings.filterwarnings("error", category=relumon.DeadUnitsWarning)
    """


def warn(message: str, category: type[Warning] = RelumonWarning) -> None:
    """``warnings.warn`` pointed at the first frame outside relumon, so the user sees their own call."""
    frame: Optional[FrameType] = sys._getframe(1)  # our caller: stacklevel 2
    level = 2
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "relumon":
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def is_strict() -> bool:
    """Whether ``RELUMON_STRICT`` asks errors inside relumon's hooks to propagate (``1``, ``true``, ``yes``, ``on``).

    Read only when an error happens, so it costs nothing per step and can be changed at any time.
    """
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes", "on")
