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


#: Packages whose frames stand between relumon and the user's code: the warning skips them too. Under Lightning the
#: first frame outside relumon is the Trainer's own; the user's line is the ``trainer.fit(...)`` that led there.
_FRAMEWORK_PACKAGES = frozenset(
    {"relumon", "lightning", "pytorch_lightning", "lightning_fabric", "torch", "transformers", "accelerate"}
)


def warn(message: str, category: type[Warning] = RelumonWarning) -> None:
    """``warnings.warn`` pointed at the user's code: the first frame outside relumon, Lightning and torch.

    Without such a frame (a spawned worker, say) it points at the first frame outside relumon.
    """
    caller: Optional[FrameType] = sys._getframe(1)  # our caller: stacklevel 2
    frame, level = caller, 2
    first_outside: Optional[int] = None
    while frame is not None:
        package = frame.f_globals.get("__name__", "").split(".")[0]
        if package != "relumon" and first_outside is None:
            first_outside = level
        if package not in _FRAMEWORK_PACKAGES:
            break
        frame = frame.f_back
        level += 1
    if frame is None:
        level = first_outside if first_outside is not None else 2
    elif _drops_the_category(frame.f_code.co_filename):
        # Lightning's warning formatter prints "file:line: message", without the category, for every file whose
        # path contains "lightning" (a user's train_lightning.py too). Keep the category name in sight.
        message = f"{category.__name__}: {message}"
    warnings.warn(message, category, stacklevel=level)


def _drops_the_category(filename: str) -> bool:
    """True when Lightning's ``warnings.formatwarning`` is in force and would print ``filename`` without a category."""
    formatter = warnings.formatwarning
    return formatter.__module__.split(".")[0] in (
        "lightning",
        "lightning_fabric",
        "pytorch_lightning",
    ) and "lightning" in os.path.abspath(filename)


def is_strict() -> bool:
    """Whether ``RELUMON_STRICT`` asks errors inside relumon's hooks to propagate (``1``, ``true``, ``yes``, ``on``).

    Read only when an error happens, so it costs nothing per step and can be changed at any time.
    """
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes", "on")
