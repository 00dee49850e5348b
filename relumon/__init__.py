"""relumon: dead-unit and gradient-flow diagnostics for the ReLU-family activations of any PyTorch model.

>>> import relumon
>>> with relumon.watch(model) as monitor:      # doctest: +SKIP
...     train(model)
>>> print(monitor.report())                    # doctest: +SKIP

The Lightning callback lives in `relumon.lightning`; importing ``relumon`` alone needs only torch.
"""

from relumon.errors import DeadUnitsWarning, RelumonError, RelumonWarning
from relumon.monitor import Monitor, watch
from relumon.options import DEFAULT_TYPES, Options
from relumon.report import LayerReport, Report

__version__ = "0.1.0"

__all__ = [
    "watch",
    "Monitor",
    "Options",
    "Report",
    "LayerReport",
    "RelumonError",
    "RelumonWarning",
    "DeadUnitsWarning",
    "DEFAULT_TYPES",
    "__version__",
]
