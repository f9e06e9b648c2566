"""Exported files on this CPU: size and single-image latency per format.

    python benchmarks/deploy.py [--size 96] [--repeats 50]

MobileNetV2 at 96x96 (random weights with real BatchNorm statistics: the
file size and speed do not depend on the weights' values), classifier of 10
classes, exported with ``kerastl.export`` as a SavedModel, a float LiteRT
file, int8 and dynamic-range LiteRT files and an ONNX file; each file is run
by its own runtime (``tf.saved_model.load``, the LiteRT interpreter,
onnxruntime) on one image at a time, against the Keras model's
``predict_on_batch`` and a ``tf.function`` call on the same image. Absolute
figures first (MB, ms per image, median of ``--repeats``), then the speed
ratio to the faster of the two Keras calls (the strongest simple baseline).

What quantization costs in accuracy is not measured here (random weights
give near-uniform scores, on which any rounding flips the top class):
``tests/test_deploy.py`` measures it on the demo's digits task.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
import kerastl  # noqa: E402
from kerastl.serving import FileRunner  # noqa: E402


def all_layers(model):
    for layer in getattr(model, "layers", ()):
        yield layer
        yield from all_layers(layer)


def median_ms(fn, x, repeats):
    fn(x)  # warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)
    size = args.size
    backbone = kerastl.load_backbone("mobilenet_v2", weights=None,
                                     input_shape=(size, size, 3))
    model = kerastl.build_classifier(backbone, 10, freeze=False, bn="train",
                                     dropout=0.0, seed=0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (64, size, size, 3)).astype("float32")
    for layer in all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(x, training=True)  # BatchNorm statistics of real activations
    one = x[:1]
    call = tf.function(lambda t: model(t, training=False))
    keras_ms = median_ms(lambda t: call(t), one, args.repeats)
    predict_ms = median_ms(model.predict_on_batch, one, args.repeats)
    root = tempfile.mkdtemp()
    rows = [{"format": "Keras model (tf.function call)", "mb": None,
             "ms": keras_ms, "agreement": 1.0, "max_difference": 0.0},
            {"format": "Keras model (predict_on_batch)", "mb": None,
             "ms": predict_ms, "agreement": 1.0, "max_difference": 0.0}]
    try:
        for format, quantize in (("savedmodel", None), ("litert", None),
                                 ("litert", "dynamic"), ("litert", "int8"),
                                 ("onnx", None)):
            folder = os.path.join(root, f"{format}-{quantize}")
            with warnings.catch_warnings():  # (agreement: see docstring)
                warnings.simplefilter("ignore")
                report = kerastl.export(
                    model, folder, format=format, quantize=quantize,
                    representative_data=x if quantize == "int8" else None,
                    validation_data=x)
            runner = FileRunner(format, folder, report.file, model)
            ms = median_ms(runner, one, args.repeats)
            rows.append({"format": format + (f" ({quantize})" if quantize
                                             else ""),
                         "mb": report.bytes / 1e6, "ms": ms,
                         "agreement": report.agreement,
                         "max_difference": report.max_difference})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nMobileNetV2 {size}x{size}, 10 classes, one image per call, "
          f"median of {args.repeats}:")
    baseline = min(keras_ms, predict_ms)  # the faster Keras call
    print(f"{'format':34s} {'MB':>7s} {'ms/image':>9s} {'speed-up':>9s}")
    for r in rows:
        mb = f"{r['mb']:.2f}" if r["mb"] is not None else "-"
        print(f"{r['format']:34s} {mb:>7s} {r['ms']:9.2f} "
              f"{baseline / r['ms']:8.2f}x")
    return {"rows": rows, "keras_ms": baseline}


if __name__ == "__main__":
    main()
