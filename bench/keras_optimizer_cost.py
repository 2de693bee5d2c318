"""Cost of one Keras optimizer step on ResNet-50's parameter shapes (CPU, 1 thread by default).

Times ``optimizer.apply(grads, variables)`` inside one ``tf.function`` for
    keras.optimizers.SGD(momentum=0.9)             the baseline
    largebatch.keras.LARS (fused: XLA elementwise kernel per variable, the default)
    largebatch.keras.LARS(fused=False)             the same core formulas as plain TF ops
    largebatch.keras.LAMB                           (for reference)
on the 161 tensors / 25.6M parameters of torchvision's ResNet-50 (conv weights without bias,
BatchNorm scale/shift, fc), in Keras layout. Variants run interleaved, best and median of
``--repeats`` steps are reported, and the ratio LARS/SGD of the medians.

    python bench/keras_optimizer_cost.py [--threads 1] [--repeats 15] [--quick] [--out bench/results]

Writes keras_optimizer_cost.csv / .json (machine, versions, settings, one row per variant) to --out.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def resnet50_shapes():
    """torchvision ResNet-50's trainable tensors in Keras layout (HWIO kernels): 161 tensors."""
    shapes = [(7, 7, 3, 64), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(1, 1, inplanes, planes), (planes,), (planes,),
                       (3, 3, planes, planes), (planes,), (planes,),
                       (1, 1, planes, 4 * planes), (4 * planes,), (4 * planes,)]
            if b == 0:
                shapes += [(1, 1, inplanes, 4 * planes), (4 * planes,), (4 * planes,)]
            inplanes = 4 * planes
    return shapes + [(2048, 1000), (1000,)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="5 repeats")
    parser.add_argument("--out", default=None, help="directory for keras_optimizer_cost.csv/.json "
                        "(default bench/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 5)

    import numpy as np
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import keras
    import largebatch.keras as lbk

    shapes = resnet50_shapes()
    n_params = sum(int(np.prod(s)) for s in shapes)
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s).astype("float32") * 0.05 for s in shapes]
    grads = [tf.constant(rng.standard_normal(s).astype("float32") * 0.01) for s in shapes]

    def variant(optimizer):
        variables = [keras.Variable(w, name=f"v{i}") for i, w in enumerate(init)]
        optimizer.build(variables)

        @tf.function
        def step():
            optimizer.apply(grads, variables)
        return step

    variants = {
        "keras SGD(momentum=0.9)": variant(keras.optimizers.SGD(0.1, momentum=0.9)),
        "LARS (fused, default)": variant(lbk.LARS(learning_rate=0.1, weight_decay=5e-5)),
        "LARS fused=False": variant(lbk.LARS(learning_rate=0.1, weight_decay=5e-5, fused=False)),
        "LAMB (fused, default)": variant(lbk.LAMB(learning_rate=1e-3, weight_decay=1e-2)),
    }
    first = {}
    for name, step in variants.items():          # trace (and XLA-compile) once, warm up once
        t0 = time.perf_counter()
        step()
        first[name] = time.perf_counter() - t0
        step()
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, step in variants.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import DEFAULT_OUT, bar_chart, machine_info, write_outputs

    print(f"optimizer apply step, ResNet-50 shapes: {len(shapes)} tensors, {n_params / 1e6:.1f}M params, "
          f"{args.threads} thread(s), TF {tf.__version__}, Keras {keras.__version__}")
    base = float(np.median(times["keras SGD(momentum=0.9)"]))
    rows = []
    for name, ts in times.items():
        median, best = float(np.median(ts)), float(np.min(ts))
        rows.append({"optimizer": name, "median_ms": round(median * 1e3, 3), "best_ms": round(best * 1e3, 3),
                     "ratio_to_sgd": round(median / base, 4), "first_call_s": round(first[name], 3)})
        print(f"  {name:26s} median {median * 1e3:7.1f} ms  best {best * 1e3:7.1f} ms  "
              f"x{median / base:4.2f} SGD  (first call {first[name]:.1f} s)")
    lars_ratio = rows[1]["ratio_to_sgd"]
    print(f"LARS / SGD = {lars_ratio:.2f} (target <= 1.0)")
    meta = machine_info(benchmark="keras_optimizer_cost", tensors=len(shapes), params=n_params,
                        threads=args.threads, repeats=args.repeats)
    out = args.out or DEFAULT_OUT
    csv_path, _ = write_outputs(out, "keras_optimizer_cost", rows, meta)
    png = os.path.join(out, "keras_optimizer_cost.png")
    bar_chart(png, [r["optimizer"] for r in rows], [r["median_ms"] for r in rows],
              f"optimizer.apply, ms (ResNet-50 shapes, {args.threads} thread)", ref=base * 1e3,
              ref_label=f"Keras SGD {base * 1e3:.1f} ms")
    print(f"wrote {csv_path}, .json and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
