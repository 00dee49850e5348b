"""Report-time reductions over many sites at once: per-unit tensors laid end to end, cut into segments.

At a thousand call sites, a handful of small kernels per site costs more than everything else in a report (each is
5-10 µs on a CPU). The report therefore concatenates the sites' per-unit tensors (dead masks, biases, remembered
figures) and reduces them per segment with a few kernels in all, however many sites there are. A segment is one
site's units; ``lengths`` gives the segments in order, zero-length ones included.

`host_cat` brings many device tensors to the host in one transfer per device; everything else takes and returns
host tensors. Sums accumulate each segment's values in order (``index_add_``), so they do not depend on the values
of other segments (a cumulative sum would).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["host_cat", "segment_counts", "segment_ids", "segment_sums", "segment_extremes"]


def segment_ids(lengths: Sequence[int]) -> Tensor:
    """The segment of each position: ``[0] * lengths[0] + [1] * lengths[1] + ...`` as an int64 tensor."""
    return torch.repeat_interleave(
        torch.arange(len(lengths), dtype=torch.int64), torch.tensor(list(lengths), dtype=torch.int64)
    )


def segment_counts(flags: Tensor, lengths: Sequence[int]) -> list[list[int]]:
    """How many entries are True in each segment of each row of ``flags`` (a ``(rows, sum(lengths))`` bool tensor cut
    along its last dim into consecutive segments of ``lengths``): one list of counts per row. A cumulative sum and one
    gather at the segment bounds, however many segments (counts are integers, so the running sum is exact)."""
    bounds = torch.tensor(list(itertools.accumulate(lengths, initial=0)), dtype=torch.int64)
    running = torch.cat([torch.zeros(flags.shape[0], 1, dtype=torch.int64), flags.cumsum(dim=1)], dim=1)
    counts: list[list[int]] = running.index_select(1, bounds).diff(dim=1).tolist()
    return counts


def segment_sums(values: Tensor, ids: Tensor, segments: int) -> Tensor:
    """The sum of ``values`` per segment (``ids`` from `segment_ids`, or a selection of it); 0 for an empty one."""
    return torch.zeros(segments, dtype=values.dtype).index_add_(0, ids, values)


def segment_extremes(values: Tensor, ids: Tensor, segments: int, *, largest: bool, empty: int) -> Tensor:
    """The largest (or smallest) of integer ``values`` per segment, and ``empty`` for a segment with none."""
    out = torch.full((segments,), empty, dtype=values.dtype)
    if values.numel():
        out.scatter_reduce_(0, ids, values, "amax" if largest else "amin", include_self=False)
    return out


def host_cat(tensors: Sequence[Tensor]) -> Tensor:
    """``tensors``, each flattened, end to end in their order, in float64 on the host: one ``cat`` and one transfer
    per device however many tensors there are (integers up to 2**53 are exact). Always a new tensor, never a view of
    a live parameter."""
    with torch.no_grad():
        flats = [t if t.ndim == 1 else t.reshape(-1) for t in tensors]
        devices = list(dict.fromkeys(t.device for t in flats))
        if len(devices) <= 1:
            return _cat64(flats).cpu()
        parts: list[Tensor] = [flats[0]] * len(flats)
        for device in devices:  # a model split over devices: one transfer from each
            indices = [i for i, t in enumerate(flats) if t.device == device]
            host = _cat64([flats[i] for i in indices]).cpu()
            for i, part in zip(indices, torch.split(host, [flats[i].numel() for i in indices])):
                parts[i] = part
        return torch.cat(parts)


def _cat64(tensors: Sequence[Tensor]) -> Tensor:
    """``cat`` into float64 on the tensors' device: the conversion happens in the copy (no kernel per tensor)."""
    device = tensors[0].device if tensors else torch.device("cpu")
    out = torch.empty(sum(t.numel() for t in tensors), dtype=torch.float64, device=device)
    return torch.cat(list(tensors), out=out) if tensors else out
