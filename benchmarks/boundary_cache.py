"""Partial fine-tuning with the boundary cache vs through the frozen prefix.

MobileNetV2 at 96x96 (random weights: the speed and the equality do not
depend on them), scikit-learn's digits drawn as 96x96 RGB images, batch 32,
Adam 1e-3, two boundaries: ``freeze_up_to="stage3"`` (everything before the
last stage frozen: stage4, top and the head train) and ``"stage4"``
(everything up to and including the last stage frozen: top and the head
train). For each, the same model, seed and batches are trained twice with
``kerastl.fine_tune``: ``boundary_cache=False`` (every epoch runs the frozen
blocks) and ``boundary_cache=True`` (they run once, that pass and its
tracing included). Prints both wall times (whole ``fine_tune`` calls),
their ratio (target >= 3x) and the largest difference between the two
models' predictions (target <= 1e-5).

The ratio is bounded by (prefix forward + top step) / top step: at the
stage3 boundary stage4's 1x1 convolutions at 6x6 and 3x3 are about a third
of a step, so about 4x at best with many epochs; at stage4 the trained part
is small and the bound is far higher.

    python benchmarks/boundary_cache.py [--epochs 10] [--images 512]
        [--boundaries stage3 stage4] [--json out.json]
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


def run(cache, x, y, xv, yv, epochs, boundary):
    model = make_model()
    keras.utils.set_random_seed(1)
    start = time.perf_counter()
    history = kerastl.fine_tune(
        model, (x, y), (xv, yv), strategy="partial", freeze_up_to=boundary,
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
    parser.add_argument("--boundaries", nargs="+",
                        default=["stage3", "stage4"])
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    x, y = datasets.digits("train", size=SIZE)
    xv, yv = datasets.digits("test", size=SIZE)
    x, y, xv, yv = x[:args.images], y[:args.images], xv[:256], yv[:256]
    results = []
    for boundary in args.boundaries:
        print(f"MobileNetV2 {SIZE}x{SIZE}, frozen up to {boundary}, "
              f"{len(x)} training images, {args.epochs} epochs", flush=True)
        plain, t_plain, h_plain = run(False, x, y, xv, yv, args.epochs,
                                      boundary)
        print(f"  through the frozen prefix: {t_plain:.1f} s", flush=True)
        cached, t_cached, h_cached = run(True, x, y, xv, yv, args.epochs,
                                         boundary)
        print(f"  boundary cache:            {t_cached:.1f} s", flush=True)
        diff = float(np.abs(cached.predict(xv, verbose=0)
                            - plain.predict(xv, verbose=0)).max())
        ratio = t_plain / t_cached
        print(f"  speed-up {ratio:.2f}x (target >= 3x: "
              f"{'met' if ratio >= 3 else 'NOT met'}); largest prediction "
              f"difference {diff:.2e} (target <= 1e-5: "
              f"{'met' if diff <= 1e-5 else 'NOT met'})", flush=True)
        results.append({
            "name": f"boundary_cache_{boundary}", "kerastl_s": t_cached,
            "reference_s": t_plain, "ratio": ratio, "target": ">= 3",
            "met": ratio >= 3 and diff <= 1e-5,
            "max_prediction_difference": diff})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
