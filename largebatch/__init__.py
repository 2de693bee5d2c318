"""largebatch: layer-wise adaptive rate scaling and the large-batch recipe, for PyTorch and
Keras 3 on Horovod.

The core (this package) is pure Python + NumPy: trust ratios (:mod:`largebatch.trust`),
schedules and scaling rules (:mod:`largebatch.schedules`), parameter policies
(:mod:`largebatch.policy`) and the NumPy reference optimizer (:mod:`largebatch.reference`).
Framework adapters live in ``largebatch.torch`` and ``largebatch.keras`` and are imported only
when asked for.
"""
__version__ = "0.1.0"

from . import schedules, trust  # noqa: F401  (pure NumPy, cheap)
from .policy import ParamPolicy  # noqa: F401
from .reference import ReferenceOptimizer  # noqa: F401
from .schedules import build_schedule, global_batch_size, momentum_correction, scaled_lr  # noqa: F401
