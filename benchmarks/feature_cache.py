"""Cached features vs re-running the frozen backbone every epoch (offline).

Same data (scikit-learn digits upsampled to 96x96 RGB), same frozen backbone
(MobileNetV2, random weights: the speed does not depend on them), same head
(``LinearProbe``'s standardise + softmax model), same optimizer, batch size
and number of epochs. Prints, in one run:

* the time to train the head for E epochs on images through the frozen
  backbone (what a plain Keras ``fit`` on a frozen model does), on cached
  features read back from a :class:`kerastl.FeatureCache`, and on a cold
  cache (extraction included); the speedups (target >= 8x warm);
* extraction throughput of ``kerastl.extract_features`` vs plain
  ``backbone.predict`` on the same ``tf.data`` pipeline (target >= 0.9x).

    python benchmarks/feature_cache.py [--epochs 10] [--size 96]
"""

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import kerastl  # noqa: E402
from kerastl import datasets  # noqa: E402

BATCH = 64


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--model", default="mobilenet_v2")
    args = parser.parse_args(argv)
    x, y = datasets.digits("train", size=args.size)
    backbone = kerastl.load_backbone(args.model, weights=None,
                                     input_shape=(args.size, args.size, 3))
    fmodel = kerastl.feature_model(backbone)  # backbone + global avg pool
    dim = fmodel.output["output"].shape[-1]
    print(f"{args.model} at {args.size}x{args.size}, {len(x)} images, "
          f"{dim} features, {args.epochs} epochs, batch {BATCH}\n")

    # Extraction throughput: the same pipeline for both.
    def pipeline():
        return tf.data.Dataset.from_tensor_slices(x).batch(BATCH).prefetch(
            tf.data.AUTOTUNE)

    backbone.model.predict(pipeline().take(2), verbose=0)  # warm up
    kerastl.extract_features(backbone, x[:128], verbose=0)
    # Alternating repeats, medians: one ~2 s pass each is too noisy.
    plain, ours = [], []
    for _ in range(3):
        plain.append(timed(lambda: backbone.model.predict(
            pipeline(), verbose=0))[1])
        ours.append(timed(lambda: kerastl.extract_features(
            backbone, pipeline(), data_key="digits-train", verbose=0))[1])
    t_plain, t_ours = float(np.median(plain)), float(np.median(ours))
    print(f"extraction: backbone.predict {len(x) / t_plain:7.1f} img/s, "
          f"kerastl.extract_features {len(x) / t_ours:7.1f} img/s "
          f"-> {t_plain / t_ours:.2f}x (target >= 0.9x)")

    # Head training: through the frozen backbone every epoch...
    probe = kerastl.LinearProbe(epochs=args.epochs, batch_size=BATCH,
                                learning_rate=1e-3)
    feats0 = kerastl.extract_features(backbone, x, verbose=0)
    head = probe.build_model(dim, 10, feats0.mean(0), feats0.var(0) + 1e-6)
    inputs = keras.Input((args.size, args.size, 3))
    frozen = keras.Model(inputs, head(fmodel(inputs)["output"]))
    fmodel.trainable = False
    frozen.compile(keras.optimizers.Adam(1e-3),
                   "sparse_categorical_crossentropy", metrics=["accuracy"])
    _, t_images = timed(lambda: frozen.fit(x, y, batch_size=BATCH,
                                           epochs=args.epochs, verbose=0))

    # ... vs on cached features: cold (extract + write), then warm (read).
    folder = tempfile.mkdtemp(prefix="kerastl-bench-cache-")
    try:
        cache = kerastl.FeatureCache(folder)

        def cached_run():
            f, labels = kerastl.extract_features(backbone, (x, y),
                                                 cache=cache,
                                                 return_labels=True,
                                                 verbose=0)
            return kerastl.LinearProbe(epochs=args.epochs, batch_size=BATCH,
                                       learning_rate=1e-3).fit(f, labels)

        _, t_cold = timed(cached_run)
        fitted, t_warm = timed(cached_run)
        assert cache.hits == 1 and cache.misses == 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\nhead training, {args.epochs} epochs:")
    print(f"  through the frozen backbone      {t_images:7.2f} s")
    print(f"  cached features, cold cache      {t_cold:7.2f} s  "
          f"-> {t_images / t_cold:5.1f}x")
    print(f"  cached features, warm cache      {t_warm:7.2f} s  "
          f"-> {t_images / t_warm:5.1f}x (target >= 8x)")
    return dict(extraction_ratio=t_plain / t_ours,
                predict_images_per_s=len(x) / t_plain,
                extract_images_per_s=len(x) / t_ours,
                through_backbone_s=t_images, warm_s=t_warm,
                warm_speedup=t_images / t_warm,
                cold_speedup=t_images / t_cold)


if __name__ == "__main__":
    main()
