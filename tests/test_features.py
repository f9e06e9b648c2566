"""Feature extraction, the on-disk feature cache and linear probes."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerastl
from kerastl.errors import KerastlError


class Counter(keras.layers.Layer):
    """Identity that counts the batches it really processes (graph or not)."""

    calls = 0

    def call(self, x):
        def bump():
            Counter.calls += 1
            return np.int32(0)

        token = tf.numpy_function(bump, [], tf.int32)
        with tf.control_dependencies([token]):
            return tf.identity(x)


def small_backbone(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, 16, 3))
    x = Counter(name="counter")(inputs)
    x = keras.layers.Rescaling(1 / 255.0)(x)
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv2")(x)
    x = keras.layers.ReLU(name="relu2")(x)
    return keras.Model(inputs, x, name="small")


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (40, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 3, 40)
    return x, y


@pytest.mark.parametrize("batch_size", [16, 4], ids=["eager", "predict"])
def test_features_match_the_model_and_pooling(arrays, batch_size,
                                              monkeypatch):
    """3 batches run eagerly, 10 through predict: the same features."""
    from kerastl.features import extract

    calls = []
    original = keras.Model.predict
    monkeypatch.setattr(keras.Model, "predict", lambda self, *a, **k: (
        calls.append(self.name), original(self, *a, **k))[1])
    x, _ = arrays
    model = small_backbone()
    f = kerastl.extract_features(model, x, batch_size=batch_size, verbose=0)
    assert bool(calls) == (len(x) / batch_size > extract.EAGER_BATCHES)
    expected = model.predict(x, verbose=0).mean(axis=(1, 2))
    np.testing.assert_allclose(f, expected, rtol=1e-5, atol=1e-6)
    fmax = kerastl.extract_features(model, x, pooling="max", verbose=0)
    np.testing.assert_allclose(fmax, model.predict(x, verbose=0)
                               .max(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    raw = kerastl.extract_features(model, x, pooling=None, verbose=0)
    assert raw.shape == (40, 8, 8, 8)


def test_several_layers_concatenated_or_as_dict(arrays):
    x, _ = arrays
    model = small_backbone()
    both = kerastl.extract_features(model, x, layers=["relu1", "relu2"],
                                    verbose=0)
    as_dict = kerastl.extract_features(model, x, layers=["relu1", "relu2"],
                                       as_dict=True, verbose=0)
    assert both.shape == (40, 4 + 8)
    assert list(as_dict) == ["relu1", "relu2"]
    np.testing.assert_array_equal(both[:, :4], as_dict["relu1"])
    np.testing.assert_array_equal(both[:, 4:], as_dict["relu2"])


def test_blocks_of_a_zoo_backbone():
    backbone = kerastl.load_backbone("mobilenet_v2", weights=None,
                                     input_shape=(32, 32, 3))
    x = np.random.default_rng(0).uniform(0, 255, (6, 32, 32, 3))
    f = kerastl.extract_features(backbone, x, layers=backbone.blocks[:2],
                                 as_dict=True, verbose=0)
    assert list(f) == backbone.blocks[:2]
    with pytest.raises(KerastlError, match="no block, endpoint or layer"):
        kerastl.extract_features(backbone, x, layers="stage99", verbose=0)


def test_datasets_folders_and_labels(arrays, tmp_path):
    x, y = arrays
    model = small_backbone()
    ref = kerastl.extract_features(model, x, verbose=0)
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    f, labels = kerastl.extract_features(model, ds, return_labels=True,
                                         verbose=0)
    np.testing.assert_allclose(f, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels, y)
    f2 = kerastl.extract_features(model, ds.batch(7).map(lambda a, b: a),
                                  verbose=0)
    np.testing.assert_allclose(f2, ref, rtol=1e-5, atol=1e-6)
    # An image folder with class subfolders: labels from the folder names.
    for c in ("cat", "dog"):
        os.makedirs(tmp_path / c)
    for i in range(6):
        keras.utils.save_img(tmp_path / ("cat" if i < 4 else "dog") /
                             f"{i}.png", x[i].astype("uint8"), scale=False)
    f, labels = kerastl.extract_features(model, str(tmp_path),
                                         return_labels=True, verbose=0)
    assert f.shape == (6, 8)
    np.testing.assert_array_equal(labels, [0, 0, 0, 0, 1, 1])
    np.testing.assert_allclose(
        f, kerastl.extract_features(model, x[:6].astype("uint8")
                                    .astype("float32"), verbose=0),
        rtol=1e-4, atol=1e-5)
    # Through the cache: an empty class folder added since shifts every
    # label (its index comes first), so it is another entry.
    cache = tmp_path.parent / (tmp_path.name + "_cache")
    kerastl.extract_features(model, str(tmp_path), return_labels=True,
                             cache=str(cache), verbose=0)
    os.makedirs(tmp_path / "ant")
    _, labels = kerastl.extract_features(model, str(tmp_path),
                                         return_labels=True,
                                         cache=str(cache), verbose=0)
    np.testing.assert_array_equal(labels, [1, 1, 1, 1, 2, 2])


def test_bad_input_is_named(arrays, tmp_path):
    model = small_backbone()
    with pytest.raises(KerastlError, match="does not exist"):
        kerastl.extract_features(model, str(tmp_path / "nope"))
    with pytest.raises(KerastlError, match="No images"):
        kerastl.extract_features(model, str(tmp_path))
    with pytest.raises(KerastlError, match="4-D"):
        kerastl.extract_features(model, np.zeros((3, 16, 16)))
    with pytest.raises(KerastlError, match="pooling"):
        kerastl.extract_features(model, arrays[0], pooling="mean")
    with pytest.raises(KerastlError, match="dtype"):
        kerastl.extract_features(model, arrays[0], dtype="int8")


# -- the cache --------------------------------------------------------------------

def cached(model, x, cache, **kw):
    before = Counter.calls
    f = kerastl.extract_features(model, x, cache=cache, batch_size=16,
                                 verbose=0, **kw)
    return f, Counter.calls - before


def test_second_call_does_no_forward_pass(arrays, tmp_path):
    x, y = arrays
    model = small_backbone()
    cache = kerastl.FeatureCache(tmp_path)
    f1, passes = cached(model, (x, y), cache, return_labels=True)
    assert passes == 3  # 40 images in batches of 16
    f2, passes = cached(model, (x, y), cache, return_labels=True)
    assert passes == 0
    np.testing.assert_array_equal(f1[0], f2[0])
    np.testing.assert_array_equal(f2[1], y)
    assert (cache.hits, cache.misses) == (1, 1)
    # Plain .npy files, no pickle, and a meta.json that records the key.
    (entry,) = cache.entries()
    files = sorted(os.listdir(tmp_path / entry))
    assert files == ["0.npy", "1.npy", "meta.json"]
    meta = json.loads((tmp_path / entry / "meta.json").read_text())
    assert meta["key"]["pooling"] == "avg"
    # A path works as cache= too, and mmap loads read-only memory maps.
    mm = kerastl.FeatureCache(tmp_path, mmap=True)
    f3, passes = cached(model, (x, y), mm, return_labels=True)
    assert passes == 0 and isinstance(f3[0], np.memmap)


@pytest.mark.parametrize("change", ["weights", "layers", "pooling", "data",
                                    "dtype", "labels"])
def test_changing_a_key_part_invalidates(arrays, tmp_path, change):
    x, y = arrays
    model = small_backbone()
    if change == "labels":  # the same data, labels asked for or not
        x = (x, y)
    cached(model, x, tmp_path)
    kwargs = {}
    if change == "weights":
        w = model.get_layer("conv2").kernel
        w.assign(w.numpy() + 1e-3)
    elif change == "layers":
        kwargs["layers"] = "relu1"
    elif change == "pooling":
        kwargs["pooling"] = "max"
    elif change == "dtype":
        kwargs["dtype"] = "float16"
    elif change == "data":
        x = x.copy()
        x[0, 0, 0, 0] += 1
    elif change == "labels":
        kwargs["return_labels"] = True
    f, passes = cached(model, x, tmp_path, **kwargs)
    assert passes == 3
    f_again, passes = cached(model, x, tmp_path, **kwargs)
    assert passes == 0
    if change == "dtype":
        assert f_again.dtype == np.float16
    if change == "labels":
        np.testing.assert_array_equal(f_again[1], y)


def test_the_feature_output_and_a_layer_called_output_are_two_entries(
        arrays, tmp_path):
    inputs = keras.Input((16, 16, 3))
    h = keras.layers.Conv2D(4, 3, name="output")(inputs)
    model = keras.Model(inputs, keras.layers.Conv2D(8, 3, name="last")(h))
    x = arrays[0][:8]
    assert kerastl.extract_features(model, x, layers="output",
                                    cache=tmp_path).shape == (8, 4)
    assert kerastl.extract_features(model, x, cache=tmp_path).shape == (8, 8)


def test_a_truncated_file_is_detected_and_recomputed(arrays, tmp_path):
    x, _ = arrays
    model = small_backbone()
    cache = kerastl.FeatureCache(tmp_path)
    good, _ = cached(model, x, cache)
    (entry,) = cache.entries()
    path = tmp_path / entry / "0.npy"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.warns(UserWarning, match="damaged"):
        again, passes = cached(model, x, cache)
    assert passes == 3
    np.testing.assert_array_equal(again, good)
    _, passes = cached(model, x, cache)
    assert passes == 0


def test_a_crash_mid_write_leaves_no_entry(arrays, tmp_path, monkeypatch):
    x, _ = arrays
    model = small_backbone()
    cache = kerastl.FeatureCache(tmp_path)
    real_save = np.save
    monkeypatch.setattr(np, "save", lambda *a, **k: (_ for _ in ()).throw(
        OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        cached(model, x, cache)
    monkeypatch.setattr(np, "save", real_save)
    assert cache.entries() == [] and os.listdir(tmp_path) == []
    _, passes = cached(model, x, cache)
    assert passes == 3


# -- probes ----------------------------------------------------------------------

def blobs(n=60, d=5, seed=0, sample_seed=None):
    """Three Gaussian classes; ``sample_seed``: other samples of the same
    classes (held-out data)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (3, d))
    if sample_seed is not None:
        rng = np.random.default_rng([seed, sample_seed])
    y = rng.integers(0, 3, n)
    return (centres[y] + rng.normal(0, 1, (n, d))).astype("float32"), y


@pytest.mark.parametrize("kind", ["softmax", "svm"])
def test_linear_probe_learns_separable_classes(kind):
    x, y = blobs()
    names = np.array(["ant", "bee", "cat"])[y]
    probe = kerastl.LinearProbe(kind, epochs=60).fit(x, names)
    xt, yt = blobs(seed=0, sample_seed=1)  # held out
    assert probe.score(xt, np.array(["ant", "bee", "cat"])[yt]) > 0.95
    assert set(probe.predict(xt)) <= {"ant", "bee", "cat"}
    if kind == "softmax":
        p = probe.predict_proba(xt)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    else:
        with pytest.raises(KerastlError, match="predict_proba"):
            probe.predict_proba(xt)


def test_probe_errors():
    x, y = blobs()
    with pytest.raises(KerastlError, match="not fitted"):
        kerastl.LinearProbe().predict(x)
    with pytest.raises(KerastlError, match="two classes"):
        kerastl.LinearProbe().fit(x, np.zeros(len(x)))
    with pytest.raises(KerastlError, match="labels"):
        kerastl.LinearProbe().fit(x, y[:5])
    with pytest.raises(KerastlError, match="kind"):
        kerastl.LinearProbe("tree")
    # Labels of shape (n, 1) (CIFAR's) and one-hot rows are one label per
    # row: the same accuracy as the flat labels (an (n, 1) column compared
    # with n predictions broadcast to n x n).
    keras.utils.set_random_seed(0)
    probe = kerastl.LinearProbe(epochs=60).fit(x, y[:, None])
    flat = probe.score(x, y)
    assert flat > 0.8 and probe.score(x, y[:, None]) == flat
    assert probe.score(x, np.eye(3)[y]) == flat
    with pytest.raises(KerastlError, match="validation_data has 5"):
        kerastl.LinearProbe(epochs=1).fit(x, y, validation_data=(x[:5], y))
