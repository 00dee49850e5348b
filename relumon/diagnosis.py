"""Diagnosis at report time: death history, blame on the feeding module, and the memory they keep across windows.

Nothing here runs in the training step. It works on what [`Monitor.report()`][relumon.Monitor.report] has already
read to the host, once per closed window:

- **Death history** (`SiteHistory`): per unit, the step of the window in which it was first seen dead, how many
  closed windows in a row it has been dead, and how many dead units came back. A recycled unit (`relumon.recycle`)
  starts a fresh history; the next closed window tells how many of the recycled units died again. Host-side,
  O(units) per call site, plain data in checkpoints.
- **Blame** (`blame`): facts about the module that fed a dying activation. The feeding module is the one whose output
  tensor the activation received in the first training forward (see `relumon.hooks.ProducerTracer`), not a guess from
  names. The facts are about whole parameters: a DTensor parameter (FSDP2's ``fully_shard``) is gathered with
  ``full_tensor()``, a collective. That is safe because blame runs on every rank for the same sites of the same
  global report; a report that is not reduced across ranks leaves sharded parameters out.
- **The feeders' weight gradients** (`WeightGradNorms`): what blame says about a feeder's weight gradient is about
  the window, not about ``.grad`` at report time (which ``zero_grad(set_to_none=False)`` has zeroed, and an
  accumulation step has summed). A tensor hook on each feeder's weight keeps, on the device, the norm of its gradient
  in the window's first measured backward pass: one reduction per feeder per window. (Every measured pass would cost
  a pass over every feeder's weight gradient on each measured step: about 6 % of a step of an MLP of 1024-wide
  Linear layers.) The host reads it only for the layers blamed.
- **Memory across windows** (`Diagnosis`): each site's history and last dead fraction (a jump from it triggers blame),
  by call-site name, with the state of sites not discovered yet kept until they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from relumon.segments import host_cat, segment_counts, segment_ids, segment_sums
from relumon.state import unscaled_l2_norm

__all__ = [
    "BLAME_JUMP",
    "Blamed",
    "Diagnosis",
    "SiteHistory",
    "WeightGradNorms",
    "WindowHistory",
    "blame",
    "blame_many",
    "describe_module",
]

#: A rise in a layer's dead fraction, from one closed window to the next, that makes relumon blame its feeder.
BLAME_JUMP = 0.2


@dataclass(frozen=True)
class WindowHistory:
    """What one closed window changed in a site's history."""

    revived_units: int  #: units dead in the previous window and alive in this one
    revived_total: int  #: revivals since monitoring began
    permanently_dead_units: int  #: units dead for at least ``permanent_after`` windows in a row
    first_dead_step: Tensor  #: int64 per unit: the step of the window in which it was first seen dead, -1 if never
    dead_streak: Tensor  #: int64 per unit: consecutive closed windows (with samples) in which it was dead
    recycled_total: int = 0  #: units recycled since monitoring began
    recycled_checked: int = 0  #: units recycled at the last recycling, measured for the first time in this window
    recycled_dead_again: int = 0  #: of those, the units dead again in this window (ReDo's "dead again" share)


class SiteHistory:
    """The death history of one call site.

    Args:
        units: number of units of the site.
    """

    def __init__(self, units: int) -> None:
        self.first_dead_step = torch.full((units,), -1, dtype=torch.int64)
        self.dead_streak = torch.zeros(units, dtype=torch.int64)
        self.revived_total = 0
        #: Units recycled and not yet seen by a closed window since: the next one tells whether they died again.
        self.recycled_pending = torch.zeros(units, dtype=torch.bool)
        self.recycled_total = 0
        self._pending = False  # whether some unit is in recycled_pending
        self._checked = self._dead_again = 0

    def recycle(self, indices: list[int]) -> None:
        """Units that were re-initialised: they start a fresh history, and the next window checks them."""
        idx = torch.tensor(indices, dtype=torch.long)
        self.first_dead_step[idx] = -1
        self.dead_streak[idx] = 0
        self.recycled_pending[idx] = True
        self.recycled_total += len(indices)
        self._pending = True

    def update(self, dead_mask: Tensor, step: int, permanent_after: int) -> WindowHistory:
        """Fold one closed window's dead mask (CPU bool, one per unit) into the history (`fold_histories` of one)."""
        return fold_histories([self], [dead_mask], step, permanent_after)[0]

    def view(self, permanent_after: int) -> WindowHistory:
        """The history as it stands, without changing it (`fold_histories` of one, with no mask)."""
        return fold_histories([self], [None], 0, permanent_after)[0]

    def _check_recycled(self, dead_mask: Tensor) -> None:
        """At a closed window: how many of the units recycled before it are dead again (only after recycling)."""
        self._checked = self._dead_again = 0
        if self._pending:
            self._pending = False
            self._checked = int(self.recycled_pending.count_nonzero())
            self._dead_again = int((self.recycled_pending & dead_mask).count_nonzero())
            self.recycled_pending = torch.zeros_like(self.recycled_pending)

    def state_dict(self) -> dict[str, Any]:
        return {
            "first_dead_step": self.first_dead_step.tolist(),
            "dead_streak": self.dead_streak.tolist(),
            "revived_total": self.revived_total,
            "recycled_pending": self.recycled_pending.nonzero().flatten().tolist(),
            "recycled_total": self.recycled_total,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        first = state.get("first_dead_step")
        streak = state.get("dead_streak")
        if first is not None and len(first) == self.first_dead_step.numel():
            self.first_dead_step = torch.tensor(first, dtype=torch.int64)
        if streak is not None and len(streak) == self.dead_streak.numel():
            self.dead_streak = torch.tensor(streak, dtype=torch.int64)
        self.revived_total = int(state.get("revived_total", 0))
        self.recycled_total = int(state.get("recycled_total", 0))
        pending = [int(i) for i in state.get("recycled_pending", []) if 0 <= int(i) < self.recycled_pending.numel()]
        self.recycled_pending = torch.zeros_like(self.recycled_pending)
        self.recycled_pending[pending] = True
        self._pending = bool(pending)


def fold_histories(
    histories: Sequence[SiteHistory], dead_masks: Sequence[Optional[Tensor]], step: int, permanent_after: int
) -> list[WindowHistory]:
    """Fold a closed window into many sites' death histories at once, and say what it changed for each.

    ``dead_masks[i]`` is site ``i``'s dead mask (CPU bool, one per unit), or None to leave its history as it is (a
    peek, or a site that saw no sample) and only read it. Report time: every site's streaks and first dead steps are
    worked on as one tensor, so the number of kernels does not grow with the number of sites (at a thousand sites,
    a handful of kernels per site cost more than everything else in a report); what is left per site is one view for
    the history and one copy for the report. A report handed out never changes when the history does.
    """
    if not histories:
        return []
    lengths = [history.dead_streak.numel() for history in histories]
    folding = [mask is not None for mask in dead_masks]
    masks = []
    for history, mask, units in zip(histories, dead_masks, lengths):
        if mask is not None:
            if mask.shape != (units,):
                raise ValueError(f"a dead mask of shape {tuple(mask.shape)} for a history of {units} units")
            history._check_recycled(mask)
        masks.append(mask if mask is not None else torch.zeros(units, dtype=torch.bool))
    streak = torch.cat([history.dead_streak for history in histories])
    first = torch.cat([history.first_dead_step for history in histories])
    dead = torch.cat(masks)
    folded = torch.tensor(folding).repeat_interleave(torch.tensor(lengths), output_size=len(streak))
    revived = (streak > 0) & folded & ~dead  # dead before (streak > 0), alive now
    # New tensors, not in-place updates: the histories' old tensors may be views of one buffer with other sites'.
    streak = torch.where(folded, (streak + 1).mul_(dead), streak)
    first = first.masked_fill(dead & (first < 0), step)
    revived_counts, permanent_counts = segment_counts(torch.stack([revived, streak >= permanent_after]), lengths)
    kept_streaks, kept_firsts = torch.split(streak, lengths), torch.split(first, lengths)
    # Each report gets tensors of its own, not views of a buffer of every site's: pickling one, or keeping one
    # layer's report of every window, would carry every site's units with it.
    report_streaks, report_firsts = [t.clone() for t in kept_streaks], [t.clone() for t in kept_firsts]
    out = []
    for i, history in enumerate(histories):
        history.dead_streak, history.first_dead_step = kept_streaks[i], kept_firsts[i]
        history.revived_total += revived_counts[i]
        out.append(
            WindowHistory(
                revived_units=revived_counts[i],
                revived_total=history.revived_total,
                permanently_dead_units=permanent_counts[i],
                first_dead_step=report_firsts[i],
                dead_streak=report_streaks[i],
                recycled_total=history.recycled_total,
                recycled_checked=history._checked,
                recycled_dead_again=history._dead_again,
            )
        )
    return out


def describe_module(module: nn.Module) -> str:
    """A short description: ``Linear 512→256``, ``Conv2d 64→128 3×3``, ``BatchNorm2d(64)``."""
    # FSDP2's fully_shard swaps in a subclass (FSDPLinear): name the user's class.
    kind = next(c.__name__ for c in type(module).__mro__ if not c.__module__.startswith("torch.distributed"))
    if isinstance(module, nn.Linear):
        return f"{kind} {module.in_features}→{module.out_features}"
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = "×".join(str(k) for k in module.kernel_size)
        return f"{kind} {module.in_channels}→{module.out_channels} {kernel}"
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return f"{kind}({module.num_features})"
    return kind


def _is_sharded(t: Tensor) -> bool:
    """A DTensor (FSDP2, tensor parallel), told apart without importing torch.distributed.tensor."""
    return callable(getattr(t, "full_tensor", None))


def _whole(t: Tensor) -> Tensor:
    """The whole tensor: a DTensor is gathered (collective: every rank must call this, in the same order)."""
    full: Tensor = t.full_tensor() if _is_sharded(t) else t  # type: ignore[attr-defined]
    return full


def _bias_facts(biases: Sequence[Optional[Tensor]], dead_masks: Sequence[Tensor]) -> list[list[str]]:
    """What the biases say, per layer: their share below 0 and their mean, and the dead units' (an empty list for a
    layer without a bias). ``biases[i]`` has one value per unit of ``dead_masks[i]``.

    Every layer's biases are read to the host together and reduced per layer with a few kernels in all."""
    facts: list[list[str]] = [[] for _ in biases]
    present = [(i, bias) for i, bias in enumerate(biases) if bias is not None and bias.numel() > 0]
    if not present:
        return facts
    lengths = [bias.numel() for _, bias in present]
    b = host_cat([bias for _, bias in present])
    dead = torch.cat([dead_masks[i] if dead_masks[i].ndim == 1 else dead_masks[i].reshape(-1) for i, _ in present])
    dead = dead.cpu().bool()
    negative = b < 0
    ids = segment_ids(lengths)
    negatives, deads, dead_negatives = segment_counts(torch.stack([negative, dead, negative & dead]), lengths)
    sums, dead_sums = torch.stack(
        [segment_sums(b, ids, len(present)), segment_sums(b.masked_fill(~dead, 0.0), ids, len(present))]
    ).tolist()
    for k, (i, _) in enumerate(present):
        units, dead_units = lengths[k], deads[k]
        facts[i].append(f"{100 * negatives[k] / units:.0f}% of its biases are negative, mean {sums[k] / units:+.3g}")
        if 0 < dead_units < units:
            facts[i].append(
                f"the dead units' biases: {100 * dead_negatives[k] / dead_units:.0f}% negative, "
                f"mean {dead_sums[k] / dead_units:+.3g}"
            )
    return facts


class Blamed(NamedTuple):
    """One layer to blame (see `blame`)."""

    layer_name: str
    fed_by: str
    module: nn.Module
    dead_mask: Tensor
    weight_grad_norm: Optional[float] = None


def blame(
    layer_name: str,
    fed_by: str,
    module: nn.Module,
    dead_mask: Tensor,
    *,
    gather_sharded: bool = True,
    weight_grad_norm: Optional[float] = None,
) -> Optional[str]:
    """Explain a layer's dead units by the module that fed it.

    Args:
        layer_name: the activation's call-site name.
        fed_by: the feeding module's path.
        module: the feeding module.
        dead_mask: CPU bool per unit of the activation.
        gather_sharded: gather DTensor parameters (a collective). Pass True only when every rank calls ``blame``
            for the same sites in the same order, as it does for a report reduced across ranks; False leaves sharded
            parameters out.
        weight_grad_norm: the norm of the module's weight gradient in the window's first measured backward pass
            (`WeightGradNorms.norm`), or None when it was not recorded: then blame says nothing about it. (``.grad``
            at report time says nothing about the window: ``zero_grad`` may have zeroed it.)

    Returns:
        e.g. "`fc2` (Linear 512→256) feeds `act2`: 98% of its biases are negative, mean -3.1; its weight gradient
        norm is 0 (first measured pass of the window)", or None when the module has nothing to say.
    """
    layer = Blamed(layer_name, fed_by, module, dead_mask, weight_grad_norm)
    return blame_many([layer], gather_sharded=gather_sharded)[0]


def blame_many(layers: Sequence[Blamed], *, gather_sharded: bool = True) -> list[Optional[str]]:
    """`blame` for many layers at once, in order: the same sentences, with every bias read in one transfer per
    device. Sharded biases are gathered one by one in the order given (a collective: every rank passes the same
    layers in the same order)."""
    biases: list[Optional[Tensor]] = []
    for layer in layers:
        bias = getattr(layer.module, "bias", None)
        if isinstance(bias, Tensor) and bias.numel() == layer.dead_mask.numel():
            biases.append(_whole(bias.detach()) if gather_sharded or not _is_sharded(bias) else None)
        else:
            biases.append(None)
    sentences: list[Optional[str]] = []
    for layer, facts in zip(layers, _bias_facts(biases, [layer.dead_mask for layer in layers])):
        norm = layer.weight_grad_norm
        if norm is not None:
            facts.append(f"its weight gradient norm is {norm:.3g} (first measured pass of the window)")
        described = f"`{layer.fed_by}` ({describe_module(layer.module)}) feeds `{layer.layer_name}`: "
        sentences.append(described + "; ".join(facts) if facts else None)
    return sentences


class _WindowNorm:
    """One feeder's weight-gradient norms in the open window: an on-device sum and the passes it adds up."""

    __slots__ = ("total", "passes")

    def __init__(self, total: Tensor) -> None:
        self.total = total
        self.passes = 0


class WeightGradNorms:
    """The weight-gradient norm of each module that feeds a watched activation, in the open window, for blame.

    A tensor hook on each feeder's ``weight`` stores ``||grad||`` (unscaled under a ``GradScaler``) on the device in
    the window's first measured backward pass, and does nothing else until the window closes: one reduction per
    feeder per window. Nothing is read to the host until `norm`, which blame calls for the layers it explains. A
    sharded (DTensor) weight is left out: its local gradient is a shard, and blame must say the same on every rank.

    Args:
        measuring: whether the current step is a measured one (read in the hook, on the host).
        grad_scale: the live loss scale of a ``GradScaler``, or None.
    """

    def __init__(self, measuring: Callable[[], bool], grad_scale: Callable[[], Optional[Tensor]]) -> None:
        self._measuring = measuring
        self._grad_scale = grad_scale
        self._norms: dict[str, _WindowNorm] = {}
        self._handles: list[Any] = []

    def track(self, path: str, module: nn.Module) -> None:
        """Record the weight-gradient norms of the module at ``path`` from now on (once per path)."""
        weight = getattr(module, "weight", None)
        if path in self._norms or not isinstance(weight, Tensor) or not weight.requires_grad or _is_sharded(weight):
            return
        entry = _WindowNorm(torch.zeros(1, dtype=torch.float64, device=weight.device))
        self._norms[path] = entry
        self._handles.append(weight.register_hook(self._make_hook(entry)))  # type: ignore[no-untyped-call]

    def _make_hook(self, entry: _WindowNorm) -> Callable[[Tensor], None]:
        measuring, grad_scale = self._measuring, self._grad_scale

        def weight_grad_hook(grad: Tensor) -> None:
            if entry.passes == 0 and measuring():
                entry.total.copy_(unscaled_l2_norm(grad.detach(), grad_scale))
                entry.passes = 1
            return None  # a value would replace the gradient

        return weight_grad_hook

    def norm(self, path: str) -> Optional[float]:
        """The weight-gradient norm of ``path`` in the open window's first measured backward pass (a host read), or
        None when none was recorded."""
        return self.norms([path])[0]

    def norms(self, paths: Sequence[str]) -> list[Optional[float]]:
        """`norm` of each of ``paths``, read to the host in one transfer per device."""
        entries = [self._norms.get(path) for path in paths]
        recorded = [entry.total for entry in entries if entry is not None and entry.passes > 0]
        values = iter(host_cat(recorded).tolist())
        return [next(values) if entry is not None and entry.passes > 0 else None for entry in entries]

    def reset(self) -> None:
        """Start a new window."""
        for entry in self._norms.values():
            entry.passes = 0

    def remove(self) -> None:
        """Remove every hook. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class Diagnosis:
    """What diagnosis remembers from one closed window to the next, by call-site name.

    Args:
        permanent_after: closed windows in a row after which a dead unit counts as permanently dead.
    """

    def __init__(self, permanent_after: int) -> None:
        self.permanent_after = permanent_after
        self._histories: dict[str, SiteHistory] = {}
        self._last_dead_fraction: dict[str, float] = {}
        self._pending: dict[str, Any] = {}  # from load_state_dict, for sites not discovered yet

    def history(self, name: str, units: int) -> SiteHistory:
        """The death history of call site ``name`` (made on first use, from loaded state if there is some)."""
        history = self._histories.get(name)
        if history is None:
            history = self._histories[name] = SiteHistory(units)
            if name in self._pending:
                history.load_state_dict(self._pending.pop(name))
        return history

    def update_many(
        self, sites: Sequence[tuple[str, int, Optional[Tensor]]], step: int, close: bool
    ) -> list[WindowHistory]:
        """Fold a window's dead mask into each site's history if ``close``, else peek: ``(name, units, dead_mask)``
        per site, the mask None when the site saw no sample. All sites at once (see `fold_histories`)."""
        histories = [self.history(name, units) for name, units, _ in sites]
        masks = [mask if close else None for _, _, mask in sites]
        return fold_histories(histories, masks, step, self.permanent_after)

    def recycled(self, name: str, units: int, indices: list[int]) -> None:
        """Record that ``indices`` of site ``name`` were recycled: they start a fresh death history."""
        self.history(name, units).recycle(indices)

    def jumped(self, name: str, dead_fraction: float) -> bool:
        """Whether ``dead_fraction`` rose by at least `BLAME_JUMP` since the last closed window of ``name``."""
        return dead_fraction - self._last_dead_fraction.get(name, 0.0) >= BLAME_JUMP

    def remember(self, name: str, dead_fraction: float) -> None:
        """Record a closed window's dead fraction of ``name``, for the next `jumped`."""
        self._last_dead_fraction[name] = dead_fraction

    def state_dict(self) -> dict[str, Any]:
        """Every site's history and last dead fraction as plain data, including loaded ones whose sites have not run
        yet."""
        state = dict(self._pending)
        for name, history in self._histories.items():
            state[name] = history.state_dict()
            if name in self._last_dead_fraction:
                state[name]["last_dead_fraction"] = self._last_dead_fraction[name]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict` output; sites not discovered yet get theirs when they first report."""
        self._pending = dict(state)
        self._last_dead_fraction = {
            name: float(site["last_dead_fraction"]) for name, site in state.items() if "last_dead_fraction" in site
        }
        for name in list(self._pending):
            if name in self._histories:
                self._histories[name].load_state_dict(self._pending.pop(name))
