"""Does transfer beat training from scratch on a small digits target? (offline)

Source task: scikit-learn digits 0-4. Target: digits 5-9 with K labelled
samples per class. A small CNN is pretrained on the source, then transferred
with kerastl (frozen features + new head; first block frozen; full
fine-tuning) and compared with the same architecture trained from scratch on
the same K samples per class. Prints target test accuracy per variant.

    python benchmarks/transfer_digits.py
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import kerastl  # noqa: E402


def digits_rgb():
    d = load_digits()
    x = d.images.astype("float32") * (255.0 / 16.0)
    x = np.kron(x, np.ones((4, 4), "float32"))  # 8x8 -> 32x32
    return np.repeat(x[..., None], 3, axis=-1), d.target


def small_cnn():
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    for filters in (16, 32, 64):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    return keras.Model(inputs, x, name="small_cnn")


def accuracy(model, x, y):
    return float((model.predict(x, verbose=0).argmax(axis=1) == y).mean())


def train(model, x, y, epochs):
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=10, epochs=epochs, verbose=0)
    return model


def main(per_class=(3, 10), seeds=(0, 1), epochs=40):
    x, y = digits_rgb()
    src = y < 5
    x_src, y_src, x_tgt, y_tgt = x[src], y[src], x[~src], y[~src] - 5
    print(f"{'labels/class':>12} {'seed':>4} {'frozen':>8} {'freeze1':>8} "
          f"{'finetune':>8} {'scratch':>8}")
    for k in per_class:
        for seed in seeds:
            keras.utils.set_random_seed(seed)
            rng = np.random.default_rng(seed)
            idx = np.concatenate([rng.choice(np.flatnonzero(y_tgt == c), k,
                                             replace=False) for c in range(5)])
            test = np.ones(len(y_tgt), bool)
            test[idx] = False
            features = small_cnn()
            source = kerastl.build_classifier(features, 5, freeze=False,
                                              dropout=0.0)
            source.compile(keras.optimizers.Adam(1e-3),
                           "sparse_categorical_crossentropy")
            source.fit(x_src, y_src, batch_size=32, epochs=8, verbose=0)
            pretrained = features.get_weights()
            row = []
            for freeze in (True, 1, False):
                features.set_weights(pretrained)
                model = kerastl.build_classifier(features, 5, freeze=freeze,
                                                 dropout=0.0)
                row.append(accuracy(train(model, x_tgt[idx], y_tgt[idx],
                                          epochs), x_tgt[test], y_tgt[test]))
            scratch = kerastl.build_classifier(small_cnn(), 5, freeze=False,
                                               dropout=0.0)
            row.append(accuracy(train(scratch, x_tgt[idx], y_tgt[idx], epochs),
                                x_tgt[test], y_tgt[test]))
            print(f"{k:>12} {seed:>4} " + " ".join(f"{a:>8.3f}" for a in row),
                  flush=True)


if __name__ == "__main__":
    main()
