"""Partial fine-tuning with the boundary cache vs through the frozen prefix.

MobileNetV2 at 96x96 (random weights: the speed and the equality do not
depend on them), everything up to the last stage frozen (``freeze_up_to=
"stage3"``: stage4, top and the head train), scikit-learn's digits drawn as
96x96 RGB images, batch 32, Adam 1e-3. The same model, seed and batches are
trained twice with ``kerastl.fine_tune``: ``boundary_cache=False`` (every
epoch runs the frozen blocks) and ``boundary_cache=True`` (they run once,
the time of that pass included). Prints both wall times (whole
``fine_tune`` calls), their ratio (target >= 3x) and the largest difference
between the two models' predictions (target <= 1e-5).

    python benchmarks/boundary_cache.py [--epochs 10] [--images 512]
        [--json out.json]
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerastl  # noqa: E402
from kerastl import datasets  # noqa: E402

SIZE = 96


def make_model():
    keras.utils.set_random_seed(0)
    backbone = kerastl.load_backbone("mobilenet_v2", weights=None,
                                     input_shape=(SIZE, SIZE, 3))
    return kerastl.build_classifier(backbone, 10)


def run(cache, x, y, xv, yv, epochs):
    model = make_model()
    keras.utils.set_random_seed(1)
    start = time.perf_counter()
    history = kerastl.fine_tune(
        model, (x, y), (xv, yv), strategy="partial", freeze_up_to="stage3",
        head_epochs=0, epochs=epochs, patience=None, batch_size=32,
        optimizer=keras.optimizers.Adam(1e-3), boundary_cache=cache,
        check_features=False).fine_tune
    seconds = time.perf_counter() - start
    assert history.boundary_cache == ("used" if cache else
                                      "boundary_cache=False")
    return model, seconds, history


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    x, y = datasets.digits("train", size=SIZE)
    xv, yv = datasets.digits("test", size=SIZE)
    x, y, xv, yv = x[:args.images], y[:args.images], xv[:256], yv[:256]
    print(f"MobileNetV2 {SIZE}x{SIZE}, frozen up to stage3, {len(x)} "
          f"training images, {args.epochs} epochs", flush=True)
    plain, t_plain, h_plain = run(False, x, y, xv, yv, args.epochs)
    print(f"  through the frozen prefix: {t_plain:.1f} s", flush=True)
    cached, t_cached, h_cached = run(True, x, y, xv, yv, args.epochs)
    print(f"  boundary cache:            {t_cached:.1f} s", flush=True)
    diff = float(np.abs(cached.predict(xv, verbose=0)
                        - plain.predict(xv, verbose=0)).max())
    ratio = t_plain / t_cached
    print(f"speed-up {ratio:.2f}x (target >= 3x: "
          f"{'met' if ratio >= 3 else 'NOT met'}); largest prediction "
          f"difference {diff:.2e} (target <= 1e-5: "
          f"{'met' if diff <= 1e-5 else 'NOT met'}); final val accuracy "
          f"{h_plain.history['val_accuracy'][-1]:.3f} vs "
          f"{h_cached.history['val_accuracy'][-1]:.3f}")
    result = {"name": "boundary_cache", "kerastl_s": t_cached,
              "reference_s": t_plain, "ratio": ratio, "target": ">= 3",
              "met": ratio >= 3 and diff <= 1e-5,
              "max_prediction_difference": diff}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
