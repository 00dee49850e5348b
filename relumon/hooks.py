"""Hook attachment: which forwards count, call-site bookkeeping and finding the module that fed an activation.

Facts this relies on (see the project's field notes, verified on torch 2.13):

- Module *full backward* hooks break on ``nn.ReLU(inplace=True)``, so gradients are taken with a forward hook that
  registers a tensor hook on the output. That works for inplace and non-inplace modules alike.
- A module called several times per forward fires its forward hook once per call, so each call gets its own site.
- ``torch.utils.checkpoint`` recomputes forwards during backward. With ``use_reentrant=True`` the first pass runs
  with grad disabled (not counted) and the recompute runs inside backward (counted). With ``use_reentrant=False``
  the first pass counts and the recompute runs under checkpoint's ``_recomputation_hook`` saved-tensor hooks, which
  we detect and skip, so samples never double and no extra site appears.
- PyTorch pickles a module's hook dicts with it (``torch.save(model)``, ``pickle.dumps``), and ``copy.deepcopy``
  copies them. relumon's module hooks are therefore `OwnHook` objects: they run only for the module they were
  registered on, and a pickled or deep-copied one becomes an `InertHook` that does nothing. A saved or copied model
  is never watched by the original's monitor.
- PyTorch allows no hooks on a TorchScript module (``torch.jit.script`` or ``trace``): ``register_forward_hook``
  raises "not supported on ScriptModules". Its submodules are TorchScript modules too. relumon hooks every other
  module (`hookable_modules`) and says once which TorchScript modules it could not look inside (`scripted_modules`).
- Under ``torch.func`` transforms (``vmap``, ``grad``...) hooks receive wrapped tensors that in-place updates of
  relumon's state cannot take (``Batching rule not implemented for aten::maximum.out``); `in_functorch_transform`
  tells such calls apart.
"""

from __future__ import annotations

import sys
import weakref
from types import FrameType
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from relumon.units import ADAPTIVE_POOLS

__all__ = [
    "is_compiling",
    "in_backward",
    "is_counted_forward",
    "in_checkpoint_recompute",
    "keeps_meaning",
    "PASS_THROUGH",
    "in_functorch_transform",
    "frame_running",
    "OwnHook",
    "OwnPreHook",
    "TracerHook",
    "InertHook",
    "ProducerTracer",
    "hookable_modules",
    "scripted_modules",
]


try:
    is_compiling: Callable[[], bool] = torch.compiler.is_compiling
except AttributeError:  # torch < 2.3
    is_compiling = torch._dynamo.is_compiling


def in_backward() -> bool:
    """True while autograd runs a backward pass (always False inside a torch.compile trace, which runs forwards)."""
    return not is_compiling() and torch._C._current_graph_task_id() != -1


def in_checkpoint_recompute() -> bool:
    """True while a non-reentrant ``torch.utils.checkpoint`` recomputes a forward during backward."""
    if not in_backward():  # the cheap, common answer
        return False
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if not hooks:
        return False
    return "_recomputation_hook" in getattr(hooks[0], "__qualname__", "")


def in_functorch_transform() -> bool:
    """True inside a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``...), whose tensors are wrapped."""
    return torch._C._functorch.maybe_current_level() is not None


def frame_running(frame: FrameType) -> bool:
    """Whether ``frame`` is still executing: it is an ancestor of our caller. Frames of a finished call, even one that
    a traceback keeps alive, are not on the stack any more."""
    current: Optional[FrameType] = sys._getframe(1)
    while current is not None:
        if current is frame:
            return True
        current = current.f_back
    return False


def hookable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` without its TorchScript modules, on which PyTorch allows no hooks (their
    submodules are TorchScript modules too)."""
    return [(name, m) for name, m in model.named_modules() if not isinstance(m, torch.jit.ScriptModule)]


def scripted_modules(model: nn.Module) -> list[str]:
    """Paths of the outermost TorchScript modules in ``model`` (not those inside another one)."""
    paths = [name for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    return [p for p in paths if not any(p.startswith(f"{q}.") for q in paths if q != p and q)]


class InertHook:
    """What a relumon hook becomes in a pickled or deep-copied model: a hook that does nothing."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __repr__(self) -> str:
        return "relumon.hooks.InertHook()"


class OwnHook:
    """A module hook that calls ``fn(module, *args)`` only for the module it was registered on.

    A pickled (``torch.save(model)``) or deep-copied model gets an `InertHook` in its place, and a shallow copy that
    shares the hook dicts is skipped by the identity check: relumon never watches a copy through the original's
    monitor, and its hooks never stop a model from pickling.
    """

    __slots__ = ("fn", "module")

    def __init__(self, fn: Callable[..., None], module: nn.Module) -> None:
        self.fn = fn
        self.module = module

    def __call__(self, module: nn.Module, *args: Any) -> None:
        if module is self.module:
            self.fn(module, *args)
        return None  # a value would replace the module's inputs or output

    def __reduce__(self) -> tuple[Any, ...]:
        return (InertHook, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> InertHook:
        return InertHook()


class OwnPreHook(OwnHook):
    """`OwnHook` for forward pre-hooks. Its own ``__call__`` (code object) keeps torch.compile's recompile budget,
    which is counted per code object, apart from the forward hooks'."""

    __slots__ = ()

    def __call__(self, module: nn.Module, *args: Any) -> None:
        if module is self.module:
            self.fn(module, *args)
        return None


class TracerHook(OwnHook):
    """`OwnHook` for `ProducerTracer`'s hooks, with its own ``__call__`` for the same reason as `OwnPreHook`."""

    __slots__ = ()

    def __call__(self, module: nn.Module, *args: Any) -> None:
        if module is self.module:
            self.fn(module, *args)
        return None


def is_counted_forward(module: nn.Module) -> bool:
    """Whether a call of ``module`` is a training forward whose statistics count.

    Counted: grad enabled and ``module.training``. Not counted: eval mode, ``no_grad``, ``inference_mode``, the
    grad-disabled first pass of a reentrant checkpoint, and a non-reentrant checkpoint's recompute.
    """
    return module.training and torch.is_grad_enabled() and not in_checkpoint_recompute()


#: Modules that keep the meaning of their input's dims: their output's units are their input's.
PASS_THROUGH: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    *ADAPTIVE_POOLS,
)


def keeps_meaning(module: nn.Module, inp: Tensor, out: Tensor) -> bool:
    """Whether ``module`` passes its input's dim meaning through: a `PASS_THROUGH` module, or any module without
    parameters or children whose output has its input's shape (an elementwise module: an unwatched activation, a
    scale)."""
    if isinstance(module, PASS_THROUGH):
        return True
    if out.shape != inp.shape or next(module.children(), None) is not None:
        return False
    return next(module.parameters(recurse=False), None) is None


class ProducerTracer:
    """Records which module produced each tensor during the first training forwards.

    Forward hooks on every module store ``id(output) -> (weakref(output), module path, module)``. The innermost
    module wins, since children finish before their parents. A module that keeps its input's dim meaning (dropout,
    identity, adaptive pooling, any elementwise module: `keeps_meaning`) passes its input's producer on, so that
    ``Conv1d -> Dropout -> ReLU`` is read as the conv's channels. The hooks exist only while call sites are being
    discovered; `remove()` takes them off.
    """

    def __init__(self, model: nn.Module, transparent: set[nn.Module]) -> None:
        self._outputs: dict[int, tuple[Any, str, nn.Module]] = {}
        #: A plain bool rather than a look at the handles, so that torch.compile can trace a check of it.
        self.active = True
        self._handles = [
            module.register_forward_hook(TracerHook(self._make_hook(name, module in transparent), module))
            for name, module in hookable_modules(model)
        ]

    def _make_hook(self, name: str, transparent: bool) -> Callable[..., None]:
        """The recording hook of one module; a ``transparent`` one (a watched activation) always passes its input's
        producer on, so that the layer after a ReLU is fed by what fed the ReLU."""
        outputs = self._outputs

        def record(module: nn.Module, args: Any, out: Any) -> None:
            if is_compiling() or not isinstance(out, Tensor):  # weakrefs and ids do not trace: skip under compile
                return None
            known = outputs.get(id(out))
            if known is None or known[0]() is not out:  # ids of dead tensors get reused
                entry = (weakref.ref(out), name, module)
                if args and isinstance(args[0], Tensor) and (transparent or keeps_meaning(module, args[0], out)):
                    fed = outputs.get(id(args[0]))
                    if fed is not None and fed[0]() is args[0]:
                        entry = (entry[0], fed[1], fed[2])  # dropout after a conv still holds the conv's channels
                    elif transparent:
                        return None
                outputs[id(out)] = entry
            return None

        return record

    def producer_of(self, tensor: Any) -> tuple[Optional[str], Optional[nn.Module]]:
        """The (path, module) that produced ``tensor`` in a traced forward, or (None, None)."""
        known = self._outputs.get(id(tensor))
        if known is None or known[0]() is not tensor:
            return None, None
        return known[1], known[2]

    def clear(self) -> None:
        """Forget the recorded outputs (at each new step), keeping the hooks."""
        self._outputs.clear()

    def remove(self) -> None:
        """Remove every tracing hook. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()
        self.active = False
