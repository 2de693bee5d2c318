"""Horovod's Keras synthetic benchmark (examples/tensorflow2/tensorflow2_keras_synthetic_benchmark.py
in the Horovod repository), migrated to Keras 3 with largebatch.keras.

The shape is Horovod's: the same flags, a keras.applications model with random weights, one
synthetic batch repeated, Horovod's two callbacks and a timing callback, then ``model.fit``.
Every line that changes for Keras 3 is marked ``# Keras 3:``; see docs/keras.md, "Migrating a
Horovod Keras script". Run it with

    horovodrun -np 2 -H localhost:2 python examples/keras3_horovod_synthetic_benchmark.py --no-cuda

(``--image-size 32 --batch-size 4 --num-iters 2 --num-batches-per-iter 2`` for a quick check on a
CPU; ``--optimizer lars`` trains with largebatch's LARS instead of SGD.)
"""
import argparse
import os
from timeit import default_timer as timer

import numpy as np
import tensorflow as tf
import keras                                        # Keras 3: the package itself (tf.keras is Keras 3 too)
import horovod.tensorflow as hvd                    # Keras 3: was horovod.tensorflow.keras
import largebatch.keras as lbk                      # Keras 3: averaging optimizer and callbacks

parser = argparse.ArgumentParser(description="Keras 3 synthetic benchmark on Horovod (largebatch)",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--fp16-allreduce", action="store_true", help="fp16 compression of the allreduce")
parser.add_argument("--model", default="ResNet50", help="a keras.applications model")
parser.add_argument("--batch-size", type=int, default=32, help="images per rank per batch")
parser.add_argument("--num-batches-per-iter", type=int, default=10, help="batches per benchmark iteration")
parser.add_argument("--num-iters", type=int, default=10, help="benchmark iterations")
parser.add_argument("--no-cuda", action="store_true", help="train on the CPU")
parser.add_argument("--image-size", type=int, default=224, help="square input size")     # added
parser.add_argument("--optimizer", choices=["sgd", "lars"], default="sgd")                # added
args = parser.parse_args()
device = "CPU" if args.no_cuda else "GPU"

hvd.init()
if hvd.rank() == 0:
    print(f"Model: {args.model}")
    print(f"Batch size: {args.batch_size}")
    print(f"Number of {device}s: {hvd.size()}")

if args.no_cuda:
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
else:                                               # one GPU per process
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        tf.config.set_visible_devices(gpus[hvd.local_rank()], "GPU")

model = getattr(keras.applications, args.model)(weights=None,
                                                input_shape=(args.image_size, args.image_size, 3))
if args.optimizer == "lars":                        # largebatch: LARS, biases and BN excluded by default
    opt = lbk.LARS(learning_rate=0.1, momentum=0.9, weight_decay=5e-5, trust_coefficient=0.001)
else:
    opt = keras.optimizers.SGD(0.01)

images = tf.random.uniform([args.batch_size, args.image_size, args.image_size, 3])
labels = tf.random.uniform([args.batch_size, 1], minval=0, maxval=999, dtype=tf.int64)
dataset = tf.data.Dataset.from_tensor_slices((images, labels)).cache().repeat().batch(args.batch_size)

compression = "fp16" if args.fp16_allreduce else None                 # Keras 3: was hvd.Compression.fp16
opt = lbk.DistributedOptimizer(opt, compression=compression)          # Keras 3: was hvd.DistributedOptimizer

model.compile(loss=keras.losses.SparseCategoricalCrossentropy(),
              optimizer=opt,
              jit_compile=False)                    # Keras 3: experimental_run_tf_function is gone

callbacks = [
    lbk.callbacks.MetricAverage(),                  # Keras 3: was hvd.callbacks.MetricAverageCallback()
    lbk.callbacks.BroadcastGlobalVariables(0),      # Keras 3: was hvd.callbacks.BroadcastGlobalVariablesCallback(0)
    lbk.callbacks.RankConsistencyCheck(every_n_steps=args.num_batches_per_iter),   # added: ranks really agree
]


class TimingCallback(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.img_secs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = timer()

    def on_epoch_end(self, epoch, logs=None):
        img_sec = args.batch_size * args.num_batches_per_iter / (timer() - self.start)
        print(f"Iter #{epoch}: {img_sec:.1f} img/sec per {device}")
        if epoch > 0:                               # the first iteration builds and warms up
            self.img_secs.append(img_sec)

    def on_train_end(self, logs=None):
        mean, conf = np.mean(self.img_secs), 1.96 * np.std(self.img_secs)
        print(f"Img/sec per {device}: {mean:.1f} +-{conf:.1f}")
        print(f"Total img/sec on {hvd.size()} {device}(s): {hvd.size() * mean:.1f} +-{hvd.size() * conf:.1f}")


if hvd.rank() == 0:
    callbacks.append(TimingCallback())

model.fit(dataset,
          batch_size=args.batch_size,               # ignored with a tf.data dataset, as before
          steps_per_epoch=args.num_batches_per_iter,
          epochs=args.num_iters,
          callbacks=callbacks,
          verbose=0)
