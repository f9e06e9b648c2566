"""Train-step time: a kerastl classifier vs the Keras guide's hand-written one.

The reference is the recipe of the Keras transfer-learning guide
(keras.io/guides/transfer_learning): ``keras.applications.MobileNetV2(
include_top=False)`` called with ``training=False`` after a ``Rescaling``
layer that does MobileNetV2's preprocessing, global average pooling,
dropout 0.2 and a new softmax ``Dense``. kerastl's is
``build_classifier(load_backbone("mobilenet_v2"), 10)``: the same layers,
the preprocessing inside as ``ImagePreprocessing`` with its input checks.
Both at 96x96 with random weights (speed does not depend on them), batch
32, Adam, two settings: the backbone frozen (feature extraction) and
everything trainable (BatchNorm frozen in both, statistics and scale:
kerastl's ``bn="frozen"``; the guide keeps BN's statistics frozen with
``training=False``, here its scale and offset too, so that both train the
same variables).
Single train steps are timed in alternating pairs after a warm-up, as in
``layerwise_overhead.py``; prints the median step times and their ratio
(target <= 1.02).

    python benchmarks/classifier_step.py [--pairs 40] [--json F]
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerastl  # noqa: E402

SIZE, BATCH, CLASSES = 96, 32, 10


def guide_model(frozen):
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    base.trainable = not frozen
    for layer in base.layers:  # kerastl's bn="frozen": gamma, beta too
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = base(x, training=False)  # BatchNorm in inference mode
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(CLASSES, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-3),
                  "sparse_categorical_crossentropy")
    return model


def kerastl_model(frozen):
    keras.utils.set_random_seed(0)
    backbone = kerastl.load_backbone("mobilenet_v2", weights=None,
                                     input_shape=(SIZE, SIZE, 3))
    model = kerastl.build_classifier(backbone, CLASSES, freeze=frozen)
    model.compile(keras.optimizers.Adam(1e-3),
                  "sparse_categorical_crossentropy")
    return model


def step_time(model, x, y):
    start = time.perf_counter()
    model.train_on_batch(x, y)
    return time.perf_counter() - start


def compare(frozen, pairs, x, y):
    ours, guide = kerastl_model(frozen), guide_model(frozen)
    assert (len(ours.trainable_weights) == len(guide.trainable_weights)), \
        "the two models must train the same variables"
    for model in (ours, guide):
        for _ in range(3):  # trace and warm up
            model.train_on_batch(x, y)
    t_ours, t_guide = [], []
    for i in range(pairs):
        order = (ours, guide) if i % 2 == 0 else (guide, ours)
        for model in order:
            (t_ours if model is ours else t_guide).append(
                step_time(model, x, y))
    return statistics.median(t_ours), statistics.median(t_guide)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (BATCH, SIZE, SIZE, 3)).astype("float32")
    y = rng.integers(0, CLASSES, BATCH)
    results = []
    for frozen in (True, False):
        ours, guide = compare(frozen, args.pairs, x, y)
        ratio = ours / guide
        setting = "backbone frozen" if frozen else "everything trainable"
        print(f"MobileNetV2 {SIZE}x{SIZE}, batch {BATCH}, {setting}: "
              f"kerastl {ours * 1e3:.1f} ms/step, Keras guide "
              f"{guide * 1e3:.1f} ms/step, ratio {ratio:.3f} (target <= "
              f"1.02: {'met' if ratio <= 1.02 else 'NOT met'})", flush=True)
        results.append({"setting": setting, "kerastl_ms": ours * 1e3,
                        "guide_ms": guide * 1e3, "ratio": ratio,
                        "met": ratio <= 1.02})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
