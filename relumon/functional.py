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

import sys
from types import FrameType
from typing import Any, Callable, Container, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from relumon.hooks import OwnHook, OwnPreHook, frame_running, hookable_modules, is_compiling

__all__ = ["FUNCTIONAL_ACTIVATIONS", "ActivationCapture", "FunctionalCalls", "leave_mode"]


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


class FunctionalCalls:
    """Catches the functional activation calls made in a module's ``forward``, naming each by its enclosing module.

    `attach` puts a forward pre-hook and an always-called forward hook on every module, which keep the running
    modules on a stack; while the stack is not empty an `ActivationCapture` is entered. Each caught call of
    ``F.<fn>`` whose innermost running module is not in ``skip`` (a watched ``nn.ReLU`` calling ``F.relu``: the
    module's own hook counts it) goes to ``on_call(site path, fn, module, args, kwargs, out)``, the site path being
    ``<module path>.F.<fn>``.

    Args:
        on_call: receives each caught call (the recorder's fold).
        skip: modules whose own calls are not caught (the watched activation modules).
    """

    def __init__(
        self,
        on_call: Callable[[str, str, nn.Module, tuple[Any, ...], dict[str, Any], Any], None],
        skip: Container[Any],
    ) -> None:
        self._on_call = on_call
        self._skip = skip
        #: Running modules, with the frame of each module call (None under compile), for functional capture.
        self._module_stack: list[tuple[str, nn.Module, Optional[FrameType]]] = []
        self._capture: Optional[ActivationCapture] = None

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        """Track the running module on a stack; while any runs, a TorchFunctionMode catches F.relu calls."""
        handles = []
        for name, module in hookable_modules(model):
            handles.append(module.register_forward_pre_hook(OwnPreHook(self._make_enter(name), module)))
            handles.append(module.register_forward_hook(OwnHook(self._exit_module, module), always_call=True))
        return handles

    def _make_enter(self, name: str) -> Callable[[nn.Module, Any], None]:
        def enter(module: nn.Module, args: Any) -> None:
            stack = self._module_stack
            if is_compiling():  # frames do not trace; the mode is eager-only anyway
                stack.append((name, module, None))
                return None
            if stack and not self._stack_running():
                self.leave_stale_capture()  # a forward ended by a BaseException left its modules on the stack
            if not stack:
                self._capture = ActivationCapture(self._on_functional_call)
                self._capture.__enter__()  # type: ignore[no-untyped-call]
            stack.append((name, module, _module_call_frame()))
            return None

        return enter

    def _exit_module(self, module: nn.Module, args: Any, out: Any) -> None:
        if self._module_stack:
            self._module_stack.pop()
        if not self._module_stack:
            self._exit_capture()
        return None

    def _exit_capture(self) -> None:
        if self._capture is not None:
            capture, self._capture = self._capture, None
            leave_mode(capture)

    def _stack_running(self) -> bool:
        """Whether the innermost module call on the stack still runs (False after a BaseException ended it)."""
        frame = self._module_stack[-1][2]
        return frame is None or frame_running(frame)

    def leave_stale_capture(self) -> None:
        """Leave the functional capture if the forward that entered it ended without leaving it.

        Python runs no hook when a ``BaseException`` such as ``KeyboardInterrupt`` unwinds a forward, so the mode
        stays on the stack until relumon runs again: the next forward of the model, ``report()``, ``new_step()`` or
        ``remove()`` call this. Calls caught meanwhile are not recorded.
        """
        if self._module_stack and not self._stack_running():
            self._module_stack.clear()
            self._exit_capture()

    def remove(self) -> None:
        """Leave the capture (when removed in the middle of a forward) and forget the running modules."""
        self._exit_capture()
        self._module_stack.clear()

    def _on_functional_call(self, fn: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if not self._module_stack or not self._stack_running():
            return
        path, module, _ = self._module_stack[-1]
        if module in self._skip:  # nn.ReLU calling F.relu: the module's own hook counts it
            return
        self._on_call(f"{path}.F.{fn}" if path else f"F.{fn}", fn, module, args, kwargs, out)


_CALL_IMPL = nn.Module._call_impl.__code__


def _module_call_frame() -> Optional[FrameType]:
    """The frame of the ``nn.Module._call_impl`` that is running our forward (pre-)hook, if found nearby."""
    frame: Optional[FrameType] = sys._getframe(1)
    for _ in range(8):
        if frame is None or frame.f_code is _CALL_IMPL:
            return frame
        frame = frame.f_back
    return None
