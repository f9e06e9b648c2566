"""``domain_dataset``: labelled source and unlabelled target, zipped for DANN."""

import numpy as np

from kerastl.errors import KerastlError


def _finite(x, what):
    """``x`` as float32, refusing NaN and infinite values (one would turn
    every weight to NaN within a step, without an error)."""
    x = np.asarray(x, "float32")
    bad = ~np.isfinite(x)
    if bad.any():
        first = int(np.flatnonzero(bad.reshape(len(x), -1).any(axis=1))[0])
        raise KerastlError(
            f"The {what} images hold NaN or infinite values ({int(bad.sum())}"
            f" values, the first in image {first}); training on them gives "
            "NaN weights. Fix or drop those images.")
    return x


def _as_dataset(data, labelled, what):
    import tensorflow as tf
    if isinstance(data, tf.data.Dataset):
        return data.unbatch() if is_batched(data) else data
    if labelled:
        if not (isinstance(data, tuple) and len(data) == 2):
            raise KerastlError(
                "The labelled source must be an (x, y) tuple of arrays or a "
                "tf.data.Dataset of (x, y).")
        x, y = data
        if len(x) != len(y):
            raise KerastlError(f"Source x has {len(x)} samples but y has "
                               f"{len(y)}.")
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]  # (n, 1), as keras.datasets gives them
        whole = y.dtype.kind in "iu" or (y.dtype.kind == "f" and bool(
            np.all(np.isfinite(y) & (np.mod(y, 1) == 0))))
        if y.ndim != 1 or not whole or (len(y) and y.min() < 0):
            raise KerastlError(
                f"The {what} labels have shape {y.shape} and dtype "
                f"{y.dtype}: expected one class index (an int >= 0) per "
                "image (one-hot labels: y.argmax(-1)).")
        return tf.data.Dataset.from_tensor_slices(
            (_finite(x, what), y.astype("int64")))
    if isinstance(data, tuple):
        raise KerastlError(
            "The target is unlabelled: pass its images only, not (x, y).")
    return tf.data.Dataset.from_tensor_slices(_finite(data, what))


def is_batched(ds):
    """Whether a ``tf.data.Dataset`` yields batches of images."""
    spec = ds.element_spec
    first = spec[0] if isinstance(spec, tuple) else spec
    return first.shape.rank is not None and first.shape.rank == 4


def domain_dataset(source, target, batch_size=32, target_labeled=None,
                   shuffle=True, seed=0):
    """Zips labelled source and unlabelled target data for :class:`DANN`.

    Yields ``({"source": xs, "target": xt}, ys)`` batches, half source and
    half target (``batch_size`` of each). An epoch is one pass over the
    source; the target repeats as needed. With ``target_labeled=(x, y)``, a
    few labelled target samples, each batch also carries ``"labeled"``
    images and the labels come as ``{"source": ys, "labeled": yl}``.

    Args:
        source: ``(x, y)`` arrays or a ``tf.data.Dataset`` of ``(x, y)``.
        target: images (array) or a ``tf.data.Dataset`` of images.
        batch_size: samples per domain per batch.
        target_labeled: optional ``(x, y)`` labelled target samples.
    """
    import tensorflow as tf  # lazy: kerastl imports without TensorFlow
    if isinstance(batch_size, bool) or not isinstance(
            batch_size, (int, np.integer)) or batch_size < 1:
        raise KerastlError(f"batch_size={batch_size!r}: expected an int "
                           ">= 1.")
    src = _as_dataset(source, labelled=True, what="source")
    tgt = _as_dataset(target, labelled=False, what="target")
    for name, data, labelled in (("source", source, True),
                                 ("target", target, False)):
        n = known_size(data, labelled)
        if n is not None and n < batch_size:
            raise KerastlError(
                f"The {name} has {n} samples, fewer than batch_size="
                f"{batch_size}: training would run 0 steps (batches drop the "
                f"remainder). Pass more {name} samples or a smaller "
                "batch_size.")
    if shuffle:
        # Arrays: a buffer of their whole length (a larger source sorted by
        # class would otherwise give batches of a few classes for long).
        def buffer(data, labelled):  # (a dataset's: 10000, its memory)
            n = None if hasattr(data, "element_spec") else known_size(
                data, labelled)
            return max(10000, n or 0)
        src = src.shuffle(buffer(source, True),
                          seed=seed, reshuffle_each_iteration=True)
        tgt = tgt.shuffle(buffer(target, False),
                          seed=None if seed is None else seed + 1,
                          reshuffle_each_iteration=True)
    src = src.batch(batch_size, drop_remainder=True)
    tgt = tgt.repeat().batch(batch_size, drop_remainder=True)
    parts = [src, tgt]
    if target_labeled is not None:
        lab = _as_dataset(target_labeled, labelled=True,
                          what="labelled target")
        lab = lab.shuffle(10000, seed=None if seed is None else seed + 2
                          ).repeat().batch(
            min(batch_size, max(1, _count(target_labeled))),
            drop_remainder=True)
        parts.append(lab)

    def combine(s, t, l=None):
        x = {"source": s[0], "target": t}
        if l is None:
            return x, s[1]
        x["labeled"] = l[0]
        return x, {"source": s[1], "labeled": l[1]}

    ds = tf.data.Dataset.zip(tuple(parts)).map(
        combine, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def known_size(data, labelled):
    """Samples in array data or in a dataset of single samples of known
    length (None otherwise)."""
    if hasattr(data, "element_spec"):  # a tf.data.Dataset
        n = int(data.cardinality())
        return None if is_batched(data) or n < 0 else n
    if labelled:
        return len(data[0]) if isinstance(data, tuple) and len(data) == 2 \
            else None
    if isinstance(data, tuple):
        return None  # refused by _as_dataset with its own message
    return len(data) if hasattr(data, "__len__") and not hasattr(
        data, "element_spec") else None


def _count(data):
    return len(data[0]) if isinstance(data, tuple) else 32
