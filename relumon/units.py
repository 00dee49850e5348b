"""What a *unit* is for an activation tensor: which dimension indexes the units.

A unit is
- a feature of a Linear output (the last dim of a 2-D activation);
- a channel of a conv feature map (dim 1 of a 3/4/5-D activation fed by a conv or a norm over channels);
- the feature dim of a ``(batch, seq, features)`` activation (the last dim).

The autograd graph decides first (`relumon.wiring.read_wiring`: the dim of the layer that made the features, carried
through adds, cats, slices, permutes, views and norms). Without a graph (no gradient tracked), the module that
produced the activation's input decides between "channel" and "last dim" (`infer_unit_dim`). When neither tells, a
4-D or 5-D activation is taken as a feature map (dim 1) and a 2-D or 3-D one as features last (the last dim), with a
warning (for 2-D, when an op the walk does not know cut it).
``relumon.watch(..., unit_dim=...)`` overrides all of this.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

__all__ = [
    "infer_unit_dim",
    "ADAPTIVE_POOLS",
    "CHANNEL_FIRST_PRODUCERS",
    "FEATURE_LAST_PRODUCERS",
]

#: Adaptive pooling: keeps the channels (dim 1) of its input, whatever its output size.
ADAPTIVE_POOLS: tuple[type[nn.Module], ...] = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)

#: Producers whose outputs carry their features in dim 1 (``N, C, ...``).
CHANNEL_FIRST_PRODUCERS: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.SyncBatchNorm,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    *ADAPTIVE_POOLS,
)

#: Producers whose outputs carry their features in the last dim (``..., F``).
FEATURE_LAST_PRODUCERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.LayerNorm,
    nn.Embedding,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),  # nn.RMSNorm is new in torch 2.4
)


def infer_unit_dim(ndim: int, producer: Optional[nn.Module] = None) -> int:
    """Return the dimension that indexes units in an activation of ``ndim`` dimensions.

    Args:
        ndim: number of dimensions of the activation tensor.
        producer: the module whose output fed the activation, when known.

    Returns:
        A non-negative dimension index. 0-D and 1-D activations return 0: a 1-D activation is one sample whose
        elements are the units; a 0-D activation is one unit.

    Example:
        >>> infer_unit_dim(4, nn.Conv2d(3, 8, 3))
        1
        >>> infer_unit_dim(3, nn.Linear(8, 8))
        2
    """
    if ndim <= 1:
        return 0
    if isinstance(producer, nn.modules.conv._ConvNd) and ndim == len(producer.kernel_size) + 1:
        return 0  # an unbatched conv output, (C, H, W) for a Conv2d: its channels are dim 0, and it is one sample
    if ndim == 2:
        return 1
    if isinstance(producer, CHANNEL_FIRST_PRODUCERS):
        # BatchNorm1d on (N, C) is handled above; on (N, C, L) its channels are dim 1.
        return 1
    if isinstance(producer, FEATURE_LAST_PRODUCERS):
        return ndim - 1
    return 1 if ndim >= 4 else ndim - 1
