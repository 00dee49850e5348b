"""Proofs of death: certificates that a ReLU unit outputs 0 for every input and for every later step.

Report-time only. A window says a unit did not fire on the samples it saw; a *certificate* says it cannot fire on any
finite input, from the weights and the wiring, and that no later step can change that. Each proof below is a theorem;
a certificate is issued only when every condition of it is checked, never on a threshold. Where a condition fails,
the unit is *refused* with the reason.

**What closes the unit** (the activation is ``nn.ReLU`` or ``nn.ReLU6``, whose output is 0 wherever its input is
``<= 0``; ``Dropout`` and ``Identity`` between keep the sign; ``AlphaDropout`` does not, and stops every proof):

- ``zero-scale``: a BatchNorm channel with scale exactly 0 and shift ``<= 0`` feeds the ReLU. Its output is the shift,
  in training mode and in eval mode alike (the normalised value is finite: ``eps > 0``).
- ``zero-filter``: the producer's (Linear/Conv) row of weights is exactly 0 and its bias ``<= 0`` (or absent). Without
  a BatchNorm the pre-activation is the bias; with one in training mode and no bias, the channel is exactly 0, its
  normalised value 0 and the output the shift, which must be ``<= 0``.
- ``nonnegative-input``: the producer feeds the ReLU directly, its input is known to be ``>= 0`` (another ReLU's
  output, through pools, views, dropout or concatenations of such), and its incoming weights and bias are all
  ``<= 0``: a sum of products of non-positive weights and non-negative inputs is ``<= 0``, rounding included.
- ``batchnorm-bound``: a BatchNorm in training mode normalises M values per channel together. By Samuelson's
  inequality each lies within ``sqrt(M - 1)`` population standard deviations of their mean; BatchNorm divides by
  ``sqrt(var + eps)``, which only shrinks them, so ``|x_hat| <= sqrt(M - 1)``. Hence ``shift + |scale| * sqrt(M - 1)
  <= 0`` closes the ReLU for **every training batch of at most M values per channel** (M is N for BatchNorm1d on
  (N, C), N*L on (N, C, L), N*H*W for BatchNorm2d). It says nothing about eval mode, where BatchNorm uses running
  statistics. **Floating point:** the inequality is exact; BatchNorm's own float32 rounding is not. The check keeps
  0.1 % room (`ROUNDING_ROOM`), which covered every batch tried whose channel values had ``|mean| < 1e4 * std``; a
  nearly constant channel far from 0 (offset 1e6, spread 1e-3) gave normalised values 2.2 times the bound. The
  certificate assumes the channel is not that ill-conditioned (`FLOAT_CAVEAT`); the other proofs are exact in
  floating point (a product with 0 is 0; a sum of non-positive terms rounds to a non-positive number).

**What keeps it closed** (`permanence`): once closed, the unit's own gradient is 0 (ReLU's derivative at 0 is 0 in
torch). Every other way a parameter of the proof could move is checked, and any doubt refuses:

- the wiring, from the autograd graph of one training forward: nothing else adds to the ReLU's input (a skip
  connection) and nothing else reads the BatchNorm's or producer's output (a second consumer would send gradient);
  the modules run once per forward and hold no tied weights; no other node of the graph (the model's returned
  tensors included) reads the parameters; the activation, BatchNorm and producer are the torch classes' own forwards
  (no subclass overriding ``forward``) and their outputs their own operations' (no forward hook that changed them).
  What the graph cannot show is outside the proof: a wiring that changes between steps (a branch taken at random or
  by step), a tensor changed in place under ``torch.no_grad()``, a loss term on an activation kept outside the model
  (only a kept ``.grad`` shows it: below), a hook added after the recorded forward;
- the parameters' ``.grad``, where kept, is exactly 0 at those entries (a penalty term in the loss would show there;
  after ``zero_grad()`` there is nothing to see, so report before it where such terms may exist); a frozen parameter
  that an optimizer still holds gets the optimizer checks below (unfrozen, momentum left would move it);
- every optimizer that holds them is on the allow-list (`ALLOWED_OPTIMIZERS`: torch.optim's own SGD, Adam, AdamW, not a
  subclass or another library's class of that name), not ``maximize``,
  with its momentum state (SGD's ``momentum_buffer``, Adam's ``exp_avg``) exactly 0 at those entries, and a weight
  decay that cannot lift the proof: ``lr * weight_decay <= 1`` (the decay step then shrinks each entry toward 0
  without flipping its sign), no decay together with SGD momentum or Adam's coupled decay (both can carry an entry
  past 0), and, for ``batchnorm-bound``, the shift decayed no faster than the scale (else the shift rises toward 0
  while the scale stays). Learning rates are read as they are now: a scheduler that raises them later is outside the
  proof, which is checked again at every report.

An input with NaN or Inf is outside every proof (ReLU passes NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from relumon.wiring import _kind, consumers_and_uses

__all__ = [
    "PROOFS",
    "ALLOWED_OPTIMIZERS",
    "ROUNDING_ROOM",
    "FLOAT_CAVEAT",
    "Proof",
    "Certification",
    "Feed",
    "read_feeds",
    "closing_proof",
    "permanence",
    "certify_feed",
    "Certifier",
]

#: The proofs, strongest first: the first that holds for a unit is the one recorded.
PROOFS = ("zero-scale", "zero-filter", "nonnegative-input", "batchnorm-bound")
#: Optimizers whose update of a parameter with zero gradient is known (see `permanence`).
ALLOWED_OPTIMIZERS = ("SGD", "Adam", "AdamW")
#: Relative room kept in the BatchNorm bound for floating-point rounding of the normalised values.
ROUNDING_ROOM = 2.0**-10
#: The one precondition of the BatchNorm bound that relumon cannot check from the weights (see the module docstring).
FLOAT_CAVEAT = "channel values not nearly constant far from 0: |mean| < 1e4 * std, float32 rounding"
#: Activations whose output is exactly 0 for every input <= 0.
CLOSING_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
#: AlphaDropout is not among them: in training mode it maps every value x to ``a * x + b`` or a constant, with
#: ``b > 0``, so it can lift a closed pre-activation above 0.
_PASS_THROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Graph nodes whose output is >= 0 wherever their one data input is (monotone, sign-keeping or selecting ops), by
#: their exact kind (the node's class name less ``Backward<n>``): a prefix would also take ``Tan`` or ``Threshold``.
_KEEPS_NONNEGATIVE = frozenset(
    {
        "View",
        "UnsafeView",
        "Reshape",
        "ReshapeAlias",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Permute",
        "Transpose",
        "T",
        "Clone",
        "ToCopy",
        "Expand",
        "Slice",
        "Select",
        "Mean",
        "NativeDropout",
        "FeatureDropout",
    }
)
#: Pools and pads (of any dimension) keep the sign too; matched by prefix, these names have no other kinds.
_KEEPS_NONNEGATIVE_FAMILIES = (
    "MaxPool",
    "AvgPool",
    "AdaptiveAvgPool",
    "AdaptiveMaxPool",
    "ReflectionPad",
    "ReplicationPad",
)
_NONNEGATIVE = ("Relu",)


@dataclass(frozen=True)
class Proof:
    """The theorem that closes one unit, with its instance.

    Attributes:
        kind: one of `PROOFS`.
        statement: the inequality as it holds, with the numbers (e.g. ``"shift -3.1 + |scale| 0.2 * sqrt(15) ..."``).
        holds_for: where it holds: ``"every finite input, training and eval mode"``, or for ``batchnorm-bound``
            ``"every training-mode batch of at most M values per channel"``.
        max_values: for ``batchnorm-bound``, the largest M (values per channel) the bound holds for; else None.
    """

    kind: str
    statement: str
    holds_for: str
    max_values: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return {
            "kind": self.kind,
            "statement": self.statement,
            "holds_for": self.holds_for,
            "max_values": self.max_values,
        }


@dataclass(frozen=True)
class Certification:
    """What could be proven about one activation call site.

    Attributes:
        site: the call-site name.
        units: ``{unit: Proof}`` for the units proven dead for every input and every later step.
        refused: ``{unit: reason}`` for units whose closing inequality holds but whose permanence (or mode) could not
            be proven.
        why_not: why no proof can apply at this site at all (its wiring), or None.
        values_per_channel: the M of the recorded training forward, for the BatchNorm bound, or None.
    """

    site: str
    units: Mapping[int, Proof] = field(default_factory=dict)
    refused: Mapping[int, str] = field(default_factory=dict)
    why_not: Optional[str] = None
    values_per_channel: Optional[int] = None

    def __len__(self) -> int:
        return len(self.units)

    @property
    def indices(self) -> list[int]:
        """The certified units, sorted."""
        return sorted(self.units)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable)."""
        return {
            "units": {str(u): p.to_dict() for u, p in sorted(self.units.items())},
            "refused": {str(u): r for u, r in sorted(self.refused.items())},
            "why_not": self.why_not,
            "values_per_channel": self.values_per_channel,
        }


@dataclass
class Feed:
    """What feeds one activation call, read from the autograd graph of one training forward.

    Attributes:
        site: the call-site name.
        activation: the activation module.
        units: units of the site (its dim 1, or the last dim for 2-D inputs).
        norm: the BatchNorm between producer and activation, or None.
        norm_path: its path.
        values_per_channel: M, the values the BatchNorm normalised together per channel in the recorded forward.
        producer: the Linear/Conv feeding the activation (through the BatchNorm, if any), or None.
        producer_path: its path.
        nonnegative_input: why the producer's input is known to be ``>= 0``, or None when it is not known.
        problem: why no proof can apply (a skip connection, a second consumer...), or None.
        param_problems: ``{id(parameter): reason}`` for parameters whose gradient can come from elsewhere (tied,
            read by another node of the graph, a module called twice).
    """

    site: str
    activation: Optional[nn.Module] = None
    units: int = 0
    norm: Optional[nn.modules.batchnorm._BatchNorm] = None
    norm_path: str = ""
    values_per_channel: Optional[int] = None
    producer: Optional[nn.Module] = None
    producer_path: str = ""
    nonnegative_input: Optional[str] = None
    problem: Optional[str] = None
    param_problems: dict[int, str] = field(default_factory=dict)


def _site_name(path: str, index: int) -> str:
    base = path or "root"
    return base if index == 0 else f"{base}.call{index + 1}"


def _nonnegative(node: Any, depth: int = 0) -> Optional[str]:
    """Why the tensor of ``node`` is known to be ``>= 0`` everywhere, or None."""
    if node is None or depth > 64 or getattr(node, "variable", None) is not None:
        return None
    kind = _kind(node)
    if kind in _NONNEGATIVE:
        return "the output of a ReLU"
    if kind == "Hardtanh":  # ReLU6 is hardtanh(0, 6)
        low = getattr(node, "_saved_min_val", None)
        return "the output of a ReLU6" if isinstance(low, (int, float)) and low >= 0 else None
    inputs = list(node.next_functions)
    # Every input must be a graph node: a constant (no grad) or a parameter of unknown sign would join the values.
    if not inputs or any(child is None or getattr(child, "variable", None) is not None for child, _ in inputs):
        return None
    data = [child for child, _ in inputs]
    if kind == "Cat" or kind == "Stack":
        reasons = [_nonnegative(child, depth + 1) for child in data]
        return "a concatenation of ReLU outputs" if all(reasons) else None
    keeps = kind in _KEEPS_NONNEGATIVE or kind.startswith(_KEEPS_NONNEGATIVE_FAMILIES)
    # avg_pool(..., divisor_override=-1) flips the sign; the node keeps the divisor as an unsigned 64-bit number.
    divisor = getattr(node, "_saved_divisor_override", None)
    if isinstance(divisor, int) and divisor >= 2**63:
        divisor -= 2**64
    if kind.startswith("AvgPool") and not (divisor is None or (isinstance(divisor, (int, float)) and divisor > 0)):
        keeps = False
    if keeps and len(data) == 1:
        inner = _nonnegative(data[0], depth + 1)
        return None if inner is None else f"{inner}, through {kind}"
    return None


def read_feeds(calls: Sequence[Any], model: nn.Module, output_nodes: Iterable[Any] = ()) -> dict[str, Feed]:
    """What feeds every ReLU/ReLU6 call site, from the module calls of one training forward.

    Args:
        calls: the calls `relumon.wiring.WiringProbe.take_calls` recorded (path, module, index, in_node, out_node,
            in_shape, out_shape).
        model: the model (for tied weights).
        output_nodes: autograd nodes of the model's outputs: roots of the graph too (a tensor returned beside the logits
            can read a parameter again), and a BatchNorm or producer output returned as is is a second consumer.

    Returns:
        ``{site name: Feed}`` for each call of a closing activation (`CLOSING_ACTIVATIONS`).
    """
    out_owner: dict[int, Any] = {}
    for call in calls:  # children finish first: the innermost module that returned a node owns it
        if call.out_node is not None:
            out_owner.setdefault(id(call.out_node), call)
    outputs = [node for node in output_nodes if node is not None]
    roots = [c.out_node for c in calls] + [c.in_node for c in calls] + outputs
    returned = {id(node) for node in outputs}
    consumers, param_reads = consumers_and_uses(roots)
    calls_per_module: dict[int, int] = {}
    for call in calls:
        calls_per_module[id(call.module)] = calls_per_module.get(id(call.module), 0) + 1
    names: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(pname)
    feeds: dict[str, Feed] = {}
    for call in calls:
        if not isinstance(call.module, CLOSING_ACTIVATIONS):
            continue
        name = _site_name(call.path, call.index)
        if name not in feeds:
            feeds[name] = _feed(name, call, out_owner, consumers, param_reads, calls_per_module, names, returned)
    return feeds


def _feed(
    name: str,
    call: Any,
    out_owner: dict[int, Any],
    consumers: dict[int, list[Any]],
    param_reads: dict[int, int],
    calls_per_module: dict[int, int],
    names: dict[int, list[str]],
    returned: frozenset[int] | set[int] = frozenset(),
) -> Feed:
    shape = call.out_shape
    feed = Feed(name, activation=call.module, units=int(shape[1]) if len(shape) >= 2 else 0)
    if len(shape) < 2:
        feed.problem = "its input is not batched (fewer than 2 dims)"
        return feed
    node = call.in_node
    activation = type(call.module)
    if activation.forward not in (nn.ReLU.forward, nn.Hardtanh.forward):
        feed.problem = f"`{activation.__name__}` overrides the forward of nn.ReLU/ReLU6: what it computes is unknown"
        return feed
    if isinstance(call.module, nn.Hardtanh) and not (call.module.min_val == 0.0 and call.module.max_val > 0.0):
        low, high = call.module.min_val, call.module.max_val
        feed.problem = f"this ReLU6 clamps to [{low:g}, {high:g}], not [0, max]: it is not closed by inputs <= 0"
        return feed
    if call.out_node is not None and _kind(call.out_node) not in ("Relu", "Hardtanh"):
        feed.problem = (
            f"the output of `{activation.__name__}` comes from `{type(call.out_node).__name__}`, not from the ReLU "
            "itself (a forward hook changed it?)"
        )
        return feed

    def stop(reason: str) -> Feed:
        # Past the BatchNorm, a wiring the walk cannot follow only means no producer: the BatchNorm proofs stand.
        if feed.norm is None:
            feed.problem = reason
        return feed

    for _ in range(10_000):  # a walk back through modules; bounded, whatever the graph
        if node is None:
            return stop("it is fed by the model's input or a tensor without gradient: no weights bound it")
        owner = out_owner.get(id(node))
        if owner is not None and owner.in_node is node:
            owner = None  # a module that returned its input as is (Identity, Dropout off) did not make the node
        if owner is None:
            op = type(node).__name__
            if _kind(node) in ("Add", "Sub"):
                return stop(f"its input is a sum (`{op}`, a skip connection or residual add): no bound on one term")
            return stop(f"its input comes from `{op}`, an operation outside any module: no proof follows it")
        readers = consumers.get(id(node), [])
        if id(node) in returned:
            return stop(
                f"the output of `{owner.path}` is also returned by the model (a second consumer): gradient can reach "
                "its parameters that way"
            )
        if len(readers) > 1:
            return stop(
                f"the output of `{owner.path}` is also read by another operation (a second consumer): gradient can "
                "reach its parameters that way"
            )
        module = owner.module
        made = None if isinstance(module, nn.Linear) and len(shape) != 2 else _own_op(module, node)  # dims: below
        if made is not None:
            return stop(made)
        if isinstance(module, _PASS_THROUGH):
            node = owner.in_node
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and feed.norm is None:
            if isinstance(module, nn.SyncBatchNorm):
                return stop(f"`{owner.path}` is a SyncBatchNorm: the values it normalises together span ranks")
            if module.num_features != feed.units:
                return stop(f"its BatchNorm `{owner.path}` has {module.num_features} features, the site {feed.units}")
            feed.norm, feed.norm_path = module, owner.path
            in_shape = owner.in_shape
            if len(in_shape) >= 2 and in_shape[1] > 0:
                feed.values_per_channel = math.prod(int(s) for s in in_shape) // int(in_shape[1])
            _param_problems(feed, owner, module, param_reads, calls_per_module, names)
            node = owner.in_node
            continue
        if isinstance(module, _WEIGHTED):
            rows = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            dim_ok = len(shape) == 2 or not isinstance(module, nn.Linear)
            if rows != feed.units or not dim_ok:
                return stop(f"`{owner.path}` has {rows} outputs along another dim than the {feed.units} units")
            feed.producer, feed.producer_path = module, owner.path
            _param_problems(feed, owner, module, param_reads, calls_per_module, names)
            feed.nonnegative_input = _nonnegative(owner.in_node)
            return feed
        return stop(f"it is fed by `{owner.path}` ({type(module).__name__}), not a BatchNorm, Linear or Conv")
    return stop("its wiring is too deep to follow")


#: The graph node kinds each module's own operation makes (its output's ``grad_fn``), and the forwards that make them;
#: another kind means something else (a forward hook returning a changed output) made the output the ReLU reads, and
#: another forward (a subclass: weight standardisation, a fused activation) computes something the proof cannot see.
_BN = nn.modules.batchnorm._BatchNorm
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_OWN_OPS: tuple[tuple[tuple[type[nn.Module], ...], tuple[str, ...], tuple[Any, ...]], ...] = (
    ((nn.SyncBatchNorm,), ("NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm", "BatchNorm", "SyncBatchNorm"), ()),
    ((_BN,), ("NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm", "BatchNorm"), (_BN.forward,)),
    ((nn.Linear,), ("Addmm", "Mm", "Linear"), (nn.Linear.forward,)),
    (
        (nn.Conv1d, nn.Conv2d, nn.Conv3d),
        ("Convolution", "CudnnConvolution", "MkldnnConvolution", "SlowConv"),
        (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward),
    ),
    (_DROPOUTS, ("NativeDropout", "FeatureDropout", "Mul", "Div"), tuple(d.forward for d in _DROPOUTS)),
    ((nn.Identity,), (), (nn.Identity.forward,)),
)


def _own_op(module: nn.Module, node: Any) -> Optional[str]:
    """Why ``node``, the output of ``module``'s call, is not what the module's own operation makes; None when it is."""
    for types, kinds, forwards in _OWN_OPS:
        if isinstance(module, types):
            name = type(module).__name__
            if forwards and type(module).forward not in forwards:
                return f"`{name}` overrides the forward of its base class: what it computes is unknown"
            if kinds and _kind(node).startswith(kinds):
                return None
            return (
                f"the output of `{name}` comes from `{type(node).__name__}`, not from its own operation (a forward "
                "hook or a subclass changed it): no proof follows it"
            )
    return None


def _param_problems(
    feed: Feed,
    owner: Any,
    module: nn.Module,
    param_reads: dict[int, int],
    calls_per_module: dict[int, int],
    names: dict[int, list[str]],
) -> None:
    calls = calls_per_module.get(id(module), 1)
    for pname, p in module.named_parameters(recurse=False):
        where = f"`{owner.path}.{pname}`"
        if calls > 1:
            feed.param_problems[id(p)] = f"{where}: its module runs {calls} times per forward (shared weights)"
        elif len(names.get(id(p), ())) > 1:
            feed.param_problems[id(p)] = f"{where} is tied to {names[id(p)][1:]} (tied weights)"
        elif param_reads.get(id(p), 0) > 1:
            feed.param_problems[id(p)] = f"{where} is read by {param_reads[id(p)]} nodes of the graph, not one"


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _row(module: nn.Module, unit: int) -> tuple[Tensor, Optional[Tensor]]:
    weight: Tensor = module.weight  # type: ignore[assignment]
    bias: Optional[Tensor] = module.bias  # type: ignore[assignment]
    return weight.detach()[unit], (bias.detach()[unit] if bias is not None else None)


def closing_proof(feed: Feed, unit: int, training: Optional[bool] = None) -> tuple[Optional[Proof], Optional[str]]:
    """The first proof (in `PROOFS` order) whose inequality closes ``unit``, or a refusal where one holds only in a
    mode the BatchNorm is not in.

    Args:
        feed: the site's `Feed`.
        unit: the unit's index.
        training: the BatchNorm's mode to judge by; None reads ``feed.norm.training``.

    Returns:
        ``(proof, None)``, ``(None, reason)`` when an inequality holds but the mode voids it, or ``(None, None)``.
    """
    norm = feed.norm
    refusal: Optional[str] = None
    if norm is not None:
        training = norm.training if training is None else training
        batch_stats = training or not norm.track_running_stats or norm.running_mean is None
        eps = float(norm.eps)
        if norm.affine:
            scale = float(norm.weight.detach()[unit])
            shift = float(norm.bias.detach()[unit])
        else:
            scale, shift = 1.0, 0.0
        finite = math.isfinite(scale) and math.isfinite(shift)
        where = f"`{feed.norm_path}`"
        if finite and eps > 0 and scale == 0.0 and shift <= 0.0:
            statement = f"{where} channel {unit}: scale 0 and shift {_fmt(shift)} <= 0: its output is the shift"
            return Proof("zero-scale", statement, "every finite input, training and eval mode"), None
        producer = feed.producer
        if producer is not None and finite and shift <= 0.0:
            weight, bias = _row(producer, unit)
            if bool((weight == 0).all()) and (bias is None or float(bias) == 0.0):
                if batch_stats and eps > 0:
                    statement = (
                        f"`{feed.producer_path}` row {unit} all 0 and no bias: the channel is exactly 0, its "
                        f"normalised value 0, so {where} outputs its shift {_fmt(shift)} <= 0"
                    )
                    return Proof("zero-filter", statement, "every finite input, training mode"), None
                refusal = f"{where} is in eval mode (running statistics): the zero-filter proof needs batch statistics"
        if finite and eps > 0 and scale != 0.0 and shift < 0.0:
            room = abs(scale) * (1.0 + ROUNDING_ROOM)
            ratio = shift / room
            # Beyond 2**52 values per channel the float steps below are too coarse: cap it (no batch is that large).
            max_values = int(math.floor(ratio * ratio + 1.0)) if abs(ratio) < 2.0**26 else 2**52
            while max_values > 1 and shift + room * math.sqrt(max_values - 1) > 0:  # float floor: step down
                max_values -= 1
            m = feed.values_per_channel
            if m is not None and max_values >= m >= 2:
                if not batch_stats:
                    return None, (
                        f"{where} is in eval mode: it normalises with running statistics, and Samuelson's bound is "
                        "about batch statistics"
                    )
                bound = shift + abs(scale) * math.sqrt(m - 1)
                statement = (
                    f"{where} channel {unit}: shift {_fmt(shift)} + |scale| {_fmt(abs(scale))} * sqrt({m} - 1) = "
                    f"{_fmt(bound)} <= 0 (Samuelson: |x_hat| <= sqrt(M - 1)); holds up to M = {max_values}"
                )
                holds = f"every training-mode batch of at most {max_values} values per channel ({FLOAT_CAVEAT})"
                return Proof("batchnorm-bound", statement, holds, max_values), None
        return None, refusal
    producer = feed.producer
    if producer is None:
        return None, None
    weight, bias = _row(producer, unit)
    b = 0.0 if bias is None else float(bias)
    if not (bool(weight.isfinite().all()) and math.isfinite(b)) or b > 0:
        return None, None
    if bool((weight == 0).all()):
        statement = f"`{feed.producer_path}` row {unit} all 0 and bias {_fmt(b)} <= 0: the pre-activation is the bias"
        return Proof("zero-filter", statement, "every finite input, training and eval mode"), None
    if feed.nonnegative_input is not None and bool((weight <= 0).all()):
        statement = (
            f"`{feed.producer_path}` row {unit}: every weight <= 0 (max {_fmt(float(weight.max()))}), bias "
            f"{_fmt(b)} <= 0, and its input is {feed.nonnegative_input} (>= 0)"
        )
        return Proof("nonnegative-input", statement, "every finite input, training and eval mode"), None
    return None, None


def _proof_params(feed: Feed, proof: Proof) -> list[tuple[str, nn.Parameter, int]]:
    """``(name, parameter, unit)`` for every parameter entry the proof relies on."""
    out: list[tuple[str, nn.Parameter, int]] = []
    norm, producer = feed.norm, feed.producer
    if proof.kind in ("zero-scale", "batchnorm-bound") or (proof.kind == "zero-filter" and norm is not None):
        if norm is not None and norm.affine:
            out += [(f"{feed.norm_path}.weight", norm.weight, -1), (f"{feed.norm_path}.bias", norm.bias, -1)]
    if proof.kind in ("zero-filter", "nonnegative-input") and producer is not None:
        out.append((f"{feed.producer_path}.weight", producer.weight, -1))  # type: ignore[arg-type]
        if producer.bias is not None:
            out.append((f"{feed.producer_path}.bias", producer.bias, -1))  # type: ignore[arg-type]
    return out


def _decay_rate(group: Mapping[str, Any]) -> float:
    lr = group.get("lr", 0.0)
    lr = float(lr.item()) if isinstance(lr, Tensor) else float(lr)
    return lr * float(group.get("weight_decay", 0.0) or 0.0)


def permanence(
    feed: Feed, proof: Proof, unit: int, optimizers: Optional[Sequence[torch.optim.Optimizer]]
) -> Optional[str]:
    """Why the parameters of ``proof`` might still move at ``unit``, or None when no later step can move them in a
    way that opens the unit. See the module docstring for the conditions.

    Args:
        feed: the site's `Feed`.
        proof: the unit's `Proof`.
        unit: the unit's index.
        optimizers: the optimizers that train the model; None means unknown (refused).
    """
    decay: dict[str, float] = {}
    for name, param, _ in _proof_params(feed, proof):
        problem = feed.param_problems.get(id(param))
        if problem is not None:
            return problem
        holders = [
            (opt, g) for opt in optimizers or () for g in opt.param_groups if any(p is param for p in g["params"])
        ]
        if not param.requires_grad and not holders:
            continue  # frozen, and no optimizer holds it
        # Frozen but held by an optimizer: its momentum and decay still count (unfrozen, it moves with them).
        grad = param.grad
        if grad is not None and bool((grad.detach()[unit] != 0).any()):
            return (
                f"`{name}` has a non-zero gradient at unit {unit}: something outside the ReLU's path (a loss term on "
                "the weights?) reaches it"
            )
        if optimizers is None or not optimizers:
            return "no optimizer is known, so what a later step does to the weights is unknown (pass `optimizer=`)"
        if not holders:
            return f"`{name}` trains but is in none of the optimizers relumon knows of: another one may update it"
        for opt, group in holders:
            kind = type(opt).__name__
            if kind not in ALLOWED_OPTIMIZERS:
                return (
                    f"`{name}` is trained by {kind}, not on the allow-list {ALLOWED_OPTIMIZERS} of optimizers whose "
                    "update of a zero-gradient parameter relumon knows"
                )
            if type(opt) is not getattr(torch.optim, kind):
                return (
                    f"`{name}` is trained by {type(opt).__module__}.{type(opt).__qualname__}, not torch.optim.{kind} "
                    "itself (a subclass or another library's class of that name may keep other state and update "
                    "otherwise)"
                )
            if group.get("maximize", False):
                return f"`{name}` is trained with maximize=True, which the proof does not cover"
            rate = _decay_rate(group)
            wd = float(group.get("weight_decay", 0.0) or 0.0)
            if rate > 1.0:
                return f"`{name}`: lr * weight_decay = {_fmt(rate)} > 1, so a decay step flips its sign"
            state = opt.state.get(param, {})
            if kind == "SGD":
                if float(group.get("momentum", 0.0) or 0.0) > 0 and wd > 0:
                    return (
                        f"`{name}` has SGD momentum with weight decay: the decay feeds the momentum, which can carry "
                        "the entry past 0"
                    )
                buffer = state.get("momentum_buffer")
                if isinstance(buffer, Tensor) and bool((buffer.detach()[unit] != 0).any()):
                    return f"`{name}`: momentum left in the optimizer (momentum_buffer non-zero at unit {unit})"
            else:
                decoupled = kind == "AdamW" or bool(group.get("decoupled_weight_decay", False))
                if wd > 0 and not decoupled:
                    return (
                        f"`{name}`: Adam's coupled weight decay feeds its moments, and the normalised step can carry "
                        "the entry past 0"
                    )
                moment = state.get("exp_avg")
                if isinstance(moment, Tensor) and bool((moment.detach()[unit] != 0).any()):
                    return f"`{name}`: momentum left in the optimizer (Adam's exp_avg non-zero at unit {unit})"
            decay[name] = max(decay.get(name, 0.0), rate)
    if proof.kind == "batchnorm-bound" and feed.norm is not None and feed.norm.affine:
        shift_decay = decay.get(f"{feed.norm_path}.bias", 0.0)
        scale_decay = decay.get(f"{feed.norm_path}.weight", 0.0)
        if shift_decay > scale_decay:
            return (
                f"weight decay shrinks the shift of `{feed.norm_path}` (lr * wd = {_fmt(shift_decay)}) faster than "
                f"its scale ({_fmt(scale_decay)}): it can lift shift + |scale| * sqrt(M - 1) above 0"
            )
    return None


def certify_feed(feed: Feed, optimizers: Optional[Sequence[torch.optim.Optimizer]]) -> Certification:
    """The certificates of one site: for every unit, a closing proof and its permanence.

    Args:
        feed: the site's `Feed`.
        optimizers: the optimizers training the model (None: unknown, so nothing is permanent).
    """
    if feed.problem is not None:
        return Certification(feed.site, why_not=feed.problem, values_per_channel=feed.values_per_channel)
    units: dict[int, Proof] = {}
    refused: dict[int, str] = {}
    for unit in range(feed.units):
        proof, refusal = closing_proof(feed, unit)
        if proof is None:
            if refusal is not None:
                refused[unit] = refusal
            continue
        reason = permanence(feed, proof, unit, optimizers)
        if reason is None:
            units[unit] = proof
        else:
            refused[unit] = reason
    why_not = None
    if feed.norm is None and feed.producer is None:
        why_not = "no BatchNorm or Linear/Conv feeds it directly"
    return Certification(feed.site, units, refused, why_not, feed.values_per_channel)


class Certifier:
    """The wiring of one training forward and the certificates each report asks for (``certify=True``).

    A `relumon.wiring.WiringProbe` records the module calls of the first training forward after it is created, then
    takes its hooks off: nothing runs in later steps.

    Args:
        model: the watched model.
    """

    def __init__(self, model: nn.Module) -> None:
        from relumon.wiring import WiringProbe

        self._probe: Optional[Any] = WiringProbe(model)
        self._feeds: Optional[dict[str, Feed]] = None

    def remove(self) -> None:
        """Take the probe's hooks off (if still recording). Idempotent."""
        if self._probe is not None:
            self._probe.finish()

    def feeds(self, model: nn.Module) -> Optional[dict[str, Feed]]:
        """Every site's `Feed`, read once from the recorded forward; None while no forward was recorded."""
        if self._feeds is None and self._probe is not None and self._probe.recorded:
            probe = self._probe
            # The model's outputs are roots of the graph too: a tensor returned beside the logits (a tuple) can be
            # a second consumer of a BatchNorm's or producer's output, or read a parameter again.
            outputs = list(probe.output_refs)
            self._feeds = read_feeds(probe.take_calls(), model, outputs)
            self._probe = None
        return self._feeds

    def certify(
        self, model: nn.Module, names: Sequence[str], optimizers: Optional[Sequence[torch.optim.Optimizer]]
    ) -> dict[str, Certification]:
        """A `Certification` per site name (every name gets one, with ``why_not`` when nothing can be said)."""
        feeds = self.feeds(model)
        out: dict[str, Certification] = {}
        for name in names:
            if feeds is None:
                out[name] = Certification(name, why_not="no training forward recorded yet: the wiring is not known")
            elif name not in feeds:
                out[name] = Certification(
                    name,
                    why_not="not an nn.ReLU/nn.ReLU6 module call recorded in the training forward (functional calls "
                    "and other activations get no certificate)",
                )
            else:
                out[name] = certify_feed(feeds[name], optimizers)
        return out
