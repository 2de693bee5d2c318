"""Large-batch Keras training on Horovod with largebatch: LARS, the Goyal et al. recipe, model.fit.

    horovodrun -np 2 -H localhost:2 python -m largebatch.keras.example_fit            # synthetic data
    horovodrun -np 2 -H localhost:2 python -m largebatch.keras.example_fit --data DIR  # image folder
                                                                     (DIR/<class>/<image files>)

Every rank runs this script on its own shard of the data. The recipe:
- global batch = per-rank batch × ranks × accumulation steps; lr = base_lr × global/base batch
  (linear scaling), gradual warmup then polynomial (power 2) decay, set every step with
  momentum correction (LearningRateSchedule callback);
- LARS (or LAMB) wrapped in largebatch.keras.DistributedOptimizer, which averages gradients
  inside model.fit's train step (horovod.tensorflow.keras.DistributedOptimizer does not, under Keras 3);
- rank 0's initial weights broadcast, epoch metrics averaged, ranks' weights checked for
  equality every N steps, trust ratios logged (rank 0) to TensorBoard and CSV.
"""
import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="largebatch Keras example (run it under horovodrun)")
    p.add_argument("--data", default=None, help="image folder (one sub-folder per class); default: synthetic")
    p.add_argument("--model", choices=("cnn", "resnet"), default="cnn")
    p.add_argument("--optimizer", choices=("lars", "lamb"), default="lars")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10, help="synthetic data only")
    p.add_argument("--examples-per-rank", type=int, default=512, help="synthetic data only")
    p.add_argument("--batch-size", type=int, default=32, help="per rank, per step")
    p.add_argument("--accumulation-steps", type=int, default=1)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--base-lr", type=float, default=0.5, help="lr tuned for --base-batch")
    p.add_argument("--base-batch", type=int, default=32)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--trust-coefficient", type=float, default=0.02)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--fp16-allreduce", action="store_true")
    p.add_argument("--log-dir", default=None, help="TensorBoard + trust_ratios.csv (rank 0)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
                   help="TF intra/inter-op threads per rank (0: TF's default)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    import tensorflow as tf
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import horovod.tensorflow as hvd
    import keras

    import largebatch.keras as lbk
    from largebatch import schedules

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    say = print if rank == 0 else (lambda *a, **k: None)

    shape = (args.image_size, args.image_size, 3)
    if args.data:
        ds = keras.utils.image_dataset_from_directory(
            args.data, image_size=shape[:2], batch_size=None, shuffle=True, seed=1234, verbose=rank == 0)
        classes = len(ds.class_names)
        ds = ds.shard(size, rank).map(lambda x, y: (x / 255.0, y))
        ds = ds.shuffle(1024, seed=rank).batch(args.batch_size, drop_remainder=True)
        batches = int(ds.cardinality().numpy())
        if batches <= 0:
            raise SystemExit(f"--data: fewer than {args.batch_size} images per rank in {args.data}")
        fit_data = dict(x=ds.prefetch(2))
    else:
        classes = args.classes
        rng = np.random.default_rng(rank)              # every rank its own data
        x = rng.standard_normal((args.examples_per_rank,) + shape).astype("float32")
        y = rng.integers(0, classes, args.examples_per_rank)
        x += 0.5 * y[:, None, None, None]               # learnable
        batches = args.examples_per_rank // args.batch_size
        fit_data = dict(x=x[:batches * args.batch_size], y=y[:batches * args.batch_size],
                        batch_size=args.batch_size, shuffle=True)

    global_batch = schedules.global_batch_size(args.batch_size, size, args.accumulation_steps)
    steps_per_epoch = max(1, batches // args.accumulation_steps)
    peak_lr = schedules.scaled_lr(args.base_lr, global_batch, args.base_batch, rule="linear")
    warmup = args.warmup_epochs if args.warmup_epochs < args.epochs else 0.0
    schedule = schedules.build_schedule(peak_lr=peak_lr, steps_per_epoch=steps_per_epoch, epochs=args.epochs,
                                        warmup="gradual" if warmup else "none", warmup_epochs=warmup,
                                        warmup_start_lr=args.base_lr, decay="poly", power=2.0)
    say(f"{size} ranks, global batch {global_batch} ({args.batch_size} per rank x {size} ranks x "
        f"{args.accumulation_steps} accumulation steps), peak lr {peak_lr:g}, {steps_per_epoch} updates/epoch")

    if args.model == "cnn":
        model = lbk.models.small_cnn(shape, classes, width=args.width, batch_norm=True)
    else:
        model = lbk.models.small_resnet(shape, classes, width=args.width)
    if args.optimizer == "lars":
        base = lbk.LARS(learning_rate=schedule(0), momentum=0.9, weight_decay=args.weight_decay,
                        trust_coefficient=args.trust_coefficient)
    else:
        base = lbk.LAMB(learning_rate=schedule(0), weight_decay=args.weight_decay)
    optimizer = lbk.DistributedOptimizer(base, compression="fp16" if args.fp16_allreduce else None,
                                         accumulation_steps=args.accumulation_steps)
    model.compile(optimizer=optimizer, jit_compile=False, metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    check = lbk.callbacks.RankConsistencyCheck(every_n_steps=50)
    callbacks = [lbk.callbacks.MetricAverage(),             # first: later callbacks see averaged logs
                 lbk.callbacks.BroadcastGlobalVariables(0),
                 lbk.callbacks.LearningRateSchedule(schedule),
                 check]
    if args.log_dir:
        callbacks.append(lbk.callbacks.TrustRatioLogger(log_dir=args.log_dir, every_n_steps=max(1, steps_per_epoch // 2),
                                                        csv_path=os.path.join(args.log_dir, "trust_ratios.csv")))
    lbk.check_callbacks(callbacks)
    history = model.fit(epochs=args.epochs, verbose=2 if rank == 0 else 0, callbacks=callbacks, **fit_data)
    final = {k: round(float(v[-1]), 4) for k, v in history.history.items()}
    say(f"final (averaged over ranks): {final}; ranks consistent after {check.checks} checks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
