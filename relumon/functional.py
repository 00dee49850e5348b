"""Capture of functional activation calls (``F.relu``, ``torch.relu``, ``x.relu()``, ``F.relu6``, ``F.leaky_relu``...).

Many models call activations as functions inside ``forward`` instead of using modules, so module hooks never see
them. With ``relumon.watch(model, functional=True)`` relumon tracks which module of the model is running (forward
pre-hooks and always-called forward hooks on every module) and, while any of them runs, a
`torch.overrides.TorchFunctionMode` intercepts calls of the functions in `FUNCTIONAL_ACTIVATIONS`. Each
call site is named by the enclosing module's path plus the function: ``encoder.block1.F.relu``, then
``encoder.block1.F.relu.call2`` for a second call in the same module and forward.

Limits:
- Only the functions listed here are caught: ``F.relu``/``F.relu_``, ``torch.relu``/``torch.relu_``,
  ``Tensor.relu``/``Tensor.relu_``, ``F.relu6``, ``F.leaky_relu``/``F.leaky_relu_``. Calls made inside a watched
  activation module (``nn.ReLU`` calls ``F.relu``) are that module's and are not counted twice. Other ops
  (``clamp(min=0)``, ``torch.maximum(x, 0)``) are not activations relumon can recognise.
- The mode sees every torch call made during the model's forward, which adds Python work to each op: functional
  capture is opt-in.
- It is eager-only: under ``torch.compile`` the mode is not entered, and functional calls are not watched.
- A forward ended by an ``Exception`` leaves the mode through the always-called forward hooks. A ``BaseException``
  (``KeyboardInterrupt``: Ctrl-C in a notebook) skips those hooks, and Python runs nothing of relumon's while it
  unwinds. Each entry of the module stack therefore keeps the frame of its module call: calls caught while that
  frame no longer runs are not recorded, and the next relumon call (any forward of the model, ``report()``,
  ``new_step()``, ``remove()``) takes the stale mode off the stack.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["FUNCTIONAL_ACTIVATIONS", "ActivationCapture", "leave_mode"]


def _table() -> dict[Callable[..., Any], str]:
    names: dict[str, list[Any]] = {
        "relu": [F.relu, torch.relu, torch.Tensor.relu, getattr(F, "relu_", None), torch.relu_, torch.Tensor.relu_],
        "leaky_relu": [F.leaky_relu, getattr(F, "leaky_relu_", None)],
        "relu6": [F.relu6],
    }
    return {fn: name for name, fns in names.items() for fn in fns if fn is not None}


#: The functions caught, mapped to the name used in call-site names (``F.<name>``).
FUNCTIONAL_ACTIVATIONS: dict[Callable[..., Any], str] = _table()


class ActivationCapture(TorchFunctionMode):
    """Calls ``on_call(name, args, kwargs, out)`` after each call of a function in `FUNCTIONAL_ACTIVATIONS`."""

    def __init__(self, on_call: Callable[[str, tuple[Any, ...], dict[str, Any], Any], None]) -> None:
        super().__init__()
        self._on_call = on_call

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: Optional[dict[str, Any]] = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = FUNCTIONAL_ACTIVATIONS.get(func)
        if name is not None:
            self._on_call(name, args, kwargs, out)
        return out


def leave_mode(mode: TorchFunctionMode) -> None:
    """Take ``mode`` off this thread's torch-function mode stack, wherever it is, keeping the others in order.

    ``mode.__exit__`` pops whatever is on top, which is another mode if one was entered after ``mode`` (and not left).
    Must not be called from inside ``mode``'s own ``__torch_function__``, where torch has popped it temporarily.
    """
    above = []
    while torch._C._len_torch_function_stack() > 0:
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            break
        above.append(top)
    for other in reversed(above):
        torch._C._push_on_torch_function_stack(other)
