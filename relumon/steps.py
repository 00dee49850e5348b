"""Step boundaries and the measurement schedule: where a training step begins, and whether it is measured.

Runs inside the training step, like the rest of the per-step path (`relumon.recorder`): a boundary costs a few
attribute writes, and the schedule one multiplication per step.

- **Step boundaries.** A call of the root module, ``new_step()``, or the first forward after a backward pass starts
  a training step; call counters restart there, so the n-th call of a module in a step maps to the same call site.
  So do a counted forward inside another backward pass than the step's (a reentrant checkpoint's recompute in a
  model driven through its methods), and a repeat of a site already called in the step, not fed by it, whose output
  carries no gradient (a frozen trunk: no backward can mark its steps), or after `MAX_CALLS_PER_STEP` calls. The
  recorder's fold tells those from the calls it sees; every boundary is a call of `StepClock.start_step`.
- **The measurement schedule.** About one training step in ``measure_every`` is measured, picked by a golden-ratio
  sequence (`is_measured_step`): spread evenly, never periodic, so loops that alternate phases get every phase
  measured. On top of it, each call site's first call of every window is measured (so no window is left without
  figures), and a site the monitor marked `Site.exact` (a sampled death being confirmed) is measured on every call.
  Compiled code measures every step (a step counter read inside a graph would recompile it every step).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from relumon.errors import RelumonWarning, is_strict, warn
from relumon.hooks import is_compiling, is_counted_forward

__all__ = ["StepClock", "MAX_CALLS_PER_STEP", "is_measured_step"]

#: Calls of one watched module within one step beyond which relumon assumes it missed a step boundary (a model driven
#: through its methods whose outputs are detached, with no backward through them): it starts a new step and warns.
MAX_CALLS_PER_STEP = 256

#: The golden ratio's fractional part: steps ``s`` with ``frac(s * phi) < 1/n`` are about one in ``n``, spread
#: evenly, and never periodic, so a loop that alternates phases (GAN D and G steps) gets every phase measured.
_PHI = 0.6180339887498949


def is_measured_step(step: int, measure_every: int) -> bool:
    """Whether training step ``step`` (0-based) is one of the measured ones: about one in ``measure_every``.

    Step 0 always is; ``measure_every=1`` measures every step.
    """
    return (step * _PHI) % 1.0 < 1.0 / measure_every


class StepClock:
    """Marks where each training step begins and whether it is measured; the recorder's fold reads it on every call.

    The recorder attaches its hooks: `on_root_forward` and `on_root_done` on the root module, `on_backward` on every
    site's statistics, `backward_seen` on unmeasured outputs.

    Args:
        measure_every: measure about one training step in this many (`is_measured_step`).
        on_start: called at every step boundary with ``forward_done``: the recorder restarts its call counters there,
            and discovery lets go of its records of the first training forward once that forward is over.
    """

    def __init__(self, measure_every: int, on_start: Callable[[bool], None]) -> None:
        self.measure_every = measure_every
        self._on_start = on_start
        self.step_pending = False  # a backward finished: the next forward outside backward starts a step
        self.in_step = False  # a counted forward happened since the last step boundary
        self.measuring = True  # this step is one of the measured ones
        #: Training steps with a counted forward since the recorder was attached (or since the run began, on resume).
        self.steps_seen = 0
        self.root_step = False  # the open step began with a call of the root module
        #: Whether a training forward has run to its end (or reached a backward pass) since discovery began.
        self.forward_done = False
        #: The autograd graph task the open step's first counted forward ran in (-1: outside any backward).
        self.step_task = -1
        #: Whether a training forward of the root module, or a ``new_step()`` with grad enabled, has happened.
        self.training_seen = False
        #: Whether compiled code ran a counted forward: its steps are not counted in ``steps_seen`` as they run.
        self.compiled_seen = False
        self._warned_boundary = False

    def start_step(self) -> None:
        """A new training step: call counters restart, so the n-th call of a module maps to the same site.

        A step starts at a call of the root module, at ``Monitor.new_step()``, or at the first counted forward after
        a backward pass reached the step's graph, whether or not the step was measured and whether or not gradients
        are tracked (unmeasured calls carry a tiny hook for that alone). Idempotent until a counted forward happens,
        so these can all mark the same boundary.
        """
        self.step_pending = False
        self.root_step = False
        self.in_step = False
        self._on_start(self.forward_done)

    def begin(self, task: int, compiling: bool) -> None:
        """The first counted forward of a step (in autograd graph task ``task``) decides whether it is measured."""
        self.in_step = True
        if compiling:
            # A step counter read inside a compiled graph would be guarded on and recompile every step, so
            # compiled code measures every step; inductor fuses the reductions into its kernels. Its steps are
            # counted at report time, from the sites' compiled forward counters (`WindowCloser.count_compiled_steps`).
            self.measuring = True
            self.compiled_seen = True
        else:
            self.step_task = task
            self.measuring = is_measured_step(self.steps_seen, self.measure_every)
            self.steps_seen += 1

    # ------------------------------------------------------------------ hooks

    def on_root_forward(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook of the root module: a step boundary."""
        try:
            self.start_step()
            self.root_step = True  # this step's boundary is the root call: no backward detection needed
            if not self.training_seen and not is_compiling() and is_counted_forward(module):
                self.training_seen = True
        except Exception as err:  # pragma: no cover - start_step only resets counters
            if is_strict():
                raise
            warn(f"relumon: an error inside relumon's step boundary ({type(err).__name__}: {err})", RelumonWarning)
        return None

    def on_root_done(self, module: nn.Module, args: Any, out: Any) -> None:
        """Forward hook of the root module."""
        if not is_compiling():
            self.forward_done = True  # the step's forward ended without an exception: its wiring is all read

    def on_backward(self) -> None:
        """Called by a site's statistics after each backward pass through it."""
        self.step_pending = True
        self.forward_done = True

    def backward_seen(self, grad: Tensor) -> None:
        """Tensor hook: a backward pass reached this step's graph, so the next forward outside it starts a step."""
        self.step_pending = True
        self.forward_done = True
        return None

    def warn_no_boundary(self, name: str) -> None:
        """Say once that the watched module at ``name`` ran `MAX_CALLS_PER_STEP` times with no step boundary."""
        if self._warned_boundary:
            return
        self._warned_boundary = True
        warn(
            f"relumon: `{name or 'root'}` ran {MAX_CALLS_PER_STEP} times without a step boundary (no call of "
            "the watched model, no backward pass through its activations, no `monitor.new_step()`), so relumon "
            "starts a new step every "
            f"{MAX_CALLS_PER_STEP} calls to bound its call sites. Call `monitor.new_step()` at the start of each "
            "training step (e.g. for a model driven through its methods whose outputs are detached).",
            RelumonWarning,
        )
