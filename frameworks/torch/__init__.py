"""largebatch.torch: LARS, LAMB and CLARS for PyTorch, and their Horovod integration.

    from largebatch.torch import LARS
    optimizer = LARS(model.parameters(), lr=2.0, momentum=0.9, weight_decay=5e-4)

The formulas are the framework-agnostic core's (:mod:`largebatch.trust`); this package turns
tensors into norms and calls it. :mod:`largebatch.torch.functional` has the optimizers' steps as
functions on lists of tensors (``functional.lars``, ``functional.lamb``), as ``torch.optim``
has its own.
"""
from . import functional  # noqa: F401
from .optim import CLARS, LAMB, LARS  # noqa: F401
from .groups import create_optimizer, param_groups  # noqa: F401
from .per_example import per_example_norm_sums  # noqa: F401
from .distributed import (amp_step, broadcast_state, distributed_optimizer, elastic_state,  # noqa: F401
                          init_optimizer_state)

__all__ = ["LARS", "LAMB", "CLARS", "functional", "param_groups", "create_optimizer", "per_example_norm_sums", "distributed_optimizer",
           "broadcast_state", "init_optimizer_state", "elastic_state", "amp_step"]
from .checkpoint import load_checkpoint, save_checkpoint  # noqa: F401,E402
from .guard import NonFiniteGuard  # noqa: F401,E402
from .consistency import RankConsistencyCheck, RankDivergenceError  # noqa: F401,E402
from .torch_distributed import TorchDistributed, compression_hook  # noqa: F401,E402
from .noise import GradientNormTap, squared_norm  # noqa: F401,E402

__all__ += ["GradientNormTap", "squared_norm", "save_checkpoint", "load_checkpoint", "NonFiniteGuard", "RankConsistencyCheck", "RankDivergenceError",
            "TorchDistributed", "compression_hook"]
