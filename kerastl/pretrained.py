"""An offline pretrained backbone: a small CNN pretrained on ``syn_digits``.

Pretrained ImageNet and TF Hub weights need the internet; this backbone does
not. :func:`pretrained_backbone` trains :func:`small_cnn` with a softmax head
on digits rendered from the fonts bundled with matplotlib
(:func:`kerastl.datasets.syn_digits`, the source task) and caches the
weights (``KERASTL_CACHE_DIR``, default ``~/.cache/kerastl``), so later
calls take a second. ``kerastl demo``, the tutorials' offline fallback and
the benchmarks transfer it to scikit-learn's handwritten digits.
"""

import os
import time

import keras

from kerastl import datasets
from kerastl.heads import build_classifier

__all__ = ["small_cnn", "pretrain", "pretrained_backbone", "cache_dir"]


def small_cnn(size=32, widths=(16, 32, 64), name="small_cnn"):
    """A small conv net (one block per width) taking RGB in [0, 255].

    Each block is Conv2D (3x3, no bias), BatchNormalization, ReLU and 2x2
    max pooling, so its structural block map is ``block1``... one block per
    width.
    """
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    for filters in widths:
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(momentum=0.9)(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x)
    return keras.Model(inputs, x, name=name)


def pretrain(backbone, samples=4000, epochs=10, seed=0, verbose=0):
    """Trains ``backbone`` with a softmax head on ``syn_digits`` (the source).

    Seeds Keras's global random state with ``seed`` (the training is meant
    to be reproducible).

    Returns:
        The source classifier (sharing the backbone's layers).
    """
    keras.utils.set_random_seed(seed)
    source = build_classifier(backbone, 10, freeze=False, bn="train")
    source.compile(keras.optimizers.Adam(2e-3),
                   "sparse_categorical_crossentropy", metrics=["accuracy"])
    xs, ys = datasets.syn_digits(samples, seed=seed)
    source.fit(xs, ys, batch_size=64, epochs=epochs, verbose=verbose)
    return source


def cache_dir():
    """Where kerastl caches pretrained weights (``KERASTL_CACHE_DIR``)."""
    return os.environ.get("KERASTL_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "kerastl")


def pretrained_backbone(samples=4000, epochs=10, seed=0, verbose=0):
    """The small CNN pretrained on ``syn_digits``, from the cache or now.

    The same weights in every process for the same arguments: the initial
    weights and the training follow ``seed`` (Keras's global random state
    is seeded with it).

    Returns:
        ``(backbone, seconds, cached)``: the ``keras.Model``, the seconds it
        took, and whether the weights came from the cache.
    """
    start = time.time()
    keras.utils.set_random_seed(seed)  # the initial weights follow seed too
    backbone = small_cnn()
    name = (f"demo_small_cnn_syn{samples}_e{epochs}_s{seed}_"
            f"keras{keras.__version__}.weights.h5")
    path = os.path.join(cache_dir(), name)
    if os.path.isfile(path):
        try:
            backbone.load_weights(path)
            return backbone, time.time() - start, True
        except Exception:  # a damaged cache file: pretrain again
            os.remove(path)
    pretrain(backbone, samples, epochs, seed, verbose=verbose)
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = path + f".tmp{os.getpid()}.weights.h5"
    backbone.save_weights(tmp)
    os.replace(tmp, path)
    return backbone, time.time() - start, False
