"""Per-call-site statistics, kept on the activation's device and combined across processes.

Each `SiteStats` holds O(units) state for one call site of a watched activation module:

- ``peak``: float32, one value per unit, the largest output seen in the window (``-inf`` before any). A unit is
  dead when its peak is ``<= 0``: a ReLU output is ``>= 0``, so ``peak <= 0`` means it was exactly 0 everywhere; a
  LeakyReLU output is ``< 0`` exactly where its pre-activation is, so ``peak <= 0`` means stuck in the negative
  regime. ``torch.maximum`` propagates NaN, so a unit that produced NaN has a NaN peak and counts as *non-finite*,
  neither dead nor alive.
- ``abs_sum`` (only with ``track_abs``, for the dormant score): float32 per unit, the sum of ``|activation|``, and
  ``positions``, the number of values summed per unit.
- ``through_sum``, ``through_passes`` (only with a ``through_slope``): the summed norm of the gradient that flows
  *through* the activation, ``dL/d(pre-activation) = dL/d(output) * f'``, where ``f'`` is 1 for a positive output and
  the slope (0 for ReLU, alpha for LeakyReLU) elsewhere, and the number of backward passes it was taken in.
- ``grad_norm_sum``: float64, shape ``(1,)``, the summed gradient norms.
- The counts (samples, forwards, backwards, and the passes and positions above) are plain Python ints in eager
  mode: a count needs no kernel, and its value is known on the host anyway (it comes from shapes). Inside a
  torch.compile graph a Python int that changes every step would be guarded on and force a recompile each step, so
  there the counts go to float64 tensors of shape ``(1,)`` instead (``samples``, ``forwards``...); ``gather`` adds
  both. (Shape ``(1,)``, not 0-d: torch.compile on torch 2.13 silently drops in-place updates of 0-d float64 CPU
  tensors made inside a compiled graph. Not views of one buffer either: in-place updates of ``unbind``/``split``
  views fail to trace.)

Per training step the hooks only launch in-place kernels on device tensors and add to host ints: nothing is read
back from the device until `gather` runs at report time. Across processes the peaks reduce with MAX (a unit is alive
if it fired on any rank) and the counts and sums with SUM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from relumon.errors import RelumonError
from relumon.hooks import is_compiling

__all__ = ["SiteStats", "GatheredSite", "gather", "distributed_world_size", "abs_sum", "l2_norm"]

# Order of the counters when gathered.
SAMPLES, FORWARDS, BACKWARDS, GRAD_NORM_SUM = range(4)


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
    """

    __slots__ = (
        "units",
        "unit_dim",
        "ndim",
        "reduce_dims",
        "peak",
        "samples",
        "forwards",
        "backwards",
        "grad_norm_sum",
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
        "_grad_scale",
        "_on_backward",
        "grad_hook",
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
    ) -> None:
        self.units = units
        self.unit_dim = unit_dim
        self.ndim = ndim
        self.reduce_dims = tuple(d for d in range(ndim) if d != unit_dim)
        self.peak = torch.full((units,), -math.inf, dtype=torch.float32, device=device)
        self.samples, self.forwards, self.backwards, self.grad_norm_sum = (
            torch.zeros(1, dtype=torch.float64, device=device) for _ in range(4)
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
        self._grad_scale = grad_scale
        self._on_backward = on_backward
        #: Tensor hook for the activation's output: accumulates the gradient norm of each backward pass.
        self.grad_hook = self._make_grad_hook()

    def observe(self, out: Tensor) -> None:
        """Fold one training forward's activation into the window. Launches kernels only; never syncs."""
        x = out.detach()
        if self.ndim == 0:
            x = x.reshape(1)
        compiling = is_compiling()
        if self.abs_sum is not None and self.positions is not None:
            if self.reduce_dims:
                self.abs_sum.add_(abs_sum(x, self.reduce_dims))
            else:
                self.abs_sum.add_(x.abs())
            if compiling:
                self.positions.add_(x.numel() // self.units)
            else:
                self.n_positions += x.numel() // self.units
        if self.reduce_dims:
            x = x.amax(dim=self.reduce_dims)
        torch.maximum(self.peak, x, out=self.peak)
        if compiling:
            self.samples.add_(batch_rows(out, self.unit_dim))
            self.forwards.add_(1)
        else:
            self.n_samples += batch_rows(out, self.unit_dim)
            self.n_forwards += 1

    def _make_grad_hook(self) -> Callable[[Tensor], None]:
        # A closure rather than a bound method: torch.compile traces a closure over tensors without a graph break.
        stats, grad_norm_sum, backwards = self, self.grad_norm_sum, self.backwards
        grad_scale, on_backward = self._grad_scale, self._on_backward

        def grad_hook(grad: Tensor) -> None:
            """Accumulate ``||dL/d(output)||_2`` of one backward pass. Returns None: a value would replace the grad."""
            grad_norm_sum.add_(unscaled_l2_norm(grad.detach(), grad_scale))
            if is_compiling():
                backwards.add_(1)
            else:  # Python side effects; compiled steps start through the root forward instead
                stats.n_backwards += 1
                on_backward()

        return grad_hook

    def grad_hook_for(self, out: Tensor) -> Callable[[Tensor], None]:
        """The tensor hook for one output when the gradient *through* the activation is measured too.

        It needs that output's sign pattern, so it is made per call (a small closure); the output is already kept
        for backward by autograd in the common cases. If the output was modified in place after the activation, its
        signs no longer say where the activation passed gradient, and that pass adds no through-gradient.
        """
        if self.through_slope is None or self.through_sum is None or self.through_passes is None:
            return self.grad_hook
        stats, slope, through_sum, through_passes = self, self.through_slope, self.through_sum, self.through_passes
        grad_hook, grad_scale = self.grad_hook, self._grad_scale
        # Not `out` itself: a hook registered on a tensor that holds that tensor is never freed by autograd. The
        # detached alias shares its storage and version counter, and autograd keeps the storage for backward anyway.
        out = out.detach()
        version = None if is_compiling() else out._version

        def grad_and_through_hook(grad: Tensor) -> None:
            grad_hook(grad)
            if version is not None and out._version != version:
                return None
            g, positive = grad.detach(), out > 0
            flowing = g * positive if slope == 0 else torch.where(positive, g, g * slope)
            through_sum.add_(unscaled_l2_norm(flowing, grad_scale))
            if is_compiling():
                through_passes.add_(1)
            else:
                stats.n_through_passes += 1
            return None

        return grad_and_through_hook

    def _sums(self) -> list[Tensor]:
        sums = [self.samples, self.forwards, self.backwards, self.grad_norm_sum]
        if self.through_sum is not None and self.through_passes is not None:
            sums += [self.through_passes, self.through_sum]
        if self.abs_sum is not None and self.positions is not None:
            sums += [self.positions, self.abs_sum]
        return sums

    def sum_state(self) -> Tensor:
        """The device part of everything that combines across ranks by SUM, as one float64 tensor (a copy):
        ``[samples, forwards, backwards, grad_norm_sum]``, then ``[through_passes, through_sum]`` with a
        ``through_slope``, then ``[positions, *abs_sum]`` with ``track_abs``. Add ``host_sum_state()``."""
        return torch.cat([t.double() for t in self._sums()])

    def host_sum_state(self) -> list[float]:
        """The eager-mode counts, laid out like ``sum_state()`` (zeros where a sum lives on the device only)."""
        host = [float(self.n_samples), float(self.n_forwards), float(self.n_backwards), 0.0]
        if self.through_sum is not None:
            host += [float(self.n_through_passes), 0.0]
        if self.abs_sum is not None:
            host += [float(self.n_positions)] + [0.0] * self.units
        return host

    @property
    def sum_state_size(self) -> int:
        """Length of ``sum_state()``."""
        return sum(t.numel() for t in self._sums())

    def reset(self) -> None:
        """Start a new window."""
        self.peak.fill_(-math.inf)
        for tensor in self._sums():
            tensor.zero_()
        self.n_samples = self.n_forwards = self.n_backwards = self.n_through_passes = self.n_positions = 0


def l2_norm(t: Tensor) -> Tensor:
    """``||t||_2`` as a float32 scalar tensor (float64 for a float64 ``t``), accumulated in at least fp32, no sync.

    A float32 contiguous tensor goes through ``torch.dot(t, t)`` (BLAS), about twice as fast as
    ``linalg.vector_norm`` on the CPU; other dtypes (bf16, fp16) through ``vector_norm(dtype=float32)``, since a
    half-precision ``dot`` would round the sum of squares to half precision.
    """
    if t.dtype == torch.float32 and not is_compiling() and t.is_contiguous():  # compiled code fuses vector_norm
        flat = t.view(-1)
        return torch.dot(flat, flat).sqrt()
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


def unscaled_l2_norm(t: Tensor, grad_scale: Callable[[], Optional[Tensor]]) -> Tensor:
    """``l2_norm(t)`` divided by the loss scale of a ``GradScaler`` in use (on the device: no sync), if any."""
    norm = l2_norm(t)
    scale = grad_scale()
    return norm if scale is None else norm / scale


def batch_rows(out: Tensor, unit_dim: int) -> int:
    """Number of samples (batch rows) in one activation: dim 0, unless it is the unit dim or there is none."""
    if out.ndim >= 2 and unit_dim != 0:
        return out.shape[0]
    return 1


@dataclass(frozen=True)
class GatheredSite:
    """One site's window statistics, on the host."""

    peak: Tensor  # float32, CPU
    samples: int
    forwards: int
    backwards: int
    grad_norm_sum: float
    positions: int = 0
    abs_sum: Optional[Tensor] = None  # float64, CPU, with track_abs
    through_passes: int = 0
    through_sum: float = 0.0


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


def _check_same_shape_on_every_rank(peaks: Tensor, sums: Tensor) -> None:
    """Element-wise reductions of buffers that differ in size across ranks would fail deep in the backend, or worse,
    reduce unrelated units together. One tiny all_reduce first makes every rank raise the same clear error."""
    sizes = torch.tensor([peaks.numel(), sums.numel()], dtype=torch.int64, device=peaks.device)
    both = torch.cat([sizes, -sizes])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    largest, smallest = both[:2].tolist(), (-both[2:]).tolist()
    if largest != smallest:
        raise RelumonError(
            f"relumon's call sites differ across ranks (this rank: {peaks.numel()} units in {sums.numel()} counters; "
            f"largest {largest}, smallest {smallest}): every rank must run the same watched layers before report()"
        )


def gather(sites: Sequence[SiteStats], sync_dist: bool) -> list[GatheredSite]:
    """Read every site's window to the host in one transfer, reducing across ranks first when ``sync_dist``.

    With ``sync_dist`` every rank must call this with the same sites in the same order; each then returns the
    same global figures.
    """
    if not sites:
        if sync_dist:  # still take part, or the ranks that have sites would wait forever
            device = _collective_device()
            _check_same_shape_on_every_rank(torch.zeros(0, device=device), torch.zeros(0, device=device))
        return []
    device = sites[0].peak.device  # sites of a model split over devices meet on the first one
    peaks = torch.cat([s.peak.to(device) for s in sites])
    sums = torch.cat([s.sum_state().to(device) for s in sites])
    host_counts = [count for s in sites for count in s.host_sum_state()]
    sums += torch.tensor(host_counts, dtype=torch.float64).to(device)
    if sync_dist:
        _check_same_shape_on_every_rank(peaks, sums)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    host = torch.cat([peaks.double(), sums]).cpu()  # the one transfer
    host_peaks, host_sums = host[: peaks.numel()].float(), host[peaks.numel() :]
    gathered = []
    peak_at = sum_at = 0
    for site in sites:
        row = host_sums[sum_at : sum_at + site.sum_state_size]
        extra: dict[str, Any] = {}
        at = 4
        if site.through_sum is not None:
            extra.update(through_passes=int(row[at]), through_sum=float(row[at + 1]))
            at += 2
        if site.abs_sum is not None:
            extra.update(positions=int(row[at]), abs_sum=row[at + 1 : at + 1 + site.units])
        gathered.append(
            GatheredSite(
                peak=host_peaks[peak_at : peak_at + site.units],
                samples=int(row[SAMPLES]),
                forwards=int(row[FORWARDS]),
                backwards=int(row[BACKWARDS]),
                grad_norm_sum=float(row[GRAD_NORM_SUM]),
                **extra,
            )
        )
        peak_at += site.units
        sum_at += site.sum_state_size
    return gathered
