"""Image-folder input pipeline: kerastl's vs Keras's recommended one.

Writes a folder of JPEG photos (crops of scikit-learn's sample images, 4
classes), then iterates it as training batches of 96x96 images:

* reference: ``keras.utils.image_dataset_from_directory(...)`` followed by
  ``.cache().prefetch(tf.data.AUTOTUNE)`` (the TensorFlow tutorials'
  recipe; its cache freezes the first epoch's order);
* kerastl: :func:`kerastl.image_folders.image_folder_datasets` (what
  ``kerastl finetune`` reads with: decoded once into memory when they fit,
  the batches replayed in a new order every epoch, prefetched).

The first epoch (decoding) and the next ``--epochs`` (from memory) are
timed separately; prints images/s of each and the ratio kerastl/reference
(target >= 0.95).

    python benchmarks/input_pipeline.py [--images 2000] [--epochs 5]
        [--json out.json]
"""

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kerastl.image_folders import image_folder_datasets  # noqa: E402

SIZE = (96, 96)
BATCH = 32


def write_folder(root, n, classes=4, seed=0):
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class{c}"))
    for i in range(n):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - 200), rng.integers(
            0, photo.shape[1] - 200)
        crop = photo[y:y + 200, x:x + 200]
        keras.utils.save_img(
            os.path.join(root, f"class{i % classes}", f"{i}.jpg"), crop,
            scale=False)


def throughput(dataset, epochs):
    """(first epoch images/s, later epochs images/s)."""
    rates = []
    for _ in range(1 + epochs):
        start, n = time.perf_counter(), 0
        for images, _ in dataset:
            n += int(images.shape[0])
        rates.append(n / (time.perf_counter() - start))
    return rates[0], float(np.median(rates[1:]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        write_folder(root, args.images)
        reference = keras.utils.image_dataset_from_directory(
            root, validation_split=0.2, subset="training", seed=0,
            image_size=SIZE, batch_size=BATCH, verbose=False)
        reference = reference.cache().prefetch(tf.data.AUTOTUNE)
        ours, _ = image_folder_datasets(root, SIZE, batch_size=BATCH,
                                        validation_split=0.2, seed=0)
        # Alternate the order so neither always runs on a warmer machine.
        ref_first, ref_rate = throughput(reference, args.epochs)
        our_first, our_rate = throughput(ours, args.epochs)
        ref_rate = (ref_rate + throughput(reference, args.epochs)[1]) / 2
        our_rate = (our_rate + throughput(ours, args.epochs)[1]) / 2
    ratio = our_rate / ref_rate
    print(f"{args.images} JPEGs, 96x96 batches of {BATCH}, 2 cores")
    print(f"  first epoch (decoding): kerastl {our_first:.0f} images/s, "
          f"reference {ref_first:.0f} images/s")
    print(f"  later epochs (cached):  kerastl {our_rate:.0f} images/s, "
          f"reference {ref_rate:.0f} images/s")
    print(f"  ratio {ratio:.2f} (target >= 0.95: "
          f"{'met' if ratio >= 0.95 else 'NOT met'})")
    result = {"name": "input_pipeline", "kerastl": our_rate,
              "reference": ref_rate, "unit": "images/s", "ratio": ratio,
              "target": ">= 0.95", "met": ratio >= 0.95,
              "first_epoch": {"kerastl": our_first, "reference": ref_first}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
