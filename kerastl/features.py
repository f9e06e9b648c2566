"""Off-the-shelf features: extraction, an on-disk cache, linear probes.

Razavian et al. (2014): the activations of a pretrained network, fed to a
shallow classifier, are a strong baseline. :func:`extract_features` computes
them for arrays, a ``tf.data.Dataset`` or an image folder in one batched,
prefetched ``predict`` pass; :class:`FeatureCache` keeps them on disk so the
backbone runs once, not once per experiment; :class:`LinearProbe` trains a
softmax (Keras) or linear-SVM (scikit-learn) classifier on them.
"""

import hashlib
import json
import os
import shutil
import warnings
import weakref

import keras
import numpy as np

from kerastl.atomic import atomic_folder
from kerastl.errors import KerastlError
from kerastl.freezing import keras_model_of

POOLINGS = ("avg", "max", None)
FORMAT_VERSION = 1


# -- which outputs ------------------------------------------------------------

def _layer_names(layers):
    if layers is None:
        return None
    if isinstance(layers, str):
        return [layers]
    layers = list(layers)
    if not layers or not all(isinstance(l, str) for l in layers):
        raise KerastlError(
            f"layers={layers!r}: expected a block/endpoint/layer name or a "
            "non-empty list of them.")
    return layers


def _endpoint_tensor(backbone, model, name):
    """The output tensor for a block, a config endpoint or a layer name."""
    from kerastl.blocks import block_map

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


def _pool(tensor, pooling, name):
    from kerastl.heads import pooling_layer

    if len(tensor.shape) == 4 and pooling is not None:
        return pooling_layer(pooling, f"kerastl_{pooling}_pool_{name}")(
            tensor)
    if len(tensor.shape) > 2 and pooling is not None:
        return keras.layers.Flatten(name=f"kerastl_flatten_{name}")(tensor)
    return tensor


_FEATURE_MODELS = weakref.WeakKeyDictionary()


def feature_model(backbone, layers=None, pooling="avg"):
    """A ``keras.Model`` from the images to the features (a dict by layer).

    ``layers=None`` takes the model's output. Spatial outputs are pooled
    (``"avg"`` or ``"max"``) inside the model; ``pooling=None`` keeps them.
    The model is built once per backbone, layers and pooling and reused, so
    repeated extractions reuse its compiled ``predict`` function.
    """
    if pooling not in POOLINGS:
        raise KerastlError(f"pooling={pooling!r}: expected one of "
                           f"'avg', 'max' or None.")
    model = keras_model_of(backbone)
    names = _layer_names(layers)
    built = _FEATURE_MODELS.setdefault(model, {})
    key = (None if names is None else tuple(names), pooling)
    if key not in built:
        built[key] = _build_feature_model(backbone, model, names, pooling)
    return built[key]


def _build_feature_model(backbone, model, names, pooling):
    if names is None:
        outputs = {"output": _pool(model.output, pooling, "output")}
    else:
        outputs = {n: _pool(_endpoint_tensor(backbone, model, n), pooling, n)
                   for n in names}
    return keras.Model(model.input, outputs, name=f"{model.name}_features")


# -- which data ---------------------------------------------------------------

class _Data:
    """Data normalised to a batched ``tf.data.Dataset`` of images.

    Attributes: ``images`` (batched dataset of image batches), ``labels``
    (a callable returning the labels or None), ``fingerprint`` (a callable).
    """

    def __init__(self, images, labels, fingerprint):
        self.images = images
        self._labels = labels
        self._fingerprint = fingerprint

    def labels(self):
        return self._labels() if callable(self._labels) else self._labels

    def fingerprint(self):
        if callable(self._fingerprint):
            self._fingerprint = self._fingerprint()
        return self._fingerprint


def _hash_array(h, a):
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))


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
        _hash_array(h, x)
        if labels is not None:
            _hash_array(h, labels)
        return h.hexdigest()

    images = tf.data.Dataset.from_tensor_slices(x).batch(batch_size)
    return _Data(images.prefetch(tf.data.AUTOTUNE), labels, fingerprint)


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
        index = {c: i for i, c in enumerate(ds.class_names)}
        return np.array([index[os.path.relpath(f, directory).split(os.sep)[0]]
                         for f in files], dtype="int64")

    def fingerprint():
        if data_key is not None:
            return f"key:{data_key}"
        h = hashlib.blake2b(digest_size=20)
        h.update(repr(tuple(image_size)).encode())
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
                _hash_array(h, element[0])
                _hash_array(h, element[1])
                ys.append(np.asarray(element[1]))
            else:
                _hash_array(h, element)
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

    return _Data(images.prefetch(tf.data.AUTOTUNE), labels, fingerprint)


# -- the cache ------------------------------------------------------------------

def model_fingerprint(model):
    """A hash of a model's architecture and every weight's value.

    Covers non-trainable weights too (BatchNorm statistics): anything that
    can change what the model computes.
    """
    h = hashlib.blake2b(digest_size=20)
    config = keras.saving.serialize_keras_object(model)
    h.update(json.dumps(config, sort_keys=True, default=repr).encode())
    for v in model.weights:
        h.update(v.path.encode())
        _hash_array(h, keras.ops.convert_to_numpy(v))
    return h.hexdigest()


class FeatureCache:
    """Features on disk, computed once and reused.

    One folder per entry, named by a hash of everything that changes the
    features: the model (architecture and every weight value), the layers,
    the pooling, the preprocessing, the input size, the dtype and a
    fingerprint of the data. Change any of them and the key changes, so a
    stale entry is never returned. Entries are plain ``.npy`` files (no
    pickle; ``mmap=True`` memory-maps them) with a ``meta.json`` that lists
    their sizes. An entry is written in a temporary folder and renamed into
    place, so a crash mid-write leaves nothing that loads as valid; an entry
    that does not match its ``meta.json`` (a truncated file) is discarded
    and recomputed.

    Args:
        directory: where the entries live (created on first write).
        mmap: load entries memory-mapped (read-only) instead of into memory.

    Example:

    >>> cache = kerastl.FeatureCache("~/.cache/kerastl/features")
    >>> x = kerastl.extract_features(backbone, images, cache=cache)  # runs
    >>> x = kerastl.extract_features(backbone, images, cache=cache)  # reads
    """

    def __init__(self, directory, mmap=False):
        self.directory = os.path.abspath(os.path.expanduser(
            os.fspath(directory)))
        self.mmap = bool(mmap)
        self.hits = 0
        self.misses = 0

    def __repr__(self):
        return (f"<FeatureCache {self.directory}: {len(self.entries())} "
                f"entries>")

    @staticmethod
    def key(parts):
        """The entry name for a dict of key parts (JSON-able)."""
        blob = json.dumps(dict(parts, format=FORMAT_VERSION), sort_keys=True,
                          default=repr)
        return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()

    def path(self, key):
        return os.path.join(self.directory, key)

    def entries(self):
        """Names of the complete entries on disk."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(e for e in os.listdir(self.directory)
                      if not e.startswith(".") and os.path.isfile(
                          os.path.join(self.directory, e, "meta.json")))

    def clear(self):
        """Deletes every entry."""
        if os.path.isdir(self.directory):
            shutil.rmtree(self.directory)

    def load(self, key):
        """The arrays of an entry (dict), or None if absent or damaged."""
        folder = self.path(key)
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.isfile(meta_path):
            return None
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            arrays = {}
            for name, info in meta["arrays"].items():
                file = os.path.join(folder, info["file"])
                if os.path.getsize(file) != info["bytes"]:
                    raise ValueError(f"{info['file']} has "
                                     f"{os.path.getsize(file)} bytes, "
                                     f"expected {info['bytes']}")
                a = np.load(file, mmap_mode="r" if self.mmap else None,
                            allow_pickle=False)
                if list(a.shape) != info["shape"] or a.dtype.str != \
                        info["dtype"]:
                    raise ValueError(f"{info['file']} is {a.dtype}{a.shape}, "
                                     f"expected {info['dtype']}{info['shape']}")
                arrays[name] = a
        except (OSError, ValueError, KeyError, TypeError) as e:
            warnings.warn(f"kerastl: discarding damaged feature-cache entry "
                          f"{folder} ({e}); recomputing.", stacklevel=3)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return arrays

    def save(self, key, arrays, parts=None):
        """Writes an entry atomically: a temporary folder, then a rename.

        An entry already there (damaged, or written by a racer) is replaced
        only once the new one is complete.
        """
        with atomic_folder(self.path(key)) as tmp:
            meta = {"arrays": {}, "key": parts or {}, "format": FORMAT_VERSION}
            for i, (name, a) in enumerate(arrays.items()):
                file = f"{i}.npy"
                full = os.path.join(tmp, file)
                with open(full, "wb") as f:
                    np.save(f, np.ascontiguousarray(a), allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())
                meta["arrays"][name] = {
                    "file": file, "bytes": os.path.getsize(full),
                    "shape": list(a.shape), "dtype": a.dtype.str}
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, indent=1, default=repr)
                f.flush()
                os.fsync(f.fileno())


def _as_cache(cache):
    if cache is None or isinstance(cache, FeatureCache):
        return cache
    if isinstance(cache, (str, os.PathLike)):
        return FeatureCache(cache)
    raise KerastlError(f"cache={cache!r}: expected a folder path or a "
                       "kerastl.FeatureCache.")


# -- extraction ---------------------------------------------------------------

def extract_features(backbone, data, layers=None, pooling="avg",
                     batch_size=64, cache=None, dtype="float32",
                     as_dict=False, return_labels=False, image_size=None,
                     data_key=None, verbose="auto"):
    """Features of a backbone (or any Keras model) for a whole dataset.

    One ``predict`` pass over a batched, prefetched ``tf.data`` pipeline
    (no Python loop over images), with Keras's progress bar.

    Args:
        backbone: a :class:`~kerastl.Backbone` or ``keras.Model``. Kerastl
            backbones take raw RGB pixels in [0, 255].
        data: images (a 4-D array), ``(images, labels)``, a
            ``tf.data.Dataset`` of images or ``(images, labels)`` (batched or
            not), or an image folder (class subfolders give the labels).
        layers: ``None`` (the model's output), or a block name, a config
            endpoint (``"stride16"``), a layer name, or a list of them.
        pooling: ``"avg"`` or ``"max"`` over space for 4-D outputs (other
            multi-dimensional outputs are flattened); ``None`` keeps them.
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

    Returns:
        ``features`` (``(n, d)`` after pooling), or ``(features, labels)``.

    Example:

    >>> x = kerastl.extract_features(backbone, images, layers=["stage3",
    ...                              "stage4"], cache="feature_cache")
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
        image_size = tuple(model.input.shape[1:3])
        image_size = None if None in image_size else image_size
    prepared = _as_data(data, batch_size, image_size, data_key)
    cache = _as_cache(cache)
    key = parts = None
    if cache is not None:
        parts = {
            "model": model_fingerprint(model),
            "layers": names, "pooling": pooling, "dtype": dtype,
            "preprocessing": getattr(backbone, "preprocessing", None),
            "input_shape": list(model.input.shape[1:]),
            "image_size": list(image_size) if image_size else None,
            "data": prepared.fingerprint(), "labels": bool(return_labels),
        }
        key = cache.key(parts)
        stored = cache.load(key)
        if stored is not None:
            cache.hits += 1
            features = {n: stored[f"features/{n}"] for n in names}
            return _result(features, stored.get("labels"), names, as_dict,
                           return_labels)
        cache.misses += 1
    out = fmodel.predict(prepared.images, verbose=verbose)
    if not isinstance(out, dict):
        out = {names[0]: out}
    features = {n: np.asarray(out[n]).astype(dtype, copy=False)
                for n in names}
    labels = prepared.labels() if return_labels else None
    if cache is not None:
        arrays = {f"features/{n}": features[n] for n in names}
        if labels is not None:
            arrays["labels"] = np.asarray(labels)
        cache.save(key, arrays, parts)
    return _result(features, labels, names, as_dict, return_labels)


def _result(features, labels, names, as_dict, return_labels):
    if as_dict:
        out = dict(features)
    elif len(names) == 1:
        out = features[names[0]]
    else:
        out = _concat_flat([features[n] for n in names])
    return (out, labels) if return_labels else out


# -- shallow classifiers -------------------------------------------------------

def _concat_flat(arrays):
    """Arrays with a common first axis, flattened and joined (dtype kept)."""
    return np.concatenate([np.reshape(a, (len(a), -1)) for a in arrays],
                          axis=1)


def flat_features(x):
    """Features as one float32 ``(n, d)`` matrix: a dict of layers is
    joined in order, more dimensions are flattened."""
    if isinstance(x, dict):
        x = _concat_flat(list(x.values()))
    x = np.asarray(x, dtype="float32")
    if x.ndim != 2:
        x = x.reshape(len(x), -1)
    return x


class LinearProbe:
    """A linear classifier on fixed features (off-the-shelf transfer).

    ``kind="softmax"``: a standardising ``Normalization`` layer and one
    softmax ``Dense`` layer with L2 weight decay, trained with Keras (Adam)
    on the features: multinomial logistic regression. ``kind="svm"``: a
    standardised linear SVM from scikit-learn (``pip install
    kerastl[data]``), as in Razavian et al. (2014).

    Labels can be any values (ints, strings); :attr:`classes_` holds them.

    Args:
        kind: ``"softmax"`` or ``"svm"``.
        l2: L2 penalty on the softmax weights.
        C: the SVM's inverse regularisation strength.
        epochs, batch_size, learning_rate: softmax training.
        verbose: Keras ``fit`` verbosity.

    Example:

    >>> probe = kerastl.LinearProbe().fit(train_features, train_labels)
    >>> probe.score(test_features, test_labels)
    """

    KINDS = ("softmax", "svm")

    def __init__(self, kind="softmax", l2=1e-4, C=1.0, epochs=100,
                 batch_size=128, learning_rate=1e-2, verbose=0):
        if kind not in self.KINDS:
            raise KerastlError(f"kind={kind!r}: expected 'softmax' or 'svm'.")
        self.kind = kind
        self.l2 = float(l2)
        self.C = float(C)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.learning_rate = float(learning_rate)
        self.verbose = verbose
        self.model = None
        self.classes_ = None
        self.history = None

    def build_model(self, dim, num_classes, mean=None, variance=None):
        """The softmax probe as a ``keras.Model`` on ``dim`` features."""
        inputs = keras.Input((dim,), name="features")
        norm = keras.layers.Normalization(mean=mean, variance=variance,
                                          name="standardize")
        outputs = keras.layers.Dense(
            num_classes, activation="softmax",
            kernel_regularizer=keras.regularizers.L2(self.l2),
            name="probe")(norm(inputs))
        return keras.Model(inputs, outputs, name="linear_probe")

    def _encode(self, y):
        # classes_ comes from np.unique: sorted, so a binary search encodes.
        y = np.asarray(y)
        codes = np.minimum(np.searchsorted(self.classes_, y),
                           len(self.classes_) - 1)
        unseen = self.classes_[codes] != y
        if unseen.any():
            raise KerastlError(f"Label {y[unseen][0]!r} was not seen in fit "
                               f"(classes: {self.classes_.tolist()}).")
        return codes.astype("int64")

    def fit(self, x, y, validation_data=None):
        """Trains on features ``x`` (array or dict) and labels ``y``."""
        x = flat_features(x)
        y = np.asarray(y)
        if len(x) != len(y):
            raise KerastlError(f"{len(x)} feature rows but {len(y)} labels.")
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise KerastlError("A probe needs at least two classes in y.")
        yi = self._encode(y)
        if self.kind == "svm":
            self.model = _svm(self.C)
            self.model.fit(x, yi)
            return self
        mean = x.mean(axis=0)
        variance = x.var(axis=0) + 1e-6
        self.model = self.build_model(x.shape[1], len(self.classes_),
                                      mean, variance)
        self.model.compile(keras.optimizers.Adam(self.learning_rate),
                           "sparse_categorical_crossentropy",
                           metrics=["accuracy"])
        val = None
        if validation_data is not None:
            vx, vy = validation_data
            val = (flat_features(vx), self._encode(vy))
        self.history = self.model.fit(
            x, yi, batch_size=self.batch_size, epochs=self.epochs,
            validation_data=val, verbose=self.verbose)
        return self

    def _check_fitted(self):
        if self.model is None:
            raise KerastlError("The probe is not fitted yet: call fit().")

    def decision_function(self, x):
        """Class scores: probabilities (softmax) or margins (SVM)."""
        self._check_fitted()
        x = flat_features(x)
        if self.kind == "svm":
            scores = self.model.decision_function(x)
            if scores.ndim == 1:  # binary
                scores = np.stack([-scores, scores], axis=1)
            return scores
        return self.model.predict(x, batch_size=1024, verbose=0)

    def predict_proba(self, x):
        """Class probabilities (softmax probes only)."""
        if self.kind != "softmax":
            raise KerastlError("predict_proba needs kind='softmax'; an SVM "
                               "gives margins: decision_function().")
        return self.decision_function(x)

    def predict(self, x):
        """Predicted labels (values of :attr:`classes_`)."""
        return self.classes_[np.argmax(self.decision_function(x), axis=1)]

    def score(self, x, y):
        """Accuracy on ``(x, y)``."""
        return float(np.mean(self.predict(x) == np.asarray(y)))


def _svm(C):
    try:
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import LinearSVC
    except ImportError:
        raise KerastlError(
            "LinearProbe(kind='svm') needs scikit-learn: pip install "
            "'kerastl[data]' (or scikit-learn), or use kind='softmax'.") \
            from None
    return make_pipeline(StandardScaler(), LinearSVC(C=C, max_iter=5000))
