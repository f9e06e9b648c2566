"""export_savedmodel: input modes, atomic writes, training-only parts left out.

Tolerance: reloaded exports must match the Keras model within 1e-5
(absolute and relative); the graphs compute the same float32 ops.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerastl
from kerastl.serving import ExportError, export_savedmodel, inference_model

TOL = dict(rtol=1e-5, atol=1e-5)


def classifier(size=16):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 3))
    x = kerastl.preprocessing.ImagePreprocessing("tf")(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


def images(n=5, size=16, seed=1):
    return np.random.default_rng(seed).integers(
        0, 256, (n, size, size, 3)).astype("uint8")


@pytest.fixture(scope="module")
def model():
    return classifier()


@pytest.mark.parametrize("mode", ["float", "uint8"])
def test_array_modes_reload_with_identical_outputs(model, mode, tmp_path):
    path = export_savedmodel(model, tmp_path / "export", input=mode)
    served = tf.saved_model.load(path)
    x = images()
    fed = x.astype("float32") if mode == "float" else x
    got = served.serve(tf.constant(fed)).numpy()
    np.testing.assert_allclose(got, model.predict(x.astype("float32"),
                                                  verbose=0), **TOL)
    # serving_default is the same function (what TF Serving calls).
    got = served.signatures["serving_default"](tf.constant(fed))
    np.testing.assert_allclose(next(iter(got.values())).numpy(),
                               model.predict(x.astype("float32"), verbose=0),
                               **TOL)


def test_bytes_mode_decodes_and_resizes_inside_the_graph(model, tmp_path):
    path = export_savedmodel(model, tmp_path / "export", input="bytes")
    served = tf.saved_model.load(path)
    small, big = images(1, 16)[0], images(1, 40, seed=2)[0]
    files = [tf.io.encode_png(small).numpy(),
             tf.io.encode_jpeg(big, quality=90).numpy()]
    got = served.serve(tf.constant(files)).numpy()
    # What a user would do by hand: decode, resize to 16x16, predict.
    decoded = [tf.io.decode_image(f, channels=3) for f in files]
    by_hand = np.stack([tf.image.resize(tf.cast(d, tf.float32), (16, 16))
                        for d in decoded])
    np.testing.assert_array_equal(decoded[0].numpy(), small)  # PNG lossless
    np.testing.assert_allclose(got, model.predict(by_hand, verbose=0), **TOL)


def test_a_crash_midway_leaves_the_earlier_export_intact(model, tmp_path,
                                                         monkeypatch):
    path = tmp_path / "export"
    export_savedmodel(model, path)
    before = {f: (path / f).read_bytes() for f in ["saved_model.pb"]}
    listing = sorted(os.listdir(path))
    # ExportArchive() returns the backend's subclass: patch that.
    archive_class = type(keras.export.ExportArchive())
    real_write_out = archive_class.write_out

    def crash(self, filepath, **kwargs):
        real_write_out(self, filepath, **kwargs)  # half the job done
        raise RuntimeError("killed")

    monkeypatch.setattr(archive_class, "write_out", crash)
    other = classifier()
    with pytest.raises(ExportError, match="killed"):
        export_savedmodel(other, path, input="uint8", overwrite=True)
    assert sorted(os.listdir(path)) == listing
    assert (path / "saved_model.pb").read_bytes() == before["saved_model.pb"]
    assert os.listdir(tmp_path) == ["export"]  # no temporary folder left
    served = tf.saved_model.load(str(path))
    x = images().astype("float32")
    np.testing.assert_allclose(served.serve(tf.constant(x)).numpy(),
                               model.predict(x, verbose=0), **TOL)


def test_a_failed_check_writes_nothing(model, tmp_path, monkeypatch):
    import kerastl.serving as export

    def wrong(e, g, **kwargs):
        return False

    monkeypatch.setattr(export.np, "allclose", wrong)
    with pytest.raises(ExportError, match="does not reproduce"):
        export_savedmodel(model, tmp_path / "export")
    assert os.listdir(tmp_path) == []


def test_gradient_reversal_and_domain_head_are_left_out(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    f = keras.layers.GlobalAveragePooling2D()(
        keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 255)(inputs)))
    label = keras.layers.Dense(3, activation="softmax", name="label")(f)
    domain = keras.layers.Dense(1, name="domain")(
        kerastl.GradientReversal(1.0)(f))
    model = keras.Model(inputs, [label, domain])
    stripped = inference_model(model)
    assert not any(isinstance(l, kerastl.GradientReversal)
                   for l in stripped.layers)
    path = export_savedmodel(model, tmp_path / "export")
    served = tf.saved_model.load(path)
    x = images().astype("float32")
    out = served.serve(tf.constant(x))
    assert not isinstance(out, (list, tuple, dict))
    np.testing.assert_allclose(out.numpy(), model.predict(x, verbose=0)[0],
                               **TOL)


def test_dann_exports_its_label_path(tmp_path):
    from conftest import small_cnn

    keras.utils.set_random_seed(0)
    dann = kerastl.DANN(small_cnn(16), 3)
    x = images(4, 16).astype("float32")
    expected = dann.predict(x, verbose=0)
    path = export_savedmodel(dann, tmp_path / "export", input="uint8")
    served = tf.saved_model.load(path)
    np.testing.assert_allclose(
        served.serve(tf.constant(x.astype("uint8"))).numpy(), expected, **TOL)


def test_bad_arguments(model, tmp_path):
    with pytest.raises(ExportError, match="input='jpeg'"):
        export_savedmodel(model, tmp_path / "e", input="jpeg")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        export_savedmodel(model, tmp_path / "file")
    with pytest.raises(ExportError, match="Expected a keras.Model"):
        export_savedmodel("model", tmp_path / "e")


@pytest.mark.slow
def test_tflite_option(model, tmp_path):
    path = export_savedmodel(model, tmp_path / "export", tflite=True)
    interpreter = tf.lite.Interpreter(
        model_path=os.path.join(path, "model.tflite"))
    runner = interpreter.get_signature_runner("serve")
    x = images(1).astype("float32")
    got = next(iter(runner(images=x).values()))
    np.testing.assert_allclose(got, model.predict(x, verbose=0), rtol=1e-4,
                               atol=1e-4)
