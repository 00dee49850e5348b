"""Recycling dead units: re-initialise what a window confirmed dead, with the wiring read from a training forward.

Report-time only. Nothing here runs in the training step except the one-off `WiringProbe`, which records the module
calls of **one** training forward (the first after it is armed) and then removes its hooks.

**What a recycled unit gets** (as ReDo, Sokar et al. 2023, and Continual Backprop, Dohare et al. 2024):

- **incoming weights** re-drawn from the producing Linear/Conv's own ``reset_parameters`` distribution (a fresh
  tensor drawn by a parameter-less clone, from a generator seeded by the window index and the site name, so every
  rank of a DDP run draws the same numbers), and its bias set to 0;
- a **BatchNorm** channel between the producer and the activation reset: weight 1, bias 0, running mean 0, running
  variance 1;
- **outgoing weights** set to 0 in every Linear/Conv that reads the unit (a conv channel read through a flatten
  covers all its positions in the Linear), so a dead unit (output 0) leaves the network's function exactly as it was;
- the **optimizer state** of every touched entry set to 0, found by parameter (never by index): every state tensor
  of the parameter's shape (Adam's ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, SGD's ``momentum_buffer``,
  Adagrad's ``sum``...). Adam's per-parameter ``step`` is kept, as ReDo keeps it (see `reset_optimizer_state`).

**The wiring** (`discover_wiring`) comes from the autograd graph of the recorded forward: a site's producer is found
by walking back from the activation's input through BatchNorm, Dropout and Identity to a Linear or Conv; its readers
by following the activation's output forward through views, flattens, dropout and pooling to the Linear/Conv
modules that take it as input. Anything else that reads or feeds the unit (a residual add, a LayerNorm, a functional
op) makes the site unsafe to rewire: it is skipped with the reason, and nothing there changes.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from relumon.cause import check_optimizers
from relumon.hooks import OwnHook, OwnPreHook, in_functorch_transform, is_compiling, is_counted_forward
from relumon.options import RECYCLE_CHOICES

__all__ = [
    "CRITERIA",
    "RecycleResult",
    "SiteWiring",
    "WiringProbe",
    "optimizers_of_model",
    "discover_wiring",
    "recycle_units",
    "reset_optimizer_state",
]

#: What [`Monitor.recycle`][relumon.Monitor.recycle] can act on.
CRITERIA = RECYCLE_CHOICES

#: Autograd nodes between an activation and a reader that keep each unit's values apart: views and flattens, copies,
#: dropout (a product with a mask that needs no gradient), pooling over positions.
_KEEPS_UNITS = (
    "ViewBackward",
    "UnsafeViewBackward",
    "ReshapeAliasBackward",
    "CloneBackward",
    "ToCopyBackward",
    "AliasBackward",
    "NativeDropoutBackward",
    "MaxPool",
    "AvgPool",
    "AdaptiveAvgPool",
    "AdaptiveMaxPool",
    "SqueezeBackward",
    "UnsqueezeBackward",
)
_VIEWS = ("ViewBackward", "UnsafeViewBackward", "ReshapeAliasBackward")
_POOLS = ("MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool")
_RESHAPES = (*_VIEWS, "SqueezeBackward", "UnsqueezeBackward")
#: Modules between a producer and its activation that recycling steps over (BatchNorm is reset, these pass through).
_PASS_THROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)


def _node_name(node: Any) -> str:
    return type(node).__name__


def _is_weighted(module: nn.Module) -> bool:
    """A Linear or a (non-transposed) Conv1d/2d/3d: the layers whose rows and columns recycling rewrites."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed


def _kind(module: nn.Module) -> str:
    return type(module).__name__


@dataclass
class _Call:
    """One recorded call of a module in the probed forward."""

    path: str
    module: nn.Module
    index: int  # 0-based call of this module within the forward
    in_node: Any
    out_node: Any
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


class WiringProbe:
    """Records the module calls of one training forward, for `discover_wiring`, then takes its hooks off.

    A forward pre-hook and a forward hook on every module keep, per call, the ``grad_fn`` of its input and output
    and their shapes. Recording starts at the first training forward (grad enabled, module in training mode) and
    ends when the first module it saw is called again (the next step); then the hooks are removed. Under
    ``torch.compile`` and ``torch.func`` transforms nothing is recorded. The probe holds the recorded autograd nodes
    (after the backward pass they hold no activations) until `calls` is read, then lets them go.

    Args:
        model: the watched model.
    """

    def __init__(self, model: nn.Module) -> None:
        self._calls: list[_Call] = []
        #: Autograd nodes of the tensors the root module returned (a tuple or dict of them too).
        self.output_nodes: set[int] = set()
        self._output_refs: list[Any] = []
        self._pending: dict[int, list[tuple[Any, tuple[int, ...]]]] = {}  # id(module) -> inputs of open calls
        self._counts: Counter[int] = Counter()
        self._first: Optional[nn.Module] = None
        self.done = False
        self._handles = []
        for path, module in model.named_modules():
            self._handles.append(module.register_forward_pre_hook(OwnPreHook(self._make_pre(path), module)))
            self._handles.append(module.register_forward_hook(OwnHook(self._make_post(path), module)))

    def _make_pre(self, path: str) -> Any:
        def pre(module: nn.Module, args: Any) -> None:
            if self.done or is_compiling() or not is_counted_forward(module) or in_functorch_transform():
                return
            if self._first is None:
                self._first = module
            elif module is self._first and self._counts[id(module)] > 0:
                self.finish()  # the first module runs again: the next step has begun
                return
            inp = args[0] if args and isinstance(args[0], Tensor) else None
            entry = (inp.grad_fn if inp is not None else None, tuple(inp.shape) if inp is not None else ())
            self._pending.setdefault(id(module), []).append(entry)

        return pre

    def _make_post(self, path: str) -> Any:
        def post(module: nn.Module, args: Any, out: Any) -> None:
            if self.done or is_compiling():
                return
            pending = self._pending.get(id(module))
            if not pending:
                return
            in_node, in_shape = pending.pop()
            index = self._counts[id(module)]
            self._counts[id(module)] += 1
            if isinstance(out, Tensor):
                self._calls.append(_Call(path, module, index, in_node, out.grad_fn, in_shape, tuple(out.shape)))
            if path == "":  # the model's outputs: a unit that reaches one cannot be rewired without changing it
                nodes = [t.grad_fn for t in _tensors_in(out) if t.grad_fn is not None]
                self._output_refs.extend(nodes)  # held, so that their ids stay theirs until the wiring is read
                self.output_nodes.update(id(node) for node in nodes)

        return post

    @property
    def recorded(self) -> bool:
        """Whether a training forward was recorded."""
        return bool(self._calls)

    def finish(self) -> None:
        """Stop recording and remove the hooks. Idempotent."""
        self.done = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()

    def take_calls(self) -> list[Any]:
        """The recorded calls, once; the probe stops and forgets them (and the autograd nodes they hold)."""
        self.finish()
        calls, self._calls = self._calls, []
        return calls


@dataclass(frozen=True)
class _Reader:
    path: str
    positions: int  # columns of a Linear reader per unit (H*W after a flatten), 1 otherwise


@dataclass(frozen=True)
class SiteWiring:
    """What feeds one call site's units and what reads them, or why it cannot be rewired.

    Attributes:
        site: the call-site name.
        units: units of the site.
        producer: path of the Linear/Conv whose rows feed the units, if found.
        norm: path of the BatchNorm between producer and activation, if any.
        readers: paths of the Linear/Conv modules that read the units.
        positions: per reader, its input columns per unit (a Linear after a flatten reads ``H*W`` per channel).
        problem: why recycling must leave this site alone, or None when it can rewire it.
    """

    site: str
    units: int
    producer: Optional[str] = None
    norm: Optional[str] = None
    readers: tuple[str, ...] = ()
    positions: tuple[int, ...] = ()
    problem: Optional[str] = None


def _site_name(path: str, index: int) -> str:
    base = path or "root"
    return base if index == 0 else f"{base}.call{index + 1}"


def _tensors_in(value: Any) -> list[Tensor]:
    """The tensors in a module's output: itself, or those in a tuple, list or dict (one level deep, and nested)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_in(v)]
    return []


def discover_wiring(
    calls: Sequence[Any],
    model: nn.Module,
    activation_types: tuple[type[nn.Module], ...],
    unit_dims: dict[str, int],
    output_nodes: Optional[set[int]] = None,
) -> dict[str, SiteWiring]:
    """Producer and readers of every activation call site, from the autograd graph of one recorded forward.

    This is the one place recycling learns the wiring; it reads only what `WiringProbe` recorded.

    Args:
        calls: `WiringProbe.take_calls()`.
        model: the model (for shared parameters).
        activation_types: the watched activation classes.
        unit_dims: ``{site name: unit dim}``, as the reports give them (``LayerReport.unit_dim``).
        output_nodes: ids of the autograd nodes of the model's outputs (`WiringProbe.output_nodes`): a site whose
            values reach one is left alone.

    Returns:
        ``{site name: SiteWiring}`` for each call of a watched activation module that ``unit_dims`` names.
    """
    out_owner: dict[int, _Call] = {}
    for call in calls:  # children finish first: the innermost module that returned a node owns it
        if call.out_node is not None:
            out_owner.setdefault(id(call.out_node), call)
    calls_per_module = Counter(id(c.module) for c in calls)
    consumers = _consumers([c.out_node for c in calls] + [c.in_node for c in calls])
    # Nodes computed inside each Linear/Conv call: from its output back to its input.
    reader_of: dict[int, _Call] = {}
    for call in calls:
        if _is_weighted(call.module) and call.in_node is not None and call.out_node is not None:
            for node in _inside(call.out_node, call.in_node):
                reader_of.setdefault(id(node), call)
    shared = _shared_parameters(model)
    wiring: dict[str, SiteWiring] = {}
    for call in calls:
        if not isinstance(call.module, activation_types):
            continue
        name = _site_name(call.path, call.index)
        if name in wiring or name not in unit_dims:
            continue
        wiring[name] = _wire_site(
            name,
            call,
            unit_dims[name],
            out_owner,
            consumers,
            reader_of,
            calls_per_module,
            shared,
            output_nodes or set(),
        )
    return wiring


def _consumers(roots: Iterable[Any]) -> dict[int, list[Any]]:
    """For every node reachable back from ``roots``: the nodes that take it as an input (its consumers)."""
    consumers: dict[int, list[Any]] = {}
    seen: set[int] = set()
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for parent, _ in getattr(node, "next_functions", ()):
            if parent is None or _node_name(parent) == "AccumulateGrad":
                continue
            consumers.setdefault(id(parent), []).append(node)
            stack.append(parent)
    return consumers


def _inside(out_node: Any, in_node: Any) -> list[Any]:
    """The nodes of one module call: back from its output, stopping at its input and at parameters."""
    inside, seen, stack = [], {id(in_node)}, [out_node]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or _node_name(node) == "AccumulateGrad":
            continue
        seen.add(id(node))
        inside.append(node)
        stack.extend(parent for parent, _ in node.next_functions)
    return inside


def _shared_parameters(model: nn.Module) -> set[int]:
    seen: Counter[int] = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {pid for pid, n in seen.items() if n > 1}


def _is_sharded(t: Any) -> bool:
    return callable(getattr(t, "full_tensor", None))


def _module_problem(path: str, module: nn.Module, calls: int, shared: set[int], role: str) -> Optional[str]:
    if calls > 1:
        return f"its {role} `{path}` is called {calls} times per forward (shared weights)"
    for pname, p in module.named_parameters(recurse=False):
        if id(p) in shared:
            return f"its {role} `{path}` has tied weights (`{pname}` is shared with another module)"
        if _is_sharded(p):
            return f"its {role} `{path}` holds sharded (DTensor, FSDP2) parameters, which recycling does not rewrite"
    return None


def _wire_site(
    name: str,
    call: _Call,
    units_dim: int,
    out_owner: dict[int, _Call],
    consumers: dict[int, list[Any]],
    reader_of: dict[int, _Call],
    calls_per_module: Counter[int],
    shared: set[int],
    output_nodes: set[int],
) -> SiteWiring:
    shape = call.out_shape
    ndim = len(shape)
    if ndim < 2:
        return SiteWiring(name, shape[0] if shape else 1, problem="its output is not batched (fewer than 2 dims)")
    units = shape[units_dim]

    def skip(reason: str, **known: Any) -> SiteWiring:
        return SiteWiring(name, units, problem=reason, **known)

    # ---- the producer: back through BatchNorm, Dropout and Identity to a Linear or Conv
    node, norm = call.in_node, None
    while True:
        if node is None:
            return skip("it is fed by the model's input or a tensor without gradient: there is no producer to reset")
        owner = out_owner.get(id(node))
        if owner is None:
            op = _node_name(node)
            if op.startswith("AddBackward") or op.startswith("SubBackward"):
                return skip(f"it is fed by an add of two or more producers (`{op}`, a residual join)")
            return skip(f"it is fed by an operation outside any module (`{op}`) that recycling cannot follow")
        readers_of_node = consumers.get(id(node), [])
        if len(readers_of_node) > 1:
            return skip(f"the output of `{owner.path}` is also read by another operation than the activation")
        module = owner.module
        if isinstance(module, _PASS_THROUGH):
            node = owner.in_node
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and norm is None:
            if module.num_features != units:
                return skip(f"its BatchNorm `{owner.path}` has {module.num_features} features, the site {units} units")
            problem = _module_problem(owner.path, module, calls_per_module[id(module)], shared, "BatchNorm")
            if problem:
                return skip(problem)
            norm = owner
            node = owner.in_node
            continue
        if not _is_weighted(module):
            return skip(f"it is fed by `{owner.path}` ({_kind(module)}), not a Linear or Conv")
        producer = owner
        break
    pmod = producer.module
    rows = pmod.out_features if isinstance(pmod, nn.Linear) else pmod.out_channels
    along = ndim - 1 if isinstance(pmod, nn.Linear) else 1
    if rows != units or units_dim != along:
        return skip(
            f"its producer `{producer.path}` ({_kind(pmod)}) has {rows} outputs along another dim than the units"
        )
    problem = _module_problem(producer.path, pmod, calls_per_module[id(pmod)], shared, "producer")
    if problem:
        return skip(problem)

    # ---- the readers: forward through unit-keeping ops to the Linear/Conv modules that take the output as input
    readers: list[_Reader] = []
    frontier: list[tuple[Any, list[Any]]] = [(call.out_node, [])]
    seen: set[int] = set()
    while frontier:
        node, path = frontier.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in output_nodes:
            return skip("the model returns its values (or a view of them): re-drawn units would change that output")
        for consumer in consumers.get(id(node), []):
            reader = reader_of.get(id(consumer))
            if reader is not None and reader.in_node is node:
                found = _map_reader(reader, path, units, units_dim, shape)
                if isinstance(found, str):
                    return skip(found)
                problem = _module_problem(
                    reader.path, reader.module, calls_per_module[id(reader.module)], shared, "reader"
                )
                if problem:
                    return skip(problem)
                readers.append(found)
                continue
            op = _node_name(consumer)
            if op.startswith(_POOLS) and not _pool_keeps_units(op, path, len(shape), units_dim):
                return skip(
                    f"its output is pooled by `{op}` in a way that may mix its units: recycling cannot map them"
                )
            if op.startswith(_KEEPS_UNITS) or (op.startswith("MulBackward") and _one_grad_input(consumer)):
                frontier.append((consumer, path + [consumer]))
                continue
            owner = out_owner.get(id(consumer))
            what = f"`{owner.path}` ({_kind(owner.module)})" if owner is not None else f"`{op}`"
            if op.startswith("AddBackward"):
                what += ", a residual add"
            return skip(f"its output is read by {what}, not a Linear or Conv recycling can rewire")
    if not readers:
        return skip("nothing inside the model reads its output through a Linear or Conv (it may be the model's output)")
    return SiteWiring(
        name,
        units,
        producer=producer.path,
        norm=norm.path if norm is not None else None,
        readers=tuple(r.path for r in readers),
        positions=tuple(r.positions for r in readers),
    )


def _pool_keeps_units(op: str, path: list[Any], ndim: int, units_dim: int) -> bool:
    """Whether a pooling node pools positions only: a 2-D pool of a batched 4-D map (or 3-D of 5-D) with the units
    in dim 1, reached without a reshape. Anything else (a 1-D pool over a Linear's features, a 3-D pool of a 4-D map,
    which takes the batch for channels and pools across them) may mix units."""
    if units_dim != 1 or any(_node_name(n).startswith(_RESHAPES) for n in path):
        return False
    return (ndim == 4 and "2D" in op.upper()) or (ndim == 5 and "3D" in op.upper())


def _one_grad_input(node: Any) -> bool:
    return sum(1 for parent, _ in node.next_functions if parent is not None) == 1


def _map_reader(reader: _Call, path: list[Any], units: int, units_dim: int, shape: tuple[int, ...]) -> Any:
    """The reader's columns per unit, or a reason why they cannot be mapped."""
    module = reader.module
    views = [n for n in path if _node_name(n).startswith(_VIEWS)]
    if isinstance(module, nn.modules.conv._ConvNd):
        if units_dim != 1 or module.in_channels != units or views:
            return f"it is read by `{reader.path}` ({_kind(module)}) through a reshape that does not keep its channels"
        return _Reader(reader.path, 1)
    assert isinstance(module, nn.Linear)
    in_features = module.in_features
    if units_dim == len(shape) - 1 and in_features == units:
        if all(tuple(n._saved_self_sym_sizes)[-1:] == (units,) for n in views):
            return _Reader(reader.path, 1)
    elif units_dim == 1 and len(views) == 1 and in_features % units == 0:
        sizes = tuple(views[0]._saved_self_sym_sizes)
        after = path[path.index(views[0]) + 1 :]
        if len(sizes) >= 3 and sizes[1] == units and math.prod(sizes[2:]) * units == in_features:
            if all(not _node_name(n).startswith(("MaxPool", "AvgPool", "Adaptive")) for n in after):
                return _Reader(reader.path, in_features // units)
    return f"it is read by `{reader.path}` (Linear {in_features} inputs) through a reshape relumon cannot map to units"


# ---------------------------------------------------------------------------------------------- acting on it


@dataclass(frozen=True)
class RecycleResult:
    """What one [`Monitor.recycle`][relumon.Monitor.recycle] call did.

    Attributes:
        window: the closed window whose findings were acted on (0-based).
        criterion: ``"dead"`` or ``"dormant"``.
        units: ``{site name: unit indices}`` that were recycled.
        skipped: ``{site name: reason}`` for sites with candidate units that recycling left alone (nothing there
            changed).
        parameters: ``{site name: names of the parameters touched}`` (incoming rows, BatchNorm channels, readers'
            columns).
        optimizers: how many optimizers had their state reset (0: the weights only).
    """

    window: int
    criterion: str
    units: dict[str, list[int]]
    skipped: dict[str, str]
    parameters: dict[str, tuple[str, ...]]
    optimizers: int

    @property
    def counts(self) -> dict[str, int]:
        """``{site name: number of units recycled}``."""
        return {name: len(indices) for name, indices in self.units.items()}

    @property
    def total(self) -> int:
        """Units recycled in all."""
        return sum(len(indices) for indices in self.units.values())

    def __str__(self) -> str:
        lines = [
            f"relumon recycle, window {self.window} ({self.criterion}): {self.total} units in {len(self.units)} sites"
        ]
        lines += [
            f"  {name}: {len(idx)} units ({', '.join(self.parameters[name])})" for name, idx in self.units.items()
        ]
        lines += [f"  {name}: skipped, {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def optimizers_of_model(optimizers: Any, model: nn.Module) -> list[torch.optim.Optimizer]:
    """``optimizers`` (None, one optimizer or a sequence) as a list, each holding some of ``model``'s parameters.

    Raises:
        TypeError: for something that is not a ``torch.optim.Optimizer`` (`relumon.cause.check_optimizers`).
        ValueError: for an optimizer that holds none of the model's parameters.
    """
    found = list(check_optimizers(optimizers))
    params = {id(p) for p in model.parameters()}
    for opt in found:
        held = [p for group in opt.param_groups for p in group["params"]]
        if not any(id(p) in params for p in held):
            raise ValueError(
                f"expected an optimizer of the watched model's parameters, got a {type(opt).__name__} holding "
                f"{len(held)} tensor(s), none of them a parameter of {type(model).__name__}. Pass the optimizer that "
                "trains this model (recycling resets its state for the re-initialised weights)."
            )
    return found


#: Entries of one parameter that recycling touched: ``(dim, indices)`` (whole rows along dim 0 or columns along
#: dim 1) or ``(-1, bool mask)`` (a grouped conv's scattered entries).
Selection = tuple[int, Tensor]


def _fill(t: Tensor, selection: Selection, value: float) -> None:
    dim, where = selection
    if dim < 0:
        t.masked_fill_(where.to(t.device), value)
    else:
        t.index_fill_(dim, where.to(t.device), value)


def reset_optimizer_state(
    optimizers: Sequence[torch.optim.Optimizer], touched: dict[int, tuple[Tensor, list[Selection]]]
) -> None:
    """Zero every per-element state tensor of the touched entries, found by parameter.

    ``touched`` maps ``id(param)`` to ``(param, selections)``. Every state tensor of the parameter's shape (Adam's
    moments, SGD's momentum buffer, Adagrad's sum...) is zeroed at the selected entries. Scalar state, such as Adam's
    per-parameter ``step``, is kept, as ReDo keeps it: resetting it would restart bias correction for the whole
    tensor, shrinking the updates of every live entry of the parameter by 3 to 6 times for about a thousand steps
    (with Adam's default betas), to help the few recycled ones.
    """
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                entry = touched.get(id(p))
                state = opt.state.get(p) if entry is not None else None
                if not state or entry is None:
                    continue
                for key, value in state.items():
                    if isinstance(value, Tensor) and value.shape == p.shape:
                        # A per-element step size (Rprop's) restarts where a fresh parameter's does, at the lr: at 0
                        # the recycled entries could hardly move again. Every other such state restarts at 0.
                        fresh = float(group["lr"]) if key == "step_size" else 0.0
                        for selection in entry[1]:
                            _fill(value, selection, fresh)


#: Classes whose ``reset_parameters`` draws from a bound that depends on the fan-in only: a clone with just the
#: recycled rows draws from the same distribution, for a fraction of the cost.
_FAN_IN_ONLY = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _fresh(module: nn.Module, seed: int, rows: int) -> dict[str, Tensor]:
    """``rows`` rows of parameters drawn by ``module``'s own ``reset_parameters`` on a clone without its weights.

    The clone has all the module's rows, unless its class is one whose initialisation depends on the fan-in alone
    (`_FAN_IN_ONLY`); then only ``rows`` rows are drawn. Drawn on the CPU from a generator seeded by ``seed``.
    """
    clone = copy.copy(module)
    whole = type(module) not in _FAN_IN_ONLY
    fresh_params = {
        name: nn.Parameter(torch.empty(p.shape if whole else (rows, *p.shape[1:]), dtype=torch.float32))
        for name, p in module._parameters.items()
        if p is not None
    }
    absent = {name: None for name, p in module._parameters.items() if p is None}  # a conv without bias
    object.__setattr__(clone, "_parameters", {**fresh_params, **absent})
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator only: no CUDA seeding queued
        clone.reset_parameters()  # type: ignore[operator]
    return {name: p.detach() for name, p in fresh_params.items()}


def _seed(window: int, site: str) -> int:
    """The same on every rank: the window index and the site name."""
    return zlib.crc32(f"relumon-recycle/{window}/{site}".encode())


def recycle_units(
    model: nn.Module,
    wiring: SiteWiring,
    indices: list[int],
    window: int,
    touched: dict[int, tuple[Tensor, list[Selection]]],
) -> tuple[str, ...]:
    """Re-initialise ``indices`` of one site in place (no grad); add the entries touched to ``touched``.

    Returns:
        The names of the parameters touched, ``"<module path>.<param>"``.
    """
    assert wiring.producer is not None and indices
    producer = model.get_submodule(wiring.producer)
    norm: Any = model.get_submodule(wiring.norm) if wiring.norm is not None else None
    names: list[str] = []
    idx = torch.tensor(indices, dtype=torch.long)

    def mark(param: Tensor, selection: Selection, name: str) -> None:
        touched.setdefault(id(param), (param, []))[1].append(selection)
        names.append(name)

    with torch.no_grad():
        fresh = _fresh(producer, _seed(window, wiring.site), len(indices))
        weight: Tensor = producer.weight  # type: ignore[assignment]
        drawn = fresh["weight"] if fresh["weight"].shape[0] == len(indices) else fresh["weight"][idx]
        weight.index_copy_(0, idx.to(weight.device), drawn.to(weight.device, weight.dtype))
        mark(weight, (0, idx), f"{wiring.producer}.weight")
        bias = getattr(producer, "bias", None)
        if isinstance(bias, Tensor):
            _fill(bias, (0, idx), 0.0)
            mark(bias, (0, idx), f"{wiring.producer}.bias")
        if norm is not None:
            for name, value in (("weight", 1.0), ("bias", 0.0)):
                param = getattr(norm, name)
                if isinstance(param, Tensor):
                    _fill(param, (0, idx), value)
                    mark(param, (0, idx), f"{wiring.norm}.{name}")
            for name, value in (("running_mean", 0.0), ("running_var", 1.0)):
                buffer = getattr(norm, name)
                if isinstance(buffer, Tensor):
                    _fill(buffer, (0, idx), value)
        for path, positions in zip(wiring.readers, wiring.positions):
            module = model.get_submodule(path)
            w: Tensor = module.weight  # type: ignore[assignment]
            selection: Selection
            groups = int(getattr(module, "groups", 1))
            if isinstance(module, nn.Linear):
                selection = (1, (idx[:, None] * positions + torch.arange(positions)).flatten())
            elif groups == 1:
                selection = (1, idx)
            else:
                per_group_in, per_group_out = w.shape[1], w.shape[0] // groups
                mask = torch.zeros(w.shape, dtype=torch.bool)
                for u in indices:
                    group = u // per_group_in
                    mask[group * per_group_out : (group + 1) * per_group_out, u % per_group_in] = True
                selection = (-1, mask)
            _fill(w, selection, 0.0)
            mark(w, selection, f"{path}.weight")
    return tuple(names)


class Recycler:
    """The wiring probe and what it found, for one monitor; the decisions of each recycle call.

    Args:
        model: the watched model.
        activation_types: the watched activation classes.
    """

    def __init__(self, model: nn.Module, activation_types: tuple[type[nn.Module], ...]) -> None:
        self._types = activation_types
        self._probe: Optional[WiringProbe] = WiringProbe(model)
        self._wiring: Optional[dict[str, SiteWiring]] = None

    def remove(self) -> None:
        """Take the probe's hooks off (if it is still recording). Idempotent."""
        if self._probe is not None:
            self._probe.finish()

    def wiring(self, model: nn.Module, unit_dims: dict[str, int]) -> Optional[dict[str, SiteWiring]]:
        """Every site's wiring, derived once from the recorded forward; None while no forward was recorded."""
        if self._wiring is None and self._probe is not None and self._probe.recorded:
            probe = self._probe
            calls = probe.take_calls()
            self._wiring = discover_wiring(calls, model, self._types, unit_dims, probe.output_nodes)
            self._probe = None  # and with it the autograd nodes it held
        return self._wiring

    def recycle(
        self,
        model: nn.Module,
        report: Any,
        optimizers: Sequence[torch.optim.Optimizer],
        criterion: str,
        tau: Optional[float],
    ) -> RecycleResult:
        """Recycle what ``report`` (a closed window) found, where the wiring allows it. See `Monitor.recycle`."""
        wiring = self.wiring(model, {layer.name: layer.unit_dim for layer in report})
        units: dict[str, list[int]] = {}
        skipped: dict[str, str] = {}
        parameters: dict[str, tuple[str, ...]] = {}
        touched: dict[int, tuple[Tensor, list[Selection]]] = {}
        for layer in report:
            candidates = _candidates(layer, criterion, tau)
            if not candidates:
                continue
            site_wiring = wiring.get(layer.name) if wiring is not None else None
            if layer.disabled is not None:
                skipped[layer.name] = f"relumon stopped measuring it after an error ({layer.disabled})"
            elif not layer.exact:
                skipped[layer.name] = (
                    f"the window was sampled ({layer.unmeasured_calls} calls not measured): a unit that looks "
                    f"{criterion} may have fired on an unmeasured step. Only a window measured on every call "
                    "confirms it (with `recycle=` set relumon measures such sites on every call of the next window; "
                    "or watch with `measure_every=1`)"
                )
            elif site_wiring is None:
                skipped[layer.name] = (
                    "its wiring is not known: relumon reads it from one training forward of a module call site, "
                    "recorded from the first training forward after `watch(..., recycle=...)` or after the first "
                    "`recycle()` call (functional calls and compiled models are not recorded)"
                )
            elif site_wiring.problem is not None:
                skipped[layer.name] = site_wiring.problem
            else:
                parameters[layer.name] = recycle_units(model, site_wiring, candidates, report.window, touched)
                units[layer.name] = candidates
        if optimizers and touched:
            reset_optimizer_state(optimizers, touched)
        return RecycleResult(report.window, criterion, units, skipped, parameters, len(optimizers))


def _candidates(layer: Any, criterion: str, tau: Optional[float]) -> list[int]:
    """The units of ``layer`` that ``criterion`` selects: dead ones, or tau-dormant ones (dead ones included)."""
    if layer.samples == 0 or not layer.counts_dead:
        return []
    if criterion == "dormant" and layer.dormant_scores is not None and tau is not None:
        selected: list[int] = (layer.dormant_scores <= tau).nonzero().flatten().tolist()
        return sorted(set(selected) | set(layer.dead_indices))
    indices: list[int] = layer.dead_indices
    return indices
