"""Death history: since when each unit is dead, for how many windows in a row, and how many came back.

The history is host-side and O(units) per call site. It changes only when a window closes, from the dead mask that
``report()`` has already read to the host, so it costs nothing between reports. It is plain data in checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

__all__ = ["SiteHistory", "WindowHistory"]


@dataclass(frozen=True)
class WindowHistory:
    """What one closed window changed in a site's history."""

    revived_units: int  #: units dead in the previous window and alive in this one
    revived_total: int  #: revivals since monitoring began
    permanently_dead_units: int  #: units dead for at least ``permanent_after`` windows in a row
    first_dead_step: Tensor  #: int64 per unit: the step of the window in which it was first seen dead, -1 if never
    dead_streak: Tensor  #: int64 per unit: consecutive closed windows (with samples) in which it was dead


class SiteHistory:
    """The death history of one call site.

    Args:
        units: number of units of the site.
    """

    def __init__(self, units: int) -> None:
        self.first_dead_step = torch.full((units,), -1, dtype=torch.int64)
        self.dead_streak = torch.zeros(units, dtype=torch.int64)
        self.revived_total = 0

    def update(self, dead_mask: Tensor, step: int, permanent_after: int) -> WindowHistory:
        """Fold one closed window's dead mask (CPU bool, one per unit) into the history."""
        revived = int(((self.dead_streak > 0) & ~dead_mask).sum())
        self.revived_total += revived
        self.dead_streak = torch.where(dead_mask, self.dead_streak + 1, torch.zeros_like(self.dead_streak))
        self.first_dead_step[dead_mask & (self.first_dead_step < 0)] = step
        return self.view(revived, permanent_after)

    def view(self, revived: int, permanent_after: int) -> WindowHistory:
        """The history as it stands, without changing it."""
        return WindowHistory(
            revived_units=revived,
            revived_total=self.revived_total,
            permanently_dead_units=int((self.dead_streak >= permanent_after).sum()),
            first_dead_step=self.first_dead_step.clone(),
            dead_streak=self.dead_streak.clone(),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "first_dead_step": self.first_dead_step.tolist(),
            "dead_streak": self.dead_streak.tolist(),
            "revived_total": self.revived_total,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        first = state.get("first_dead_step")
        streak = state.get("dead_streak")
        if first is not None and len(first) == self.first_dead_step.numel():
            self.first_dead_step = torch.tensor(first, dtype=torch.int64)
        if streak is not None and len(streak) == self.dead_streak.numel():
            self.dead_streak = torch.tensor(streak, dtype=torch.int64)
        self.revived_total = int(state.get("revived_total", 0))
