"""Train-step time: LayerwiseOptimizer vs the plain optimizer it wraps.

MobileNetV2 at 96x96 (random weights), batch 32, every block trainable, Adam.
Two identical models are trained alternately in one process, one with
``Adam`` and one with ``LayerwiseOptimizer(Adam, LayerDecay(0.7))``. After
a warm-up that compiles both, single training steps are timed in pairs, the
order inside each pair alternating, so that drift of a busy machine hits both
alike. Prints the median step time of each and their ratio (and the spread of
the per-pair ratios). Target: <= 1.03.

    python benchmarks/layerwise_overhead.py [--pairs 60]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerastl  # noqa: E402


def make_model(layerwise, size, classes=10):
    keras.utils.set_random_seed(0)
    backbone = kerastl.load_backbone("mobilenet_v2", weights=None,
                                     input_shape=(size, size, 3))
    model = kerastl.build_classifier(backbone, classes, freeze=False)
    opt = keras.optimizers.Adam(1e-3)
    if layerwise:
        opt = kerastl.LayerwiseOptimizer(opt, kerastl.LayerDecay(0.7), model)
    model.compile(opt, "sparse_categorical_crossentropy")
    return model


def time_steps(model, x, y, steps):
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return (time.perf_counter() - start) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=60)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (args.batch, args.size, args.size, 3)).astype(
        "float32")
    y = rng.integers(0, 10, args.batch)
    plain, layerwise = make_model(False, args.size), make_model(True, args.size)
    print(kerastl.describe_learning_rates(layerwise))
    for model in (plain, layerwise):  # compile the train functions
        time_steps(model, x, y, 2)

    t_plain, t_lw = [], []
    for i in range(args.pairs):
        order = (plain, layerwise) if i % 2 == 0 else (layerwise, plain)
        for model in order:
            t = time_steps(model, x, y, 1)
            (t_plain if model is plain else t_lw).append(t)
    pair = sorted(b / a for a, b in zip(t_plain, t_lw))
    q = lambda p: pair[min(len(pair) - 1, int(p * len(pair)))]  # noqa: E731
    med_plain, med_lw = statistics.median(t_plain), statistics.median(t_lw)
    ratio = med_lw / med_plain
    print(f"\n{args.pairs} step pairs, MobileNetV2 {args.size}x{args.size}, "
          f"batch {args.batch}, {keras.backend.backend()} backend")
    print(f"plain Adam        median {med_plain * 1e3:8.1f} ms/step")
    print(f"LayerwiseOptimizer median {med_lw * 1e3:7.1f} ms/step")
    print(f"per-pair ratio quartiles: {q(0.25):.3f} {q(0.5):.3f} {q(0.75):.3f}")
    print(f"ratio layerwise/plain (medians): {ratio:.3f} (target <= 1.03)")
    return dict(plain_ms=med_plain * 1e3, layerwise_ms=med_lw * 1e3,
                ratio=ratio)


if __name__ == "__main__":
    main()
