"""Cause of death: what killed a layer's units, from the optimizer's side: the learning rate, how far the update
moved the producer's weights, how far the dead units' biases moved, and advice built from those facts.

Two halves, like the rest of relumon:

- **At optimizer steps** (the per-step side). Global optimizer step hooks
  (``torch.optim.optimizer.register_optimizer_step_pre_hook`` and ``..._post_hook``) act only for the optimizers in
  [`Monitor.optimizers`][relumon.Monitor], so the list stays a plain, settable one. For each *producer* (the module
  that feeds a watched site, ``fed_by``) whose weight the stepping optimizer holds, they measure
  ``||Δw|| / ||w||`` of that one step, on the device, with no host read:

  - The pre-hook and the post-hook copy a fixed set of at most `SAMPLED_WEIGHTS` elements of each weight (views of
    it, made once) into the next rows of one buffer allocated once: a ``cat`` and a ``stack`` for all producers. A
    weight with at most `SAMPLED_WEIGHTS` elements is taken whole, so its ratio is exact; a larger one is sampled as
    512 chunks of `SAMPLE_CHUNK` contiguous elements (a cache line each), spread evenly in memory order and starting
    in different columns: an estimate of the ratio whose cost does not grow with the model. No whole weight tensor
    is copied.
  - Every `PENDING_STEPS` optimizer steps (fewer once all the copies would pass `PENDING_BYTES`), and before a
    report reads them, the pending steps are folded at once: per producer and step, the norm of the difference over
    the norm before (one ``index_add_`` and one ``vector_norm`` for all producers and steps), and per producer the
    window's largest ratio, the optimizer step that made it and the ``GradScaler``'s scale at that step (``max``,
    ``where``). About fifteen kernels per fold, four per optimizer step, however many producers there are. The
    learning rate of each step is read on the host from ``param_groups`` (plain floats), and kept only when it
    changes.
  - The hooks fire per optimizer step, so gradient accumulation counts optimizer steps, not micro-batches; a step a
    ``GradScaler`` skips (inf/NaN gradients) never calls the optimizer, so it is not counted; weights are never
    scaled, so the ratio needs no unscaling.
  - Until the first training forward has found the producers (Lightning runs it inside the optimizer's closure,
    after the pre-hook), every module whose weight the optimizer holds is measured, once.

- **At report time** (`CauseTracker.attach`, from [`Monitor.report()`][relumon.Monitor.report]). One host transfer
  reads, per producer, its biases and per-unit weight-row norms (O(units)) and the window's largest update. For each
  unit, relumon remembers the bias and row norm at the start of the last window in which the unit lived (its output
  was positive somewhere), and that window's index. For a layer that alerts or whose dead fraction jumps, the
  [`Cause`][relumon.cause.Cause] reads, for the dead units:

  - ``bias_shift``: the mean move of their biases since the start of the last window in which they lived;
  - ``update_ratio``: the producer's largest ``||Δw|| / ||w||`` over one optimizer step in those windows (the update
    that kills a unit often comes in the last window in which it lived: once dead, its weights get no gradient);
  - ``lr`` and ``grad_scale`` at that step; ``advice`` built from these facts.

Under ``torch.distributed`` every rank decides from the same global report (dead masks) and from parameters that
DDP keeps identical, so every rank builds the same cause. Sharded (DTensor) producers are left out of the figures.
Without an optimizer the cause says less: no learning rate and no update ratio; the bias shift is known from the
second closed window on.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from relumon.errors import RelumonWarning, is_strict, warn
from relumon.segments import host_cat, segment_counts, segment_extremes, segment_ids, segment_sums

__all__ = [
    "Cause",
    "CauseTracker",
    "SAMPLED_WEIGHTS",
    "PENDING_STEPS",
    "PENDING_BYTES",
    "HEALTHY_UPDATE_RATIO",
    "advice",
    "advice_for",
    "check_optimizers",
]

#: Weight elements per producer whose change is measured at each optimizer step; a smaller weight is taken whole.
SAMPLED_WEIGHTS = 8192

#: Optimizer steps whose copies a producer bucket keeps before folding them into the window's largest update at once
#: (`_Bucket.flush`): each step then costs its two copies of the measured elements (a ``cat`` and a ``stack`` each),
#: and the fold's dozen kernels are paid once per this many steps.
PENDING_STEPS = 8

#: The most bytes the copies of a tracker's buckets take together: past it, a bucket keeps fewer pending steps (one at
#: least: two copies of every producer's measured elements, which any measurement needs).
PENDING_BYTES = 16 * 2**20

#: The familiar healthy size of one update, ``||Δw|| / ||w||``; ten times it and more reads as a large update.
HEALTHY_UPDATE_RATIO = 1e-3

#: Closed windows of update records kept per producer.
RECORD_WINDOWS = 64


@dataclass(frozen=True)
class Cause:
    """Why a layer's units died: the optimizer's side of the story, measured, and advice built from it.

    Attributes:
        step: the step of the report that found the layer dead (or its dead fraction jump), as in
            ``first_dead_step``.
        units: how many dead units the figures are about (the units that died in this window, else every dead unit).
        windows: closed windows since the start of the last window in which those units lived, this one included;
            None when they were never seen alive.
        fed_by: the producer, the module whose output fed the layer.
        lr: the learning rate of the param group holding the producer's weight, at the step of the largest update;
            None without an optimizer that holds it.
        update_ratio: the producer's largest ``||Δw|| / ||w||`` over one optimizer step in those windows (near 1e-3
            is healthy); None without an optimizer step measured.
        update_step: the optimizer step that made it, counted from 1 per optimizer since it was first measured.
        bias_shift: the mean move of the dead units' biases over those windows (negative: they fell); None without a
            bias, or when no earlier value is known.
        bias: the dead units' mean bias now; None without a bias.
        weight_shift: the mean relative change of the dead units' incoming weight-row norms over those windows
            (``-0.5``: halved); None when unknown.
        grad_scale: the ``GradScaler``'s scale at the step of the largest update, or None.
        advice: a sentence built from the facts above.
        peak_lr: the largest learning rate of the producer's param group in those windows, when it was more than
            ten times ``lr`` (a spike the update figures do not name); else None.
        peak_lr_step: the optimizer step at which ``peak_lr`` took effect.
        own_update: ``||ΔW|| / ||W||`` of the dying units' own incoming rows over the window in which they died,
            exact (for a producer whose update ratio is sampled: a sparse update can miss the sample); else None.
        never_alive: True when none of the units was ever seen alive and neither their biases nor their weight rows
            moved since watching began: they started dead.
    """

    step: int
    units: int
    windows: Optional[int]
    fed_by: Optional[str]
    lr: Optional[float]
    update_ratio: Optional[float]
    update_step: Optional[int]
    bias_shift: Optional[float]
    bias: Optional[float]
    weight_shift: Optional[float]
    grad_scale: Optional[float]
    advice: str
    peak_lr: Optional[float] = None
    peak_lr_step: Optional[int] = None
    own_update: Optional[float] = None
    never_alive: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain data (strict JSON: NaN becomes None)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in dataclasses.asdict(self).items()}


def check_optimizers(value: Any) -> tuple[Optimizer, ...]:
    """``value`` (an optimizer, a sequence of them, or None) as a tuple of optimizers, else TypeError."""
    if value is None:
        return ()
    if isinstance(value, Optimizer):
        return (value,)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        bad = [type(x).__name__ for x in value if not isinstance(x, Optimizer)]
        if not bad:
            return tuple(value)
    else:
        bad = [type(value).__name__]
    hint = (
        " (a Lightning optimizer wraps one: pass `trainer.optimizers`, or let ReluMonitor find them)"
        if any("LightningOptimizer" in name for name in bad)
        else ""
    )
    raise TypeError(f"expected `optimizer` to be a torch.optim.Optimizer, a sequence of them, or None, got {bad}{hint}")


def advice(
    *,
    lr: Optional[float],
    update_ratio: Optional[float],
    update_step: Optional[int],
    bias_shift: Optional[float],
    bias: Optional[float],
    windows: Optional[int],
    grad_scale: Optional[float],
    fed_by: Optional[str],
    negative_regime: bool,
    has_optimizer: bool,
    newly_dead: Optional[int] = None,
    never_alive: bool = False,
    peak_lr: Optional[float] = None,
    peak_lr_step: Optional[int] = None,
    own_update: Optional[float] = None,
) -> str:
    """The cause's sentence from facts given one by one, named as `Cause`'s fields: `advice_for` on a `Cause` that
    holds them (the other fields play no part).

    ``newly_dead``: when the figures are about the units that died in this window only (others died earlier), their
    number, so the sentence says whose biases moved. ``never_alive``: the units were never seen alive and their
    weights never moved (the advice then points at the init and the input's scale, not the learning rate).
    ``peak_lr``: a learning rate more than ten times ``lr`` held in those windows (a spike), at ``peak_lr_step``.
    ``own_update``: the dying units' own rows' exact ``||ΔW|| / ||W||`` over their last window, when the update
    ratio is sampled.
    """
    facts = Cause(
        step=0,
        units=0,
        windows=windows,
        fed_by=fed_by,
        lr=lr,
        update_ratio=update_ratio,
        update_step=update_step,
        bias_shift=bias_shift,
        bias=bias,
        weight_shift=None,
        grad_scale=grad_scale,
        advice="",
        peak_lr=peak_lr,
        peak_lr_step=peak_lr_step,
        own_update=own_update,
        never_alive=never_alive,
    )
    return advice_for(facts, negative_regime=negative_regime, has_optimizer=has_optimizer, newly_dead=newly_dead)


def advice_for(cause: Cause, *, negative_regime: bool, has_optimizer: bool, newly_dead: Optional[int] = None) -> str:
    """The sentence of ``cause`` (its ``advice``): the facts that are known, then what to change, chosen by those facts.

    Reads ``cause``'s ``lr``, ``update_ratio``, ``update_step``, ``bias_shift``, ``bias``, ``windows``,
    ``grad_scale``, ``fed_by``, ``never_alive`` (the units were never seen alive and their weights never moved: the
    advice then points at the init and the input's scale, not the learning rate), ``peak_lr`` (a learning rate more
    than ten times ``lr`` held in those windows: a spike, at ``peak_lr_step``) and ``own_update`` (the dying units'
    own rows' exact ``||ΔW|| / ||W||`` over their last window, when the update ratio is sampled).

    Args:
        cause: the facts.
        negative_regime: whether the layer's activation passes negative values (no LeakyReLU advice then).
        has_optimizer: whether relumon knows an optimizer (else the advice asks for ``optimizer=``).
        newly_dead: when the figures are about the units that died in this window only (others died earlier),
            their number, so the sentence says whose biases moved.
    """
    lr, update_ratio, update_step = cause.lr, cause.update_ratio, cause.update_step
    bias_shift, bias, windows = cause.bias_shift, cause.bias, cause.windows
    grad_scale, fed_by, own_update = cause.grad_scale, cause.fed_by, cause.own_update
    peak_lr, peak_lr_step, never_alive = cause.peak_lr, cause.peak_lr_step, cause.never_alive
    facts = []
    feeder = f"`{fed_by}`" if fed_by else "the layer feeding it"
    if bias_shift is not None and bias is not None:
        span = (
            "within one window" if windows == 1 else f"within {windows} windows" if windows else "since watching began"
        )
        moved = "fell" if bias_shift < 0 else "rose" if bias_shift > 0 else "did not move"
        size = f" by {abs(bias_shift):.3g}" if bias_shift != 0 else ""
        whose = (
            f"the biases of the {newly_dead} unit{'s' if newly_dead != 1 else ''} that died in this window"
            if newly_dead is not None
            else "the dead units' biases"
        )
        facts.append(f"{whose} {moved}{size} {span} (mean now {bias:.3g})")
    if update_ratio is not None:
        at = f" at optimizer step {update_step}" if update_step is not None else ""
        lr_text = f", lr {lr:.3g}" if lr is not None else ""
        facts.append(f"the largest update of {feeder} was ||Δw||/||w|| = {update_ratio:.2g}{at}{lr_text}")
    elif lr is not None:
        facts.append(f"lr {lr:.3g}")
    if own_update is not None and (update_ratio is None or own_update > update_ratio):
        facts.append(
            f"their own incoming rows moved by ||ΔW||/||W|| = {own_update:.2g} within the window they died in "
            "(measured exactly; the layer's update ratio is sampled)"
        )
    spike = peak_lr is not None and lr is not None and peak_lr > 10 * lr
    if spike and peak_lr is not None and lr is not None:
        at = f" at optimizer step {peak_lr_step}" if peak_lr_step is not None else ""
        # lr 0 at the named step (a warm-up's first step, a schedule's last) makes no ratio: name both rates.
        times = f"{peak_lr / lr:,.0f} times the lr {lr:.3g} above" if lr > 0 else f"while the lr above was {lr:.3g}"
        facts.append(f"the learning rate reached {peak_lr:.3g}{at}, {times}")
    if grad_scale is not None:
        facts.append(f"loss scale {grad_scale:g} (figures unscaled)")
    large = update_ratio is not None and update_ratio >= 10 * HEALTHY_UPDATE_RATIO
    if own_update is not None and own_update >= 10 * HEALTHY_UPDATE_RATIO and not large:
        large, update_ratio = True, own_update
    if never_alive:
        remedy = (
            "they were never alive since watching began and their weights and biases never moved, so no update "
            f"killed them: they started dead. Check the init of {feeder} (its bias and weight scale) and the input's "
            "scale (normalisation), not the learning rate"
        )
    elif spike and peak_lr is not None:
        remedy = (
            f"the learning rate spiked to {peak_lr:.3g} in these windows: check the schedule (a warm-up or a step "
            "that multiplies the rate), or clip gradients"
        )
        if not negative_regime:
            remedy += "; LeakyReLU(0.01) would keep gradients flowing"
    elif large and update_ratio is not None:
        target = ""
        if lr is not None and update_ratio > 0 and math.isfinite(update_ratio):
            target = f" (about {lr * HEALTHY_UPDATE_RATIO / update_ratio:.2g} would make it 1e-3)"
        times = f"{update_ratio / HEALTHY_UPDATE_RATIO:,.0f}" if math.isfinite(update_ratio) else "infinitely many"
        remedy = (
            f"that is {times} times the healthy 1e-3: lower the learning rate{target} or warm it up, or clip gradients"
        )
        if not negative_regime:
            remedy += "; LeakyReLU(0.01) would keep gradients flowing"
    elif bias_shift is not None and bias_shift < 0 and update_ratio is not None:
        remedy = (
            "the updates were modest, so the biases drifted down rather than jumped: check weight decay, the input's "
            f"scale (normalisation) and the init of {feeder}"
        )
    elif bias_shift is not None and bias_shift >= 0 and (update_ratio is None or not large):
        remedy = (
            f"the biases did not fall, so the units' input moved, or they started dead: check the init of {feeder} and "
            "the layers before it"
        )
    else:
        remedy = f"try a lower learning rate, LeakyReLU, or the init or bias of {feeder}"
    if not has_optimizer:
        remedy += (
            "; pass `optimizer=` to relumon.watch (ReluMonitor finds the Trainer's) to see the learning rate and "
            "update size"
        )
    text = "; ".join(facts)
    return (text[0].upper() + text[1:] + ": " if text else "") + remedy + "."


# --------------------------------------------------------------------------- the per-step side


#: Contiguous elements per sampled chunk: one 64-byte cache line of fp32, so a sample costs few memory reads.
SAMPLE_CHUNK = 16


def _sample_stride(weight: Tensor) -> int:
    """The distance between the sampled chunks of `SAMPLE_CHUNK` elements: 0 takes the whole weight (at most
    `SAMPLED_WEIGHTS` elements); else chunks spread evenly over the weight, with a stride prime to the row length so
    that they start in different columns."""
    numel = weight.numel()
    if numel <= SAMPLED_WEIGHTS:
        return 0
    chunks = SAMPLED_WEIGHTS // SAMPLE_CHUNK
    stride = (numel - SAMPLE_CHUNK) // (chunks - 1)
    row = max(numel // max(weight.shape[0], 1), 1)
    while stride > SAMPLE_CHUNK and math.gcd(stride, row) != 1:
        stride -= 1
    return stride


#: The unit roundoff of float64 (half its machine epsilon): the largest relative error of one addition.
ROUNDING = 2.0**-53


def _mean_move(total: float, count: float, size: float) -> Optional[float]:
    """The mean of ``count`` moves that sum to ``total`` (their absolute values to ``size``), or None without one.

    Moves that cancel leave a sum at the scale of float64 rounding, whose sign depends on the order of the addition
    (and chose the advice: "fell" or "did not move"). A sum no larger than the rounding error that adding ``count``
    values can make, ``(count - 1) * 2**-53 * size``, may be exactly such a sum of moves that cancel: it is no move
    at all, 0. A larger sum is a move, whatever the order.
    """
    if not count:
        return None
    if math.isfinite(size) and abs(total) <= (count - 1) * ROUNDING * size:
        total = 0.0
    return total / count


def _flat(weight: Tensor) -> Optional[Tensor]:
    """A 1-D view of ``weight`` in memory order (contiguous or channels-last), or None: no copy, ever."""
    w = weight.detach()
    if w.is_contiguous():
        return w.view(-1)
    for memory_format, order in ((torch.channels_last, (0, 2, 3, 1)), (torch.channels_last_3d, (0, 2, 3, 4, 1))):
        if w.ndim == len(order) and w.is_contiguous(memory_format=memory_format):
            return w.permute(order).reshape(-1)  # a view: the permuted tensor is contiguous
    return None


#: One closed window's largest update of a producer: (window, ratio, its optimizer step, lr, grad scale).
_Record = tuple[int, float, Optional[int], Optional[float], Optional[float]]


class _Producer:
    """A module that feeds a watched site: its parameters, what is measured per step and per window."""

    def __init__(self, path: str, module: nn.Module, window: int, before_updates: bool, snapshot: bool = True) -> None:
        self.path = path
        self.module_ref = weakref.ref(module)
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        own = module._parameters  # a dict, but for a TorchScript module (a wrapper without `.get`)
        if not isinstance(own, dict):
            own = dict(module.named_parameters(recurse=False))
        if own.get("weight") is not weight:
            # Computed from other tensors (a weight_norm or spectral_norm parametrization): each read is a new tensor,
            # so one kept here would never move. Its update ratio and row norms are left unknown, not read as 0.
            weight = None
        if own.get("bias") is not bias:
            bias = None
        self.weight: Optional[Tensor] = weight if _measurable(weight) else None
        self.bias: Optional[Tensor] = (
            bias if isinstance(bias, Tensor) and _measurable(bias) and bias.ndim == 1 else None
        )
        if self.weight is not None and _flat(self.weight) is None:
            self.weight = None  # an unusual memory layout: sampling it would copy it, so it is left out
        #: Whether the weight has one row per unit along dim 0 (a transposed conv's dim 0 is its input channels).
        self.has_rows = self.weight is not None and not isinstance(module, nn.modules.conv._ConvTransposeNd)
        self.stride = _sample_stride(self.weight) if self.weight is not None else 0
        #: Biases and row norms at the start of window `start_window` (device tensors until a report reads them).
        self.start_bias: Optional[Tensor] = None
        self.start_rows: Optional[Tensor] = None
        #: The window whose start the snapshot is; a snapshot taken after updates of its window is not a start.
        self.start_window = window if before_updates else window + 1
        if snapshot:  # else the caller sets the start figures (a report, from the values it reads anyway)
            self.snapshot()
        #: (window, largest ratio, its optimizer step, lr, grad scale) of each closed window, newest last.
        self.records: deque[_Record] = deque(maxlen=RECORD_WINDOWS)
        #: (window, largest lr, the optimizer step it took effect) of each closed window, newest last.
        self.peaks: deque[tuple[int, float, int]] = deque(maxlen=RECORD_WINDOWS)
        #: A sampled weight's copy at the start of window `start_window` (device), so the dying units' own rows are
        #: measured exactly at the report; None for a weight measured whole.
        self.start_weight: Optional[Tensor] = None
        self.keep_start_weight()

    def keep_start_weight(self) -> None:
        """Copy a sampled weight at a window's start (report time; on the device, no host read)."""
        if self.weight is not None and self.stride and self.weight.ndim >= 1:
            with torch.no_grad():
                if self.start_weight is not None and self.start_weight.shape == self.weight.shape:
                    self.start_weight.copy_(self.weight.detach())
                else:
                    self.start_weight = self.weight.detach().clone()

    def own_update(self, rows: Tensor, start: Optional[Tensor]) -> Optional[float]:
        """``||W[rows] - start[rows]|| / ||start[rows]||`` (report time), or None when unknown."""
        weight = self.weight
        if weight is None or start is None or start.shape != weight.shape or not bool(rows.any()):
            return None
        with torch.no_grad():
            where = rows.nonzero().flatten().to(weight.device)
            now, then = weight.detach().index_select(0, where).double(), start.index_select(0, where).double()
            moved = torch.linalg.vector_norm(now - then) / torch.linalg.vector_norm(then).clamp_min(1e-30)
        value = float(moved)
        return value if math.isfinite(value) else None

    def snapshot(self) -> None:
        with torch.no_grad():
            self.start_bias = self.bias.detach().clone() if self.bias is not None else None
            self.start_rows = self.row_norms()

    def row_norms(self) -> Optional[Tensor]:
        """Per-unit norms of the incoming weights (rows along dim 0), float32, on the device."""
        weight = self.weight
        if weight is None or weight.ndim == 0 or not self.has_rows:
            return None
        # One row per unit, reshaped (a copy for a channels-last weight), so that the sum runs in the same order
        # whatever the layout: the norms of a weight that did not move must not change when its layout does.
        rows = weight.detach().reshape(weight.shape[0], -1)
        # vector_norm accumulates in float32 for low precision, but refuses to narrow float64: reduce those as they
        # are, then convert.
        wide = rows.dtype == torch.float64
        norms: Tensor = torch.linalg.vector_norm(rows, dim=1, dtype=None if wide else torch.float32)
        return norms.float() if wide else norms


def _measurable(t: Any) -> bool:
    """A plain (not sharded) floating-point tensor with elements."""
    return (
        isinstance(t, Tensor)
        and t.is_floating_point()
        and t.numel() > 0
        and not callable(getattr(t, "full_tensor", None))
    )


class _Bucket:
    """The producers one optimizer steps on one device, measured together: a fixed number of kernels per optimizer
    step, however many producers there are.

    Before and after each optimizer step the measured elements of every producer (its whole weight, or its sampled
    chunks) are copied into a row of one buffer (one ``cat`` for the whole weights, one ``stack`` for the sampled
    ones): row ``2 i`` before pending step ``i``, row ``2 i + 1`` after it. Every `capacity` steps, and before
    anything reads the window's figures, `flush` folds the pending steps at once: per producer and step, the norm of
    the update over the norm before (one ``index_add_`` for whole weights of various lengths, one ``vector_norm`` for
    sampled weights, all `SAMPLED_WEIGHTS` long), and the window's largest of them. None reads the device on the
    host. Producers are kept in that order: whole weights first.

    The copy before a step is taken in the pre-hook, every step: whatever changed the weights since the last step
    (an in-place edit, ``w.data``, a collective, recycling) is never read as the optimizer's update.

    The views of the weights are made once per window, and made again when a weight's storage moved
    (``param.data = ...``, ``model.to(...)``, a swap by a sharding wrapper, an optimizer that assigns new tensors in
    its step), which one ``data_ptr()`` per weight tells at each pre- and post-hook.
    """

    def __init__(self, producers: list[_Producer], group_of: list[int], budget: Optional[int] = None) -> None:
        order = sorted(range(len(producers)), key=lambda i: producers[i].stride != 0)  # whole weights first
        self.producers = [producers[i] for i in order]
        self.group_of = [group_of[i] for i in order]  # the param group index of each producer's weight
        weights = [p.weight for p in self.producers]
        assert all(w is not None for w in weights)
        self.weights: list[Tensor] = [w for w in weights if w is not None]
        self.strides = [p.stride for p in self.producers]
        self._whole = sum(1 for stride in self.strides if not stride)
        device = self.weights[0].device
        self._ptrs: list[int] = []
        self._views: list[Tensor] = []
        self._lengths: list[int] = []
        views = self._samples()
        self._lengths = [view.numel() for view in views]
        self._whole_elements = sum(self._lengths[: self._whole])
        # Which producer each element of the whole weights' part belongs to, for the per-producer sums (made on the
        # device by fills: no copy from the host, which a GPU would count as a sync).
        self._owners = torch.cat(
            [torch.full((n,), i, dtype=torch.int64, device=device) for i, n in enumerate(self._lengths[: self._whole])]
            or [torch.zeros(0, dtype=torch.int64, device=device)]
        )
        wide = self.weights[0].dtype == torch.float64
        # Copies in float32 (float64 for float64 weights): a bf16 or fp16 weight converts exactly.
        dtype = torch.float64 if wide else torch.float32
        elements = sum(self._lengths)
        #: Optimizer steps kept before a fold: `PENDING_STEPS`, fewer where their copies would pass ``budget`` (what
        #: is left of `PENDING_BYTES` for all of the tracker's buckets), one at least.
        room = PENDING_BYTES if budget is None else budget
        self.capacity = max(1, min(PENDING_STEPS, room // max(2 * elements * dtype.itemsize, 1)))
        #: Row ``2 i``: the measured elements before pending step ``i``; row ``2 i + 1``: after it.
        self.copies = torch.empty(2 * self.capacity, elements, dtype=dtype, device=device)
        sampled = len(views) - self._whole
        #: Per row of `copies`: its whole weights' part and its sampled part, shaped as the copy writes them.
        self._row_views: list[tuple[Optional[Tensor], Optional[Tensor]]] = [
            (
                row[: self._whole_elements] if self._whole else None,
                row[self._whole_elements :].view(sampled, *views[-1].shape) if sampled else None,
            )
            for row in self.copies
        ]
        #: Optimizer steps copied before and after and not folded into the window's figures yet (`flush`).
        self._pending = 0
        #: The optimizer step of pending step 0 (pending steps are consecutive).
        self._first_step = 0
        #: The ``GradScaler``'s scale at each pending step (NaN without one), and whether any pending step had one.
        self._scales = torch.full((self.capacity,), math.nan, dtype=torch.float32, device=device)
        self._scaled = False
        n = len(producers)
        #: Per producer, the window's largest ``||Δw|| / ||w||`` (float64, like the norms it comes from), up to the
        #: last `flush` (see `flush` for NaN and inf); -1 before any step.
        self.max_ratio = torch.full((n,), -1.0, dtype=torch.float64, device=device)
        self.max_step = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.max_scale = torch.full((n,), math.nan, dtype=torch.float32, device=device)
        #: Whether the pre-hook copied the weights for a step whose post-hook has not run yet.
        self.armed = False

    def carry_over(self, old: _Bucket) -> None:
        """Keep the window's figures of producers that were measured before a refresh (device copies only)."""
        old.flush()
        at = {p.path: i for i, p in enumerate(old.producers)}
        for j, producer in enumerate(self.producers):
            i = at.get(producer.path)
            if i is not None and old.max_ratio.device == self.max_ratio.device:
                self.max_ratio[j : j + 1].copy_(old.max_ratio[i : i + 1])
                self.max_step[j : j + 1].copy_(old.max_step[i : i + 1])
                self.max_scale[j : j + 1].copy_(old.max_scale[i : i + 1])

    def _samples(self) -> list[Tensor]:
        """Views of the measured elements: 1-D for a whole weight, ``(chunks, SAMPLE_CHUNK)`` strided for a sampled
        one. Made again only when a weight's storage moved."""
        ptrs = [w.data_ptr() for w in self.weights]
        if ptrs == self._ptrs:
            return self._views
        views = []
        for weight, stride in zip(self.weights, self.strides):
            flat = _flat(weight)
            if flat is None:
                raise RuntimeError(f"a producer's weight {tuple(weight.shape)} changed to a layout with no flat view")
            if stride:
                chunks = SAMPLED_WEIGHTS // SAMPLE_CHUNK
                flat = flat.as_strided((chunks, SAMPLE_CHUNK), (stride, 1), flat.storage_offset())
            views.append(flat)
        if self._lengths and [v.numel() for v in views] != self._lengths:
            raise RuntimeError("a producer's weight changed size since relumon found it")
        self._views, self._ptrs = views, ptrs
        return views

    def _copy(self, row: int) -> None:
        """The measured elements of every producer, now, into row ``row`` of `copies` (two kernels, into views of the
        row made once: inside a training step even a view costs as much as a small kernel)."""
        views = self._samples()
        whole = self._whole
        into_whole, into_sampled = self._row_views[row]
        with torch.no_grad():
            if into_whole is not None:
                torch.cat(views[:whole], out=into_whole)
            if into_sampled is not None:
                torch.stack(views[whole:], out=into_sampled)

    def _norms(self, rows: Tensor) -> Tensor:
        """Per row of ``rows`` (copies laid out like `copies`' rows) and producer, the norm of the producer's part, as
        a ``(rows, producers)`` tensor (float64 with whole weights; else the copies' dtype).

        Whole weights are summed element by element in float64 (``index_add_``), so their ratio is exact; the sampled
        rows by ``vector_norm``, which accumulates float32 in blocks (float64 for float64 weights)."""
        m = rows.shape[0]
        parts = []
        if self._whole:
            whole = rows[:, : self._whole_elements]
            squares = whole.double().square_() if whole.dtype != torch.float64 else whole.square()
            sums = torch.zeros(m, self._whole, dtype=torch.float64, device=rows.device)
            parts.append(sums.index_add_(1, self._owners, squares).sqrt_())
        if len(self.weights) > self._whole:
            sampled = rows[:, self._whole_elements :].reshape(m, len(self.weights) - self._whole, -1)
            parts.append(torch.linalg.vector_norm(sampled, dim=2))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # cat promotes the sampled norms to float64

    def before(self) -> None:
        """Pre-hook: copy the weights as they are before this step into the next free row. No host read."""
        self._copy(2 * self._pending)
        self.armed = True

    def after(self, step: int, scale: Optional[Tensor]) -> None:
        """Post-hook: copy the weights after optimizer step ``step`` beside the copy before it (``scale``: the
        ``GradScaler``'s, or None), folding the pending steps when the rows are full. No host read."""
        if not self.armed:
            return
        if self._pending and step != self._first_step + self._pending:
            self.flush()  # the pending steps are consecutive, so that a row's step is known from its index
        if not self._pending:
            self._first_step = step
        at = self._pending
        # Views checked again, not the pre-hook's: an optimizer may assign new tensors in its step
        # (``p.data = p.data - lr * grad``), and the old views would read the old storage, a ratio of 0.
        self._copy(2 * at + 1)
        if scale is not None and scale.device == self._scales.device:
            with torch.no_grad():
                self._scales[at : at + 1].copy_(scale.reshape(1))
            self._scaled = True
        self.armed = False
        self._pending = at + 1
        if self._pending == self.capacity:
            self.flush()

    def flush(self) -> None:
        """Fold the pending optimizer steps into the window's largest update per producer (kernels only, no host
        read). Idempotent.

        An update that overflows (a ratio of inf) is the largest; a NaN ratio (NaN weights: no update can be measured)
        ranks below every other, so a diverging window names the step that blew up, and NaN only when no step of the
        window had a measurable update. The ratio kept is the named step's own. A copy taken for a step whose
        post-hook has not run yet (a report between the hooks) moves to row 0.
        """
        n = self._pending
        if not n:
            return
        self._pending = 0
        with torch.no_grad():
            before_rows, after_rows = self.copies[0 : 2 * n : 2], self.copies[1 : 2 * n : 2]
            before = self._norms(before_rows)
            update = self._norms(after_rows - before_rows)
            ratio = update.div_(before.clamp_min_(1e-30))  # (steps, producers)
            best, at = _rank(ratio).max(dim=0)  # the first step that reached the largest one
            larger = best > _rank(self.max_ratio)
            torch.where(larger, ratio.gather(0, at.unsqueeze(0)).squeeze(0), self.max_ratio, out=self.max_ratio)
            torch.where(larger, at + self._first_step, self.max_step, out=self.max_step)
            # The scale of the step that made the largest update: NaN for a step taken without one.
            torch.where(larger, self._scales[:n][at], self.max_scale, out=self.max_scale)
            if self._scaled:
                self._scales.fill_(math.nan)
                self._scaled = False
            if self.armed:
                self.copies[0].copy_(self.copies[2 * n])

    def reset(self) -> None:
        """Start a new window. The views of the weights are let go too (made again at the next hook, once per window):
        a view holds its weight's storage, so one kept after ``model.half()`` or ``model.cpu()`` would keep the old
        weights in memory; let go here, they live at most until the window closes or the monitor goes. Steps still
        pending belong to the window that closes (a report `flush`es before it reads), so they are folded and let go
        with it."""
        self.flush()
        self._views, self._ptrs = [], []
        self.max_ratio.fill_(-1.0)
        self.max_step.fill_(-1)
        self.max_scale.fill_(math.nan)


def _rank(ratio: Tensor) -> Tensor:
    """How update ratios compare: as they are, inf the largest, and NaN (not measurable) below every real ratio but
    above the -1 of a window with no step yet."""
    return ratio.nan_to_num(nan=-0.5, posinf=math.inf)


class _StepGroup:
    """What relumon measures for one optimizer: its buckets, its step count and its learning rates."""

    def __init__(self, key: tuple[int, int], buckets: list[_Bucket], steps: int = 0) -> None:
        self.key = key
        self.buckets = buckets
        self.steps = steps
        #: (first optimizer step, lr of each param group), appended when the rates change.
        self.lrs: list[tuple[int, tuple[Any, ...]]] = []

    def log_lrs(self, optimizer: Optimizer) -> None:
        rates = tuple(group.get("lr") for group in optimizer.param_groups)
        if any(isinstance(r, Tensor) for r in rates):  # a tensor lr: keep its value of this step, on the device
            self.lrs.append((self.steps + 1, tuple(r.detach().clone() if isinstance(r, Tensor) else r for r in rates)))
        elif not self.lrs or self.lrs[-1][1] != rates:
            self.lrs.append((self.steps + 1, rates))

    def lr_at(self, step: int, group: int) -> Optional[float]:
        rate = None
        for first, rates in self.lrs:
            if first > step:
                break
            rate = rates[group] if group < len(rates) else None
        if isinstance(rate, Tensor):
            return float(rate)  # report time
        return float(rate) if isinstance(rate, (int, float)) else None

    def peak_lr(self, group: int) -> Optional[tuple[float, int]]:
        """The largest rate of param group ``group`` in the open window, and the optimizer step it took effect."""
        best: Optional[tuple[float, int]] = None
        for first, rates in self.lrs:
            rate = rates[group] if group < len(rates) else None
            value = float(rate) if isinstance(rate, (int, float, Tensor)) else None
            if value is not None and math.isfinite(value) and (best is None or value > best[0]):
                best = (value, first)
        return best

    def forget_lrs(self) -> None:
        """After a window closed: only the rate in force is still needed."""
        del self.lrs[:-1]


class _SiteMemory:
    """Per unit of a site: the bias and row norm at the start of the last window it lived in, and that window."""

    def __init__(self, units: int, blank: Optional[tuple[Tensor, Tensor, Tensor]] = None) -> None:
        #: ``blank``: the three per-unit tensors, unknown everywhere (`many` hands out views of shared buffers).
        self.bias, self.rows, self.alive_window = blank if blank is not None else self._blank(units)
        #: For a sampled producer weight: each unit's incoming row at the start of the last window it lived in
        #: (device, NaN where unknown), so the update that killed it is measured exactly at the report.
        self.weight: Optional[Tensor] = None

    @staticmethod
    def _blank(units: int) -> tuple[Tensor, Tensor, Tensor]:
        """Bias and row norm unknown (NaN), never seen alive (-1), for ``units`` units."""
        return (
            torch.full((units,), math.nan, dtype=torch.float64),
            torch.full((units,), math.nan, dtype=torch.float64),
            torch.full((units,), -1, dtype=torch.int64),
        )

    @classmethod
    def many(cls, units: Sequence[int]) -> list[_SiteMemory]:
        """Memories of many sites at once (a first report meets every site): each tensor a view of one buffer made
        for all of them, since three small allocations per site add up at thousands of sites. The memory is only
        ever written in place or replaced whole, so a view stays its site's own; nothing saves it."""
        sizes = list(units)
        bias, rows, alive = (torch.split(buffer, sizes) for buffer in cls._blank(sum(sizes)))
        return [cls(n, blank) for n, blank in zip(sizes, zip(bias, rows, alive))]


class _Hook:
    """A global optimizer step hook that calls the tracker only for the monitor's optimizers (weakly held)."""

    def __init__(self, tracker: CauseTracker, after: bool) -> None:
        self._tracker = weakref.ref(tracker)
        self._after = after

    # Never traced: under a compiled optimizer step the hooks' Python state (a row index that changes every step)
    # would be guarded on and recompile them at every step until Dynamo's recompile limit. They launch a few kernels
    # per step, which a compiled graph would not make cheaper. (Disabled here, on the hook itself: a frame Dynamo
    # skips runs with the frames it calls still traced.)
    @torch.compiler.disable  # type: ignore[untyped-decorator]
    def __call__(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        tracker = self._tracker()
        if tracker is None or not any(o is optimizer for o in tracker.optimizers()):
            return None
        try:
            if self._after:
                tracker.after_step(optimizer)
            else:
                tracker.before_step(optimizer)
        except Exception as err:
            if is_strict():
                raise
            tracker.disable(err)
        return None


class CauseTracker:
    """Measures what the cause of death needs at optimizer steps, and builds [`Cause`][relumon.cause.Cause] at reports.

    Args:
        model: the watched model.
        sites: the recorder's call sites (a live list: sites discovered later are picked up).
        optimizers: returns the optimizers to measure (the monitor's ``optimizers`` list).
        grad_scaler: the ``GradScaler`` in use, or None.
    """

    def __init__(
        self,
        model: nn.Module,
        sites: list[Any],
        optimizers: Callable[[], Iterable[Any]],
        grad_scaler: Optional[Any] = None,
    ) -> None:
        self._model = weakref.ref(model)
        self._sites = sites
        self.optimizers = optimizers
        self._grad_scaler = grad_scaler
        self._groups: weakref.WeakKeyDictionary[Optimizer, _StepGroup] = weakref.WeakKeyDictionary()
        self._producers: dict[str, _Producer] = {}
        self._memory: dict[str, _SiteMemory] = {}
        self._window = 0
        self._disabled: Optional[str] = None
        #: The open window's largest lr per producer: (window, lr, optimizer step).
        self._peaks: dict[str, tuple[int, float, int]] = {}
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._handles = [
            register_optimizer_step_pre_hook(_Hook(self, after=False)),
            register_optimizer_step_post_hook(_Hook(self, after=True)),
        ]

    # ------------------------------------------------------------------ optimizer steps

    def before_step(self, optimizer: Optimizer) -> None:
        """Pre-hook: snapshot the sampled weights of the producers ``optimizer`` holds. No host read."""
        if self._disabled is not None:
            return
        key = (len(self._sites), len(optimizer.param_groups))
        group = self._groups.get(optimizer)
        if group is None or group.key != key:
            group = self._refresh(optimizer, key, group)
        group.log_lrs(optimizer)
        for bucket in group.buckets:
            bucket.before()

    def after_step(self, optimizer: Optimizer) -> None:
        """Post-hook: fold ``||Δw|| / ||w||`` of this step into the window's largest, per producer. No host read."""
        group = self._groups.get(optimizer)
        if group is None or self._disabled is not None:
            return
        group.steps += 1
        scale = self._scale()
        for bucket in group.buckets:
            bucket.after(group.steps, scale)

    def _scale(self) -> Optional[Tensor]:
        scaler = self._grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        scale: Optional[Tensor] = getattr(scaler, "_scale", None)  # the live tensor: `get_scale()` would sync
        return scale

    def _producer_paths(self) -> list[str]:
        paths = []
        for site in list(self._sites):
            if site.fed_by is not None and site.counts_dead and site.fed_by not in paths:
                paths.append(site.fed_by)
        return paths

    def _producer(self, path: str, before_updates: bool, snapshot: bool = True) -> Optional[_Producer]:
        producer = self._producers.get(path)
        if producer is None:
            model = self._model()
            try:
                module = model.get_submodule(path) if model is not None else None
            except AttributeError:
                module = None
            if module is None:
                return None
            producer = self._producers[path] = _Producer(path, module, self._window, before_updates, snapshot)
        return producer

    def _refresh(self, optimizer: Optimizer, key: tuple[int, int], old: Optional[_StepGroup]) -> _StepGroup:
        """The producers ``optimizer`` steps: those of the sites found so far, or, before any, every module whose
        weight it holds (Lightning's first forward runs inside the optimizer's closure, after this hook)."""
        group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        paths = self._producer_paths()
        if not paths:
            model = self._model()
            if model is not None:
                paths = [
                    name
                    for name, module in model.named_modules()
                    if id(getattr(module, "weight", None)) in group_of and name
                ]
        by_device: dict[tuple[torch.device, bool], tuple[list[_Producer], list[int]]] = {}
        for path in paths:
            producer = self._producer(path, before_updates=True)
            if producer is None or producer.weight is None or id(producer.weight) not in group_of:
                continue
            where = (producer.weight.device, producer.weight.dtype == torch.float64)
            members, groups = by_device.setdefault(where, ([], []))
            members.append(producer)
            groups.append(group_of[id(producer.weight)])
        # The copies of every bucket the tracker holds share `PENDING_BYTES` (past it, a bucket keeps one step): one
        # optimizer per parameter (optimizer steps in backward) makes a bucket each.
        budget = PENDING_BYTES - sum(
            b.copies.nbytes for g in list(self._groups.values()) if g is not old for b in g.buckets
        )
        buckets = []
        for members, groups in by_device.values():
            buckets.append(_Bucket(members, groups, budget=max(budget, 0)))
            budget -= buckets[-1].copies.nbytes
        group = _StepGroup(key, buckets, old.steps if old is not None else 0)
        if old is not None:
            group.lrs = old.lrs
            for bucket in buckets:
                for previous in old.buckets:
                    bucket.carry_over(previous)
        self._groups[optimizer] = group
        return group

    def disable(self, err: BaseException) -> None:
        """Stop measuring after an unexpected error, saying so once: the training goes on."""
        if self._disabled is None:
            self._disabled = f"{type(err).__name__}: {err}"
            warn(
                f"relumon: an error inside relumon's optimizer step hooks ({self._disabled}); the cause of death "
                "goes on without learning rates and update sizes. Training is not affected.",
                RelumonWarning,
            )

    # ------------------------------------------------------------------ report time

    def attach(self, layers: Sequence[Any], wanted: set[str], *, window: int, step: int, close: bool) -> list[Any]:
        """``layers`` (LayerReports of one window) with ``cause`` set on those named in ``wanted``.

        Reads the producers' state to the host once. With ``close``, folds the window into each unit's memory and
        starts the next window's records.
        """
        self._window = window
        sites = {layer.name: layer for layer in layers if layer.fed_by is not None and layer.counts_dead}
        paths = {layer.fed_by for layer in sites.values()}
        found = [path for path in paths if path not in self._producers]
        for path in found:  # their start figures are the values read below
            self._producer(path, before_updates=False, snapshot=False)
        # Modules measured only until the first forward found the real producers (see `_refresh`) are let go.
        self._producers = {path: p for path, p in self._producers.items() if path in paths}
        producers = list(self._producers.values())
        if not producers:
            return list(layers)
        buckets = [(group, b) for group in list(self._groups.values()) for b in group.buckets]
        for _, bucket in buckets:
            bucket.flush()  # the window's figures hold every optimizer step so far
        now = self._read(producers, buckets)
        for path in found:
            if path in self._producers:  # found at this report: its snapshot is what was just read
                figures = now[path]
                figures["start_bias"], figures["start_rows"] = figures["bias"], figures["rows"]
                self._producers[path].start_bias, self._producers[path].start_rows = figures["bias"], figures["rows"]
        records = self._window_records(buckets, now, window, close)
        met = [(name, layer) for name, layer in sites.items() if name not in self._memory]
        for (name, layer), memory in zip(met, _SiteMemory.many([layer.units for _, layer in met])):
            self._memory[name] = self._first_memory(memory, self._producers[layer.fed_by], now, window)
        explained = [layer for layer in layers if layer.name in wanted and layer.name in sites]
        causes = dict(zip((layer.name for layer in explained), self._causes(explained, now, records, step, window)))
        out = [layer.replace(cause=causes[layer.name]) if layer.name in causes else layer for layer in layers]
        if close:
            for name, layer in sites.items():
                if layer.samples > 0:
                    self._remember(self._memory[name], layer, self._producers[layer.fed_by], now, window)
            for producer in producers:
                producer.start_bias, producer.start_rows = now[producer.path]["bias"], now[producer.path]["rows"]
                producer.start_window = window + 1
                if producer.path in records:
                    producer.records.append(records[producer.path])
                if producer.path in self._peaks:
                    producer.peaks.append(self._peaks[producer.path])
                producer.keep_start_weight()
            for group, bucket in buckets:
                bucket.reset()
                group.forget_lrs()
        return out

    def _read(
        self, producers: list[_Producer], buckets: list[tuple[_StepGroup, _Bucket]]
    ) -> dict[str, dict[str, Optional[Tensor]]]:
        """Everything report time needs from the device, read to the host in one transfer per device (float64).

        Each value is relumon's own host tensor, never a live parameter of a CPU model. The window's start figures
        (``start_bias``, ``start_rows``) are relumon's own copies already (host float64 after the first report), and
        nothing in a report writes them: those are used as they are.
        """
        slots: list[tuple[str, str, Tensor, bool]] = []  # (owner, name, flat tensor, used as it is)

        def add(owner: str, name: str, t: Optional[Tensor], own: bool = False) -> None:
            if t is not None:
                # Relumon's own host float64 copies are used as they are; everything else is read below.
                as_is = own and t.device.type == "cpu" and t.dtype is torch.float64
                slots.append((owner, name, t if t.ndim == 1 else t.reshape(-1), as_is))

        with torch.no_grad():  # the live biases are read without a graph: no `detach()` per tensor
            for producer in producers:
                add(producer.path, "bias", producer.bias)
                add(producer.path, "rows", producer.row_norms())
                add(producer.path, "start_bias", producer.start_bias, own=True)
                add(producer.path, "start_rows", producer.start_rows, own=True)
            for i, (_, bucket) in enumerate(buckets):
                add(f"#{i}", "ratio", bucket.max_ratio)
                add(f"#{i}", "step", bucket.max_step)
                add(f"#{i}", "scale", bucket.max_scale)
            # Everything else in one transfer per device, into a new host tensor (a CPU model's bias is the live
            # parameter).
            reads = [t for _, _, t, as_is in slots if not as_is]
            values = iter(torch.split(host_cat(reads), [t.numel() for t in reads]) if reads else ())
            now: dict[str, dict[str, Optional[Tensor]]] = {
                p.path: {"bias": None, "rows": None, "start_bias": None, "start_rows": None} for p in producers
            }
            for owner, name, t, as_is in slots:
                now.setdefault(owner, {})[name] = t if as_is else next(values)
        return now

    def _window_records(
        self,
        buckets: list[tuple[_StepGroup, _Bucket]],
        now: dict[str, dict[str, Optional[Tensor]]],
        window: int,
        close: bool,
    ) -> dict[str, _Record]:
        """This window's largest update per producer: (window, ratio, optimizer step, lr, grad scale)."""
        records: dict[str, _Record] = {}
        self._peaks = {}
        for i, (group, bucket) in enumerate(buckets):
            ratio, steps, scales = (now[f"#{i}"][k] for k in ("ratio", "step", "scale"))
            assert ratio is not None and steps is not None and scales is not None
            for j, producer in enumerate(bucket.producers):
                if float(steps[j]) < 0:
                    continue  # no optimizer step measured it in this window
                step = int(steps[j])
                scale = float(scales[j])
                record = (
                    window,
                    float(ratio[j]),
                    step,
                    group.lr_at(step, bucket.group_of[j]),
                    None if math.isnan(scale) else scale,
                )
                known = records.get(producer.path)
                # A producer two optimizers step: the larger update is the one that can kill, not the last one read.
                if known is None or math.isnan(known[1]) or record[1] > known[1]:
                    records[producer.path] = record
                peak = group.peak_lr(bucket.group_of[j])
                if peak is not None:
                    old = self._peaks.get(producer.path)
                    if old is None or peak[0] > old[1]:
                        self._peaks[producer.path] = (window, peak[0], peak[1])
        return records

    def _causes(
        self,
        layers: Sequence[Any],
        now: dict[str, dict[str, Optional[Tensor]]],
        records: dict[str, _Record],
        step: int,
        window: int,
    ) -> list[Cause]:
        """The `Cause` of each of ``layers`` (LayerReports with a producer and a memory), in order.

        For each layer, the figures are about the units that died in this window, else every dead unit, else every
        unit. Every layer's per-unit figures (dead masks, streaks, the memory, the biases and row norms now) are laid
        end to end and reduced per layer in a few kernels in all (`relumon.segments`): at a thousand layers blamed at
        once, two dozen small kernels per layer cost more than the rest of the report. What is left per layer is
        plain Python: the update records, the learning rate and the sentence.
        """
        if not layers:
            return []
        units = [layer.units for layer in layers]
        memories = [self._memory[layer.name] for layer in layers]
        figures = [now[layer.fed_by] for layer in layers]
        count = len(layers)

        def end_to_end(
            values: Sequence[Optional[Tensor]], fill: float, dtype: torch.dtype
        ) -> tuple[Tensor, list[bool]]:
            """``values`` end to end; ``fill`` for a missing one or one of another length (and whether each was)."""
            known = [v is not None and v.numel() == n for v, n in zip(values, units)]
            parts = [
                (v if v.ndim == 1 else v.reshape(-1)) if v is not None and ok else torch.full((n,), fill, dtype=dtype)
                for v, n, ok in zip(values, units, known)
            ]
            return torch.cat(parts).to(dtype), known

        dead, _ = end_to_end([layer.dead_mask for layer in layers], False, torch.bool)
        # A layer without a death history: the figures are about its dead units (as if each had just died).
        streak, _ = end_to_end([layer.dead_streak for layer in layers], 1, torch.int64)
        fresh = dead & (streak == 1)
        n_dead, n_fresh = segment_counts(torch.stack([dead, fresh]), units)
        ids = segment_ids(units)
        # Per layer: 0 picks the units that died in this window, 1 every dead unit, 2 every unit.
        choice = torch.tensor([0 if f else 1 if d else 2 for d, f in zip(n_dead, n_fresh)], dtype=torch.int64)
        of_unit = choice.index_select(0, ids)
        chosen = torch.where(of_unit == 0, fresh, torch.where(of_unit == 1, dead, True))
        picked = chosen.nonzero().flatten()
        n_picked = [f if f else d if d else n for d, f, n in zip(n_dead, n_fresh, units)]
        of_picked = ids.index_select(0, picked)

        alive_window, _ = end_to_end([m.alive_window for m in memories], -1, torch.int64)
        alive_window = alive_window.index_select(0, picked)
        # The earliest window in which a chosen unit lived (the smallest non-negative), `never` when none did.
        never = torch.iinfo(torch.int64).max
        since = segment_extremes(
            alive_window.masked_fill(alive_window < 0, never), of_picked, count, largest=False, empty=never
        )

        bias_now, has_bias = end_to_end([f["bias"] for f in figures], math.nan, torch.float64)
        bias_then, _ = end_to_end([m.bias for m in memories], math.nan, torch.float64)
        rows_now, has_rows = end_to_end([f["rows"] for f in figures], math.nan, torch.float64)
        rows_then, _ = end_to_end([m.rows for m in memories], math.nan, torch.float64)
        bias_now = bias_now.index_select(0, picked)
        bias_moved = bias_now - bias_then.index_select(0, picked)
        moved_known = bias_moved.isnan().logical_not_()  # an unknown start is NaN; a NaN bias is left out too
        known_moves = bias_moved.masked_fill(~moved_known, 0.0)
        rows_moved = rows_now.index_select(0, picked) / rows_then.index_select(0, picked) - 1
        rows_known = rows_moved.isfinite()
        sums = torch.stack(
            [
                segment_sums(bias_now, of_picked, count),
                segment_sums(known_moves, of_picked, count),
                segment_sums(moved_known.double(), of_picked, count),
                segment_sums(known_moves.abs(), of_picked, count),
                segment_sums(rows_moved.masked_fill(~rows_known, 0.0), of_picked, count),
                segment_sums(rows_known.double(), of_picked, count),
            ]
        ).tolist()
        bias_sum, moved_sum, moved_count, moved_size, rows_sum, rows_count = sums
        first_windows = [None if w == never else w for w in since.tolist()]  # exact: read as integers

        lr_of = self._lr_lookup()
        has_optimizer = any(True for _ in self.optimizers())
        starts = list(itertools.accumulate(units, initial=0))
        causes = []
        for k, layer in enumerate(layers):
            producer = self._producers[layer.fed_by]
            memory = memories[k]
            first_lived = first_windows[k]
            windows = window - first_lived + 1 if first_lived is not None else None
            bias = bias_shift = weight_shift = None
            if has_bias[k]:
                bias = bias_sum[k] / n_picked[k] if n_picked[k] else math.nan
                bias_shift = _mean_move(moved_sum[k], moved_count[k], moved_size[k])
            if has_rows[k]:
                weight_shift = rows_sum[k] / rows_count[k] if rows_count[k] else None
            history = list(producer.records) + ([records[producer.path]] if producer.path in records else [])
            first = first_lived if first_lived is not None else -1
            span = [r for r in history if r[0] >= first]
            best = max(span, key=lambda r: (not math.isnan(r[1]), r[1]), default=None)
            lr = update_ratio = grad_scale = None
            update_step = None
            if best is not None:
                _, update_ratio, update_step, lr, grad_scale = best
            if lr is None:
                lr = lr_of(producer)
            peaks = list(producer.peaks) + ([self._peaks[producer.path]] if producer.path in self._peaks else [])
            peak = max((r for r in peaks if r[0] >= first), key=lambda r: r[1], default=None)
            peak_lr = peak_step = None
            if peak is not None and lr is not None and peak[1] > 10 * lr:
                peak_lr, peak_step = peak[1], peak[2]
            # Their own rows against the start of the last window they lived in, exactly (a sampled ratio can miss
            # them).
            own = None
            if first_lived is not None and memory.weight is not None:
                own = producer.own_update(chosen[starts[k] : starts[k + 1]], memory.weight)
            # Never seen alive, and neither their biases nor their rows moved: they started dead.
            never_alive = (
                first_lived is None
                and bias_shift is not None
                and abs(bias_shift) <= 1e-12
                and (weight_shift is None or abs(weight_shift) <= 1e-12)
            )
            cause = Cause(
                step=step,
                units=n_picked[k],
                windows=windows,
                fed_by=layer.fed_by,
                lr=lr,
                update_ratio=update_ratio,
                update_step=update_step,
                bias_shift=bias_shift,
                bias=bias,
                weight_shift=weight_shift,
                grad_scale=grad_scale,
                advice="",
                peak_lr=peak_lr,
                peak_lr_step=peak_step,
                own_update=own,
                never_alive=never_alive,
            )
            newly_dead = n_fresh[k] if n_fresh[k] and n_dead[k] > n_fresh[k] else None
            sentence = advice_for(
                cause, negative_regime=bool(layer.negative_regime), has_optimizer=has_optimizer, newly_dead=newly_dead
            )
            # The sentence is built from the other facts. This Cause is new and no one else holds it, so its last
            # field is set the way a frozen dataclass's own __init__ sets fields (a `replace` costs a second init).
            object.__setattr__(cause, "advice", sentence)
            causes.append(cause)
        return causes

    def _lr_lookup(self) -> Callable[[_Producer], Optional[float]]:
        """The learning rate now of the param group holding a producer's weight (None without one), by a table made
        once per report rather than a search per layer."""
        where: dict[int, tuple[_StepGroup, int]] = {}
        for group in self._groups.values():
            for bucket in group.buckets:
                for j, p in enumerate(bucket.producers):
                    where.setdefault(id(p), (group, bucket.group_of[j]))  # the first optimizer found, as before

        def lr_of(producer: _Producer) -> Optional[float]:
            found = where.get(id(producer))
            if found is not None:
                return found[0].lr_at(found[0].steps, found[1])
            return self._unmeasured_lr(producer)

        return lr_of

    def _unmeasured_lr(self, producer: _Producer) -> Optional[float]:
        """The rate of a producer whose weight is not measured (a parametrized weight): that of the group holding any
        of its parameters (a parametrization's ``original`` is a parameter of a submodule)."""
        optimizers = list(self.optimizers())
        module = producer.module_ref()
        if not optimizers or module is None:
            return None
        held = {id(p) for p in module.parameters()}
        for optimizer in optimizers:
            for param_group in getattr(optimizer, "param_groups", ()):
                if any(id(p) in held for p in param_group["params"]):
                    rate = param_group.get("lr")
                    return float(rate) if isinstance(rate, (int, float, Tensor)) else None
        return None

    def _first_memory(
        self, memory: _SiteMemory, producer: _Producer, now: dict[str, dict[str, Optional[Tensor]]], window: int
    ) -> _SiteMemory:
        """A site's memory before its first closed window (``memory``, unknown everywhere, filled here): the producer's
        snapshot, when it is this window's start."""
        units = memory.alive_window.numel()
        if producer.start_window <= window:
            for attribute, key in (("bias", "start_bias"), ("rows", "start_rows")):
                start = now[producer.path].get(key)
                if start is not None and start.numel() == units:
                    setattr(memory, attribute, start.clone())
            if producer.start_weight is not None and producer.start_weight.shape[0] == units:
                memory.weight = producer.start_weight.clone()
        return memory

    def _remember(
        self,
        memory: _SiteMemory,
        layer: Any,
        producer: _Producer,
        now: dict[str, dict[str, Optional[Tensor]]],
        window: int,
    ) -> None:
        """Fold a closed window into a site's memory: units alive in it remember this window's start."""
        units = layer.units
        if memory.bias.numel() != units or layer.dead_mask.numel() != units:
            return
        alive = ~layer.dead_mask.bool()
        known = producer.start_window == window
        for attribute, key in (("bias", "start_bias"), ("rows", "start_rows")):
            values = getattr(memory, attribute)
            start = now[producer.path].get(key)
            if known and start is not None and start.numel() == units:
                values.copy_(torch.where(alive, start, values))
            else:
                values.masked_fill_(alive, math.nan)
        memory.alive_window.masked_fill_(alive, window)
        rows = memory.weight
        if rows is not None:
            start_weight = producer.start_weight
            mask = alive.to(rows.device).view(-1, *([1] * (rows.ndim - 1)))
            if known and start_weight is not None and start_weight.shape == rows.shape:
                rows.copy_(torch.where(mask, start_weight, rows))
            else:
                rows.masked_fill_(mask, math.nan)

    def recycled(self, site: str, indices: list[int]) -> None:
        """Units ``indices`` of ``site`` were just re-initialised (`relumon.recycle`): their references restart at the
        recycled weights, so that a recycled unit that dies again is measured from its new bias and rows, as if it
        lived at the start of the next window. Report time (one small host read)."""
        memory = self._memory.get(site)
        fed_by = next((s.fed_by for s in list(self._sites) if s.name == site), None)
        producer = self._producers.get(fed_by) if fed_by is not None else None
        if memory is None or producer is None or not indices:
            return
        idx = torch.tensor(indices, dtype=torch.long)
        units = memory.bias.numel()
        with torch.no_grad():
            bias = producer.bias.detach().double().cpu() if producer.bias is not None else None
            rows = producer.row_norms()
            rows = rows.double().cpu() if rows is not None else None
        for values, now, start in ((memory.bias, bias, "start_bias"), (memory.rows, rows, "start_rows")):
            if now is None or now.numel() != units:
                values[idx] = math.nan
                continue
            values[idx] = now[idx]
            snapshot = getattr(producer, start)
            if snapshot is not None and snapshot.numel() == units:
                snapshot[idx.to(snapshot.device)] = now[idx].to(snapshot.device, snapshot.dtype)
        memory.alive_window[idx] = self._window + 1
        weight = producer.weight
        for kept in (memory.weight, producer.start_weight):
            if kept is not None and weight is not None and kept.shape == weight.shape:
                with torch.no_grad():
                    at = idx.to(kept.device)
                    kept.index_copy_(0, at, weight.detach().index_select(0, at).to(kept.dtype))

    def columns_zeroed(self, path: str, weight: Tensor, selection: tuple[int, Tensor]) -> None:
        """Recycling is about to zero entries of ``weight`` (a reader's columns of recycled units) of module ``path``.

        When that module also feeds a site, what the cause measures of it is re-based, so that recycling's own change
        is not read as an update that killed its units: the kept copies of its weight (for a sampled weight's exact
        ``own_update``) get the same zeros, and the reference row norms (for ``weight_shift``) lose the part of each
        row that is zeroed. Report time; called before the entries are zeroed.
        """
        try:
            self._rebase(path, weight, selection)
        except Exception as err:  # recycling goes on: the cause steps aside
            if is_strict():
                raise
            self.disable(err)

    def _rebase(self, path: str, weight: Tensor, selection: tuple[int, Tensor]) -> None:
        producer = self._producers.get(path)
        if producer is None or producer.weight is not weight or weight.ndim < 2:
            return
        dim, where = selection
        where = where.to(weight.device)
        with torch.no_grad():
            if dim > 0:  # whole columns: only those are read (no full-size temporaries for a large weight)
                zeroed = weight.detach().index_select(dim, where)
            elif dim == 0:
                zeroed = weight.detach().index_fill(0, where, 0.0) - weight.detach()  # whole rows gone
            else:  # a grouped conv's scattered entries (a small weight)
                zeroed = weight.detach().masked_fill(~where, 0.0)
            removed: Tensor = torch.linalg.vector_norm(zeroed.reshape(zeroed.shape[0], -1).double(), dim=1).pow(2)

            def shrink(rows: Optional[Tensor]) -> Optional[Tensor]:
                if rows is None or rows.numel() != removed.numel():
                    return rows
                gone = removed.to(rows.device)
                return (rows.double().pow(2) - gone).clamp_min(0.0).sqrt().to(rows.dtype)

            producer.start_rows = shrink(producer.start_rows)
            kept = [producer.start_weight]
            for site in list(self._sites):
                memory = self._memory.get(site.name)
                if site.fed_by == path and memory is not None:
                    shrunk = shrink(memory.rows)
                    if shrunk is not None:
                        memory.rows = shrunk
                    kept.append(memory.weight)
            for copy in kept:
                if copy is not None and copy.shape == weight.shape:
                    if dim >= 0:
                        copy.index_fill_(dim, where.to(copy.device), 0.0)
                    else:
                        copy.masked_fill_(where.to(copy.device), 0.0)

    def remove(self) -> None:
        """Remove the optimizer hooks. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._groups = weakref.WeakKeyDictionary()
