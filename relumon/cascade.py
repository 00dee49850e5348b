"""Which dead call site explains which: dead cascades, their roots, and gradients blocked by dead layers.

When a ReLU layer dies, the layers after it often die with it: their input is all zero, so the next BatchNorm
outputs its own bias (0 at init) and the next ReLU outputs 0 too. One cause, many dead layers. relumon reports such a
**cascade** as one event with one **root**.

**What is recorded (once).** During the first training forward, when a call site is discovered, the recorder walks
the autograd graph back from the site's output (`upstream_sites`): from its ``grad_fn`` through ``next_functions``,
stopping at the nearest other sites' output nodes. A path that ends at a parameter's ``AccumulateGrad`` carries no
signal. A ``None`` edge (a tensor that needs no gradient) is the data input, a constant buffer, a frozen parameter or
an absent optional argument (a conv without bias). Where no site lies upstream of the node that has it, it is the
data. Where a site's path meets it, it counts as data at a **join**: any node other than a product (``mul``, ``mm``,
a conv, whose dead input gives a dead output whatever its other operand holds) or a norm or dropout (whose absent or
frozen parameters and masks are no signal). Joins are residual adds and ``torch.cat``, which module hooks cannot see,
but equally a slice assignment into a buffer (``feat[:, :6] = h; feat[:, 6:] = wide``, a ``CopySlices`` node),
``index_put``, ``index_copy``, ``torch.maximum(site, data)`` or ``addmm(data, site, w)``: the rule names the few ops
that cannot join, so an op it does not know errs towards a join. Scatter aggregations (``index_add_``,
``scatter_add_``, ``scatter_reduce_``, ``index_reduce_``: a graph network's message passing into
``torch.zeros(...)``) are not joins: their buffer without grad counts as the zeros it is in that pattern, so one dead
layer's cascade through an aggregation has one root. The ``AccumulateGrad`` of a leaf that is not a
parameter (an input that requires grad) and an embedding lookup with no site upstream count as data too. The walk
visits each graph node between a site and its nearest upstream sites once; it runs for the sites of the first
training forward only and adds nothing to later steps.

**The rule (at report time).** A call site whose every unit was dead or saturated in the window is a
**consequence** when no path from it reaches the data input without crossing another site, and every nearest
upstream site *carried no signal*: every unit dead (ReLU: output 0) or saturated (ReLU6: output 6), on every call of
the window. An upstream site that the sampling schedule left unmeasured on some call (``unmeasured_calls``) may have
fired then: it explains nothing, and the site below is its own root (confirmed like any root, by a window measured on
every call). Its
``caused_by`` is the root of the first such upstream site (in forward order). Any other dead site is a **root**. An
activation stuck in the negative regime (LeakyReLU...) still passes a signal, so it explains nothing downstream.

**Blocked gradients.** A site whose output gradient was exactly 0 is **blocked by** a dead layer when every nearest
downstream site either carried no signal (it passes no gradient back) or is blocked itself; ``blocked_by`` names the
first of those dead layers in forward order.

**Limits.** Sites first called after the first training forward, and every site under ``torch.compile`` (there is no
eager graph to walk), have an unknown upstream: each of their deaths is its own root. A constant tensor that needs no
gradient counts as data, so a site fed by one is a root (relumon errs towards more roots, never hiding a death): a
buffer made without grad (``torch.zeros``) and then filled from sites alone by slice assignment or ``index_put``, and
the frozen bias of a Linear (``addmm``) are such constants. Conversely, a scatter aggregation into a data tensor
(``data.index_add_(0, idx, site)``) is taken for a buffer of zeros: there the data joins unseen. A reentrant
``torch.utils.checkpoint`` segment starts from a detached input: the first site in it is a root.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from torch import nn

__all__ = ["upstream_sites", "find_roots", "consequences_of", "find_blockers"]


#: Autograd nodes that read a parameter at data-chosen positions (an embedding lookup): a signal from the data.
_LOOKUPS = ("Embedding", "Index", "Gather", "Take")
#: Nodes whose operands without grad cannot carry a signal past dead sites on their other edges: products (a constant
#: factor, dropout's mask, a frozen weight) and layers whose absent or frozen parameters are such an operand (a conv
#: without bias, a norm without affine parameters): a dead input gives a dead output whatever that operand holds.
#: Every other node with such an operand next to a site's path is a **join**: an add, a cat, a slice assignment
#: (``CopySlices``), ``index_put``/``index_copy``, ``torch.maximum``, ``addmm``'s added operand... mixes that operand
#: (the data input, or a constant) into the signal, as a residual shortcut does.
_NO_SIGNAL_OPERAND = (
    "ConvolutionBackward",
    "CudnnConvolutionBackward",
    "MkldnnConvolutionBackward",
    "MulBackward",
    "DivBackward",
    "MmBackward",
    "BmmBackward",
    "MvBackward",
    "DotBackward",
    "NativeBatchNorm",
    "CudnnBatchNorm",
    "MiopenBatchNorm",
    "NativeLayerNorm",
    "NativeGroupNorm",
    "NativeDropoutBackward",
    # Scatter aggregations (graph message passing): ``zeros(N, H).index_add_(0, dst, site[src])``. Their buffer needs
    # no gradient and is, in that pattern, zeros: a constant, not the data (a dead site's messages sum to nothing).
    "IndexAddBackward",
    "ScatterAddBackward",
    "ScatterReduceBackward",
    "IndexReduceBackward",
)


def node_key(node: Any) -> tuple[int, int]:
    """A key for an autograd node that holds no reference to it: its id and its sequence number (which grows with
    every node made), so a freed node's reused id never matches. Holding the nodes themselves would keep every
    graph, and its saved activations, alive for as long as discovery lasts."""
    seq = getattr(node, "_sequence_nr", None)
    return (id(node), int(seq()) if callable(seq) else -1)


def upstream_sites(grad_fn: Any, known: Mapping[Any, str]) -> tuple[tuple[str, ...], bool]:
    """The nearest upstream sites of an activation output, and whether a path reaches the data around them.

    A path ends at a site's output node (that site is upstream), at a parameter's ``AccumulateGrad`` (no signal), at
    the ``AccumulateGrad`` of a leaf that is not a parameter (an input that requires grad: data), or at a ``None``
    edge: a tensor that needs no gradient. Such a tensor is the data input, a constant buffer, or an absent optional
    argument (a conv without bias); a ``None`` edge counts as data at a node with no site upstream of it, and at a
    join (an add, a cat, a slice assignment, ``index_put``, ``maximum``, ``addmm``...: any node but the products,
    norms and dropout of `_NO_SIGNAL_OPERAND`), but not at a conv, a product or a norm fed by a site, whose missing
    bias, constant factor or frozen parameters are no signal. An embedding lookup with no site upstream counts as
    data too (its indices are).

    Args:
        grad_fn: the output's ``grad_fn`` (the activation's own autograd node, inplace or not), or None.
        known: the `node_key` of the output ``grad_fn`` of every site discovered so far, mapped to the site's name.

    Returns:
        ``(names, from_input)``: the sites whose outputs are reached first on the way back, in forward order of
        discovery, and True when some path reaches the data input without crossing a site.
    """
    if grad_fn is None:  # nothing upstream needs a gradient: fed by data alone
        return (), True
    # Iterative post-order walk (graphs can be deeper than Python's recursion limit): for each node, the sites
    # reached first behind it (with their output node's sequence number, which orders them as the forward made them:
    # no lookup over every known site, so discovering N sites stays O(N)) and whether it reaches the data without
    # crossing one.
    done: dict[int, tuple[frozenset[tuple[int, str]], bool]] = {}
    stack: list[tuple[Any, bool]] = [(grad_fn, False)]
    while stack:
        node, expanded = stack.pop()
        key = id(node)
        if key in done:
            continue
        node_id = node_key(node)
        site = known.get(node_id) if node is not grad_fn else None
        if site is not None:
            done[key] = (frozenset(((node_id[1], site),)), False)
            continue
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None:
            done[key] = (frozenset(), not isinstance(variable, nn.Parameter))
            continue
        children = [edge[0] for edge in node.next_functions if edge[0] is not None]
        if not expanded:
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in done)
            continue
        sites: frozenset[tuple[int, str]] = frozenset().union(*(done[id(c)][0] for c in children))
        data = any(done[id(c)][1] for c in children)
        name = type(node).__name__
        if len(children) < len(node.next_functions) and (not sites or not name.startswith(_NO_SIGNAL_OPERAND)):
            # A tensor without grad where no site is upstream, or joined to a site's path (a residual shortcut, a
            # wide path, a buffer filled from both): the data. (A conv's missing bias behind a site is not.)
            data = True
        elif not sites and name.startswith(_LOOKUPS):  # an embedding lookup: its indices are data
            data = True
        done[key] = (sites, data)
    sites, from_input = done[id(grad_fn)]
    return tuple(name for _, name in sorted(sites)), from_input


def find_roots(
    order: Sequence[str],
    upstream: Mapping[str, Optional[tuple[str, ...]]],
    from_input: Mapping[str, bool],
    dead: set[str],
    silent: set[str],
    measured: Optional[set[str]] = None,
) -> dict[str, str]:
    """Map each dead site that an upstream death explains to its root.

    Args:
        order: site names in forward order (upstream sites come first).
        upstream: each site's nearest upstream sites; None when unknown.
        from_input: whether a path from the site reaches the data input without crossing a site.
        dead: sites whose every unit was dead or saturated (stuck negative included).
        silent: dead sites that carried no signal (every unit output 0 or the cap).
        measured: sites whose silence is known: measured on every call of the window (``LayerReport.exact``), or
            confirmed silent by an earlier such window and silent in every measured call since; None when all were.
            A sampled site never confirmed may have fired on a call that was not measured, so its silence explains
            nothing downstream.

    Returns:
        ``{consequence: root}``. Dead sites that are not keys are roots.
    """
    position = {name: i for i, name in enumerate(order)}
    root_of: dict[str, str] = {}
    for name in order:
        ups = upstream.get(name)
        if name not in dead or not ups or from_input.get(name, True):
            continue
        if all(u in silent and (measured is None or u in measured) for u in ups):
            roots = [root_of.get(u, u) for u in ups]
            root_of[name] = min(roots, key=lambda r: position.get(r, len(order)))
    return root_of


def consequences_of(order: Sequence[str], root_of: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """Each root's consequences in forward order, from `find_roots`'s ``{consequence: root}``, in one pass."""
    consequences: dict[str, list[str]] = {}
    for name in order:
        root = root_of.get(name)
        if root is not None:
            consequences.setdefault(root, []).append(name)
    return {root: tuple(names) for root, names in consequences.items()}


def find_blockers(
    order: Sequence[str],
    upstream: Mapping[str, Optional[tuple[str, ...]]],
    dead: set[str],
    silent: set[str],
    zero_grad: set[str],
) -> dict[str, str]:
    """Map each live site whose output gradient was exactly 0 to the dead site that blocked it, where one did.

    Args:
        order: site names in forward order.
        upstream: each site's nearest upstream sites; None when unknown.
        dead: sites whose every unit was dead or saturated: they get no entry (their own death says enough), but
            can block the sites below them.
        silent: sites that carried no signal (and pass no gradient back).
        zero_grad: sites whose output gradient was exactly 0 in the window.
    """
    position = {name: i for i, name in enumerate(order)}
    downstream: dict[str, list[str]] = {name: [] for name in order}
    for name in order:
        for u in upstream.get(name) or ():
            if u in downstream:
                downstream[u].append(name)
    blocked: dict[str, str] = {}
    for name in reversed(order):
        downs = downstream[name]
        if name not in zero_grad or not downs:
            continue
        causes = [d if d in silent else blocked.get(d) for d in downs]
        if all(c is not None for c in causes):
            blocked[name] = min((c for c in causes if c is not None), key=position.__getitem__)
    return {name: blocker for name, blocker in blocked.items() if name not in dead}
