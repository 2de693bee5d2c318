"""Rank script: horovod.tensorflow allreduce inside tf.function, and broadcast_variables."""
import tensorflow as tf
import horovod.tensorflow as hvd

from multirank import report

hvd.init()
rank = hvd.rank()


@tf.function
def average(x):
    return hvd.allreduce(x, op=hvd.Average)


local = tf.range(6, dtype=tf.float32) * float(rank + 1)
var = tf.Variable(tf.fill([3], float(rank + 7)))
hvd.broadcast_variables([var], root_rank=0)
report(rank, averaged=average(local).numpy(), var=var.numpy(), size=hvd.size())
