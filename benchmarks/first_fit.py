"""The cost of a short fine-tuning run: the train step traced once or twice.

On TensorFlow, Keras creates the optimizer's and the metrics' variables
inside the first trace of the train step, and the step is then traced a
second time; kerastl builds them before ``fit`` (``kerastl.prebuild``), so
it is traced once. This times ``kerastl.fine_tune`` (head phase and main
phase, one epoch each, Adam, accuracy, a validation split) on a few
hundred images, where tracing is most of the run, with kerastl's early
build and without it (the build patched out: Keras's own deferred build),
in alternating pairs in one process, each run on a fresh model. Prints the
median run times and their ratio (kerastl / Keras's deferred build), and
also for ``kerastl.DANN``'s ``fit``.

    python benchmarks/first_fit.py [--pairs 3] [--model mobilenet_v2]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerastl  # noqa: E402
from kerastl import prebuild  # noqa: E402

SIZE = 32


def fine_tune_run(model_name, x, y, val):
    keras.utils.set_random_seed(0)
    backbone = kerastl.load_backbone(model_name, weights=None,
                                     input_shape=(SIZE, SIZE, 3))
    model = kerastl.build_classifier(backbone, 10, seed=0)
    start = time.perf_counter()
    kerastl.fine_tune(model, (x, y), val, strategy="full", head_epochs=1,
                      epochs=1, seed=0, batch_size=32, check_features=False)
    return time.perf_counter() - start


def dann_run(x, y, xt):
    keras.utils.set_random_seed(0)
    backbone = kerastl.load_backbone("mobilenet_v2", weights=None,
                                     input_shape=(SIZE, SIZE, 3))
    model = kerastl.DANN(backbone, 10)
    model.compile(keras.optimizers.Adam(1e-3), metrics=["accuracy"])
    start = time.perf_counter()
    model.fit(kerastl.adaptation.domain_dataset((x, y), xt, batch_size=32,
                                                seed=0), epochs=1, verbose=0)
    return time.perf_counter() - start


def timed(run, pairs):
    """Median seconds of ``run()`` with kerastl's build and without."""
    saved = prebuild.build_before_fit
    times = {"kerastl": [], "deferred": []}
    for i in range(pairs):
        order = ("kerastl", "deferred") if i % 2 == 0 else \
            ("deferred", "kerastl")
        for which in order:
            prebuild.build_before_fit = saved if which == "kerastl" else \
                (lambda *a, **k: None)
            times[which].append(run())
            keras.backend.clear_session()
    prebuild.build_before_fit = saved
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--model", default="mobilenet_v2")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (256, SIZE, SIZE, 3)).astype("float32")
    y = rng.integers(0, 10, 256)
    val = (x[:64], y[:64])
    fine_tune_run(args.model, x[:64], y[:64], val)  # warm-up
    keras.backend.clear_session()
    rows = [(f"fine_tune, {args.model} {SIZE}x{SIZE}, 2 phases",
             timed(lambda: fine_tune_run(args.model, x, y, val),
                   args.pairs)),
            (f"DANN fit, mobilenet_v2 {SIZE}x{SIZE}, 1 epoch",
             timed(lambda: dann_run(x, y, x[::-1]), args.pairs))]
    print(f"{'run':44s} {'kerastl':>9s} {'deferred':>9s} {'ratio':>6s}")
    for name, t in rows:
        print(f"{name:44s} {t['kerastl']:8.2f}s {t['deferred']:8.2f}s "
              f"{t['kerastl'] / t['deferred']:6.2f}")


if __name__ == "__main__":
    main()
