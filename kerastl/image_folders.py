"""Image folders (one subfolder per class) as checked data and as fast
``tf.data`` pipelines: what ``kerastl finetune`` reads, usable on its own.
"""

import os

import numpy as np

from kerastl.errors import KerastlError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def scan_image_folder(folder, decode=True):
    """Checks an image folder; returns ``{class name: [file paths]}``.

    Raises :class:`KerastlError` naming the problem: a missing folder, fewer
    than two class subfolders, an empty class folder, or (``decode``) files
    that do not decode as images (all of them, in one error). With
    ``decode=False`` it needs neither Keras nor TensorFlow: the command line
    runs it before importing them, so a wrong folder is reported at once.
    """
    if not os.path.isdir(folder):
        raise KerastlError(f"Image folder {folder!r} does not exist.")
    classes = sorted(d for d in os.listdir(folder)
                     if os.path.isdir(os.path.join(folder, d))
                     and not d.startswith("."))
    if len(classes) < 2:
        raise KerastlError(
            f"Image folder {folder!r} has {len(classes)} class subfolder(s); "
            "expected one subfolder of images per class, at least two.")
    files = {}
    for c in classes:
        d = os.path.join(folder, c)
        # (subfolders too, as Keras's image_dataset_from_directory reads
        # them: without following links)
        files[c] = sorted(os.path.join(root, f)
                          for root, _, names in os.walk(d)
                          for f in names
                          if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files[c]:
            raise KerastlError(
                f"Class folder {d!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    if not decode:
        return files
    import tensorflow as tf  # lazy: only when images are decoded

    unreadable = []
    for c in classes:
        for path in files[c]:
            try:
                tf.io.decode_image(tf.io.read_file(path), channels=3,
                                   expand_animations=False)
            except (tf.errors.InvalidArgumentError, ValueError):
                unreadable.append(path)
    if unreadable:  # every one of them, in one error
        shown = ", ".join(repr(p) for p in unreadable[:UNREADABLE_SHOWN])
        more = len(unreadable) - UNREADABLE_SHOWN
        shown += f" and {more} more" if more > 0 else ""
        raise KerastlError(
            f"{len(unreadable)} file(s) in {folder!r} are not readable "
            f"images: {shown}; remove or replace them.")
    return files


# How many unreadable files an error names (the rest are counted).
UNREADABLE_SHOWN = 10


# Decoded images are kept in memory when all of them take at most this.
CACHE_IMAGES_BYTES = 2 * 1024 ** 3


def image_folder_datasets(folder, image_size, batch_size=32,
                          validation_split=0.2, seed=0,
                          cache_bytes=CACHE_IMAGES_BYTES, verbose=0):
    """Training and validation ``tf.data`` pipelines for an image folder.

    The split, decoding and resizing are Keras's
    (``keras.utils.image_dataset_from_directory``: the same files in the
    same split for a seed, decoded in parallel, shuffled in a buffer before
    batching). When the decoded images fit in ``cache_bytes`` (float32,
    default 2 GiB) the first epoch's batches are kept in memory and later
    epochs replay them in a new order each epoch (the order of the batches
    is reshuffled, not their contents: replaying costs nothing per image);
    otherwise images are decoded every epoch, as Keras does. Both pipelines
    prefetch.

    Returns:
        ``(train, validation)`` datasets of ``(images, int labels)``
        batches, each with Keras's ``file_paths`` and ``class_names``.
    """
    import keras  # lazy: the command line checks folders before Keras
    import tensorflow as tf  # lazy, as scan_image_folder

    common = dict(validation_split=validation_split, subset="both",
                  seed=seed, image_size=image_size, label_mode="int",
                  shuffle=True, verbose=False)
    train, val = keras.utils.image_dataset_from_directory(
        folder, batch_size=batch_size, **common)
    paths = (train.file_paths, val.file_paths)
    names = train.class_names
    n = len(paths[0]) + len(paths[1])
    size = n * image_size[0] * image_size[1] * 3 * 4
    if size <= cache_bytes:
        if verbose:
            print(f"kerastl: keeping the {n} decoded images in memory "
                  f"({size / 2 ** 20:.1f} MiB).", flush=True)
        batches = -(-len(paths[0]) // batch_size)
        train = train.cache().shuffle(batches, seed=seed,
                                      reshuffle_each_iteration=True)
        val = val.cache()
        train, val = (d.prefetch(tf.data.AUTOTUNE) for d in (train, val))
    elif verbose:
        print(f"kerastl: {n} decoded images would take "
              f"{size / 2 ** 30:.1f} GiB; decoding them every epoch.",
              flush=True)
    for d, p in zip((train, val), paths):
        d.file_paths, d.class_names = p, names
        # Nothing random after decoding: fine_tune's boundary cache may
        # replay these (it does not replay other pipelines by default).
        d.kerastl_replayable = True
    return train, val


class ImageArrays:
    """An image folder decoded into memory: what :func:`image_folder_arrays`
    returns.

    Attributes:
        train, validation: ``(images, int labels)`` NumPy arrays (float32
            RGB in [0, 255]).
        class_names: the class subfolders, in label order.
    """

    def __init__(self, train, validation, class_names):
        self.train = train
        self.validation = validation
        self.class_names = list(class_names)


def image_folder_arrays(folder, image_size, validation_split=0.2, seed=0,
                        max_bytes=CACHE_IMAGES_BYTES, verbose=0):
    """An image folder decoded once into NumPy arrays, or None when they
    would take more than ``max_bytes``.

    The same split as :func:`image_folder_datasets` (Keras's
    ``image_dataset_from_directory`` with the same seed). Arrays are what
    makes a run exactly resumable: the order of every epoch can then be
    drawn from the seed and the epoch (``TrainingPlan(seed=...)``), in any
    process.

    Returns:
        An :class:`ImageArrays`, or None.
    """
    train, val = image_folder_datasets(folder, image_size, batch_size=256,
                                       validation_split=validation_split,
                                       seed=seed, cache_bytes=0)
    n = len(train.file_paths) + len(val.file_paths)
    size = n * image_size[0] * image_size[1] * 3 * 4
    if size > max_bytes:
        if verbose:
            print(f"kerastl: {n} decoded images would take "
                  f"{size / 2 ** 30:.1f} GiB; decoding them every epoch.",
                  flush=True)
        return None
    if verbose:
        print(f"kerastl: keeping the {n} decoded images in memory "
              f"({size / 2 ** 20:.1f} MiB).", flush=True)

    def arrays(ds):
        xs, ys = [], []
        for x, y in ds.as_numpy_iterator():
            xs.append(x)
            ys.append(y)
        return (np.concatenate(xs).astype("float32", copy=False),
                np.concatenate(ys).astype("int64", copy=False))

    return ImageArrays(arrays(train), arrays(val), train.class_names)
