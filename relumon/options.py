"""relumon's options, declared and validated once.

[`relumon.watch`][relumon.watch], [`Monitor`][relumon.Monitor] and the Lightning callback
[`ReluMonitor`][relumon.lightning.ReluMonitor] all take these as keyword arguments (or a ready
[`Options`][relumon.Options] as ``options=``) and forward them here, so an option is added, documented and checked
in one place. Each error says what was expected and what was got.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Mapping, Optional, Sequence, Union

from torch import nn

from relumon.cause import check_optimizers

__all__ = [
    "CALLBACK_ON_DEAD_CHOICES",
    "FROM_TRAINER",
    "CallbackOnDead",
    "resolve_callback_options",
    "DEFAULT_TYPES",
    "ON_DEAD_CHOICES",
    "RECYCLE_CHOICES",
    "OnDead",
    "OptionAttributes",
    "Options",
    "check_int_at_least",
    "check_on_dead",
    "option_names",
    "signature_with_options",
]

#: The activation types watched by default: the ReLU family. ``nn.ReLU6`` subclasses ``nn.Hardtanh``, not ``nn.ReLU``,
#: so it is listed on its own.
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.RReLU, nn.PReLU)

#: What [`relumon.watch`][relumon.watch] does when a layer dies (the Lightning callback adds ``"stop"``).
OnDead = Union[Literal["warn", "raise", "ignore"], Callable[[Any], Any]]

ON_DEAD_CHOICES = ("warn", "raise", "ignore")

#: What ``recycle=`` can act on (see [`Monitor.recycle`][relumon.Monitor.recycle]).
RECYCLE_CHOICES = ("dead", "dormant")


@dataclass(frozen=True)
class Options:
    """How relumon watches a model: every option of [`relumon.watch`][relumon.watch], in one place.

    ``relumon.watch(model, measure_every=1)`` is ``relumon.watch(model, options=Options(measure_every=1))``. The
    Lightning callback takes the same keyword arguments, except ``grad_scaler``, ``sync_dist`` and ``optimizer``,
    which it takes from the Trainer, and ``on_dead``, which it handles itself (adding ``"stop"``).

    Attributes:
        types: activation classes to watch (one class alone is accepted). Default: the ReLU family, ``(nn.ReLU,
            nn.LeakyReLU, nn.ReLU6, nn.RReLU, nn.PReLU)``. ReLU and ReLU6 count dead units (output 0; ReLU6 also
            saturated units, output 6); LeakyReLU, PReLU and RReLU count units stuck in the negative regime. Other
            classes (``nn.Tanh``, ``nn.Sigmoid``...) get gradient flow only, except those whose negative outputs mark
            a negative regime (ELU, GELU, SiLU...), which count it too.
        unit_dim: the dimension that indexes units. ``None`` infers it per call site from the activation's rank and
            the module that fed it (dim 1 for conv feature maps, the last dim otherwise); an int applies to every
            site; a mapping from module path to int overrides single modules (key ``"*"`` for the rest).
        batch_dim: the dimension that holds the samples (batch rows), for ``samples`` and ``min_samples``. ``None``
            uses dim 0, except for 3-D activations in PyTorch's sequence-first layout ``(S, B, E)``: inside a module
            with ``batch_first=False`` (``nn.LSTM``, ``nn.TransformerEncoderLayer``...), or fed by such modules when
            every one in the model says so, the samples are dim 1. An int applies to every site; a mapping from
            module path to int overrides single modules (key ``"*"`` for the rest).
        track_grad: also record the gradient norm at each activation's output.
        grad_scaler: a ``torch.amp.GradScaler`` in use, so that gradient norms are reported unscaled.
        on_dead: what to do the first time a window measured on every call finds every unit of a layer dead (once per
            dead cascade, for its root; a sampled window is confirmed first): ``"warn"`` (a
            [`DeadUnitsWarning`][relumon.DeadUnitsWarning]), ``"raise"`` (a [`RelumonError`][relumon.RelumonError]),
            ``"ignore"``, or a callable that receives the [`LayerReport`][relumon.LayerReport].
        min_samples: a window must have seen at least this many samples of a layer before it can alert.
        sync_dist: reduce reports across ``torch.distributed`` ranks. ``None`` does so whenever a process group of
            more than one rank is initialised.
        measure_every: measure about one training step in every ``measure_every``, spread by a golden-ratio
            sequence (never periodic, so alternating phases all get measured), plus each call site's first call in
            every window. The default 4 keeps the overhead near zero (see ``docs/benchmarks.md``); "dead" then means
            0 for every *measured* sample, ``samples`` counts only those, and a sampled window never alerts on its own
            (see ``LayerReport.confirming``). ``measure_every=1`` measures every step exactly.
        permanent_after: a unit dead for this many closed windows in a row counts as permanently dead.
        dormant_tau: also report tau-dormant units (Sokar et al., ICML 2023): a unit whose mean ``|activation|``,
            divided by the layer's mean of the same, is ``<= tau``. Costs one more reduction per measured call.
        functional: also watch ``F.relu``, ``torch.relu``, ``x.relu()``, ``F.relu6`` and ``F.leaky_relu`` calls made
            inside the model's forward (see [`relumon.functional`][relumon.functional] for the mechanism and its
            limits). Eager only.
        grad_through: also measure the gradient that flows *through* each ReLU/ReLU6/LeakyReLU to the layer below,
            ``dL/d(output)`` times the activation's derivative (1 where the output is positive, 0 or alpha
            elsewhere, and 0 at a ReLU6's cap of 6), as ``grad_through_norm``. A dead layer shows a gradient at its
            output and none through it.
            Costs two elementwise passes over the gradient per measured call.
        optimizer: the ``torch.optim.Optimizer`` (or a sequence of them) that trains the model, so that an alert's
            [`Cause`][relumon.cause.Cause] says the learning rate and how far one update moved the weights feeding the
            dead layer (``LayerReport.cause``). It fills [`Monitor.optimizers`][relumon.Monitor], which may also be
            set later. None: the cause says less (no learning rate, no update size). Costs a few small kernels per
            optimizer step, no host read (see `relumon.cause`).
        recycle: ``None`` (the default), ``"dead"`` or ``"dormant"``: re-initialise the units that each closed window
            confirmed dead (or tau-dormant, which needs ``dormant_tau``) right after closing it, as
            [`Monitor.recycle`][relumon.Monitor.recycle] does, with the optimizers in ``Monitor.optimizers`` (the
            Lightning callback sets them from the Trainer). relumon then records the wiring of the first training
            forward (once), and measures on every call of the next window the sites where a sampled window found
            candidates, so that only confirmed units are recycled. See ``docs/plasticity.md``.
        certify: also *prove* which units are dead for every input and every later step
            ([`LayerReport.certified`][relumon.LayerReport], see `relumon.proof` and ``docs/check.md``). relumon then
            records the wiring of the first training forward (once) and checks the weights, the wiring and the
            optimizers (``optimizer=``) at report time. Nothing more runs per step.

    Raises:
        TypeError: on an argument of the wrong type.
        ValueError: on an argument out of range.
    """

    types: tuple[type[nn.Module], ...] = DEFAULT_TYPES
    unit_dim: Union[int, Mapping[str, int], None] = None
    batch_dim: Union[int, Mapping[str, int], None] = None
    track_grad: bool = True
    grad_scaler: Optional[Any] = None
    on_dead: OnDead = "warn"
    min_samples: int = 1
    sync_dist: Optional[bool] = None
    measure_every: int = 4
    permanent_after: int = 3
    dormant_tau: Optional[float] = None
    functional: bool = False
    grad_through: bool = False
    optimizer: Union[Any, Sequence[Any], None] = None
    recycle: Optional[Literal["dead", "dormant"]] = None
    certify: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "types", _check_types(self.types))
        object.__setattr__(self, "unit_dim", _check_unit_dim(self.unit_dim))
        object.__setattr__(self, "batch_dim", _check_unit_dim(self.batch_dim, "batch_dim"))
        check_on_dead(self.on_dead, ON_DEAD_CHOICES)
        check_int_at_least("min_samples", self.min_samples)
        check_int_at_least("measure_every", self.measure_every)
        check_int_at_least("permanent_after", self.permanent_after)
        for name in ("track_grad", "functional", "grad_through", "certify"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"expected `{name}` to be True or False, got {getattr(self, name)!r}")
        if self.sync_dist is not None and not isinstance(self.sync_dist, bool):
            raise TypeError(f"expected `sync_dist` to be True, False or None, got {self.sync_dist!r}")
        tau = self.dormant_tau
        if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 <= tau < 1):
            raise ValueError(f"expected `dormant_tau` to be None or a number in [0, 1), got {tau!r}")
        object.__setattr__(self, "optimizer", _check_optimizer(self.optimizer))
        if self.recycle is not None and self.recycle not in RECYCLE_CHOICES:
            raise ValueError(f"expected `recycle` to be None or one of {RECYCLE_CHOICES}, got {self.recycle!r}")
        if self.recycle == "dormant" and self.dormant_tau is None:
            raise ValueError(
                "`recycle='dormant'` needs `dormant_tau` (e.g. dormant_tau=0.1): the tau-dormant score is measured "
                "only when it is set"
            )
        if self.grad_scaler is not None and not hasattr(self.grad_scaler, "is_enabled"):
            raise TypeError(
                f"expected `grad_scaler` to be a torch.amp.GradScaler, got {type(self.grad_scaler).__name__}"
            )

    @classmethod
    def resolve(
        cls,
        options: Optional[Options],
        overrides: Mapping[str, Any],
        *,
        owner: str,
        own: Sequence[str] = ("options",),
        excluded: Sequence[str] = (),
    ) -> Options:
        """``options`` (or the defaults) with ``overrides`` applied, naming ``owner`` in the error for an unknown key.

        Args:
            options: a ready [`Options`][relumon.Options], or None for the defaults.
            overrides: keyword arguments, each the name of an option.
            owner: the callable the keywords were given to, for the error message (e.g. ``"relumon.watch()"``).
            own: ``owner``'s own keyword arguments, listed in the error next to the options it forwards.
            excluded: options ``owner`` does not accept (left out of the list in the error).

        Raises:
            TypeError: for a keyword that names no option, or an ``options`` that is not an ``Options``.
        """
        if options is not None and not isinstance(options, Options):
            raise TypeError(f"expected `options` to be a relumon.Options, got {type(options).__name__}")
        unknown = sorted(set(overrides) - set(option_names()))
        if unknown:
            accepted = [name for name in option_names() if name not in excluded and name not in own]
            raise TypeError(
                f"{owner} got unexpected keyword argument(s) {unknown}; its own arguments are {list(own)} and the "
                f"options it forwards to relumon.Options are {accepted}"
            )
        if options is None:
            return cls(**overrides)
        return dataclasses.replace(options, **overrides) if overrides else options

    def replace(self, **changes: Any) -> Options:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


class OptionAttributes:
    """Mixin: each option is readable as an attribute of its holder (``monitor.measure_every``), from ``.options``.

    The holder sets ``self.options``; attributes it defines itself (the callback's own ``on_dead``) take precedence.
    """

    options: Options

    def __getattr__(self, name: str) -> Any:
        # Only called for names not found normally; read __dict__ so a half-built or unpickling object never recurses.
        options = self.__dict__.get("options")
        if options is not None and name in _OPTION_NAMES:
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def option_names() -> list[str]:
    """The public option names, in declaration order."""
    return [f.name for f in dataclasses.fields(Options)]


def signature_with_options(
    func: Callable[..., Any], *, exclude: Sequence[str] = (), defaults: Optional[Mapping[str, Any]] = None
) -> inspect.Signature:
    """``func``'s signature with its ``**options`` replaced by one keyword-only parameter per option.

    Lets ``help()``, ``inspect.signature`` and notebooks show the options that ``func`` forwards to
    [`Options`][relumon.Options], although they are declared only there.
    """
    signature = inspect.signature(func)
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    taken = {p.name for p in params}
    overrides = dict(defaults or {})
    for f in dataclasses.fields(Options):
        if f.name in exclude or f.name in taken:
            continue
        default = overrides.get(f.name, f.default)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=f.type))
    return signature.replace(parameters=params)


#: What a Trainer callback does when a layer dies: the monitor's choices plus ``"stop"`` (end training).
CALLBACK_ON_DEAD_CHOICES = ("warn", "raise", "stop", "ignore")
CallbackOnDead = Union[Literal["warn", "raise", "stop", "ignore"], Callable[[Any], Any]]

#: Options a Trainer callback takes from its Trainer (its GradScaler, its process group, its optimizers), never from
#: its arguments.
FROM_TRAINER = ("grad_scaler", "sync_dist", "optimizer")


def resolve_callback_options(
    owner: str,
    options: Optional[Options],
    kwargs: Mapping[str, Any],
    *,
    on_dead: Any,
    prefix: Any,
    own: Sequence[str],
    source: str,
) -> tuple[Options, Any]:
    """The checks every Trainer callback (Lightning's, Hugging Face's) makes of its arguments, in one place.

    Args:
        owner: the callback's class name, for the messages.
        options: a ready [`Options`][relumon.Options] or None; it must leave `FROM_TRAINER` unset.
        kwargs: options by name; none of `FROM_TRAINER` may be among them.
        on_dead: the callback's own policy, one of `CALLBACK_ON_DEAD_CHOICES` or a callable.
        prefix: the first part of every logged tag, a non-empty string.
        own: the callback's own argument names, listed in the error for an unknown keyword.
        source: where the Trainer keeps what `FROM_TRAINER` names, for the message.

    Returns:
        The validated options and the policy in force: ``on_dead``, or the options' own when ``on_dead`` is left at
        ``"warn"``.

    Raises:
        TypeError: for an option the callback takes from the Trainer, or an unknown keyword.
        ValueError: for a bad ``on_dead`` or ``prefix``.
    """
    from_trainer = sorted(set(kwargs) & set(FROM_TRAINER))
    if from_trainer:
        raise TypeError(f"{owner} takes {from_trainer} from the Trainer ({source}); pass the other options only")
    check_on_dead(on_dead, CALLBACK_ON_DEAD_CHOICES)
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"expected `prefix` to be a non-empty string, got {prefix!r}")
    if isinstance(options, Options):
        given = [name for name in FROM_TRAINER if getattr(options, name) is not None]
        if given:
            raise TypeError(f"{owner} takes {given} from the Trainer; pass an `options=` without them")
        if on_dead == "warn" and options.on_dead != "warn":
            on_dead = options.on_dead  # the callback's own `on_dead` wins when given; else the options' one
    resolved = Options.resolve(options, kwargs, owner=f"{owner}()", own=own, excluded=(*FROM_TRAINER, "on_dead"))
    return resolved, on_dead


def check_int_at_least(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is an int ``>= minimum`` (bools excluded), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"expected `{name}` to be an int >= {minimum}, got {value!r}")
    return value


def check_on_dead(value: Any, choices: Sequence[str]) -> Any:
    """``value`` if it is one of ``choices`` or a callable, else ValueError listing them."""
    if not (callable(value) or (isinstance(value, str) and value in choices)):
        raise ValueError(f"expected `on_dead` to be one of {tuple(choices)} or a callable, got {value!r}")
    return value


def _check_types(types: Any) -> tuple[type[nn.Module], ...]:
    """``types`` as a non-empty tuple of ``nn.Module`` subclasses (one class alone is accepted), else TypeError."""
    if isinstance(types, type):
        types = (types,)
    try:
        checked = tuple(types) if isinstance(types, Iterable) else None
    except TypeError:
        checked = None
    if checked is None:
        raise TypeError(f"expected `types` to be a tuple of nn.Module subclasses, got {types!r}")
    bad = [t for t in checked if not (isinstance(t, type) and issubclass(t, nn.Module))]
    if bad or not checked:
        raise TypeError(f"expected `types` to be a non-empty tuple of nn.Module subclasses, got {types!r}")
    return checked


def _check_optimizer(value: Any) -> Optional[tuple[Any, ...]]:
    """``optimizer`` as None or a non-empty tuple of optimizers, else TypeError (`relumon.cause.check_optimizers`)."""
    return check_optimizers(value) or None


def _check_unit_dim(unit_dim: Any, name: str = "unit_dim") -> Union[int, dict[str, int], None]:
    """``unit_dim`` (or the option ``name``) as None, an int or a plain dict of module path to int, else TypeError.

    Whether the names in a mapping are watched is checked against the model when it is watched.
    """
    if unit_dim is None or (isinstance(unit_dim, int) and not isinstance(unit_dim, bool)):
        return int(unit_dim) if unit_dim is not None else None
    if isinstance(unit_dim, Mapping):
        bad = {k: v for k, v in unit_dim.items() if isinstance(v, bool) or not isinstance(v, int)}
        if bad:
            raise TypeError(f"expected `{name}` values to be ints, got {bad}")
        return dict(unit_dim)
    raise TypeError(f"expected `{name}` to be None, an int or a mapping of module path to int, got {unit_dim!r}")


_OPTION_NAMES = frozenset(option_names())
