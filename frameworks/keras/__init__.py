"""largebatch for Keras 3 (TensorFlow backend) on Horovod.

    import horovod.tensorflow as hvd
    import largebatch.keras as lbk
    hvd.init()
    opt = lbk.DistributedOptimizer(lbk.LARS(learning_rate=2.0, weight_decay=5e-4))
    model.compile(optimizer=opt, loss=..., jit_compile=False)
    model.fit(x_shard, y_shard, callbacks=[lbk.callbacks.BroadcastGlobalVariables(0),
                                           lbk.callbacks.MetricAverage()])

``horovod.tensorflow.keras.DistributedOptimizer`` silently does not average gradients under
Keras 3; this package refuses it (:class:`HorovodKerasError`) wherever it can see it. Horovod's
Keras callbacks (which crash or do nothing under Keras 3) are refused when ``model.fit`` starts
with a largebatch optimizer, naming the replacement.
Importing this package with TF_USE_LEGACY_KERAS=1 (tf-keras) raises ImportError.
"""
from ._checks import check_keras as _check_keras

_check_keras()

from ._checks import HorovodKerasError, check_callbacks, check_optimizer, guard_horovod_callbacks, innermost  # noqa: E402
from .distributed import DistributedOptimizer, is_distributed, loss_scale_skips  # noqa: E402
from .optimizers import CLARS, LAMB, LARS  # noqa: E402
from .factory import create_optimizer  # noqa: E402
from .per_example import enable_clars, per_example_norm_sums  # noqa: E402
from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from .elastic import elastic_state  # noqa: E402
from . import callbacks, checkpoint, models, per_example  # noqa: E402,F401

guard_horovod_callbacks()            # Horovod's Keras callbacks already imported (see _checks)

__all__ = ["LARS", "LAMB", "CLARS", "create_optimizer", "enable_clars", "per_example_norm_sums", "per_example", "DistributedOptimizer", "is_distributed", "loss_scale_skips", "check_optimizer", "innermost",
           "check_callbacks", "HorovodKerasError", "callbacks", "models", "checkpoint", "save_checkpoint",
           "load_checkpoint", "elastic_state"]
