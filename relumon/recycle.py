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
  Adagrad's ``sum``, restarted at its ``initial_accumulator_value``...). Adam's per-parameter ``step`` is kept,
  as ReDo keeps it (see `reset_optimizer_state`).

**The wiring** is the recorder's record of each site (`relumon.wiring.WiringBook`), read once from the autograd graph
of the first training forward, when it is over: the producer (a Linear or Conv, through BatchNorm, Dropout and
Identity), the readers (every Linear/Conv that takes the activation, through views, flattens, transposes, dropout,
pooling and means over other dims), and whether anything else reads or feeds the unit (a residual add, a LayerNorm,
a functional op, an output the model returns), whether a parameter involved is used twice in the graph or frozen.
Such a site is skipped with the reason, and nothing there changes. So the first `recycle()` acts.

**The promise** is "the same function on the window's samples": a dead unit output 0 on every sample of the window,
and every reader's columns for it are 0 now. On other inputs a unit dead on the window can fire (a BatchNorm channel
under running statistics, a held-out image): there its old output is gone (see ``docs/plasticity.md``).
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from relumon.cause import check_optimizers
from relumon.options import RECYCLE_CHOICES
from relumon.wiring import SiteWiring, WiringBook, WiringProbe

__all__ = [
    "CRITERIA",
    "RecycleResult",
    "SiteWiring",
    "WiringProbe",
    "optimizers_of_model",
    "recycle_units",
    "reset_optimizer_state",
]

#: What [`Monitor.recycle`][relumon.Monitor.recycle] can act on.
CRITERIA = RECYCLE_CHOICES

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
    moments, SGD's momentum buffer, Adagrad's sum...) is zeroed at the selected entries. A factored state tensor (the
    parameter's shape with some dims 1, as Adafactor's ``row_var`` and ``col_var``) is zeroed where every entry it
    stands for was touched (a recycled row's ``row_var``, a zeroed column's ``col_var``). Scalar state, such as Adam's
    per-parameter ``step``, is kept, as ReDo keeps it: resetting it would restart bias correction for the whole
    tensor, shrinking the updates of every live entry of the parameter by 3 to 6 times for about a thousand steps
    (with Adam's default betas), to help the few recycled ones.

    An `torch.optim.LBFGS` keeps one flat history for all its parameters (directions, steps, the previous gradient):
    after re-initialised weights its next curvature pair would mix the jump recycling made with a gradient step, so
    its whole state is cleared, and its next step starts afresh (a steepest-descent step, as its first).
    """
    for opt in optimizers:
        if isinstance(opt, torch.optim.LBFGS):
            held = [p for group in opt.param_groups for p in group["params"]]
            if any(id(p) in touched for p in held) and held:
                opt.state[held[0]].clear()
            continue
        for group in opt.param_groups:
            for p in group["params"]:
                entry = touched.get(id(p))
                state = opt.state.get(p) if entry is not None else None
                if not state or entry is None:
                    continue
                mask: Optional[Tensor] = None
                for key, value in state.items():
                    if not isinstance(value, Tensor) or value.ndim != p.ndim or value.ndim == 0:
                        continue
                    # A per-element step size (Rprop's) restarts where a fresh parameter's does, at the lr: at 0
                    # the recycled entries could hardly move again. Every other such state restarts at 0.
                    # Adagrad's sum restarts at the group's `initial_accumulator_value`, as a fresh parameter's.
                    fresh = float(group["lr"]) if key == "step_size" else 0.0
                    if key == "sum" and "initial_accumulator_value" in group:
                        fresh = float(group["initial_accumulator_value"])
                    if value.shape == p.shape:
                        for selection in entry[1]:
                            _fill(value, selection, fresh)
                        continue
                    collapsed = [d for d in range(p.ndim) if value.shape[d] == 1 and p.shape[d] != 1]
                    if any(value.shape[d] not in (1, p.shape[d]) for d in range(p.ndim)) or not collapsed:
                        continue  # not a factored statistic of this parameter
                    if mask is None:
                        mask = torch.zeros(p.shape, dtype=torch.bool)
                        for selection in entry[1]:
                            _fill(mask, selection, True)
                    _fill(value, (-1, mask.all(dim=tuple(collapsed), keepdim=True)), fresh)


#: Classes whose ``reset_parameters`` draws from a bound that depends on the fan-in only: a clone with just the
#: recycled rows draws from the same distribution, for a fraction of the cost.
_FAN_IN_ONLY = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _fresh(module: nn.Module, seed: int, rows: int) -> dict[str, Tensor]:
    """``rows`` rows of parameters drawn by ``module``'s own ``reset_parameters`` on a clone without its weights.

    The clone has all the module's rows, and its own copies of the module's buffers and submodules, unless its class
    is one whose initialisation depends on the fan-in alone (`_FAN_IN_ONLY`); then only ``rows`` rows are drawn.
    Drawn on the CPU from a generator seeded by ``seed``.
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
    if whole:
        # A subclass's own `reset_parameters` may also reset its buffers or submodules in place: the clone gets its
        # own copies, so that only the recycled rows of the real module change.
        buffers = {name: b.detach().clone() if b is not None else None for name, b in module._buffers.items()}
        object.__setattr__(clone, "_buffers", buffers)
        object.__setattr__(clone, "_modules", {name: copy.deepcopy(m) for name, m in module._modules.items()})
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator only: no CUDA seeding queued
        clone.reset_parameters()  # type: ignore[operator]
    return {name: p.detach() for name, p in fresh_params.items()}


def _seed(window: int, site: str) -> int:
    """The same on every rank: the window index and the site name."""
    return zlib.crc32(f"relumon-recycle/{window}/{site}".encode())


def _redraw(
    producer: nn.Module,
    norm: Any,
    wiring: SiteWiring,
    idx: Tensor,
    window: int,
    mark: Callable[[Tensor, Selection, str], None],
) -> None:
    """The incoming side of recycled units ``idx``: fresh producer rows, bias 0, BatchNorm channel reset (no grad)."""
    fresh = _fresh(producer, _seed(window, wiring.site), len(idx))
    weight: Tensor = producer.weight  # type: ignore[assignment]
    drawn = fresh["weight"] if fresh["weight"].shape[0] == len(idx) else fresh["weight"][idx]
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


def recycle_units(
    model: nn.Module,
    wiring: SiteWiring,
    indices: list[int],
    window: int,
    touched: dict[int, tuple[Tensor, list[Selection]]],
    before_zeroing: Optional[Callable[[str, Tensor, Selection], None]] = None,
    incoming: bool = True,
    outgoing: bool = True,
) -> tuple[str, ...]:
    """Re-initialise ``indices`` of one site in place (no grad); add the entries touched to ``touched``.

    ``before_zeroing(path, weight, selection)`` is called before a reader's columns are zeroed (the cause of death
    re-bases what it measures of that module, when it also feeds a site). ``incoming``: re-draw the producer's rows
    and reset its bias and BatchNorm channel; ``outgoing``: zero the readers' columns (`Recycler` does every site's
    incoming side first, so that a reader's rows re-drawn for another site keep the zeros).

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
        if incoming:
            _redraw(producer, norm, wiring, idx, window, mark)
        for path, positions in zip(wiring.readers, wiring.positions) if outgoing else ():
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
            if before_zeroing is not None:
                before_zeroing(path, w, selection)
            _fill(w, selection, 0.0)
            mark(w, selection, f"{path}.weight")
    return tuple(names)


class Recycler:
    """The decisions of each recycle call, from the recorder's wiring record (`relumon.wiring.WiringBook`).

    Args:
        book: the recorder's record of the sites' producers and readers.
        before_zeroing: called with ``(path, weight, selection)`` before a reader's columns are zeroed
            (`relumon.cause.CauseTracker.columns_zeroed`).
    """

    def __init__(
        self, book: WiringBook, before_zeroing: Optional[Callable[[str, Tensor, Selection], None]] = None
    ) -> None:
        self._book = book
        self._before_zeroing = before_zeroing

    def remove(self) -> None:
        """Nothing to take off: the record belongs to the recorder. Kept for the monitor's teardown."""

    def recycle(
        self,
        model: nn.Module,
        report: Any,
        optimizers: Sequence[torch.optim.Optimizer],
        criterion: str,
        tau: Optional[float],
    ) -> RecycleResult:
        """Recycle what ``report`` (a closed window) found, where the wiring allows it. See `Monitor.recycle`."""
        units: dict[str, list[int]] = {}
        skipped: dict[str, str] = {}
        parameters: dict[str, tuple[str, ...]] = {}
        touched: dict[int, tuple[Tensor, list[Selection]]] = {}
        plan: list[tuple[str, SiteWiring, list[int]]] = []
        for layer in report:
            candidates = _candidates(layer, criterion, tau)
            if not candidates:
                continue
            site_wiring = self._book.site(layer.name)
            if layer.disabled is not None:
                skipped[layer.name] = f"relumon stopped measuring it after an error ({layer.disabled})"
            elif layer.negative_regime:
                skipped[layer.name] = (
                    f"its {layer.kind} units are stuck in the negative regime, not dead: they still output slope x "
                    "input (not 0) and pass gradient, so zeroing their readers' columns would change what the network "
                    "computes"
                )
            elif not layer.exact:
                skipped[layer.name] = (
                    f"the window was sampled ({layer.unmeasured_calls} calls not measured): a unit that looks "
                    f"{criterion} may have fired on an unmeasured step. Only a window measured on every call "
                    "confirms it (with `recycle=` set relumon measures such sites on every call of the next window; "
                    "or watch with `measure_every=1`)"
                )
            elif site_wiring is None:
                skipped[layer.name] = self._book.why_unknown(layer.name)
            elif site_wiring.problem is not None:
                skipped[layer.name] = site_wiring.problem
            elif (path := site_wiring.replaced(model)) is not None:
                skipped[layer.name] = (
                    f"the model's module `{path}` is not the one relumon recorded in the first training forward (it "
                    "was replaced since), so the wiring it read no longer holds"
                )
            else:
                plan.append((layer.name, site_wiring, candidates))
        # Every site's incoming side first, then every reader's columns: a reader whose rows are re-drawn for another
        # site (a BasicBlock's conv2 reads the first call of `relu` and feeds the second) keeps the zeros for the
        # units it reads, whatever the order of the sites.
        for name, site_wiring, candidates in plan:
            parameters[name] = recycle_units(model, site_wiring, candidates, report.window, touched, outgoing=False)
            units[name] = candidates
        for name, site_wiring, candidates in plan:
            parameters[name] += recycle_units(
                model, site_wiring, candidates, report.window, touched, self._before_zeroing, incoming=False
            )
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
