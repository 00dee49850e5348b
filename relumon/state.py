"""Per-call-site statistics, kept on the activation's device and combined across processes.

Each `SiteStats` holds O(units) state for one call site of a watched activation module:

- ``peak``: float32, one value per unit, the largest output seen in the window (``-inf`` before any). A unit is
  dead when its peak is ``<= 0``: a ReLU output is ``>= 0``, so ``peak <= 0`` means it was exactly 0 everywhere; a
  LeakyReLU output is ``< 0`` exactly where its pre-activation is, so ``peak <= 0`` means stuck in the negative
  regime. A PReLU's learned slope can be below 0, making a negative input's output positive: its peak is the largest
  *input* instead, so that ``peak <= 0`` means stuck in the negative regime whatever the slope. ``torch.maximum``
  propagates NaN, so a unit that produced NaN has a NaN peak and counts as *non-finite*, neither dead nor alive.
- ``floor`` (only for a capped activation, ReLU6): float32 per unit, the smallest output seen (``+inf`` before any).
  A unit whose floor is ``>= cap`` output the cap (6) for every sample and position: it is *saturated* and, like a
  dead unit, passes no gradient. One ``amin`` per measured call, for capped sites only.
- ``abs_sum`` (only with ``track_abs``, for the dormant score): float32 per unit, the sum of ``|activation|``, and
  ``positions``, the number of values summed per unit.
- ``through_sum``, ``through_passes`` (only with a ``through_slope``): the summed norm of the gradient that flows
  *through* the activation, ``dL/d(pre-activation) = dL/d(output) * f'``, where ``f'`` is 1 for a positive output and
  the slope (0 for ReLU, alpha for LeakyReLU) elsewhere (and 0 at a ReLU6's cap), and the number of backward passes
  it was taken in.
- ``grad_norm_sum``: float64, shape ``(1,)``, the summed gradient norms of the backward passes whose norm was finite,
  and ``nonfinite_passes``, the passes whose norm was inf or NaN (a ``GradScaler`` overflow step, which it skips):
  they are left out of the mean and counted instead. In eager mode a contiguous float32 gradient (without a
  ``GradScaler``) writes its squared norm into one of `PENDING_PASSES` small slots instead, with one ``dot``; the
  slots are folded into the sum (square roots, one sum) when they are full and before anything reads the state
  (`SiteStats.flush`). Inside a training step even a tiny kernel costs 10-20 µs on the CPU (the step's large
  kernels leave the caches cold), so kernels per call, not bytes, are what the small ones cost.
- **One gradient per forward.** In eager mode each measured output gets its own small hook that counts the first
  gradient reaching it, once: later passes through the same forward's graph (the second pass of a Hessian-vector
  product, a ``retain_graph`` re-run) neither add to the norm nor count as passes. Under torch.compile every pass
  counts (a per-call flag in a compiled hook would not persist).
- The counts (samples, forwards, backwards, and the passes and positions above) are plain Python ints in eager
  mode: a count needs no kernel, and its value is known on the host anyway (it comes from shapes). Inside a
  torch.compile graph a Python int that changes every step would be guarded on and force a recompile each step, so
  there the counts go to float64 tensors of shape ``(1,)`` instead (``samples``, ``forwards``...); ``gather`` adds
  both. (Shape ``(1,)``, not 0-d: torch.compile on torch 2.13 silently drops in-place updates of 0-d float64 CPU
  tensors made inside a compiled graph. Not views of one buffer either: in-place updates of ``unbind``/``split``
  views fail to trace.)

Per training step the hooks only launch in-place kernels on device tensors and add to host ints: nothing is read
back from the device until `gather` runs at report time. Across processes the peaks reduce with MAX (a unit is alive
if it fired on any rank), the floors with MIN and the counts and sums with SUM.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.autograd.forward_ad as forward_ad
import torch.distributed as dist
from torch import Tensor

from relumon.errors import RelumonError
from relumon.hooks import is_compiling

__all__ = [
    "SiteStats",
    "GatheredSite",
    "SiteLayout",
    "gather",
    "layout_of",
    "distributed_world_size",
    "abs_sum",
    "l2_norm",
]

# Order of the counters when gathered.
SAMPLES, FORWARDS, BACKWARDS, GRAD_NORM_SUM, NONFINITE_PASSES, UNMEASURED = range(6)
_COUNTERS = 6


class SiteStats:
    """On-device statistics of one call site over the current window.

    Args:
        units: number of units (size of ``unit_dim``).
        unit_dim: the dimension that indexes units, non-negative, for activations of ``ndim`` dimensions.
        ndim: the number of dimensions the site's activations have.
        device: where the activations live; the state lives there too.
        grad_scale: returns the current loss scale (a tensor on ``device``) or None, so that gradient norms are
            reported unscaled under a ``GradScaler``.
        on_backward: called after each backward pass through the site (not under torch.compile).
        track_abs: also sum ``|activation|`` per unit, for the dormant score.
        through_slope: also measure the gradient that flows through the activation, whose derivative is 1 for a
            positive output and ``through_slope`` elsewhere. None (the default) does not.
        cap: the activation's upper cap (6 for ReLU6), or None. With a cap, each unit's smallest output is kept too
            (saturation), and the gradient through is 0 at the cap.
    """

    __slots__ = (
        "units",
        "unit_dim",
        "ndim",
        "reduce_dims",
        "batch_dim",
        "peak",
        "cap",
        "floor",
        "samples",
        "forwards",
        "backwards",
        "grad_norm_sum",
        "nonfinite_passes",
        "unmeasured",
        "abs_sum",
        "positions",
        "through_slope",
        "through_sum",
        "through_passes",
        "n_samples",
        "n_forwards",
        "n_backwards",
        "n_through_passes",
        "n_positions",
        "n_unmeasured",
        "_grad_scale",
        "_on_backward",
        "grad_hook",
        "_squares",
        "_square_slots",
        "_pending",
    )

    def __init__(
        self,
        units: int,
        unit_dim: int,
        ndim: int,
        device: torch.device,
        grad_scale: Callable[[], Optional[Tensor]] = lambda: None,
        on_backward: Callable[[], None] = lambda: None,
        track_abs: bool = False,
        through_slope: Optional[float] = None,
        cap: Optional[float] = None,
        peak_dtype: torch.dtype = torch.float32,
        batch_dim: int = 0,
    ) -> None:
        self.units = units
        self.unit_dim = unit_dim
        self.ndim = ndim
        self.reduce_dims = tuple(d for d in range(ndim) if d != unit_dim)
        #: The dim that holds the samples (batch rows): 0, or 1 in PyTorch's sequence-first ``(S, B, E)`` layout.
        self.batch_dim = batch_dim
        # float32 for every activation dtype but float64, whose tiny positive outputs (1e-60) would round to 0 in
        # float32 and read as dead.
        self.peak = torch.full((units,), -math.inf, dtype=peak_dtype, device=device)
        self.cap = cap
        self.floor: Optional[Tensor] = None
        if cap is not None:
            self.floor = torch.full((units,), math.inf, dtype=peak_dtype, device=device)
        self.samples, self.forwards, self.backwards, self.grad_norm_sum, self.nonfinite_passes, self.unmeasured = (
            torch.zeros(1, dtype=torch.float64, device=device) for _ in range(_COUNTERS)
        )
        self.abs_sum: Optional[Tensor] = None
        self.positions: Optional[Tensor] = None
        if track_abs:
            self.abs_sum = torch.zeros(units, dtype=torch.float32, device=device)
            self.positions = torch.zeros(1, dtype=torch.float64, device=device)
        self.through_slope = through_slope
        self.through_sum: Optional[Tensor] = None
        self.through_passes: Optional[Tensor] = None
        if through_slope is not None:
            self.through_sum = torch.zeros(1, dtype=torch.float64, device=device)
            self.through_passes = torch.zeros(1, dtype=torch.float64, device=device)
        # Eager-mode counts (see the module docstring); the tensors above take them inside compiled graphs.
        self.n_samples = self.n_forwards = self.n_backwards = self.n_through_passes = self.n_positions = 0
        #: Counted training calls that the sampling schedule did not measure (host only: compiled code measures all).
        self.n_unmeasured = 0
        self._grad_scale = grad_scale
        self._on_backward = on_backward
        #: Tensor hook for outputs of compiled code: accumulates the gradient norm of every backward pass.
        self.grad_hook = self._make_grad_hook()
        # Eager passes' squared gradient norms, `PENDING_PASSES` at most, folded into `grad_norm_sum` by
        # `flush` (see `_add_norm`); `_square_slots` are 0-d views of `_squares`, one per slot, made once.
        self._squares: Optional[Tensor] = None
        self._square_slots: list[Tensor] = []
        self._pending = 0

    def observe(self, out: Tensor, rows: bool = True, regime: Optional[Tensor] = None) -> None:
        """Fold one training forward's activation into the window. Launches kernels only; never syncs.

        Args:
            out: the activation, of the site's ``ndim`` with ``units`` along ``unit_dim``.
            rows: whether its batch rows count as samples, and the call as a forward (False for a recurrent cell's
                later time steps: the same rows, in the same forward).
            regime: a tensor of ``out``'s shape whose sign, rather than the output's, tells the positive regime from
                the negative one (PReLU's input: with a learned slope below 0 a negative input gives a positive
                output). Its peak is kept instead of the output's; the other statistics read ``out``.
        """
        samples = batch_rows(out, self.unit_dim, self.batch_dim) if rows else 0
        self._fold(out, self.unit_dim, self.reduce_dims, samples, rows, regime)

    def observe_as(self, out: Tensor, unit_dim: int, samples: int, regime: Optional[Tensor] = None) -> None:
        """Fold a call whose layout is not the site's (an unbatched call, a pooled one): ``units`` along
        ``unit_dim`` of ``out``, holding ``samples`` samples."""
        self._fold(out, unit_dim, tuple(d for d in range(out.ndim) if d != unit_dim), samples, True, regime)

    def relayout(self, ndim: int, unit_dim: int) -> None:
        """Take calls of ``ndim`` dims with the units along ``unit_dim`` as the site's own from now on (a site first
        seen unbatched, in a batch-of-one dry run, gets its batched layout back)."""
        self.ndim = ndim
        self.unit_dim = unit_dim
        self.reduce_dims = tuple(d for d in range(ndim) if d != unit_dim)
        self.batch_dim = 0

    def move_to(self, device: torch.device) -> None:
        """Move the window's state to ``device`` (the model was moved after the site was found). Eager only.

        The state on the device is every slot that holds a tensor (the optional ones hold None when unused).
        """
        self.flush()
        self._squares, self._square_slots = None, []  # made again on the new device
        for name in SiteStats.__slots__:
            value = getattr(self, name, None)
            if isinstance(value, Tensor):
                setattr(self, name, value.to(device))
        self.grad_hook = self._make_grad_hook()

    def _fold(
        self,
        out: Tensor,
        unit_dim: int,
        reduce_dims: tuple[int, ...],
        samples: int,
        forward: bool,
        regime: Optional[Tensor] = None,
    ) -> None:
        compiling = is_compiling()
        if compiling or forward_ad._current_level >= 0:
            # A detached alias: compiled code, and forward-mode AD (a dual tensor keeps its tangent with grad mode
            # off, and out= reductions refuse it).
            self._fold_values(out.detach(), unit_dim, reduce_dims, samples, forward, regime, compiling)
            return
        # Eager: the reductions run with grad mode off rather than on a detached alias, which would cost one more
        # dispatch per call (inside a training step a call of even a tiny op costs 10-20 µs: caches are cold).
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            self._fold_values(out, unit_dim, reduce_dims, samples, forward, regime, compiling)
        finally:
            torch._C._set_grad_enabled(enabled)

    def _fold_values(
        self,
        x: Tensor,
        unit_dim: int,
        reduce_dims: tuple[int, ...],
        samples: int,
        forward: bool,
        regime: Optional[Tensor],
        compiling: bool,
    ) -> None:
        if x.ndim == 0:
            x = x.reshape(1)
        if self.abs_sum is not None and self.positions is not None:
            if reduce_dims:
                self.abs_sum.add_(abs_sum(x, reduce_dims))
            else:
                self.abs_sum.add_(x.abs())
            if compiling:
                self.positions.add_(x.numel() // self.units)
            else:
                self.n_positions += x.numel() // self.units
        if self.floor is not None:
            low = extreme_per_unit(x, unit_dim, reduce_dims, torch.amin, one_pass=compiling)
            torch.minimum(self.floor, low, out=self.floor)
        if regime is not None:
            x = (regime.detach() if compiling else regime).reshape(x.shape)
        peak = extreme_per_unit(x, unit_dim, reduce_dims, torch.amax, one_pass=compiling)
        torch.maximum(self.peak, peak, out=self.peak)
        if compiling:
            self.samples.add_(samples)
            self.forwards.add_(int(forward))
        else:
            self.n_samples += samples
            self.n_forwards += int(forward)

    def _make_grad_hook(self) -> Callable[[Tensor], None]:
        # A closure rather than a bound method: torch.compile traces a closure over tensors without a graph break.
        grad_norm_sum, nonfinite, backwards, grad_scale = (
            self.grad_norm_sum,
            self.nonfinite_passes,
            self.backwards,
            self._grad_scale,
        )

        def grad_hook(grad: Tensor) -> None:
            """Accumulate ``||dL/d(output)||_2`` of one backward pass. Returns None: a value would replace the grad."""
            add_grad_norm(grad_norm_sum, nonfinite, grad.detach(), grad_scale)
            backwards.add_(1)

        return grad_hook

    def grad_hook_for(self, out: Tensor) -> Callable[[Tensor], None]:
        """The tensor hook for one measured output: the first gradient that reaches it counts, once.

        Made per call (a small closure holding a flag). With a ``through_slope`` it also measures the gradient that
        flows through the activation, which needs that output's sign pattern; the output is already kept for backward
        by autograd in the common cases. If the output was modified in place after the activation, its signs no
        longer say where the activation passed gradient, and that pass adds no through-gradient. Compiled code gets
        the shared `grad_hook` (every pass counts there).
        """
        if is_compiling():
            return self._compiled_hook_for(out)
        if self.through_slope is not None:
            return self._first_grad_and_through_hook(out)
        stats = self
        seen = [False]  # a list: the hook flips it without `nonlocal` bookkeeping. No reference to `out`: a hook on
        # a tensor that refers to that tensor would keep it alive for good.

        def first_grad_hook(grad: Tensor) -> None:
            if seen[0]:  # a later pass through the same forward's graph (second order, retain_graph)
                return None
            seen[0] = True
            stats._add_norm(grad if not grad.requires_grad else grad.detach())
            stats.n_backwards += 1
            stats._on_backward()
            return None

        return first_grad_hook

    def _first_grad_and_through_hook(self, out: Tensor) -> Callable[[Tensor], None]:
        stats, slope, through_sum, grad_scale, cap = (
            self,
            self.through_slope,
            self.through_sum,
            self._grad_scale,
            self.cap,
        )
        # Not `out` itself: a hook registered on a tensor that holds that tensor is never freed by autograd. The
        # detached alias shares its storage and version counter, and autograd keeps the storage for backward anyway.
        out = out.detach()
        version = out._version
        seen = [False]

        def first_grad_and_through_hook(grad: Tensor) -> None:
            if seen[0]:
                return None
            seen[0] = True
            g = grad.detach()
            stats._add_norm(g)
            stats.n_backwards += 1
            if slope is not None and through_sum is not None and out._version == version:
                through_sum.add_(through_norm(g, out, slope, cap, grad_scale))
                stats.n_through_passes += 1
            stats._on_backward()
            return None

        return first_grad_and_through_hook

    def _compiled_hook_for(self, out: Tensor) -> Callable[[Tensor], None]:
        """Inside a torch.compile trace: the shared hook, plus the through-gradient when it is measured."""
        if self.through_slope is None or self.through_sum is None or self.through_passes is None:
            return self.grad_hook
        slope, through_sum, through_passes = self.through_slope, self.through_sum, self.through_passes
        grad_hook, grad_scale, cap = self.grad_hook, self._grad_scale, self.cap
        out = out.detach()  # not `out` itself: see `_first_grad_and_through_hook`

        def grad_and_through_hook(grad: Tensor) -> None:
            grad_hook(grad)
            through_sum.add_(through_norm(grad.detach(), out, slope, cap, grad_scale))
            through_passes.add_(1)
            return None

        return grad_and_through_hook

    def _add_norm(self, grad: Tensor) -> None:
        """Add one eager backward pass's ``||grad||`` to the window, in two kernels where it can.

        A contiguous float32 gradient without a ``GradScaler`` (the common case) writes its squared norm into a
        pending slot with one ``dot``; `flush` folds the slots into ``grad_norm_sum`` (one square root and one sum for
        `PENDING_PASSES` passes), before anything reads it and when the slots are full. Other gradients are added at
        once (`add_grad_norm`). The sum is the same, up to float32 rounding of each norm, either way.
        """
        norm_sum = self.grad_norm_sum
        if (
            grad.dtype is not torch.float32
            or not grad.is_contiguous()
            or grad.device != norm_sum.device
            or self._grad_scale() is not None
        ):
            add_grad_norm(norm_sum, self.nonfinite_passes, grad, self._grad_scale)
            return
        slots = self._square_slots
        if not slots:
            self._squares = torch.empty(PENDING_PASSES, dtype=torch.float32, device=norm_sum.device)
            slots = self._square_slots = list(self._squares.unbind())
        flat = grad.view(-1)
        at = self._pending
        torch.dot(flat, flat, out=slots[at])
        self._pending = at + 1
        if at + 1 == PENDING_PASSES:
            self.flush()

    def flush(self) -> None:
        """Fold the pending squared gradient norms into ``grad_norm_sum`` (kernels only, no sync). Idempotent."""
        pending = self._pending
        if not pending or self._squares is None:
            return
        self._pending = 0
        self.grad_norm_sum.add_(self._squares[:pending].sqrt_().sum())

    def sums(self) -> list[Tensor]:
        """The device part of everything that combines across ranks by SUM, in order (the tensors themselves).

        ``[samples, forwards, backwards, grad_norm_sum, nonfinite_passes, unmeasured]``, then
        ``[through_passes, through_sum]`` with a ``through_slope``, then ``[positions, abs_sum]`` with ``track_abs``;
        flattened, as float64, and added to ``host_sum_state()``, they are the site's SUM-reduced state. Pending
        gradient norms are folded in first (`flush`).
        """
        self.flush()
        sums = [self.samples, self.forwards, self.backwards, self.grad_norm_sum, self.nonfinite_passes, self.unmeasured]
        if self.through_sum is not None and self.through_passes is not None:
            sums += [self.through_passes, self.through_sum]
        if self.abs_sum is not None and self.positions is not None:
            sums += [self.positions, self.abs_sum]
        return sums

    def host_sum_state(self) -> list[float]:
        """The eager-mode counts, laid out like ``sums()`` flattened (zeros where a sum lives on the device only)."""
        host = [float(self.n_samples), float(self.n_forwards), float(self.n_backwards), 0.0, 0.0]
        host.append(float(self.n_unmeasured))
        if self.through_sum is not None:
            host += [float(self.n_through_passes), 0.0]
        if self.abs_sum is not None:
            host += [float(self.n_positions)] + [0.0] * self.units
        return host

    def peak_state(self) -> Tensor:
        """Everything that combines across ranks by MAX, as one float32 tensor: the peaks, then, with a cap, the
        negated floors (the MAX of negated floors is minus their MIN)."""
        if self.floor is None:
            return self.peak
        return torch.cat([self.peak, -self.floor])

    def reset(self) -> None:
        """Start a new window."""
        self.peak.fill_(-math.inf)
        if self.floor is not None:
            self.floor.fill_(math.inf)
        for tensor in self.sums():
            tensor.zero_()
        self.n_samples = self.n_forwards = self.n_backwards = self.n_through_passes = self.n_positions = 0
        self.n_unmeasured = 0


def add_grad_norm(
    norm_sum: Tensor, nonfinite: Tensor, grad: Tensor, grad_scale: Callable[[], Optional[Tensor]]
) -> None:
    """Add ``||grad||_2`` (unscaled) to ``norm_sum``. No sync.

    Under a ``GradScaler`` an inf/NaN norm is an overflow step, which the scaler skips: it is counted in
    ``nonfinite`` instead of added (three more tiny kernels, paid only with a scaler). Without one, nothing skips a
    step, and a non-finite norm is the training's own state: it is added as it is.
    """
    norm = l2_norm(grad)
    scale = grad_scale()
    if scale is None:
        norm_sum.add_(norm.double())  # an explicit cast is cheaper than the add's own type promotion on the CPU
        return
    norm = norm / scale
    finite = norm.isfinite()
    norm_sum.add_(torch.where(finite, norm, 0.0))
    nonfinite.add_(finite.logical_not())


def l2_norm(t: Tensor) -> Tensor:
    """``||t||_2`` as a float32 scalar tensor (float64 for a float64 ``t``), accumulated in at least fp32, no sync.

    A float32 contiguous tensor goes through ``torch.dot(t, t)`` (BLAS), about twice as fast as
    ``linalg.vector_norm`` on the CPU; other dtypes (bf16, fp16) through ``vector_norm(dtype=float32)``, since a
    half-precision ``dot`` would round the sum of squares to half precision.
    """
    if t.dtype == torch.float32 and not is_compiling() and t.is_contiguous():  # compiled code fuses vector_norm
        flat = t.view(-1)
        return torch.dot(flat, flat).sqrt_()
    if t.dtype == torch.float64:  # vector_norm cannot narrow its accumulation to fp32; fp64 is at least fp32
        norm: Tensor = torch.linalg.vector_norm(t)
        return norm
    norm = torch.linalg.vector_norm(t, dtype=torch.float32)
    return norm


def abs_sum(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``|x|`` summed over ``dims``, accumulated in at least fp32: fp32 for half precision and fp32 inputs, fp64 for
    fp64, exact integers for integer activations (``vector_norm`` takes neither a narrowing dtype nor integers)."""
    if not x.is_floating_point():
        return x.abs().sum(dim=dims)
    norm: Tensor = (
        torch.linalg.vector_norm(x, ord=1, dim=dims)
        if x.dtype == torch.float64
        else torch.linalg.vector_norm(x, ord=1, dim=dims, dtype=torch.float32)
    )
    return norm


#: Eager backward passes whose squared gradient norms a site keeps pending before one `SiteStats.flush` folds them
#: into its sum: two kernels per pass (``view``, ``dot``) instead of six, and four per flush.
PENDING_PASSES = 8

#: Positions per unit and sample (the size of the dims after the unit dim, e.g. H * W) from which a per-unit extreme
#: reduces those positions first and the batch second; below it, the batch first. Measured on the CPU (2 threads,
#: torch 2.13): a reduction over a short contiguous run (4 x 4 positions) pays per run, so for DenseNet-121's
#: ``(32, 512, 4, 4)`` the batch first costs 26 µs against 228 µs positions first (and 395 µs in one pass), while for
#: ``(64, 32, 32, 32)`` positions first costs 74 µs against 155 µs.
POSITIONS_FIRST_FROM = 256


def extreme_per_unit(
    x: Tensor, unit_dim: int, reduce_dims: tuple[int, ...], extreme: Callable[..., Tensor], one_pass: bool = False
) -> Tensor:
    """``extreme(x, dim=reduce_dims)`` (``torch.amax`` or ``torch.amin``: every dim but ``unit_dim``; ``x`` itself when
    there is none), computed in the order that reads a contiguous activation fastest. The result is the same whatever
    the order (a max or min is exact, and NaN propagates through both steps).

    - ``one_pass`` (compiled code, which inductor fuses into one kernel): one reduction.
    - Units last (``Linear``'s ``(N, C)``, a transformer's ``(N, L, C)``), units first, or a layout that is not
      contiguous (channels-last): one reduction, which reads ``x`` once in memory order.
    - Units in the middle (``(N, C, H, W)``, ``(N, C, L)``): two reductions. With at least `POSITIONS_FIRST_FROM`
      positions per unit and sample, the positions first (a long contiguous run each), then the batch of the small
      ``(N, C)`` result; with fewer, the batch first (keeping ``C * H * W`` contiguous values), then the positions of
      the small ``(C, H, W)`` result.
    """
    if not reduce_dims:
        return x
    last = x.ndim - 1
    if one_pass or unit_dim == 0 or unit_dim == last or not x.is_contiguous():
        return extreme(x, dim=reduce_dims)
    if x.stride(unit_dim) >= POSITIONS_FIRST_FROM:
        return extreme(extreme(x, dim=tuple(range(unit_dim + 1, x.ndim))), dim=tuple(range(unit_dim)))
    return extreme(extreme(x, dim=tuple(range(unit_dim))), dim=tuple(range(1, x.ndim - unit_dim)))


def through_norm(
    grad: Tensor, out: Tensor, slope: float, cap: Optional[float], grad_scale: Callable[[], Optional[Tensor]]
) -> Tensor:
    """``||dL/d(pre-activation)||_2`` from the output gradient and the output: the gradient passes where the output
    is positive (and, with a ``cap``, below it: ReLU6), and ``slope`` times it elsewhere. Unscaled, no sync."""
    positive = out > 0
    if cap is not None:  # ReLU6: no gradient at the cap either
        positive &= out < cap
    flowing = grad * positive if slope == 0 else torch.where(positive, grad, grad * slope)
    return unscaled_l2_norm(flowing, grad_scale)


def unscaled_l2_norm(t: Tensor, grad_scale: Callable[[], Optional[Tensor]]) -> Tensor:
    """``l2_norm(t)`` divided by the loss scale of a ``GradScaler`` in use (on the device: no sync), if any."""
    norm = l2_norm(t)
    scale = grad_scale()
    return norm if scale is None else norm / scale


def batch_rows(out: Tensor, unit_dim: int, batch_dim: int = 0) -> int:
    """Number of samples (batch rows) in one activation: the size of ``batch_dim`` (0, or 1 in the sequence-first
    layout), unless it is the unit dim or there is none."""
    if out.ndim >= 2 and unit_dim != batch_dim and batch_dim < out.ndim:
        return out.shape[batch_dim]
    return 1


@dataclass(frozen=True)
class GatheredSite:
    """One site's window statistics, on the host."""

    peak: Tensor  # float64, CPU
    samples: int
    forwards: int
    backwards: int
    grad_norm_sum: float
    nonfinite_passes: int = 0
    unmeasured: int = 0
    positions: int = 0
    abs_sum: Optional[Tensor] = None  # float64, CPU, with track_abs
    through_passes: int = 0
    through_sum: float = 0.0
    floor: Optional[Tensor] = None  # float32, CPU, for a capped activation


@dataclass(frozen=True)
class SiteLayout:
    """What every rank must know of a call site to take part in its reduction, even one it never ran.

    Attributes:
        name: the call site's name; sites pair up across ranks by name.
        units: the number of units (the length of its peaks).
        through: whether it keeps the through-gradient sums.
        abs_sum: whether it keeps the dormant-score sums.
        capped: whether it keeps a per-unit floor (a capped activation, for saturation).
        info: plain data that describes the site (picklable), handed back with its figures, so that a rank can
            report a site only another rank has run.
    """

    name: str
    units: int
    through: bool
    abs_sum: bool
    capped: bool = False
    info: Any = None

    @property
    def peak_size(self) -> int:
        """Length of the site's MAX-reduced state (see `SiteStats.peak_state`)."""
        return self.units * (2 if self.capped else 1)

    @property
    def sum_size(self) -> int:
        """Length of the site's SUM-reduced state (see `SiteStats.sums`)."""
        return _COUNTERS + (2 if self.through else 0) + (1 + self.units if self.abs_sum else 0)

    def key(self) -> tuple[str, int, bool, bool, bool]:
        return (self.name, self.units, self.through, self.abs_sum, self.capped)


def layout_of(name: str, stats: SiteStats, info: Any = None) -> SiteLayout:
    """The `SiteLayout` of a local site."""
    return SiteLayout(
        name, stats.units, stats.through_sum is not None, stats.abs_sum is not None, stats.floor is not None, info
    )


def distributed_world_size() -> int:
    """World size of the default process group, or 1 when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _collective_device() -> torch.device:
    """A device the default process group's backend can reduce on."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(count: int) -> int:
    """``count`` summed over the ranks of the default process group (every rank must call it)."""
    total = torch.tensor([count], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return int(total.item())


def _agree_on_sites(local: list[SiteLayout]) -> list[SiteLayout]:
    """The call sites every rank reduces, in one order that every rank shares.

    The common case costs one tiny all_reduce: a fingerprint of the local sites (names, sizes, descriptions, order)
    that matches on every rank means every rank has the same sites in the same order. Otherwise (stochastic depth or
    other control flow made ranks discover different sites, or in another order) the ranks exchange their site lists
    and agree on
    the union, paired by name: rank 0's order first, then sites only later ranks ran. A site a rank never ran takes
    part with empty statistics. Ranks never merge unrelated sites; a name with different sizes on two ranks (a unit
    dim inferred differently) raises the same `RelumonError` on every rank.
    """
    text = "\n".join(repr((layout.key(), layout.info)) for layout in local)
    fingerprint = zlib.crc32(text.encode())
    both = torch.tensor([fingerprint, -fingerprint], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    largest, smallest = both.tolist()
    if largest == -smallest:
        return local
    lists: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(lists, local)
    union: dict[str, SiteLayout] = {}
    for rank, layouts in enumerate(lists):
        for layout in layouts:
            known = union.get(layout.name)
            if known is None:
                union[layout.name] = layout
            elif known.key() != layout.key():
                raise RelumonError(
                    f"relumon's call sites differ across ranks: `{layout.name}` has {known.units} units on one rank "
                    f"and {layout.units} on rank {rank}. Every rank must see the same shapes at a call site; pass "
                    "`unit_dim=` if the unit dim was inferred differently."
                )
    return list(union.values())  # the first rank's description of each site, so every rank reports the same


def gather(sites: Sequence[tuple[SiteLayout, SiteStats]], sync_dist: bool) -> list[tuple[SiteLayout, GatheredSite]]:
    """Read every site's window to the host in one transfer, reducing across ranks first when ``sync_dist``.

    With ``sync_dist`` every rank must call this; sites pair up by name (see `_agree_on_sites`), and every rank
    returns the same global figures for the same sites in the same order. Without it, the local sites in order.
    """
    by_name = {layout.name: stats for layout, stats in sites}
    layouts = [layout for layout, _ in sites]
    if sync_dist:
        layouts = _agree_on_sites(layouts)
    if not layouts:
        return []
    local = [by_name.get(layout.name) for layout in layouts]
    present = [stats for stats in local if stats is not None]
    # Sites of a model split over devices meet on the first one.
    device = present[0].peak.device if present else _collective_device()
    peaks, sums, host_counts = [], [], []
    for layout, stats in zip(layouts, local):
        if stats is None:  # a site only other ranks ran: it takes part with nothing seen
            peaks.append(torch.full((layout.peak_size,), -math.inf, dtype=torch.float32, device=device))
            sums.append(torch.zeros(layout.sum_size, dtype=torch.float64, device=device))
            host_counts += [0.0] * layout.sum_size
        else:  # its sums go in one by one, one `cat` for all sites; a `.to` only where one is needed (it costs)
            same = stats.peak.device == device
            peaks.append(stats.peak_state() if same else stats.peak_state().to(device))
            sums += [t if same and t.dtype is torch.float64 else t.to(device, torch.float64) for t in stats.sums()]
            host_counts += stats.host_sum_state()
    all_peaks, all_sums = torch.cat(peaks), torch.cat(sums)
    all_sums += torch.tensor(host_counts, dtype=torch.float64).to(device)
    if sync_dist:
        dist.all_reduce(all_peaks, op=dist.ReduceOp.MAX)
        dist.all_reduce(all_sums, op=dist.ReduceOp.SUM)
    host = torch.cat([all_peaks.double(), all_sums]).cpu()  # the one transfer
    host_peaks, host_sums = host[: all_peaks.numel()], host[all_peaks.numel() :]  # float64: no rounding to 0
    values = host_sums.tolist()  # the scalars as Python floats at once: no tensor indexing per figure
    gathered = []
    peak_at = sum_at = 0
    for layout in layouts:
        row = values[sum_at : sum_at + _COUNTERS + 3]
        extra: dict[str, Any] = {}
        at = _COUNTERS
        if layout.through:
            extra.update(through_passes=int(row[at]), through_sum=row[at + 1])
            at += 2
        if layout.abs_sum:
            start = sum_at + at + 1
            extra.update(positions=int(row[at]), abs_sum=host_sums[start : start + layout.units])
        if layout.capped:
            extra.update(floor=-host_peaks[peak_at + layout.units : peak_at + 2 * layout.units])
        site = GatheredSite(
            peak=host_peaks[peak_at : peak_at + layout.units],
            samples=int(row[SAMPLES]),
            forwards=int(row[FORWARDS]),
            backwards=int(row[BACKWARDS]),
            grad_norm_sum=row[GRAD_NORM_SUM],
            nonfinite_passes=int(row[NONFINITE_PASSES]),
            unmeasured=int(row[UNMEASURED]),
            **extra,
        )
        gathered.append((layout, site))
        peak_at += layout.peak_size
        sum_at += layout.sum_size
    return gathered
