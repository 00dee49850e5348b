"""Argument checks shared by [`relumon.watch`][relumon.watch] and the Lightning callback.

Each error says what was expected and what was got.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from torch import nn

__all__ = ["check_int_at_least", "check_on_dead", "check_dormant_tau", "check_types"]


def check_int_at_least(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is an int ``>= minimum`` (bools excluded), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"expected `{name}` to be an int >= {minimum}, got {value!r}")
    return value


def check_on_dead(value: Any, choices: Sequence[str]) -> Any:
    """``value`` if it is one of ``choices`` or a callable, else ValueError listing them."""
    if not (value in choices or callable(value)):
        raise ValueError(f"expected `on_dead` to be one of {tuple(choices)} or a callable, got {value!r}")
    return value


def check_dormant_tau(value: Any) -> Any:
    """``value`` if it is None or a number in ``[0, 1)``, else ValueError."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1):
        raise ValueError(f"expected `dormant_tau` to be None or a number in [0, 1), got {value!r}")
    return value


def check_types(types: Iterable[type[nn.Module]]) -> tuple[type[nn.Module], ...]:
    """``types`` as a non-empty tuple of ``nn.Module`` subclasses (one class alone is accepted), else TypeError."""
    if isinstance(types, type):
        types = (types,)
    try:
        checked = tuple(types)
    except TypeError:
        raise TypeError(f"expected `types` to be a tuple of nn.Module subclasses, got {types!r}") from None
    bad = [t for t in checked if not (isinstance(t, type) and issubclass(t, nn.Module))]
    if bad or not checked:
        raise TypeError(f"expected `types` to be a non-empty tuple of nn.Module subclasses, got {types!r}")
    return checked
