"""Off-the-shelf features: which outputs, which data, one ``predict`` pass.

Razavian et al. (2014): the activations of a pretrained network, fed to a
shallow classifier, are a strong baseline. :func:`extract_features` computes
them for arrays, a ``tf.data.Dataset`` or an image folder in one batched,
prefetched ``predict`` pass; :func:`feature_model` is the model it runs.
"""

import contextlib
import hashlib
import numbers
import os
import shutil
import tempfile
import weakref

import keras
import numpy as np

from kerastl import _keras_private as _private
from kerastl.blocks import block_map, model_input, model_output
from kerastl.errors import KerastlError
from kerastl.features.cache import as_cache, hash_array, model_fingerprint
from kerastl.freezing import keras_model_of
from kerastl.heads import POOLINGS as HEAD_POOLINGS
from kerastl.heads import pool, prefix_tokens

#: The heads' poolings, plus ``None``: spatial outputs kept as they are.
POOLINGS = HEAD_POOLINGS + (None,)


# -- which outputs ------------------------------------------------------------

def _layer_names(layers):
    if layers is None:
        return None
    if isinstance(layers, str):
        return [layers]
    if not isinstance(layers, (list, tuple)):
        raise KerastlError(
            f"layers={layers!r}: expected a block/endpoint/layer name or a "
            "non-empty list of them.")
    layers = list(layers)
    if not layers or not all(isinstance(l, str) for l in layers):
        raise KerastlError(
            f"layers={layers!r}: expected a block/endpoint/layer name or a "
            "non-empty list of them.")
    return layers


def _endpoint_tensor(backbone, model, name):
    """The output tensor for a block, a config endpoint or a layer name."""
    if hasattr(backbone, "endpoints") and name in backbone.endpoints:
        return backbone.endpoint_layer(name).output
    bm = block_map(model)
    if name in bm:
        return bm.output_layer(name).output
    try:
        return model.get_layer(name).output
    except ValueError:
        pass
    raise KerastlError(
        f"{model.name!r} has no block, endpoint or layer {name!r}. Blocks: "
        f"{', '.join(bm.names)}.")


def _pool(tensor, pooling, name, model=None):
    if pooling is None:
        return tensor
    if len(tensor.shape) == 3 and (model is None or
                                   prefix_tokens(model) is None):
        # Not a transformer kerastl knows: flattened, as always.
        return keras.layers.Flatten(name=f"kerastl_flatten_{name}")(tensor)
    return pool(tensor, pooling, f"kerastl_{pooling}_pool_{name}", model)


_FEATURE_MODELS = weakref.WeakKeyDictionary()


def feature_model(backbone, layers=None, pooling="avg"):
    """A ``keras.Model`` from the images to the features (a dict by layer).

    ``layers=None`` takes the model's output. Spatial outputs are pooled
    inside the model (``"avg"``, ``"max"`` or ``"flatten"``, as the heads
    pool; a transformer's tokens also ``"cls"`` or ``"cls_avg"``, see
    :class:`kerastl.heads.TokenPooling`; other 3-D outputs are flattened);
    ``pooling=None`` keeps them.
    The model is built once per backbone, layers and pooling and reused, so
    repeated extractions reuse its compiled ``predict`` function.
    """
    if pooling not in POOLINGS:
        raise KerastlError(f"pooling={pooling!r}: expected one of "
                           f"'avg', 'max', 'flatten', 'cls', 'cls_avg' (a "
                           f"transformer's tokens) or None.")
    model = keras_model_of(backbone)
    names = _layer_names(layers)
    built = _FEATURE_MODELS.setdefault(model, {})
    key = (None if names is None else tuple(names), pooling)
    if key not in built:
        built[key] = _build_feature_model(backbone, model, names, pooling)
    return built[key]


def _build_feature_model(backbone, model, names, pooling):
    if names is None:
        outputs = {"output": _pool(model_output(model), pooling, "output",
                                   model)}
    else:
        outputs = {n: _pool(_endpoint_tensor(backbone, model, n), pooling, n,
                            model)
                   for n in names}
    return keras.Model(model_input(model), outputs,
                       name=f"{model.name}_features")


# -- which data ---------------------------------------------------------------

class _Data:
    """Data normalised to a batched ``tf.data.Dataset`` of images.

    Attributes: ``images`` (batched dataset of image batches), ``labels``
    (a callable returning the labels or None), ``fingerprint`` (a callable).
    """

    def __init__(self, images, labels, fingerprint, paired=None,
                 stable=None, array=None):
        self.images = images
        # The images as one array, when they are one (small ones run
        # through the model straight from it).
        self.array = array
        # A callable that raises unless two passes give the same elements
        # in the same order (datasets); sharding needs that.
        self.stable = stable
        self._labels = labels
        self._fingerprint = fingerprint
        # A dataset may yield its elements in another order on each pass
        # (``shuffle``, ``image_dataset_from_directory``'s default): its
        # labels must come from the pass that computes the features.
        # ``paired`` yields ``{"images", "labels"}`` for that one pass.
        self.paired = paired

    def labels(self):
        return self._labels() if callable(self._labels) else self._labels

    def shard(self, index, count, batch_size):
        """Elements ``index, index + count, ...`` only (same fingerprint:
        the key of a shard is the whole data's plus the shard)."""
        import tensorflow as tf

        if self.stable is not None:
            self.stable()

        def part(ds):
            if ds is None:
                return None
            return ds.unbatch().shard(count, index).batch(
                batch_size).prefetch(tf.data.AUTOTUNE)

        def labels():
            full = self.labels()
            return None if full is None else full[index::count]

        return _Data(part(self.images), labels, self.fingerprint,
                     part(self.paired), self.stable)

    def fingerprint(self):
        if callable(self._fingerprint):
            self._fingerprint = self._fingerprint()
        return self._fingerprint


def _as_data(data, batch_size, image_size, data_key):
    import tensorflow as tf

    if isinstance(data, (str, os.PathLike)):
        return _folder_data(os.fspath(data), batch_size, image_size, data_key)
    if isinstance(data, tf.data.Dataset):
        return _dataset_data(data, batch_size, data_key)
    labels = None
    if isinstance(data, tuple):
        if len(data) != 2:
            raise KerastlError(
                "Expected images, an (images, labels) tuple, a "
                "tf.data.Dataset or an image folder; got a tuple of "
                f"{len(data)} items.")
        data, labels = data
        labels = np.asarray(labels)
    x = np.asarray(data)
    if x.ndim != 4:
        raise KerastlError(
            f"Images must be a 4-D array (n, height, width, channels); got "
            f"shape {x.shape}.")
    if labels is not None and len(labels) != len(x):
        raise KerastlError(f"{len(x)} images but {len(labels)} labels.")

    def fingerprint():
        if data_key is not None:
            return f"key:{data_key}"
        h = hashlib.blake2b(digest_size=20)
        hash_array(h, x)
        if labels is not None:
            hash_array(h, labels)
        return h.hexdigest()

    images = tf.data.Dataset.from_tensor_slices(x).batch(batch_size)
    return _Data(images.prefetch(tf.data.AUTOTUNE), labels, fingerprint,
                 array=x)


def _folder_data(directory, batch_size, image_size, data_key):
    import tensorflow as tf

    if not os.path.isdir(directory):
        raise KerastlError(f"Image folder {directory!r} does not exist.")
    if image_size is None:
        raise KerastlError(
            "The model takes images of any size; an image folder needs a "
            "fixed size. Pass image_size=(height, width).")
    classes = sorted(d for d in os.listdir(directory)
                     if os.path.isdir(os.path.join(directory, d)))
    try:
        ds = keras.utils.image_dataset_from_directory(
            directory, labels="inferred" if classes else None,
            label_mode="int", image_size=tuple(image_size),
            batch_size=batch_size, shuffle=False, verbose=False)
    except ValueError as e:
        raise KerastlError(f"No images in {directory!r}: {e}") from None
    # Keras's own index of the folder: the same files, in the same order,
    # for the labels and the fingerprint (no second pass over the pixels).
    files = list(ds.file_paths)
    images = ds.map(lambda x, *y: x) if classes else ds

    def labels():
        if not classes:
            return None
        return _path_labels(files, directory, ds.class_names)

    def fingerprint():
        if data_key is not None:
            return f"key:{data_key}"
        h = hashlib.blake2b(digest_size=20)
        h.update(repr(tuple(image_size)).encode())
        # (the label of each file is its class's index among every class
        # folder, an empty one included)
        h.update(repr(tuple(ds.class_names) if classes else ()).encode())
        for f in files:
            st = os.stat(f)
            h.update(f"{os.path.relpath(f, directory)}|{st.st_size}|"
                     f"{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    return _Data(images.prefetch(tf.data.AUTOTUNE), labels, fingerprint)


def _dataset_data(ds, batch_size, data_key):
    import tensorflow as tf

    spec = ds.element_spec
    first = spec[0] if isinstance(spec, tuple) else spec
    if first.shape.rank == 3:
        ds = ds.batch(batch_size)
    elif first.shape.rank != 4:
        raise KerastlError(
            f"The dataset yields images of shape {first.shape}; expected "
            "(height, width, channels) or batches of them, optionally with "
            "labels: (images, labels).")
    has_labels = isinstance(spec, tuple) and len(spec) >= 2
    images = ds.map(lambda x, *y: x) if has_labels else ds
    state = {}

    def scan():
        # One pass: hash what the dataset yields and keep the labels. Far
        # cheaper than the forward pass it lets the cache skip.
        h = hashlib.blake2b(digest_size=20)
        ys = []
        for element in ds.as_numpy_iterator():
            if has_labels:
                hash_array(h, element[0])
                hash_array(h, element[1])
                ys.append(np.asarray(element[1]))
            else:
                hash_array(h, element)
        state["labels"] = np.concatenate(ys) if ys else None
        return h.hexdigest()

    def labels():
        if not has_labels:
            return None
        if "labels" not in state:
            state["labels"] = np.concatenate(
                [np.asarray(y) for y in ds.map(lambda x, y, *r: y)
                 .as_numpy_iterator()])
        return state["labels"]

    def fingerprint():
        return f"key:{data_key}" if data_key is not None else scan()

    def stable():
        passes = [[np.asarray(b) for b in images.take(2).as_numpy_iterator()]
                  for _ in range(2)]
        if len(passes[0]) != len(passes[1]) or not all(
                np.array_equal(a, b) for a, b in zip(*passes)):
            raise KerastlError(
                "shard=(index, count) of a dataset that yields its elements "
                "in another order on every pass (shuffle() reshuffles each "
                "iteration by default, and so does "
                "image_dataset_from_directory): each worker would draw its "
                "part from another order, so parts would overlap and miss "
                "elements. Shard before shuffling, or shuffle once "
                "(reshuffle_each_iteration=False, or shuffle=False).")

    paired = None
    if has_labels:
        paired = ds.map(lambda x, y, *r: ({"images": x, "labels": y},))
        paired = paired.prefetch(tf.data.AUTOTUNE)
    return _Data(images.prefetch(tf.data.AUTOTUNE), labels, fingerprint,
                 paired, stable)


# -- a labelled subset --------------------------------------------------------

def _folder_files(directory):
    """``(files, labels, class names)`` of an image folder in Keras's
    order, without decoding any image (``image_dataset_from_directory``
    indexes lazily)."""
    ds = keras.utils.image_dataset_from_directory(
        directory, labels="inferred", label_mode="int", image_size=(8, 8),
        batch_size=None, shuffle=False, verbose=False)
    files = list(ds.file_paths)
    return (files, _path_labels(files, directory, ds.class_names),
            list(ds.class_names))


def _path_labels(files, directory, class_names):
    """The label of each file of an image folder: the index of its class
    subfolder among Keras's ``class_names``."""
    index = {c: i for i, c in enumerate(class_names)}
    return np.array([index[os.path.relpath(f, directory).split(os.sep)[0]]
                     for f in files], dtype="int64")


def data_labels(data):
    """The labels of labelled data, as :func:`extract_features` reads it:
    ``(images, labels)`` arrays, an image folder (class subfolders: no
    image is decoded) or a dataset of ``(images, labels)`` (one pass over
    it). None for data without labels."""
    import tensorflow as tf

    if isinstance(data, (str, os.PathLike)):
        directory = os.fspath(data)
        if not os.path.isdir(directory):
            raise KerastlError(f"Image folder {directory!r} does not exist.")
        if not any(os.path.isdir(os.path.join(directory, d))
                   for d in os.listdir(directory)):
            return None  # images without class subfolders: no labels
        try:
            return _folder_files(directory)[1]
        except ValueError as e:
            raise KerastlError(f"No images in {directory!r}: {e}") from None
    if isinstance(data, tf.data.Dataset):
        return _dataset_data(data, 64, None).labels()
    if isinstance(data, tuple) and len(data) == 2:
        return np.asarray(data[1])
    return None


@contextlib.contextmanager
def labelled_subset(data, indices):
    """Yields ``data`` cut to the examples at ``indices`` (in their order in
    the data), for :func:`extract_features`: arrays for arrays and for a
    dataset (its elements at those positions in one pass, kept in memory:
    every model then scores the same images, even of a dataset that
    reshuffles on each pass), or, for an image folder, a temporary folder
    of links to the chosen files with every class subfolder (removed on
    exit; copies where links are not allowed), so each model still reads
    them at its own input size. ``indices=None``: the data as it is."""
    import tensorflow as tf

    if indices is None:
        yield data
        return
    indices = np.sort(np.asarray(indices, dtype="int64"))
    if isinstance(data, (str, os.PathLike)):
        directory = os.fspath(data)
        files, _, classes = _folder_files(directory)
        with tempfile.TemporaryDirectory(prefix="kerastl_subset_") as tmp:
            for cls in classes:  # every class keeps its label index
                os.makedirs(os.path.join(tmp, cls))
            for i in indices:
                rel = os.path.relpath(files[i], directory)
                # (a position prefix: files of the same name in nested
                # folders of a class stay apart)
                link = os.path.join(tmp, rel.split(os.sep)[0],
                                    f"{i:08d}_{os.path.basename(rel)}")
                try:
                    os.symlink(os.path.abspath(files[i]), link)
                except OSError:  # (Windows without the symlink right)
                    shutil.copyfile(files[i], link)
            yield tmp
        return
    if isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        first = spec[0] if isinstance(spec, tuple) else spec
        flat = data.unbatch() if first.shape.rank == 4 else data
        count = int(indices.max()) + 1
        mask = np.zeros(count, bool)
        mask[indices] = True
        mask = tf.constant(mask)
        chosen = flat.take(count).enumerate().filter(
            lambda i, element: tf.gather(mask, i)).map(
            lambda i, element: element)
        parts = list(chosen.batch(256).as_numpy_iterator())
        if isinstance(spec, tuple):
            yield tuple(np.concatenate([p[k] for p in parts])
                        for k in range(len(spec)))[:2]
        else:
            yield np.concatenate(parts)
        return
    if isinstance(data, tuple):
        yield tuple(np.asarray(a)[indices] for a in data)
        return
    yield np.asarray(data)[indices]


# -- extraction ---------------------------------------------------------------

@_private.quiet_retracing()
def extract_features(backbone, data, layers=None, pooling="avg",
                     batch_size=64, cache=None, dtype="float32",
                     as_dict=False, return_labels=False, image_size=None,
                     data_key=None, verbose="auto", shard=None):
    """Features of a backbone (or any Keras model) for a whole dataset.

    One ``predict`` pass over a batched, prefetched ``tf.data`` pipeline
    (no Python loop over images), with Keras's progress bar; data of at
    most 8 batches runs eagerly instead (no function to trace: seconds
    saved per model on small data, which :func:`rank_backbones` scores many
    models on).

    Args:
        backbone: a :class:`~kerastl.Backbone` or ``keras.Model``. Kerastl
            backbones take raw RGB pixels in [0, 255].
        data: images (a 4-D array), ``(images, labels)``, a
            ``tf.data.Dataset`` of images or ``(images, labels)`` (batched or
            not), or an image folder (class subfolders give the labels).
        layers: ``None`` (the model's output), or a block name, a config
            endpoint (``"stride16"``), a layer name, or a list of them.
        pooling: ``"avg"`` or ``"max"`` over space for 4-D outputs; for a
            transformer's tokens ``(batch, tokens, dim)`` also ``"cls"`` and
            ``"cls_avg"`` (see :class:`kerastl.heads.TokenPooling`);
            ``"flatten"`` flattens; ``None`` keeps them.
        batch_size: for arrays and unbatched datasets.
        cache: a :class:`FeatureCache` or a folder: computed once, read back
            on later calls with the same model, weights, layers, pooling,
            input size, dtype and data.
        dtype: ``"float32"`` or ``"float16"`` (half the disk and memory).
        as_dict: return ``{layer: features}`` instead of one array with the
            layers' features concatenated in the given order.
        return_labels: also return the labels (None if the data has none).
        image_size: ``(height, width)`` images from a folder are resized to;
            default: the model's input size.
        data_key: a string that identifies the data, used in the cache key
            instead of hashing the data (for a ``tf.data.Dataset`` hashing
            costs one pass over the data, without the model).
        verbose: Keras ``predict`` verbosity.
        shard: ``(index, count)``: this worker's part of the data, elements
            ``index, index + count, ...`` (any number of workers, each with
            its own index), written into ``cache`` (required) as its own
            entry. Once every part is there, a call without ``shard`` (on
            any worker or machine sharing the cache folder) reads them back
            as one array in the original order. Writers never share an
            entry, and an entry appears only complete.

    Returns:
        ``features`` (``(n, d)`` after pooling), or ``(features, labels)``;
        with ``shard``, this part's.

    Example::

        x = kerastl.extract_features(backbone, images, layers=["stage3",
                                     "stage4"], cache="feature_cache")
    """
    if dtype not in ("float32", "float16"):
        raise KerastlError(f"dtype={dtype!r}: expected 'float32' or "
                           "'float16'.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise KerastlError(f"batch_size={batch_size!r}: expected an int >= 1.")
    model = keras_model_of(backbone)
    fmodel = feature_model(backbone, layers, pooling)
    names = list(fmodel.output.keys()) if isinstance(fmodel.output, dict) \
        else ["output"]
    if image_size is None:
        image_size = tuple(model_input(model).shape[1:3])
        image_size = None if None in image_size else image_size
    index, count = _check_shard(shard, cache)
    prepared = _as_data(data, batch_size, image_size, data_key)
    cache = as_cache(cache)
    key = parts = None
    if cache is not None:
        parts = {
            "model": model_fingerprint(model),
            # (None: the backbone's feature output, which the feature
            # model also calls "output", as a layer could be called)
            "layers": _layer_names(layers),
            "pooling": pooling, "dtype": dtype,
            "preprocessing": getattr(backbone, "preprocessing", None),
            "input_shape": list(model_input(model).shape[1:]),
            "image_size": list(image_size) if image_size else None,
            "data": prepared.fingerprint(), "labels": bool(return_labels),
        }
        if count is not None:
            parts = dict(parts, shard=[index, count])
            prepared = prepared.shard(index, count, batch_size)
        key = cache.key(parts)
        stored = cache.load(key, parts)
        if stored is None and count is None:
            stored = _gathered_shards(cache, parts)
        if stored is not None:
            cache.hits += 1
            features = {n: stored[f"features/{n}"] for n in names}
            return _result(features, stored.get("labels"), names, as_dict,
                           return_labels)
        cache.misses += 1
    if return_labels and prepared.paired is not None:
        # One pass gives the features and their labels together.
        out = _predict(_with_labels(fmodel, prepared.paired),
                       prepared.paired, verbose)
        labels = np.asarray(out.pop(_LABELS))
    else:
        out = _predict(fmodel, prepared.images, verbose,
                       array=prepared.array, batch_size=batch_size)
        labels = prepared.labels() if return_labels else None
    if not isinstance(out, dict):
        out = {names[0]: out}
    features = {n: np.asarray(out[n]).astype(dtype, copy=False)
                for n in names}
    for n in names:
        check_finite(features[n], f"extract_features: the features of {n!r}")
    if cache is not None:
        arrays = {f"features/{n}": features[n] for n in names}
        if labels is not None:
            arrays["labels"] = np.asarray(labels)
        cache.save(key, arrays, parts)
    return _result(features, labels, names, as_dict, return_labels)


_LABELS = "__kerastl_labels__"

# Data of at most this many batches runs through the model eagerly, batch
# by batch: ``predict`` traces its function once for the full batches and
# again for a smaller last one, which for a small dataset costs more than
# the forward passes (MobileNetV2 at 32x32, 100 images, 2 CPU cores:
# 5.2 s by predict, 0.9 s eagerly; the features equal to 1e-17).
EAGER_BATCHES = 8


def _predict(model, ds, verbose, array=None, batch_size=None):
    """``model.predict(ds)``, or the same outputs computed eagerly when
    ``ds`` has at most :data:`EAGER_BATCHES` batches (sliced straight from
    ``array`` when the images are one: no pipeline to start)."""
    import tensorflow as tf

    batches = int(ds.cardinality())
    if not 0 < batches <= EAGER_BATCHES or tf.distribute.has_strategy():
        # (under a tf.distribute strategy predict spreads the batches)
        return model.predict(ds, verbose=verbose)
    if array is not None:
        ds = (array[i:i + batch_size]
              for i in range(0, len(array), batch_size))
    outputs = []
    for element in ds:
        if isinstance(element, tuple):  # (x,) as predict unpacks it
            element = element[0]
        x = keras.tree.map_structure(np.asarray, element)
        outputs.append(keras.tree.map_structure(
            keras.ops.convert_to_numpy, model(x, training=False)))
    return keras.tree.map_structure(lambda *parts: np.concatenate(parts),
                                    *outputs)


# The most workers a sharded extraction may have (readers look for the
# parts of up to this many).
MAX_SHARDS = 4096


def _check_shard(shard, cache):
    if shard is None:
        return None, None
    if cache is None:
        raise KerastlError(
            "shard=(index, count) writes this worker's part into the "
            "feature cache: pass cache= (a folder all workers share).")
    try:
        index, count = shard
    except (TypeError, ValueError):
        raise KerastlError(f"shard={shard!r}: expected (index, count), e.g. "
                           "(0, 4) for the first of 4 workers.") from None
    ok = all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
             for v in (index, count))
    if not ok or not 1 <= count <= MAX_SHARDS or not 0 <= index < count:
        raise KerastlError(
            f"shard={shard!r}: expected (index, count) with 0 <= index < "
            f"count <= {MAX_SHARDS}.")
    return int(index), int(count)


def _gathered_shards(cache, parts):
    """The whole data's arrays from complete shard entries, or None.

    Shard ``i`` of ``n`` holds rows ``i, i + n, ...``; they are interleaved
    back into the original order.
    """
    if not os.path.isdir(cache.directory):
        return None
    present = set(os.listdir(cache.directory))  # one listing, then hashes
    pieces = None
    for count in range(1, MAX_SHARDS + 1):
        keys = [cache.key(dict(parts, shard=[0, count]))]
        if keys[0] not in present:
            continue
        keys += [cache.key(dict(parts, shard=[i, count]))
                 for i in range(1, count)]
        if not all(k in present for k in keys):
            continue  # an incomplete set (a run still going, or aborted)
        pieces = []
        for index, key in enumerate(keys):
            piece = cache.load(key, dict(parts, shard=[index, count]))
            if piece is None:
                break
            pieces.append(piece)
        if len(pieces) == count:
            break
        pieces = None
    if pieces is None:
        return None
    total = sum(len(next(iter(p.values()))) for p in pieces)
    out = {}
    for name in pieces[0]:
        first = pieces[0][name]
        whole = np.empty((total,) + first.shape[1:], first.dtype)
        for index, piece in enumerate(pieces):
            whole[index::count] = piece[name]
        out[name] = whole
    return out


def _with_labels(fmodel, paired):
    """``fmodel`` with the labels passed through as one more output."""
    spec = paired.element_spec[0]["labels"]
    images = keras.Input(fmodel.input.shape[1:], name="images")
    labels = keras.Input(spec.shape[1:], dtype=spec.dtype.name,
                         name="labels")
    out = dict(fmodel(images))
    out[_LABELS] = keras.layers.Identity(name="labels_through")(labels)
    return keras.Model({"images": images, "labels": labels}, out,
                       name=f"{fmodel.name}_with_labels")


def _result(features, labels, names, as_dict, return_labels):
    if as_dict:
        out = dict(features)
    elif len(names) == 1:
        out = features[names[0]]
    else:
        out = _concat_flat([features[n] for n in names])
    return (out, labels) if return_labels else out


# -- flat feature matrices ---------------------------------------------------

def _concat_flat(arrays):
    """Arrays with a common first axis, flattened and joined (dtype kept)."""
    return np.concatenate([np.reshape(a, (len(a), -1)) for a in arrays],
                          axis=1)


def check_finite(features, what):
    """Refuses features with NaN or infinite values, naming the rows."""
    a = np.asarray(features)
    if a.dtype.kind != "f" or not a.size:
        return
    bad = ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise KerastlError(
            f"{what}: {len(rows)} of {len(a)} rows hold NaN or infinite "
            f"values (rows {', '.join(map(str, rows[:5]))}"
            f"{', ...' if len(rows) > 5 else ''}). Check those images (NaN "
            "pixels?) or drop the rows.")


def flat_features(x):
    """Features as one float32 ``(n, d)`` matrix: a dict of layers is
    joined in order, more dimensions are flattened."""
    if isinstance(x, dict):
        x = _concat_flat(list(x.values()))
    x = np.asarray(x, dtype="float32")
    if x.ndim != 2:
        x = x.reshape(len(x), -1)
    return x
