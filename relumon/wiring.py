"""The wiring of an activation, read from the autograd graph of a training forward: the one source of wiring facts.

What a *unit* is, which calls of a module are *one site*, and which dim holds the *samples* all depend on how the
network is really wired, not on the nearest module. `read_wiring` answers from the autograd graph, once per call
site, when the site is discovered:

- **Units.** From the activation's input, the walk follows ``next_functions`` back through ops that keep or move
  dims (adds, subs, muls, cats, stacks, slices and chomps, selects, ``chunk``/``split``/``unsafe_chunk``, ``glu``,
  sums and means over saved dims, transposes, permutes, views and reshapes, squeezes and unsqueezes, expands, the
  ``as_strided`` view an in-place op on a view leaves, norms, pools, dropout, other activations, clones, dtype casts,
  whatever custom module they sit in), and carries along the way which dim of each tensor is which dim of the
  activation. It stops at the layers that make features: a convolution (channels: dim 1 of its output, dim 0 when
  unbatched), a matrix product (``Linear``, ``addmm``, ``mm``, ``bmm``: the last dim, or the row dim when the weight
  is the left operand alone, ``W @ x + b``), a recurrent layer or an embedding (the last dim). Norms are walked
  *through*, so ``LayerNorm([C, H, W])`` after a conv keeps the conv's channels, and a view that merges dims is undone
  by the view back (instance norm's ``(B, C, L) -> (1, B*C, L) -> (B, C, L)``); a norm with nothing behind it decides
  itself (BatchNorm and GroupNorm: dim 1; a LayerNorm over the last dim: the last dim). The units are the activation
  dim that the producer's feature dim maps to. When branches disagree, or a view merges the feature dim with another
  one, or no producer is reached, or an op the walk does not know cuts it (``Wiring.unknown``), the graph cannot
  tell: the caller falls back and warns.
- **Samples.** Convolutions say where the samples are (dim 0 of their batched output); otherwise `batch_walk` follows
  the rows back through the producers to the output of a module that declares its layout, a time-major recurrent
  layer, a token embedding, or the model's input fed straight into a Linear (dim 0 of the input is the batch; said
  when that moves the samples off dim 0: `Wiring.batch_by_input`) (`Wiring.batch_dim`).
- **Weights.** The parameters of the first producers on every path (and of the norms walked through), each keyed with
  the select, slice, transpose or one-expert index it is read through (an expert ``W1[e]``,
  ``W1.index_select(0, tensor([e]))``, ``W`` against ``W.T``): calls of one
  activation module fed by the same weights are one site (a recurrent cell unrolled T times is one site).
- **Recurrence.** Which sites' outputs the walk met on the way: the same site's marks a recurrent cell's state.
- **Call signatures.** `call_signature` looks at one node behind a call (its parameter inputs), cheaply enough for
  the per-step path: a module with several sites matches each call to its site by it, not by its call index.

Facts this relies on (torch 2.13): a node's ``_input_metadata[i].shape`` is the shape of its ``i``-th forward output,
and each ``next_functions`` edge ``(node, i)`` names that output; a parameter ends a path at an ``AccumulateGrad``
node whose ``variable`` is the parameter; ``SliceBackward0``/``SelectBackward0``/``CatBackward0``/``StackBackward0``/
``SplitBackward0``/``GluBackward0``/``SqueezeBackward1``/``UnsqueezeBackward0`` save ``_saved_dim``, ``SumBackward1``
and ``MeanBackward1`` ``_saved_dim`` (a tuple) and ``_saved_keepdim``, ``TransposeBackward0``
``_saved_dim0``/``_saved_dim1``, ``PermuteBackward0`` ``_saved_dims``, ``AsStridedBackward0`` ``_saved_size`` and
``_saved_stride``; a saved negative dim reads back as an unsigned 64-bit number (`saved_dim` converts it). Node names
are torch's internal ones: an unknown node ends its path ("cannot tell"), never a guess. ``tests/test_wiring_oracle.py``
checks every op named here against plain forward hooks.

The walk runs at discovery only (the first call of each call index, or of each new call signature), visits at most
`MAX_NODES` nodes, and holds no reference to the graph afterwards.
"""

from __future__ import annotations

import math
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "Wiring",
    "read_wiring",
    "batch_walk",
    "call_signature",
    "align_view",
    "saved_dim",
    "MAX_NODES",
    "UNBATCHED",
    "batch_first_of",
]

#: `Wiring.batch_dim` of a call of unbatched convolutions: the call is one sample.
UNBATCHED = -1

#: At most this many graph nodes are visited per walk: discovery stays cheap on very deep or wide graphs.
MAX_NODES = 512

#: Nodes whose output carries features in dim 1 (dim 0 unbatched).
_CONV = ("Convolution", "CudnnConvolution", "MkldnnConvolution", "SlowConv", "ThnnConv", "ConvDepthwise")
#: Nodes whose output carries features in the last dim.
_LAST = (
    "Addmm",
    "Mm",
    "Bmm",
    "Baddbmm",
    "Addmv",
    "Mv",
    "Linear",
    "Embedding",
    "EmbeddingBag",
    "Matmul",
    "MkldnnRnnLayer",
    "CudnnRnn",
    "MiopenRnn",
)
#: Recurrent layers whose output is time-major whatever ``batch_first`` says (the CPU LSTM: ``(T, B, H)``, then a
#: transpose), and whose final states are ``(B, H)``.
_TIME_MAJOR_RNN = ("MkldnnRnnLayer",)
#: Norms: walked through; with nothing behind them, BatchNorm-like ones mean dim 1 and LayerNorm-like the last dim.
_CHANNEL_NORMS = ("NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm", "BatchNorm", "NativeGroupNorm")
_LAST_NORMS = ("NativeLayerNorm", "LayerNorm", "FusedRmsNorm", "RmsNorm")
#: Pools and resamplers keep (N, C, ...) with other spatial sizes; with nothing behind them they mean channels.
_POOLS = ("MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool", "Upsample", "FractionalMaxPool", "LpPool")
#: Ops whose inputs have the output's dims (up to broadcasting from the right).
_SAME_DIMS = (
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Neg",
    "Clone",
    "ToCopy",
    "Alias",
    "NativeDropout",
    "Dropout",
    "FeatureDropout",
    "Relu",
    "LeakyRelu",
    "Hardtanh",
    "Threshold",
    "Gelu",
    "Silu",
    "Sigmoid",
    "Tanh",
    "Elu",
    "Celu",
    "Selu",
    "Mish",
    "Hardswish",
    "Hardsigmoid",
    "Softplus",
    "Prelu",
    "PreluKernel",
    "Rrelu",
    "Where",
    "Clamp",
    "Pow",
    "Exp",
    "Abs",
    "Sqrt",
    "Rsqrt",
    "MaskedFill",
    "Maximum",
    "Minimum",
    "Slice",
    "Narrow",
    "Cat",
    "ConstantPadNd",
    "ReflectionPad",
    "ReplicationPad",
    "Roll",
    "Flip",
    "CopySlices",
    "Lerp",
    "Addcmul",
    "Addcdiv",
    "Split",
    "SplitWithSizes",
    "UnsafeSplit",
    "UnsafeSplitWithSizes",
    "Glu",
)
#: Reductions over saved dims (``x.sum(0)`` of a stack, ``mean(dim)``): the reduced dims are none of the activation's.
_REDUCTIONS = ("Sum", "Mean")
#: Ops a layer applies to its own weight (``Linear``'s transpose, an autocast copy).
_WEIGHT_VIEWS = (
    "T",
    "Transpose",
    "Permute",
    "ToCopy",
    "View",
    "Reshape",
    "UnsafeView",
    "Expand",
    "Clone",
    "Select",
    "Slice",
)
#: Ops whose input and output differ in shape in ways `align_view` maps.
_VIEWS = ("View", "UnsafeView", "Reshape", "Squeeze", "Unsqueeze", "AsStrided", "Flatten", "Unflatten")


@dataclass
class Wiring:
    """What the autograd graph says about one activation call.

    Attributes:
        unit_dim: the activation dim that holds the units, or None when the graph cannot tell.
        why_not: when ``unit_dim`` is None, a short reason (for the warning).
        weights: ids of the parameters of the first producers on every path (and of the norms walked through), or
            None when there is no graph (the call's input needs no gradient).
        met: names of the sites whose outputs a path met (and stopped at): the same site's name marks a recurrent
            call (a cell fed its own earlier output).
        producer_kinds: names of the producer nodes reached (for messages and tests).
        batch_dim: the activation dim that holds the samples when every producer says so (a convolution: dim 0 of
            its batched output), `UNBATCHED` when they are unbatched convolutions (the call is one sample), or None
            when the graph does not say (a matrix product's rows may be samples or positions).
        unknown: names of the nodes the walk could not follow (an op it does not know, or dims it could not map).
    """

    unit_dim: Optional[int] = None
    why_not: str = "no producer layer in the autograd graph"
    weights: Optional[frozenset[Hashable]] = None
    met: set[str] = field(default_factory=set)
    producer_kinds: list[str] = field(default_factory=list)
    batch_dim: Optional[int] = None
    unknown: list[str] = field(default_factory=list)
    #: Whether ``batch_dim`` rests on the convention that dim 0 of the model's input holds the samples (rows reached
    #: nothing but a Linear fed by the input itself, and then moved off dim 0): the caller says so.
    batch_by_input: bool = False


def _kind(node: Any) -> str:
    name = type(node).__name__
    for suffix in ("Backward0", "Backward1", "Backward2", "Backward"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _saved(node: Any, attr: str) -> Any:
    try:
        return getattr(node, attr)
    except (AttributeError, RuntimeError):  # a freed graph raises on saved values
        return None


def saved_dim(value: Any, ndim: int) -> Optional[int]:
    """A dim saved in the autograd graph, as a non-negative index into ``ndim`` dims, or None when it is none.

    torch 2.13 reads a saved negative dim back as an unsigned 64-bit number (-1 is 2**64 - 1): it is converted back
    before normalising, since ``% ndim`` on the raw value is right only when ``ndim`` is a power of two.

    Example:
        >>> saved_dim(2**64 - 1, 3)
        2
    """
    if value is None or ndim <= 0:
        return None
    dim = int(value)
    if dim >= 2**63:
        dim -= 2**64
    if not -ndim <= dim < ndim:
        return None
    return dim % ndim


def align_view(in_shape: Sequence[int], out_shape: Sequence[int]) -> dict[int, int]:
    """Map each dim of ``out_shape`` to the dim of ``in_shape`` it is, for a view or reshape between them.

    A dim maps only when it is one dim on both sides with the same size (size-1 dims only when in step on both
    sides); dims merged or split by the view, and other size-1 dims, map to nothing.

    Example:
        >>> align_view((12, 7), (2, 6, 7))
        {2: 1}
    """
    mapping: dict[int, int] = {}
    i = j = 0
    while i < len(in_shape) and j < len(out_shape):
        a, b = int(in_shape[i]), int(out_shape[j])
        if a == b:  # size-1 dims in step on both sides are the same dim too (a layer's single unit)
            mapping[j] = i
            i += 1
            j += 1
            continue
        if a == 1:
            i += 1
            continue
        if b == 1:
            j += 1
            continue
        if a == 0 or b == 0:
            break
        i += 1
        j += 1
        while a != b:  # a group of dims merged or split: none of them maps
            if a < b:
                if i >= len(in_shape):
                    return mapping
                a *= int(in_shape[i])
                i += 1
            else:
                if j >= len(out_shape):
                    return mapping
                b *= int(out_shape[j])
                j += 1
    return mapping


def _shape_of(node: Any, output_nr: int) -> Optional[tuple[int, ...]]:
    meta = _saved(node, "_input_metadata")
    if meta is None or output_nr >= len(meta):
        return None
    try:
        return tuple(int(s) for s in meta[output_nr].shape)
    except Exception:  # a nested or symbolic shape: no answer
        return None


Dims = tuple[Optional[int], ...]


def _input_dims(
    node: Any, kind: str, dims: Dims, out_shape: tuple[int, ...], in_shape: tuple[int, ...]
) -> Optional[Dims]:
    """The activation dims of one input of ``node``, given those of its output, or None when unknown."""
    if kind in ("Squeeze", "Unsqueeze"):
        exact = _squeezed_input_dims(node, kind, dims, in_shape)
        if exact is not None:
            return exact
    if kind.startswith(_VIEWS) or kind == "Expand":
        if kind == "Expand":
            lead = len(out_shape) - len(in_shape)
            return tuple(dims[lead + d] if in_shape[d] == out_shape[lead + d] else None for d in range(len(in_shape)))
        mapping = align_view(in_shape, out_shape)
        result: list[Optional[int]] = [None] * len(in_shape)
        for out_d, in_d in mapping.items():
            result[in_d] = dims[out_d]
        return tuple(result)
    if kind == "Transpose" or kind == "T":
        if len(dims) < 2:
            return None
        raw = (_saved(node, "_saved_dim0"), _saved(node, "_saved_dim1")) if kind == "Transpose" else (0, 1)
        d0, d1 = saved_dim(raw[0], len(dims)), saved_dim(raw[1], len(dims))
        if d0 is None or d1 is None:
            return None
        swapped = list(dims)
        swapped[d0], swapped[d1] = swapped[d1], swapped[d0]
        return tuple(swapped)
    if kind == "Permute":
        order = _saved(node, "_saved_dims")
        if order is None or len(order) != len(dims):
            return None
        permuted: list[Optional[int]] = [None] * len(dims)
        for out_d, raw_d in enumerate(order):
            at = saved_dim(raw_d, len(dims))
            if at is None:
                return None
            permuted[at] = dims[out_d]
        return tuple(permuted)
    if kind in ("Select", "Unbind"):
        dim = saved_dim(_saved(node, "_saved_dim"), len(in_shape))
        if dim is None or len(in_shape) != len(dims) + 1:
            return None
        return dims[:dim] + (None,) + dims[dim:]
    if kind == "Stack":
        dim = saved_dim(_saved(node, "_saved_dim"), len(dims))
        if dim is None or len(in_shape) + 1 != len(dims):
            return None
        return dims[:dim] + dims[dim + 1 :]
    if kind in _REDUCTIONS:
        return _reduced_input_dims(node, dims, in_shape)
    if kind.startswith(_SAME_DIMS + _POOLS + _CHANNEL_NORMS + _LAST_NORMS):
        if len(in_shape) > len(dims):
            return None
        return dims[len(dims) - len(in_shape) :]  # broadcasting aligns from the right
    return None


def _squeezed_input_dims(node: Any, kind: str, dims: Dims, in_shape: tuple[int, ...]) -> Optional[Dims]:
    """The activation dims of the input of a squeeze or unsqueeze, from its saved dims (size-1 dims included, which a
    view's alignment cannot place); None when they are not saved."""
    raw = _saved(node, "_saved_dim")
    if kind == "Unsqueeze":
        dim = saved_dim(raw, len(dims))
        if dim is None or len(in_shape) + 1 != len(dims):
            return None
        return dims[:dim] + dims[dim + 1 :]
    if raw is None:  # squeeze(): every size-1 dim
        removed = {d for d, n in enumerate(in_shape) if n == 1}
    else:
        raw = tuple(raw) if isinstance(raw, (tuple, list)) else (raw,)
        named = [saved_dim(d, len(in_shape)) for d in raw]
        removed = {d for d in named if d is not None and in_shape[d] == 1}
    if len(in_shape) != len(dims) + len(removed):
        return None
    kept = iter(dims)
    return tuple(None if d in removed else next(kept) for d in range(len(in_shape)))


def _strided_input_dims(
    node: Any, dims: Dims, in_shape: tuple[int, ...], base_strides: Optional[tuple[int, ...]]
) -> Optional[Dims]:
    """The activation dims of the base of an ``as_strided`` view (what an in-place op on a view leaves: ConvNeXt's
    ``permute`` then ``ReLU(inplace=True)``).

    ``base_strides`` are the base's real strides (known for the activation's own view: its ``_base``), or None. A
    plain view of a whole contiguous base (a reshape) maps like a view. With the base's strides, each view dim is
    matched to the base dim with its stride: one view dim per base dim, of the base dim's size (or smaller, a slice,
    when every view dim matched); view dims that match nothing were merged into a base dim (a view of a view), which
    is then known only if its size says it holds nothing else. None when no dim maps: the graph does not tell."""
    size, stride = _saved(node, "_saved_size"), _saved(node, "_saved_stride")
    if size is None or stride is None or len(size) != len(dims) or len(stride) != len(dims):
        return None
    size, stride = tuple(int(n) for n in size), tuple(int(st) for st in stride)
    contiguous = [1] * len(in_shape)
    for d in range(len(in_shape) - 2, -1, -1):
        contiguous[d] = contiguous[d + 1] * in_shape[d + 1]
    if base_strides is None or list(base_strides) == contiguous or len(in_shape) <= 1:
        plain = _contiguous_view_dims(node, dims, in_shape, size, stride)
        if plain is not None or base_strides is None:
            return plain
    if base_strides is None or len(base_strides) != len(in_shape):
        return None
    matched: dict[int, list[int]] = {}
    unmatched = False
    for out_d, (n, st) in enumerate(zip(size, stride)):
        if n == 1:
            continue
        hits = [d for d in range(len(in_shape)) if base_strides[d] == st and in_shape[d] > 1 and n <= in_shape[d]]
        if len(hits) != 1:
            unmatched = True
            continue
        matched.setdefault(hits[0], []).append(out_d)
    result: list[Optional[int]] = [None] * len(in_shape)
    for base_d, outs in matched.items():
        if len(outs) == 1 and (size[outs[0]] == in_shape[base_d] or not unmatched):
            result[base_d] = dims[outs[0]]
    return tuple(result) if any(d is not None for d in result) else None


def _contiguous_view_dims(
    node: Any, dims: Dims, in_shape: tuple[int, ...], size: tuple[int, ...], stride: tuple[int, ...]
) -> Optional[Dims]:
    """An ``as_strided`` view that is a plain view of its whole contiguous base (a reshape then an in-place op):
    mapped like a view. None otherwise."""
    expected, numel = 1, 1
    for n, st in zip(reversed(size), reversed(stride)):
        if n != 1 and st != expected:
            return None
        expected *= n
    for n in in_shape:
        numel *= n
    if expected != numel or int(_saved(node, "_saved_storage_offset") or 0) != 0:
        return None
    mapping = align_view(in_shape, size)
    result: list[Optional[int]] = [None] * len(in_shape)
    for out_d, in_d in mapping.items():
        result[in_d] = dims[out_d]
    return tuple(result)


def _reduced_input_dims(node: Any, dims: Dims, in_shape: tuple[int, ...]) -> Optional[Dims]:
    """The activation dims of the input of a sum or mean over saved dims (None for a reduction over all dims)."""
    raw = _saved(node, "_saved_dim")
    if raw is None:
        return None
    raw = tuple(raw) if isinstance(raw, (tuple, list)) else (raw,)
    reduced = {saved_dim(d, len(in_shape)) for d in raw}
    if not raw or None in reduced:
        return None
    if bool(_saved(node, "_saved_keepdim")):
        if len(in_shape) != len(dims):
            return None
        return tuple(None if d in reduced else dims[d] for d in range(len(dims)))
    if len(in_shape) != len(dims) + len(reduced):
        return None
    kept = iter(dims)
    return tuple(None if d in reduced else next(kept) for d in range(len(in_shape)))


def read_wiring(
    tensor: Optional[Tensor],
    sites: Optional[Mapping[Any, tuple[str, int]]] = None,
    key: Optional[Callable[[Any], Any]] = None,
    layouts: Optional[Mapping[Any, int]] = None,
    stop_kind: Optional[str] = None,
) -> Wiring:
    """Read the wiring of an activation from the autograd graph behind its input ``tensor``.

    Args:
        tensor: the activation's input (for an in-place activation, whatever tensor still has the input's graph), or
            None.
        sites: for the output nodes of calls already seen (keyed by ``key(node)``), the site's name and unit dim: a
            path that meets one stops there and takes that site's units (a ReLU after a residual add of a site's
            output); the names met are in ``Wiring.met``.
        key: how to key nodes for ``sites`` (e.g. `relumon.cascade.node_key`).
        layouts: for the output nodes of modules that declare their layout (``batch_first`` on ``nn.LSTM``,
            ``nn.MultiheadAttention``, ``nn.Transformer*``), keyed by ``key(node)``, the dim of that output holding the
            samples. When the producers do not say where the samples are, a second walk follows the rows back through
            the producers to such an output (`batch_walk`).
        stop_kind: where ``sites`` is not known (a call first seen after the first training forward), the node kind
            of the activation's own op (``"Relu"``): a path stops at such a node, below the start, as at an earlier
            call's output, and ``"?"`` is added to ``Wiring.met`` (a loop whose count varies per step: its later
            iterations are fed by the same weights and their own earlier output, not by everything behind it).

    Returns:
        A `Wiring`. Its ``unit_dim`` is None when the graph cannot tell (no graph, branches that disagree, a view that
        merges the feature dim).
    """
    wiring = Wiring()
    if tensor is None or tensor.grad_fn is None:
        wiring.why_not = "its input has no autograd graph (no gradient is tracked)"
        return wiring
    ndim = tensor.ndim
    root = tensor.grad_fn
    base = tensor._base
    base_strides = tuple(base.stride()) if base is not None and base.layout == torch.strided else None
    weights: set[Hashable] = set()
    answers: set[int] = set()
    batches: set[Optional[int]] = set()  # what the producers say of the sample dim
    blurred = False
    muted = False  # a single-feature producer broadcast over the units (an SE or FiLM gate of one unit)
    visited: set[tuple[int, Dims]] = set()
    budget = MAX_NODES
    start: Dims = tuple(range(ndim))
    # Each entry: a node, the activation dims of its output, that output's shape, and the dims before the last view
    # that merged some of them (with the shape they had), so that the view back restores them (instance norm's
    # ``(B, C, L) -> (1, B*C, L) -> (B, C, L)``).
    stack: list[tuple[Any, Dims, tuple[int, ...], Optional[tuple[tuple[int, ...], Dims]]]] = [
        (tensor.grad_fn, start, tuple(tensor.shape), None)
    ]
    while stack and budget > 0:
        node, dims, shape, restore = stack.pop()
        if (id(node), dims) in visited:
            continue
        visited.add((id(node), dims))
        budget -= 1
        met = None
        if sites is not None:
            met = sites.get(key(node) if key is not None else node)
        if met is not None:  # another call's output: its units are known, and the walk stops there
            wiring.met.add(met[0])
            batches.add(None)
            target = dims[met[1]] if met[1] < len(dims) else None
            if target is None:
                blurred = True
            else:
                answers.add(target)
            continue
        kind = _kind(node)
        if stop_kind is not None and kind == stop_kind and node is not root:
            wiring.met.add("?")  # an earlier call of this kind of activation: its units are not known here
            batches.add(None)
            continue
        edges = [(child, nr) for child, nr in node.next_functions if child is not None]
        params = [child.variable for child, _ in edges if isinstance(getattr(child, "variable", None), nn.Parameter)]
        feature: Optional[int] = None
        if kind.startswith(_CONV):
            weight = next((p for p in params if p.ndim >= 3), None)
            feature = 0 if weight is not None and len(shape) == weight.ndim - 1 else 1
            # An unbatched call runs as a batch of one, squeezed after: its lost dim 0 of size 1 is one sample.
            batches.add(UNBATCHED if feature == 0 or (dims[0] is None and shape[0] == 1) else dims[0])
        elif kind.startswith(_LAST):
            feature = _product_feature_dim(node, kind, len(shape))
            batches.add(_rnn_batch_dim(kind, dims))
        if feature is not None:
            wiring.producer_kinds.append(kind)
            weights.update(_first_weights(node))
            if _broadcast_single(feature, shape, dims, tuple(tensor.shape)):
                muted = True  # one feature broadcast over many units (a gate): it says nothing of the unit dim
            elif 0 <= feature < len(dims) and dims[feature] is not None:
                answers.add(int(dims[feature]))  # type: ignore[arg-type]
            else:
                blurred = True
            continue
        is_norm = kind.startswith(_CHANNEL_NORMS + _LAST_NORMS)
        if is_norm:
            weights.update(id(p) for p in params)
        is_view = kind.startswith(_VIEWS)
        keeps = kind.startswith(_SAME_DIMS + _CHANNEL_NORMS + _LAST_NORMS)
        followed = False
        for child, nr in edges:
            if getattr(child, "variable", None) is not None:
                continue  # a leaf: a parameter or an input that requires grad
            in_shape = _shape_of(child, nr)
            if in_shape is None:
                continue
            child_restore = restore if keeps and len(in_shape) == len(dims) else None
            child_dims: Optional[Dims]
            if kind == "AsStrided":  # an in-place op on a view: the base's strides are known for the activation's
                child_dims = _strided_input_dims(node, dims, in_shape, base_strides if node is root else None)
                if child_dims is not None and _lost(dims, child_dims):
                    child_restore = (shape, dims)
            elif is_view and restore is not None and in_shape == restore[0]:
                child_dims = restore[1]  # the view back of an earlier merging view
                child_restore = None
            else:
                child_dims = _input_dims(node, kind, dims, shape, in_shape)
                if is_view and child_dims is not None and _lost(dims, child_dims):
                    child_restore = (shape, dims)
            if child_dims is None:
                continue
            followed = True
            stack.append((child, child_dims, in_shape, child_restore))
            if is_norm:
                break  # a norm's data input is its first edge; the rest are its own parameters
        if not followed and is_norm:
            # Nothing behind the norm: it decides. BatchNorm/GroupNorm normalise per channel (dim 1); a LayerNorm over
            # the last dim alone means features there; over more dims it cannot tell.
            if kind.startswith(_CHANNEL_NORMS) and len(dims) >= 2 and dims[1] is not None:
                answers.add(int(dims[1]))
            elif kind.startswith(_LAST_NORMS):
                normalized = _saved(node, "_saved_normalized_shape")
                if normalized is not None and len(normalized) == 1 and dims[-1] is not None:
                    answers.add(int(dims[-1]))
        elif not followed and kind.startswith(_POOLS) and len(dims) >= 3 and dims[1] is not None:
            answers.add(int(dims[1]))
        elif not followed and any(getattr(child, "variable", None) is None for child, _ in edges):
            wiring.unknown.append(kind)  # a path the walk cannot follow: it never guesses past it
    wiring.weights = frozenset(weights)
    blurred = blurred or (muted and not answers)  # a gate alone: as before, the graph does not tell
    if len(batches) == 1:
        wiring.batch_dim = batches.pop()
    if len(answers) == 1 and not blurred:
        wiring.unit_dim = answers.pop()
    elif len(answers) > 1:
        wiring.why_not = f"its producers disagree on the unit dim (dims {sorted(answers)})"
    elif blurred:
        wiring.why_not = "a view or reduction merges the producer's feature dim with another dim"
    elif budget <= 0:
        wiring.why_not = f"no producer layer within {MAX_NODES} autograd nodes"
    elif wiring.unknown:
        wiring.why_not = f"the walk cannot follow `{'`, `'.join(sorted(set(wiring.unknown)))}` back to a producer layer"
    if wiring.batch_dim is None and wiring.unit_dim is not None and tensor.ndim >= 3:
        by_input: list[bool] = []
        wiring.batch_dim = batch_walk(tensor, layouts or {}, key, by_input)
        wiring.batch_by_input = bool(by_input)
    return wiring


def batch_walk(
    tensor: Tensor,
    layouts: Mapping[Any, int],
    key: Optional[Callable[[Any], Any]] = None,
    by_input: Optional[list[bool]] = None,
) -> Optional[int]:
    """The activation dim that holds the samples, read by following the rows back to the output of a module that
    declares its layout (an ``nn.LSTM`` with ``batch_first=False``: dim 1), or None when no path reaches one, or the
    paths disagree.

    Rows are followed through the ops of `read_wiring`'s walk and *through* the producers: a matrix product's rows are
    the rows of its data operand (a Linear over ``(T, B, D)`` is a view to ``(T*B, D)``, a product, and the view back:
    the dims merged on the way in come back on the way out), a convolution's dim 0 is its input's dim 0. Where no
    such output is reached, a token embedding of 2-D indices says: dim 0 of ``input_ids`` is the batch, by the
    convention of Hugging Face models (a fairseq-style model transposes to ``(T, B, C)`` after it); where none is
    either, a matrix product fed by the model's input itself (a tensor without gradient) says: dim 0 of that input is
    the batch, as a ``DataLoader`` stacks it. When that last convention moves the samples off the activation's dim 0
    (a transpose after the Linear), ``True`` is appended to ``by_input``, so that the caller can say so.
    """
    answers: set[Optional[int]] = set()
    lookups: set[Optional[int]] = set()  # dim 0 of token embeddings (``input_ids`` are batch-first by convention)
    inputs: set[Optional[int]] = set()  # dim 0 of the model's input fed straight into a Linear (the same convention)
    visited: set[tuple[int, Dims]] = set()
    budget = MAX_NODES
    stack: list[tuple[Any, Dims, tuple[int, ...], Optional[tuple[tuple[int, ...], Dims]]]] = [
        (tensor.grad_fn, tuple(range(tensor.ndim)), tuple(tensor.shape), None)
    ]
    while stack and budget > 0:
        node, dims, shape, restore = stack.pop()
        if node is None or (id(node), dims) in visited:
            continue
        visited.add((id(node), dims))
        budget -= 1
        said = layouts.get(key(node) if key is not None else node)
        if said is not None:
            answers.add(dims[said] if said < len(dims) else None)
            continue
        kind = _kind(node)
        nexts = node.next_functions
        if kind in _OPERANDS and len(shape) == 2:  # rows of a product: its data operand's rows (weight on the right)
            left, right = _OPERANDS[kind]
            if max(left, right) < len(nexts) and _weight_behind(nexts[right][0]) and nexts[left][0] is None:
                inputs.add(_input_rows(dims, shape, restore))  # the input's rows, with no graph behind them
            elif max(left, right) < len(nexts) and _weight_behind(nexts[right][0]) and nexts[left][0] is not None:
                child, nr = nexts[left]
                in_shape = _shape_of(child, nr)
                if in_shape is not None and len(in_shape) == 2:
                    prefix = (restore[0][:-1], restore[1][:-1]) if restore is not None else None
                    stack.append((child, (dims[0], None), in_shape, prefix))
            continue
        if kind.startswith(_CONV):
            child, nr = nexts[0] if nexts else (None, 0)
            in_shape = _shape_of(child, nr) if child is not None else None
            if in_shape is not None and len(in_shape) == len(dims):
                stack.append((child, (dims[0],) + (None,) * (len(dims) - 1), in_shape, None))
            continue
        if kind == "Embedding" and len(shape) >= 3 and shape[0] > 1:
            lookups.add(dims[0])
            continue
        if kind.startswith(_TIME_MAJOR_RNN):
            answers.add(_rnn_batch_dim(kind, dims))
            continue
        if kind.startswith(_LAST) or kind == "AsStrided":
            continue
        is_view = kind.startswith(_VIEWS)
        keeps = kind.startswith(_SAME_DIMS + _CHANNEL_NORMS + _LAST_NORMS)
        for child, nr in nexts:
            if child is None or getattr(child, "variable", None) is not None:
                continue
            in_shape = _shape_of(child, nr)
            if in_shape is None:
                continue
            child_restore = restore if keeps and len(in_shape) == len(dims) else None
            child_dims: Optional[Dims]
            if is_view and restore is not None and in_shape[: len(restore[0])] == restore[0]:
                # The view into the product (prefix: a Linear's rows) or back (an instance norm's merge).
                child_dims = restore[1] + (None,) * (len(in_shape) - len(restore[1]))
                child_restore = None
            else:
                child_dims = _input_dims(node, kind, dims, shape, in_shape)
                if is_view and child_dims is not None and _lost(dims, child_dims):
                    child_restore = (shape, dims)
            if child_dims is not None:
                stack.append((child, child_dims, in_shape, child_restore))
            if kind.startswith(_CHANNEL_NORMS + _LAST_NORMS):
                break
    if answers:
        return answers.pop() if len(answers) == 1 else None
    if lookups:
        return lookups.pop() if len(lookups) == 1 else None
    if len(inputs) != 1:
        return None
    rows = inputs.pop()
    if rows is not None and rows != 0 and by_input is not None:
        by_input.append(True)
    return rows


def _input_rows(dims: Dims, shape: tuple[int, ...], restore: Optional[tuple[tuple[int, ...], Dims]]) -> Optional[int]:
    """The activation dim of dim 0 of a matrix product's data operand: the product's rows, or, when a view merged
    dims into them (a Linear over ``(B, L, D)``), the first of those dims; None when the view is not that."""
    if restore is None:
        return dims[0]
    before, before_dims = restore
    if len(before) < 2 or len(before_dims) != len(before) or before[-1] != shape[-1]:
        return None
    if math.prod(before[:-1]) != shape[0]:
        return None
    return before_dims[0]


def _broadcast_single(feature: int, shape: tuple[int, ...], dims: Dims, act_shape: tuple[int, ...]) -> bool:
    """Whether a producer makes a single feature that reaches the activation broadcast over a bigger dim, or squeezed
    away: a one-unit gate (``sigmoid(fc(x)).unsqueeze(1)``, a ``(B, 1, L)`` attention map) multiplying the real
    features. Such a producer says nothing of where the units are."""
    if not 0 <= feature < len(shape) or shape[feature] != 1:
        return False
    target = dims[feature] if feature < len(dims) else None
    return target is None or act_shape[target] != 1


def _rnn_batch_dim(kind: str, dims: Dims) -> Optional[int]:
    """The activation dim holding the samples, for an output of a time-major recurrent layer (``(T, B, H)``, or its
    final state ``(B, H)``); None for other producers (their rows may be samples or positions)."""
    if not kind.startswith(_TIME_MAJOR_RNN):
        return None
    return dims[1] if len(dims) == 3 else dims[0] if len(dims) == 2 else None


def _lost(dims: Dims, child_dims: Dims) -> bool:
    """Whether a view loses track of some activation dim (merges it with another one)."""
    return len({d for d in dims if d is not None} - {d for d in child_dims if d is not None}) > 0


#: Operand positions ``(left, right)`` among ``next_functions`` of the matrix products.
_OPERANDS = {"Mm": (0, 1), "Bmm": (0, 1), "Addmm": (1, 2), "Baddbmm": (1, 2)}


def _product_feature_dim(node: Any, kind: str, ndim: int) -> int:
    """The feature dim of a matrix product's output: the last dim (``x @ W``, ``Linear``), or the row dim when the
    weight is the left operand alone (``W @ x + b``, a ``bmm`` with the weight on the left)."""
    positions = _OPERANDS.get(kind)
    if positions is None or ndim < 2:
        return ndim - 1
    nexts = node.next_functions
    if max(positions) >= len(nexts):
        return ndim - 1
    left, right = (_weight_behind(nexts[p][0]) for p in positions)
    return ndim - 2 if left and not right else ndim - 1


def _weight_behind(node: Any, limit: int = 8) -> bool:
    """Whether ``node`` is a parameter, possibly behind a chain of the views a layer applies to its own weight."""
    for _ in range(limit):
        if node is None:
            return False
        if isinstance(getattr(node, "variable", None), nn.Parameter):
            return True
        if _kind(node) not in _WEIGHT_VIEWS:
            return False
        inner = [child for child, _ in node.next_functions if child is not None]
        if len(inner) != 1:
            return False
        node = inner[0]
    return False


def _path_step(node: Any) -> Optional[tuple[Any, ...]]:
    """What a weight view does to the weight, for the site's identity: a transpose, a permute, or which expert (the
    index of a select or the range of a slice); None for casts, views and copies, which change nothing."""
    kind = _kind(node)
    if kind in ("T", "Transpose"):
        return ("T",)
    if kind == "Permute":
        return ("P", _saved(node, "_saved_dims"))
    if kind == "Select":
        return ("S", _saved(node, "_saved_dim"), _saved(node, "_saved_index"))
    if kind == "Slice":
        return ("L", _saved(node, "_saved_dim"), _saved(node, "_saved_start"), _saved(node, "_saved_end"))
    if kind == "IndexSelect":  # ``W.index_select(0, ids)``: which experts, by value (read at discovery only)
        return ("I", _saved(node, "_saved_dim"), _index_values(_saved(node, "_saved_index")))
    if kind == "Index":  # ``W[ids]`` with an index tensor
        indices = _saved(node, "_saved_indices") or ()
        return ("X", tuple(_index_values(i) for i in indices))
    return None


#: Index tensors on a weight path with at most this many entries are read at discovery.
_MAX_INDEX_KEY = 64


def _index_values(index: Any) -> Hashable:
    """An index tensor saved on a weight path, as a hashable key: the one entry it picks (``W.index_select(0,
    tensor([e]))``, ``W[tensor([e])]``: an expert), read at discovery only; None when it picks several (a gather of
    each token's expert mixes experts in one call, which stays one site whatever the routing), is long, or is none."""
    if not isinstance(index, Tensor) or index.numel() == 0 or index.numel() > _MAX_INDEX_KEY:
        return None
    first = index.flatten()[0]
    return int(first) if bool((index == first).all()) else None


def _first_weights(node: Any, limit: int = 64) -> set[Hashable]:
    """Keys of the parameters met first behind ``node``, breadth-first over at most ``limit`` nodes: a Linear's bias
    and its weight (behind a transpose or a cast), or, for a product of two activations (attention), the weights
    further back.

    A parameter reached straight is keyed by its id; one reached through a transpose, permute, select or slice by its
    id and that path, so an expert ``W1[e]`` of a batched ``(E, D, H)`` parameter, and ``W`` against ``W.T`` in a tied
    autoencoder, are different weights."""
    found: set[Hashable] = set()
    frontier: list[tuple[Any, tuple[Any, ...]]] = [(child, ()) for child, _ in node.next_functions if child is not None]
    seen = 0
    while frontier and seen < limit:
        seen += len(frontier)
        inner = [(c, path) for c, path in frontier if getattr(c, "variable", None) is None]
        for c, path in frontier:
            variable = getattr(c, "variable", None)
            if isinstance(variable, nn.Parameter):
                found.add(id(variable) if not path else (id(variable), path))
        # A weight behind its transpose or cast is still this layer's; further back only while none was found.
        if found:
            inner = [(c, path) for c, path in inner if _kind(c) in _WEIGHT_VIEWS]
        frontier = []
        for child, path in inner:
            step = _path_step(child)
            longer = path + (step,) if step is not None else path
            frontier.extend((c, longer) for c, _ in child.next_functions if c is not None)
    return found


#: The node type that ends a path at a leaf tensor (its ``variable``).
_ACCUMULATE_GRAD: Any = type(
    (_leaf := nn.Parameter(torch.zeros(1))).mul(1).grad_fn.next_functions[0][0]  # type: ignore[union-attr]
)
del _leaf

#: Nodes a call signature steps through (the view back of a Linear over a 3-D input).
_SIGNATURE_VIEWS = ("ViewBackward0", "UnsafeViewBackward0")
#: Weight views a call signature looks behind: a Linear's transpose, an expert's select.
_SIGNATURE_WEIGHTS = ("TBackward0", "SelectBackward0")


def call_signature(inp: Optional[Tensor], out: Tensor) -> tuple[Hashable, ...]:
    """A cheap fingerprint of the layer that fed one activation call: the parameters among the inputs of the node
    behind it (a Linear's bias, a conv's or a norm's parameters), or where there are none, the parameters right behind
    a transpose or select there (a bias-free Linear's weight, an expert's ``b1[e]`` with its index).

    It looks at one node (two behind a view back), never walks the graph: cheap enough for every call of a module
    with several sites, so that a call is matched to its site by what fed it, not by its call index, when calls are
    skipped by the data (experts with no token, LayerDrop). Empty when the node behind has no parameter input (a
    residual add): the call index decides then.
    """
    node: Any = (inp if inp is not None else out).grad_fn
    if node is None:
        return ()
    if inp is None or inp is out:  # in place: the activation's own node is first
        edges = node.next_functions
        node = edges[0][0] if edges else None
    for _ in range(2):
        if node is None or type(node).__name__ not in _SIGNATURE_VIEWS:
            break
        node = node.next_functions[0][0]
    if node is None:
        return ()
    edges = node.next_functions
    signature: list[Hashable] = [id(c.variable) for c, _ in edges if type(c) is _ACCUMULATE_GRAD]
    if signature:  # a bias, a conv's weight: enough, and the cheapest look
        return tuple(signature)
    child: Any
    for child, _ in edges:
        if child is None:
            continue
        name = type(child).__name__
        if name in _SIGNATURE_WEIGHTS:  # a bias-free Linear's weight behind its transpose, an expert's b1[e]
            inner: Any = child.next_functions[0][0]
            if type(inner) is _ACCUMULATE_GRAD:
                index = _saved(child, "_saved_index") if name == "SelectBackward0" else None
                signature.append((name, id(inner.variable), index))
    return tuple(signature)


def batch_first_of(model: nn.Module) -> dict[str, bool]:
    """Paths of the modules that declare a ``batch_first`` layout (``nn.LSTM``, ``nn.Transformer*``,
    ``nn.MultiheadAttention``...), with their setting."""
    return {
        name: module.batch_first
        for name, module in model.named_modules()
        if isinstance(getattr(module, "batch_first", None), bool)
    }


# ================================================================================================================
# Producers and readers: the facts recycling rewrites (`relumon.recycle`), read once, for the sites found in the
# first training forward.
#
# A unit can be re-initialised without changing what the network computes only when the graph proves three things:
# one Linear/Conv makes it (its rows), every consumer of the activation is a Linear/Conv that recycling rewires (its
# columns) or an op that keeps each unit's values apart on the way to one, and no parameter involved is used anywhere
# else (a weight tied through a functional call is reached twice: its ``AccumulateGrad`` node has two consumers).
# `WiringBook` records one training forward (a pre-hook and a hook on every module, removed when the next step
# begins) and the sites the recorder discovers in it, and reads these facts from that one graph, once, when the
# forward is over; nothing of it runs after that.
# ================================================================================================================

#: Modules between a producer and its activation that recycling steps over (a BatchNorm is reset; these pass through).
_RW_PASS_THROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)
#: Nodes that keep every dim as it is (copies, casts, dropout).
_RW_SAME = ("CloneBackward", "ToCopyBackward", "AliasBackward", "NativeDropoutBackward", "ContiguousBackward")
#: Nodes that reshape: the unit dim is followed with `align_view`, or becomes a flatten's ``units x positions``.
_RW_VIEWS = ("ViewBackward", "UnsafeViewBackward", "ReshapeAliasBackward", "SqueezeBackward", "UnsqueezeBackward")
#: Pools over the trailing 1, 2 or 3 dims (``MaxPool1d`` is an unsqueeze, a 2-D pool and a squeeze in the graph).
_RW_POOLS = ("MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool", "FractionalMaxPool")
#: Reductions over given dims (``AdaptiveAvgPool2d(1)`` is ``MeanBackward1`` over the spatial dims).
_RW_REDUCTIONS = ("MeanBackward1", "SumBackward1", "AmaxBackward0", "MaxBackward1", "NansumBackward")


def _node_name(node: Any) -> str:
    return type(node).__name__


def _is_weighted(module: nn.Module) -> bool:
    """A Linear or a (non-transposed) Conv1d/2d/3d: the layers whose rows and columns recycling rewrites."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed


def _signed(value: Any) -> int:
    """A saved dim as a Python int: torch 2.13 reads a saved negative dim back as an unsigned 64-bit number."""
    number = int(value)
    return number - 2**64 if number >= 2**63 else number


def _tensors_in(value: Any) -> list[Tensor]:
    """The tensors in a module's output: itself, or those in a tuple, list or dict (nested too)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_in(v)]
    return []


def _storage(t: Tensor) -> int:
    """The address of ``t``'s storage (shared by its views and its ``detach()``), or 0 when it has none."""
    try:
        return int(t.untyped_storage().data_ptr())
    except Exception:  # a tensor subclass or a fake tensor without storage
        return 0


@dataclass
class ModuleCall:
    """One recorded call of a module in the probed forward."""

    path: str
    module: nn.Module
    in_node: Any
    out_node: Any
    in_shape: tuple[int, ...]
    index: int = 0  # 0-based call of this module within the forward
    out_shape: tuple[int, ...] = ()


class WiringProbe:
    """Records the module calls of one training forward, then takes its hooks off.

    A forward pre-hook and a forward hook on every module keep, per call, the ``grad_fn`` of its input and output,
    and the autograd nodes of every tensor any module returned (a tuple's or a dict's too: the walk for consumers
    starts there). Recording starts at the first training forward (grad enabled, module in training mode) and ends
    when the first module it saw is called again (the next step); then the hooks are removed and ``on_done`` runs.
    Under ``torch.compile`` and ``torch.func`` transforms nothing is recorded.

    Args:
        model: the watched model.
        on_done: called once when the recorded forward is over (not when the probe is removed unrecorded).
    """

    def __init__(self, model: nn.Module, on_done: Optional[Callable[[], None]] = None) -> None:
        from relumon.hooks import OwnHook, OwnPreHook, hookable_modules

        self.calls: list[ModuleCall] = []
        #: Autograd nodes of every tensor a module returned (held until the wiring is read).
        self.roots: list[Any] = []
        #: Ids of the autograd nodes of the tensors the root module returned.
        self.output_nodes: set[int] = set()
        #: Those nodes themselves (held, so that their ids stay theirs until the wiring is read).
        self.output_refs: list[Any] = []
        #: Storage addresses of the tensors the root module returned without a gradient (a detached activation).
        self.output_storages: set[int] = set()
        self._counts: Counter[int] = Counter()
        self._pending: dict[int, list[tuple[Any, tuple[int, ...]]]] = {}  # id(module) -> inputs of open calls
        self._seen: set[int] = set()
        self._first: Optional[nn.Module] = None
        self._on_done = on_done
        self.done = False
        self._handles: list[Any] = []
        for path, module in hookable_modules(model):  # TorchScript modules take no hooks
            self._handles.append(module.register_forward_pre_hook(OwnPreHook(self._make_pre(), module)))
            self._handles.append(module.register_forward_hook(OwnHook(self._make_post(path), module)))

    def _make_pre(self) -> Callable[..., None]:
        from relumon.hooks import in_functorch_transform, is_compiling, is_counted_forward

        def pre(module: nn.Module, args: Any) -> None:
            if self.done or is_compiling() or not is_counted_forward(module) or in_functorch_transform():
                return
            if self._first is None:
                self._first = module
            elif module is self._first and id(module) in self._seen:
                self.finish()  # the first module runs again: the next step has begun
                return
            inp = args[0] if args and isinstance(args[0], Tensor) else None
            entry = (inp.grad_fn if inp is not None else None, tuple(inp.shape) if inp is not None else ())
            self._pending.setdefault(id(module), []).append(entry)

        return pre

    def _make_post(self, path: str) -> Callable[..., None]:
        from relumon.hooks import is_compiling

        def post(module: nn.Module, args: Any, out: Any) -> None:
            if self.done or is_compiling():
                return
            pending = self._pending.get(id(module))
            if not pending:
                return
            in_node, in_shape = pending.pop()
            self._seen.add(id(module))
            index = self._counts[id(module)]
            self._counts[id(module)] += 1
            nodes = [t.grad_fn for t in _tensors_in(out) if t.grad_fn is not None]
            self.roots.extend(nodes)
            if isinstance(out, Tensor):
                self.calls.append(ModuleCall(path, module, in_node, out.grad_fn, in_shape, index, tuple(out.shape)))
            if path == "":  # the model's outputs: a unit that reaches one cannot be rewired without changing it
                self.output_nodes.update(id(node) for node in nodes)
                self.output_refs.extend(nodes)
                self.output_storages.update(_storage(t) for t in _tensors_in(out) if t.grad_fn is None)

        return post

    @property
    def recorded(self) -> bool:
        """Whether a training forward was recorded."""
        return bool(self.calls)

    def finish(self, read: bool = True) -> None:
        """Stop recording, remove the hooks, and (with ``read``, once) call ``on_done``. Idempotent."""
        first = not self.done
        self.done = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()
        on_done, self._on_done = self._on_done, None
        if first and read and on_done is not None and self.calls:
            on_done()

    def take_calls(self) -> list[ModuleCall]:
        """The recorded calls, once; the probe stops and forgets them and the autograd nodes it held."""
        self.finish(read=False)
        calls, self.calls, self.roots, self.output_refs = self.calls, [], [], []
        return calls


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
        modules: weak references to the producer, the BatchNorm (if any) and the readers recorded, in that order, so
            that recycling can tell when the model's modules were replaced since.
    """

    site: str
    units: int
    producer: Optional[str] = None
    norm: Optional[str] = None
    readers: tuple[str, ...] = ()
    positions: tuple[int, ...] = ()
    problem: Optional[str] = None
    modules: tuple[Any, ...] = field(default=(), compare=False, repr=False)

    def replaced(self, model: nn.Module) -> Optional[str]:
        """The first module path that no longer names the module recorded, or None when all still do."""
        paths = [self.producer] + ([self.norm] if self.norm is not None else []) + list(self.readers)
        for path, ref in zip(paths, self.modules):
            try:
                module = model.get_submodule(path) if path is not None else None
            except AttributeError:
                return path
            if module is None or module is not ref():
                return path
        return None


@dataclass
class DiscoveredSite:
    """A site the recorder discovered in the recorded forward: its activation's nodes, shape and unit dim."""

    name: str
    in_node: Any
    out_node: Any
    shape: tuple[int, ...]
    unit_dim: int
    calls: int = 1
    storage: int = 0  # the address of its output's storage (see `WiringProbe.output_storages`)


class WiringBook:
    """The producer and reader facts of every site found in the first training forward: one record per site.

    The recorder calls `discovered` once per new call index at discovery; the `WiringProbe` records the module calls
    of the same forward. When the forward is over (the next step begins, or the facts are asked for first), the
    graph is walked once by `read_site_wiring`, and the nodes are let go. Sites first called later have no record
    (`why_unknown` says so).

    Args:
        model: the watched model.
    """

    def __init__(self, model: nn.Module) -> None:
        import weakref

        self._model = weakref.ref(model)
        self._found: dict[str, DiscoveredSite] = {}
        self.facts: dict[str, SiteWiring] = {}
        self._error: Optional[str] = None
        self._probe: Optional[WiringProbe] = None
        self._probe = WiringProbe(model, on_done=self._read)

    def discovered(self, name: str, inp: Optional[Tensor], out: Tensor, unit_dim: int) -> None:
        """Record a newly discovered call of site ``name`` (its activation's input and output) in the recorded
        forward. Cheap: it keeps two node references."""
        probe = self._probe
        if probe is None or probe.done:
            return
        known = self._found.get(name)
        if known is not None:
            known.calls += 1
            return
        out_node = out.grad_fn
        if inp is not None and inp is not out:
            in_node = inp.grad_fn
        else:  # an in-place activation: its input's node is the first edge of its own node
            edges = getattr(out_node, "next_functions", ())
            in_node = edges[0][0] if edges else None
        self._found[name] = DiscoveredSite(name, in_node, out_node, tuple(out.shape), unit_dim, storage=_storage(out))

    def _read(self) -> None:
        probe, self._probe = self._probe, None
        model = self._model()
        if probe is None or model is None:
            return
        try:
            self.facts = read_site_wiring(
                probe.calls, probe.roots, probe.output_nodes, self._found.values(), model, probe.output_storages
            )
        except Exception as err:  # relumon never breaks the training it watches
            from relumon.errors import is_strict

            if is_strict():
                raise
            self._error = f"reading it failed ({type(err).__name__}: {err})"
        probe.calls, probe.roots = [], []
        self._found = {}

    def site(self, name: str) -> Optional[SiteWiring]:
        """The record of site ``name``; reads the recorded forward now if it was not read yet."""
        probe = self._probe
        if probe is not None and probe.recorded:
            probe.finish()  # reads it (`_read`)
        return self.facts.get(name)

    def why_unknown(self, name: str) -> str:
        """Why site ``name`` has no record."""
        if self._error is not None:
            return f"its wiring is not known: {self._error}"
        if self._probe is not None:
            return (
                "its wiring is not known yet: no training forward was recorded (compiled or transformed forwards are "
                "not)"
            )
        return (
            "its wiring is not known: relumon reads it from the first training forward, and this site was first "
            "called later, or outside a module call it could record (compiled code)"
        )

    def remove(self) -> None:
        """Take the probe's hooks off and let the recorded nodes go. Idempotent."""
        if self._probe is not None:
            self._probe.finish(read=False)
            self._probe = None
        self._found = {}


def read_site_wiring(
    calls: Sequence[ModuleCall],
    roots: Sequence[Any],
    output_nodes: set[int],
    sites: Any,
    model: nn.Module,
    output_storages: Optional[set[int]] = None,
) -> dict[str, SiteWiring]:
    """Producer and readers of every discovered site, from the autograd graph of one recorded forward.

    Args:
        calls: the module calls `WiringProbe` recorded.
        roots: the autograd nodes of every tensor a module returned.
        output_nodes: ids of the nodes of the tensors the model returned: a site whose values reach one is left alone.
        sites: the `DiscoveredSite` records.
        model: the model (for parameters registered twice).
        output_storages: storage addresses of the tensors the model returned without gradient: a site whose output
            shares one (the model returns it detached) is left alone.

    Returns:
        ``{site name: SiteWiring}``.
    """
    sites = list(sites)
    out_owner: dict[int, ModuleCall] = {}
    for call in calls:  # children finish first: the innermost module that returned a node owns it
        if call.out_node is not None:
            out_owner.setdefault(id(call.out_node), call)
    calls_per_module = Counter(id(c.module) for c in calls)
    starts = list(roots) + [c.out_node for c in calls] + [c.in_node for c in calls]
    starts += [s.out_node for s in sites] + [s.in_node for s in sites]
    consumers, uses = consumers_and_uses(starts)
    reader_of: dict[int, ModuleCall] = {}  # nodes computed inside each Linear/Conv call, back to its input
    for call in calls:
        if _is_weighted(call.module) and call.in_node is not None and call.out_node is not None:
            for node in _inside(call.out_node, call.in_node):
                reader_of.setdefault(id(node), call)
    registered = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    graph = _Graph(
        out_owner, consumers, uses, reader_of, calls_per_module, registered, output_nodes, set(output_storages or ())
    )
    return {site.name: _wire_site(site, graph) for site in sites}


def consumers_and_uses(roots: Sequence[Any]) -> tuple[dict[int, list[Any]], Counter[int]]:
    """For every node reachable back from ``roots``: the nodes that take it as an input; and per parameter, how many
    nodes take it (its ``AccumulateGrad``'s consumers: 2 or more for a weight used twice)."""
    consumers: dict[int, list[Any]] = {}
    uses: Counter[int] = Counter()
    seen: set[int] = set()
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for parent, _ in getattr(node, "next_functions", ()):
            if parent is None:
                continue
            if _node_name(parent) == "AccumulateGrad":
                variable = getattr(parent, "variable", None)
                if variable is not None:
                    uses[id(variable)] += 1
                continue
            consumers.setdefault(id(parent), []).append(node)
            stack.append(parent)
    return consumers, uses


def _inside(out_node: Any, in_node: Any) -> list[Any]:
    """The nodes of one module call: back from its output, stopping at its input and at parameters."""
    inside: list[Any] = []
    seen, stack = {id(in_node)}, [out_node]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or _node_name(node) == "AccumulateGrad":
            continue
        seen.add(id(node))
        inside.append(node)
        stack.extend(parent for parent, _ in node.next_functions)
    return inside


@dataclass
class _Graph:
    out_owner: dict[int, ModuleCall]
    consumers: dict[int, list[Any]]
    uses: Counter[int]
    reader_of: dict[int, ModuleCall]
    calls_per_module: Counter[int]
    registered: Counter[int]
    output_nodes: set[int]
    output_storages: set[int]

    def problem(self, call: ModuleCall, role: str) -> Optional[str]:
        """Why ``call``'s module cannot be rewritten: called twice, parameters shared, used twice, frozen, sharded."""
        path, module = call.path, call.module
        calls = self.calls_per_module[id(module)]
        if calls > 1:
            return f"its {role} `{path}` is called {calls} times per forward (shared weights)"
        own = dict(module.named_parameters(recurse=False))  # `_parameters` of a TorchScript module has no `.get`
        for pname in ("weight", "bias"):
            # A weight computed from other tensors (`torch.nn.utils.parametrizations.weight_norm`/`spectral_norm`,
            # the older hook-based `weight_norm`): writing into it would change a temporary, or be overwritten at the
            # next forward, so the rows and columns recycling zeroes would not stay zero.
            value = getattr(module, pname, None)
            if isinstance(value, Tensor) and own.get(pname) is not value:
                return (
                    f"its {role} `{path}` computes its `{pname}` from other tensors, or holds it outside its "
                    "parameters (a parametrization such as weight_norm or spectral_norm, an FSDP flat parameter), "
                    "which recycling cannot rewrite row by row"
                )
        for pname, p in module.named_parameters(recurse=False):
            if self.registered[id(p)] > 1:
                return f"its {role} `{path}` has tied weights (`{pname}` is shared with another module)"
            if self.uses[id(p)] > 1:
                return (
                    f"its {role} `{path}` has a weight used again elsewhere in the graph (`{pname}` is reached "
                    f"{self.uses[id(p)]} times: tied through a functional call), so rewriting it would change that use"
                )
            if not p.requires_grad:
                return (
                    f"its {role} `{path}` is frozen (`{pname}` requires no gradient): a recycled unit could not learn "
                    "again, and its rows or columns would stay as recycling left them"
                )
            if callable(getattr(p, "full_tensor", None)):
                return (
                    f"its {role} `{path}` holds sharded (DTensor, FSDP2) parameters, which recycling does not rewrite"
                )
        return None


def _wire_site(site: DiscoveredSite, graph: _Graph) -> SiteWiring:
    shape, name = site.shape, site.name
    ndim = len(shape)
    if ndim < 2:
        return SiteWiring(name, shape[0] if shape else 1, problem="its output is not batched (fewer than 2 dims)")
    units_dim = site.unit_dim
    units = shape[units_dim]

    def skip(reason: str) -> SiteWiring:
        return SiteWiring(name, units, problem=reason)

    if site.calls > 1:
        return skip(f"it is one site over {site.calls} calls per forward (a shared or recurrent cell)")
    if site.storage and site.storage in graph.output_storages:
        return skip(
            "the model returns its values without gradient (detached, or a view of them): re-drawn units would "
            "change that output"
        )
    # ---- the producer: back through BatchNorm, Dropout and Identity to a Linear or Conv
    node: Any = site.in_node
    norm: Optional[ModuleCall] = None
    while True:
        if node is None:
            return skip("it is fed by the model's input or a tensor without gradient: there is no producer to reset")
        owner = graph.out_owner.get(id(node))
        if owner is None:
            op = _node_name(node)
            if op.startswith(("AddBackward", "SubBackward")):
                return skip(f"it is fed by an add of two or more producers (`{op}`, a residual join)")
            return skip(f"it is fed by an operation outside any module (`{op}`) that recycling cannot follow")
        if len(graph.consumers.get(id(node), [])) > 1:
            return skip(f"the output of `{owner.path}` is also read by another operation than the activation")
        module = owner.module
        if isinstance(module, _RW_PASS_THROUGH):
            node = owner.in_node
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and norm is None:
            if module.num_features != units:
                return skip(f"its BatchNorm `{owner.path}` has {module.num_features} features, the site {units} units")
            problem = graph.problem(owner, "BatchNorm")
            if problem:
                return skip(problem)
            norm = owner
            node = owner.in_node
            continue
        if not _is_weighted(module):
            return skip(f"it is fed by `{owner.path}` ({type(module).__name__}), not a Linear or Conv")
        producer = owner
        break
    pmod = producer.module
    rows = pmod.out_features if isinstance(pmod, nn.Linear) else pmod.out_channels
    along = ndim - 1 if isinstance(pmod, nn.Linear) else 1
    if rows != units or units_dim != along:
        kind = type(pmod).__name__
        return skip(f"its producer `{producer.path}` ({kind}) has {rows} outputs along another dim than the units")
    problem = graph.problem(producer, "producer")
    if problem:
        return skip(problem)

    # ---- the readers: forward through ops that keep each unit apart, to the Linear/Conv modules that read it
    readers: list[tuple[str, int]] = []
    reader_calls: list[ModuleCall] = []
    frontier: list[tuple[Any, int, tuple[int, ...], int]] = [(site.out_node, units_dim, shape, 1)]
    seen: set[int] = set()
    while frontier:
        node, dim, at_shape, positions = frontier.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in graph.output_nodes:
            return skip("the model returns its values (or a view of them): re-drawn units would change that output")
        for consumer in graph.consumers.get(id(node), []):
            reader = graph.reader_of.get(id(consumer))
            if reader is not None and reader.in_node is node:
                found = _map_reader(reader, dim, at_shape, positions, units)
                if isinstance(found, str):
                    return skip(found)
                problem = graph.problem(reader, "reader")
                if problem:
                    return skip(problem)
                readers.append((reader.path, found))
                reader_calls.append(reader)
                continue
            step = _follow(consumer, dim, at_shape, positions)
            if isinstance(step, str):
                owner = graph.out_owner.get(id(consumer))
                if owner is not None and step.endswith("recycling can rewire"):  # name the module, not the node
                    step = f"its output is read by `{owner.path}` ({type(owner.module).__name__}), not a Linear or Conv"
                return skip(step)
            frontier.append((consumer, *step))
    if not readers:
        return skip("nothing inside the model reads its output through a Linear or Conv (it may be the model's output)")
    return SiteWiring(
        name,
        units,
        producer=producer.path,
        norm=norm.path if norm is not None else None,
        readers=tuple(path for path, _ in readers),
        positions=tuple(p for _, p in readers),
        modules=tuple(weakref.ref(c.module) for c in [producer, *([norm] if norm else []), *reader_calls]),
    )


def _out_shape(node: Any) -> Optional[tuple[int, ...]]:
    return _shape_of(node, 0)


def _follow(node: Any, dim: int, shape: tuple[int, ...], positions: int) -> Any:
    """Where the units are in ``node``'s output, given where they are in its input: ``(dim, shape, positions)``, or
    a reason why the values of different units (or of a unit and anything else) may mix there."""
    op = _node_name(node)
    new = _out_shape(node)
    if new is None:
        return f"its output is read by `{op}`, whose shape relumon cannot read"
    if op.startswith(_RW_SAME) or (op.startswith("MulBackward") and _one_grad_input(node)):
        return dim, new, positions  # a copy, a cast, dropout (a product with a mask that needs no gradient)
    if op.startswith(_RW_VIEWS):
        mapped = {i: o for o, i in align_view(shape, new).items()}
        if dim in mapped:
            return mapped[dim], new, positions
        # A flatten of (units, positions...) into the last dim: each unit is a run of positions there.
        if (
            len(new) >= 1
            and math.prod(shape[dim:]) == new[-1]
            and math.prod(shape[:dim]) == math.prod(new[:-1])
            and positions == 1
        ):
            return len(new) - 1, new, math.prod(shape[dim + 1 :])
        return f"its output is reshaped by `{op}` in a way that merges its units with another dim"
    if op.startswith(("TransposeBackward", "PermuteBackward")) and positions == 1:
        if op.startswith("Transpose"):
            d0, d1 = _saved(node, "_saved_dim0"), _saved(node, "_saved_dim1")
            if d0 is None or d1 is None:
                return f"its output is read by `{op}`, whose dims relumon cannot read"
            a, b = _signed(d0) % len(shape), _signed(d1) % len(shape)
            return (b if dim == a else a if dim == b else dim), new, positions
        order = _saved(node, "_saved_dims")
        if order is None:
            return f"its output is read by `{op}`, whose dims relumon cannot read"
        order = [_signed(d) % len(shape) for d in order]
        return order.index(dim), new, positions
    if op.startswith(_RW_POOLS):
        pooled = 3 if "3D" in op.upper() else 2 if "2D" in op.upper() else 1
        if positions != 1 or dim >= len(shape) - pooled:
            return f"its output is pooled by `{op}` in a way that may mix its units: recycling cannot map them"
        return dim, new, positions
    if op.startswith(_RW_REDUCTIONS):
        saved = _saved(node, "_saved_dim")
        keepdim = bool(_saved(node, "_saved_keepdim"))
        if saved is None or positions != 1:
            return f"its output is reduced by `{op}` over dims relumon cannot read"
        dims = {_signed(d) % len(shape) for d in (saved if isinstance(saved, (tuple, list)) else (saved,))}
        if dim in dims:
            return f"its output is reduced by `{op}` over its units: recycling cannot map them"
        return (dim if keepdim else dim - sum(1 for d in dims if d < dim)), new, positions
    if op.startswith("AddBackward"):
        return f"its output is read by `{op}`, a residual add, not a Linear or Conv recycling can rewire"
    return f"its output is read by `{op}`, not a Linear or Conv recycling can rewire"


def _one_grad_input(node: Any) -> bool:
    return sum(1 for parent, _ in node.next_functions if parent is not None) == 1


def _map_reader(reader: ModuleCall, dim: int, shape: tuple[int, ...], positions: int, units: int) -> Any:
    """The reader's input columns per unit, or a reason why they cannot be mapped."""
    module = reader.module
    kind = type(module).__name__
    if isinstance(module, nn.modules.conv._ConvNd):
        batched = len(shape) == len(module.kernel_size) + 2
        if dim != (1 if batched else 0) or positions != 1 or module.in_channels != units:
            return f"it is read by `{reader.path}` ({kind}) through a reshape that does not keep its channels"
        return 1
    assert isinstance(module, nn.Linear)
    if dim == len(shape) - 1 and shape[-1] == module.in_features == units * positions:
        return positions
    return (
        f"it is read by `{reader.path}` (Linear {module.in_features} inputs) through a reshape relumon cannot map to "
        "units"
    )


__all__ += ["DiscoveredSite", "ModuleCall", "SiteWiring", "WiringBook", "WiringProbe", "read_site_wiring"]
