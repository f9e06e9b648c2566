"""How many blocks to freeze? The transfer-depth sweep, offline.

Gerace et al. (2023): the best number of frozen (transferred) layers
depends on how much target data there is; with few target examples it pays
to keep more of the source network frozen, with more data less.

Source: a 5-block CNN pretrained on ``kerastl.datasets.syn_digits`` (digits
rendered from fonts). Target: scikit-learn's handwritten digits, with
2, 10 and 50 labelled examples per class. For every number of frozen leading
blocks (0 = full fine-tuning, 5 = feature extraction), ``transfer_depth_sweep``
fine-tunes a new head (and the unfrozen blocks) for the same number of steps
and scores the held-out digits test split. Prints the table, the best depth
per target size and whether it moves the way the paper says; draws the
curves with ``--plot``.

The sweep trains through ``kerastl.fine_tune``, so each run computes its
frozen blocks once (the boundary cache). Two timings against
``boundary_cache=False`` (every epoch through the whole model, as the
sweep trained before it used the driver), in seconds, with the largest
accuracy difference between the two sweeps (the same batches; float
summation order differs between the one-time pass and the training steps,
so long runs can end a few test images apart):

* the largest target size of the table above (the small CNN at 32x32:
  little compute before the boundary, so little to save);
* MobileNetV2 at 96x96 (random weights: the time does not depend on them)
  on 300 digits, frozen up to stage3 and up to stage4, 10 epochs each.

    python benchmarks/transfer_depth.py [--sizes 2 10 50] [--seeds 2]
        [--steps 300] [--plot depth.png]
"""

import argparse
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import kerastl  # noqa: E402
from kerastl import datasets  # noqa: E402

from kerastl.pretrained import pretrain, small_cnn  # noqa: E402


def cnn(filters=(16, 32, 32, 64, 64)):
    """A 5-block CNN (one block per resolution, 32x32 down to 1x1)."""
    return small_cnn(widths=filters, name="cnn5")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 10, 50])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    start = time.time()
    keras.utils.set_random_seed(0)
    backbone = cnn()
    source = pretrain(backbone, samples=6000, epochs=10)
    train = datasets.digits("train")
    test = datasets.digits("test")
    print(f"source: syn_digits x6000; source-only accuracy on the digits "
          f"test set {source.evaluate(*test, verbose=0)[1]:.3f}; blocks "
          f"{kerastl.block_map(backbone).names}\n")
    sweep = kerastl.analysis.DepthSweep()
    seconds = {}

    def run(size, cache):
        epochs = max(1, math.ceil(args.steps / math.ceil(10 * size /
                                                         args.batch)))
        t = time.perf_counter()
        rows = kerastl.analysis.transfer_depth_sweep(
            backbone, train, test, train_sizes=[size],
            seeds=range(args.seeds), epochs=epochs, batch_size=args.batch,
            boundary_cache=cache)
        return rows, time.perf_counter() - t

    for size in args.sizes:
        rows, seconds[size] = run(size, "auto")
        sweep.extend(rows)
        print(f"  {size}/class done in {seconds[size]:.0f} s "
              f"({time.time() - start:.0f} s)", flush=True)
    largest = max(args.sizes)
    plain, plain_s = run(largest, False)
    cached = [r for r in sweep if r["train_size"] == largest]
    difference = max(abs(a["accuracy"] - b["accuracy"])
                     for a, b in zip(cached, plain))
    speed = {"size": largest, "cached_s": seconds[largest],
             "end_to_end_s": plain_s,
             "speedup": plain_s / seconds[largest],
             "max_accuracy_difference": difference}
    print(f"\nthe {largest}/class sweep ({len(cached)} runs): "
          f"{seconds[largest]:.1f} s with the boundary cache, "
          f"{plain_s:.1f} s end to end (x{speed['speedup']:.2f}); largest "
          f"accuracy difference {difference:.4f}")
    mobilenet = mobilenet_speed(args.batch * 2)
    print(f"MobileNetV2 96x96 sweep (depths {mobilenet['depths']}): "
          f"{mobilenet['cached_s']:.1f} s with the boundary cache, "
          f"{mobilenet['end_to_end_s']:.1f} s end to end "
          f"(x{mobilenet['speedup']:.2f}); largest accuracy difference "
          f"{mobilenet['max_accuracy_difference']:.4f}")
    print("\ntarget test accuracy, mean over seeds, by frozen leading "
          "blocks:\n")
    print(sweep)
    best = sweep.best()
    depths = [best[s] for s in args.sizes]
    trend = all(a >= b for a, b in zip(depths, depths[1:]))
    print("\nbest depth per target size: "
          + ", ".join(f"{s}/class -> {best[s]}" for s in args.sizes))
    print("the best depth does not grow as target data grows "
          f"(the paper's qualitative finding): {'yes' if trend else 'NO'}")
    if args.plot:
        sweep.plot(args.plot, title="syn_digits -> digits")
        print(f"plot: {args.plot}")
    print(f"\n{time.time() - start:.0f} s in all")
    return {"sweep": sweep, "speed": speed, "mobilenet": mobilenet}


def mobilenet_speed(batch, images=300, epochs=10):
    """The sweep's time with and without the boundary cache on MobileNetV2
    at 96x96, frozen up to stage3 and stage4."""
    backbone = kerastl.load_backbone("mobilenet_v2", weights=None,
                                     input_shape=(96, 96, 3))
    x, y = datasets.digits("train", size=96)
    xt, yt = datasets.digits("test", size=96)
    names = kerastl.block_map(backbone).names
    depths = [names.index("stage3") + 1, names.index("stage4") + 1]
    out = {"depths": depths}
    for cache in ("auto", False):
        t = time.perf_counter()
        rows = kerastl.analysis.transfer_depth_sweep(
            backbone, (x[:images], y[:images]), (xt[:100], yt[:100]),
            depths=depths, epochs=epochs, batch_size=batch,
            boundary_cache=cache)
        out["cached_s" if cache else "end_to_end_s"] = time.perf_counter() - t
        out["rows_cached" if cache else "rows_plain"] = rows
    out["speedup"] = out["end_to_end_s"] / out["cached_s"]
    out["max_accuracy_difference"] = max(
        abs(a["accuracy"] - b["accuracy"])
        for a, b in zip(out["rows_cached"], out["rows_plain"]))
    return out


if __name__ == "__main__":
    main()
