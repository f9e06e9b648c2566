"""AdaMatch's train step with Keras's ``RandAugment`` in its strong view vs
kerastl's (:class:`kerastl.augment.RandAugment`, which computes only the
operations it draws).

Keras's layer (3.15) runs all 14 of its operations for each of its two
slots and keeps the drawn ones with ``where``; kerastl's subclass runs the
drawn one alone (the backend's ``switch``), with the same random draws and
so the same images (``tests/test_adamatch.py`` checks that bit for bit,
and that a whole ``fit`` gives the same weights). The model is
AdaMatch on ``domain_adaptation.py``'s network (the DANN paper's digit
convolutions, 32x32, batch 64 per domain); the two models differ only in
that layer. Single train steps are timed in alternating pairs after a warm-up,
as in ``classifier_step.py``; prints the median step times, their ratio
and the strong view alone on one batch.

    python benchmarks/adamatch_step.py [--pairs 30] [--json F]
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from domain_adaptation import paper_features  # noqa: E402
from kerastl.adaptation import AdaMatch, domain_dataset  # noqa: E402

SIZE, BATCH, CLASSES = 32, 64, 10


def with_keras_rand_augment(strong):
    """The same strong view with Keras's own RandAugment in its place."""
    first, ours, last = strong.layers
    theirs = keras.layers.RandAugment.from_config(ours.get_config())
    return keras.Sequential([first, theirs, last], name=strong.name)


def model(which):
    keras.utils.set_random_seed(0)
    m = AdaMatch(paper_features(), CLASSES, seed=0)
    if which == "keras":
        m.strong = with_keras_rand_augment(m.strong)
    m.compile(keras.optimizers.Adam(1e-3))
    return m


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    xs = rng.uniform(0, 255, (BATCH, SIZE, SIZE, 3)).astype("float32")
    ys = rng.integers(0, CLASSES, BATCH)
    xt = rng.uniform(0, 255, (BATCH, SIZE, SIZE, 3)).astype("float32")
    batch = next(iter(domain_dataset((xs, ys), xt, batch_size=BATCH)))
    models = {"kerastl": model("kerastl"), "keras": model("keras")}
    times = {name: [] for name in models}
    for m in models.values():
        for _ in range(3):  # trace and warm up
            m.train_on_batch(*batch)
    for i in range(args.pairs):
        for name in (("kerastl", "keras") if i % 2 == 0
                     else ("keras", "kerastl")):
            start = time.perf_counter()
            models[name].train_on_batch(*batch)
            times[name].append(time.perf_counter() - start)
    ours, theirs = (statistics.median(times[k]) for k in ("kerastl", "keras"))
    # The strong view alone, on one domain's batch, in a graph.
    views = {}
    for name, m in models.items():
        fn = tf.function(lambda x, s=m.strong: s(x, training=True))
        for _ in range(3):
            fn(xs)
        samples = []
        for _ in range(args.pairs):
            start = time.perf_counter()
            fn(xs)
            samples.append(time.perf_counter() - start)
        views[name] = statistics.median(samples)
    result = {"step_kerastl_ms": ours * 1e3, "step_keras_ms": theirs * 1e3,
              "step_ratio": ours / theirs,
              "strong_kerastl_ms": views["kerastl"] * 1e3,
              "strong_keras_ms": views["keras"] * 1e3,
              "strong_ratio": views["kerastl"] / views["keras"]}
    print(f"AdaMatch train step, {SIZE}x{SIZE}, batch {BATCH} per domain: "
          f"kerastl's RandAugment {result['step_kerastl_ms']:.1f} ms, "
          f"Keras's {result['step_keras_ms']:.1f} ms, ratio "
          f"{result['step_ratio']:.2f}")
    print(f"strong view alone, one batch of {BATCH}: kerastl's "
          f"{result['strong_kerastl_ms']:.1f} ms, Keras's "
          f"{result['strong_keras_ms']:.1f} ms, ratio "
          f"{result['strong_ratio']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
