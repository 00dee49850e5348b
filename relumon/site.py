"""Watched modules and their call sites: what the recorder folds each call into, and what each activation type is.

A **watched module** (`Watched`) is a module of the watched types, or a functional call site (``encoder.F.relu``)
found while the model runs: its call counter for the current step, its sites by call index, and the facts of its
activation that the fold needs (the regime, the slope below 0, the cap). A **call site** (`Site`) is the n-th call of
a watched module within one training step, with its `relumon.state.SiteStats`; calls fed by the same weights share
one (`relumon.discovery` decides). Activations of the ReLU family count dead units (`ZERO_FLOOR_TYPES`), those with a
negative regime count units stuck in it (`NEGATIVE_REGIME_TYPES`); others get gradient flow only (`counts_dead`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import Tensor, nn

from relumon.state import SiteLayout, SiteStats, layout_of

__all__ = ["Site", "Watched", "NEGATIVE_REGIME_TYPES", "ZERO_FLOOR_TYPES", "counts_dead"]

#: Activations whose output is 0 for non-positive inputs: a unit is dead when its output was 0 everywhere.
ZERO_FLOOR_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)

#: Activations that pass negative values: for them "dead" means "stuck in the negative regime".
NEGATIVE_REGIME_TYPES: tuple[type[nn.Module], ...] = (
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
)


class Site:
    """A call site: the n-th call of a watched module within one training step, with its on-device statistics.

    Attributes:
        name: ``<module path>`` for the first call, then ``<module path>.call2``, ``.call3``...
        module_name: the module's path (for functional calls, the enclosing module's path plus ``F.<fn>``).
        call: 0-based call index within a step.
        kind: the activation's class name (``"ReLU"``) or ``"F.relu"``.
        fed_by: path of the module whose output fed the activation in its first training forward, if any.
        negative_regime: whether the activation passes negative values (LeakyReLU...).
        stats: the window's statistics.
        counts_dead: whether dead units are counted (the ReLU family and activations with a negative regime); else
            gradient flow only.
        upstream: names of the nearest upstream sites in the autograd graph of the first training forward; None when
            unknown (discovered later, or under torch.compile).
        from_input: whether a path from the site reaches the data input without crossing another site.
        disabled: why relumon stopped measuring this site (an error inside its hooks), or None.
        grad_hook: the tensor hook registered on the site's outputs (``stats.grad_hook``, errors contained).
    """

    __slots__ = (
        "name",
        "module_name",
        "call",
        "kind",
        "fed_by",
        "negative_regime",
        "stats",
        "counts_dead",
        "upstream",
        "from_input",
        "exact",
        "disabled",
        "grad_hook",
        "feature_last",
    )

    def __init__(
        self,
        name: str,
        module_name: str,
        call: int,
        kind: str,
        fed_by: Optional[str],
        negative_regime: bool,
        stats: SiteStats,
        counts_dead: bool = True,
    ) -> None:
        self.name = name
        self.module_name = module_name
        self.call = call
        self.kind = kind
        self.fed_by = fed_by
        self.negative_regime = negative_regime
        self.stats = stats
        #: Measure every call, whatever the schedule: set by the monitor while a sampled death is being confirmed.
        self.exact = False
        self.counts_dead = counts_dead
        self.upstream: Optional[tuple[str, ...]] = None
        self.from_input = True
        self.disabled: Optional[str] = None
        self.grad_hook: Callable[[Tensor], None] = stats.grad_hook
        #: Whether the units are the last dim (Linear-like), so calls of another rank keep them there.
        self.feature_last = stats.ndim <= 2 or stats.unit_dim == stats.ndim - 1

    def layout(self) -> SiteLayout:
        """What other ranks need to pair this site with theirs, and to report it if they never ran it."""
        info = {
            "module_name": self.module_name,
            "call": self.call,
            "kind": self.kind,
            "fed_by": self.fed_by,
            "negative_regime": self.negative_regime,
            "unit_dim": self.stats.unit_dim,
            "counts_dead": self.counts_dead,
            "cap": self.stats.cap,
            "upstream": self.upstream,
            "from_input": self.from_input,
            "disabled": self.disabled,
        }
        return layout_of(self.name, self.stats, info)


class Watched:
    """A watched module: its path, its call counter for the current step and its sites by call index."""

    __slots__ = (
        "name",
        "kind",
        "negative_regime",
        "unit_dim",
        "slope",
        "calls",
        "sites",
        "warned_shape",
        "cap",
        "counts_dead",
        "skipped",
        "disabled",
        "regime_from_input",
        "distinct",
        "by_key",
        "rows",
        "restart",
        "recurrent",
        "warned_units",
        "signatures",
        "keyed",
    )

    def __init__(
        self,
        name: str,
        kind: str,
        negative_regime: bool,
        unit_dim: Optional[int],
        slope: Optional[float],
        cap: Optional[float] = None,
        counts_dead: bool = True,
        regime_from_input: bool = False,
    ) -> None:
        self.name = name
        self.kind = kind
        self.negative_regime = negative_regime
        self.unit_dim = unit_dim
        #: The activation's derivative for non-positive outputs (0 for ReLU, alpha for LeakyReLU); None if it is not
        #: that simple (GELU...), which leaves the gradient through the activation unmeasured.
        self.slope = slope
        #: The activation's upper cap (6 for ReLU6): a unit whose output was the cap everywhere is saturated.
        self.cap = cap
        self.counts_dead = counts_dead
        self.calls = 0
        self.sites: list[Site] = []
        self.warned_shape = False
        self.skipped = False  # ran in a training forward with a dtype that is not watched
        #: Why the whole module was disabled (an error before its call site existed), or None.
        self.disabled: Optional[str] = None
        #: Decide the regime from the input's sign (PReLU: a learned slope below 0 makes a negative input's output
        #: positive, so the output's sign says nothing).
        self.regime_from_input = regime_from_input
        # ``sites`` is indexed by call index within a step; calls fed by the same weights share one site, so a site
        # can appear at several indices. Per call index: whether it adds batch rows (a recurrent cell's later time
        # steps are the same rows), whether it repeats a site already called in the step without being fed by it (a
        # possible missed step boundary), and whether it is fed by the same site's earlier output.
        self.distinct: list[Site] = []
        self.by_key: dict[Any, Site] = {}
        self.rows: list[bool] = []
        self.restart: list[bool] = []
        self.recurrent: list[bool] = []
        self.warned_units = False
        #: The site of each call signature (`relumon.wiring.call_signature`) seen at discovery; None where two sites
        #: share one. Once the module has several sites (``keyed``), each call is matched by its signature, so calls
        #: skipped by the data (experts with no token, LayerDrop) do not shift later calls into other sites.
        self.signatures: dict[Any, Optional[Site]] = {}
        self.keyed = False

    @classmethod
    def of_module(cls, name: str, module: nn.Module, unit_dim: Optional[int]) -> Watched:
        """A watched activation module at path ``name`` (``unit_dim``: the dim the user gave for it, or None)."""
        return cls(
            name,
            type(module).__name__,
            _is_negative_regime(module),
            unit_dim,
            _slope_of(module),
            _cap_of(module),
            counts_dead(module),
            regime_from_input=isinstance(module, nn.PReLU),
        )

    @classmethod
    def of_function(
        cls, path: str, fn: str, args: tuple[Any, ...], kwargs: dict[str, Any], unit_dim: Optional[int]
    ) -> Watched:
        """A functional call site at ``path`` (``<module path>.F.<fn>``), from the first call of ``F.<fn>`` there."""
        if fn == "leaky_relu":
            slope = float(kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01))
        else:
            slope = 0.0
        return cls(path, f"F.{fn}", fn == "leaky_relu", unit_dim, slope, 6.0 if fn == "relu6" else None)


def counts_dead(module: nn.Module) -> bool:
    """Whether relumon counts dead units of ``module``: the ReLU family, and activations with a negative regime.

    Other activations (Tanh, Sigmoid...) get gradient flow only: "dead" has no meaning for them.
    """
    return isinstance(module, ZERO_FLOOR_TYPES + NEGATIVE_REGIME_TYPES)


def _is_negative_regime(module: nn.Module) -> bool:
    """Whether ``module`` passes negative values. RReLU does while its random slope can be above 0 (the default)."""
    if isinstance(module, nn.RReLU):
        return float(module.upper) > 0
    return isinstance(module, NEGATIVE_REGIME_TYPES)


def _cap_of(module: nn.Module) -> Optional[float]:
    """The upper cap of a capped activation (6 for ReLU6), else None."""
    if isinstance(module, nn.ReLU6):
        return float(module.max_val)
    return None


def _slope_of(module: nn.Module) -> Optional[float]:
    """The derivative of ``module`` for non-positive outputs, if it is a ReLU, ReLU6 or LeakyReLU; else None.

    ReLU6 also passes no gradient at its cap, which `relumon.state.SiteStats` handles with the site's cap. RReLU's
    training slope is random and PReLU's is learned: their gradient through is left unmeasured.
    """
    if type(module) is nn.ReLU or type(module) is nn.ReLU6:
        return 0.0
    if isinstance(module, nn.LeakyReLU):
        return float(module.negative_slope)
    return None
