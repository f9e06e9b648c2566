"""HubLayer: TF Hub SavedModels as Keras 3 layers, on SavedModels the tests write.

Two kinds: (a) a Keras 3 model written with ``model.export``; (b) a
``tf.Module`` following the Reusable SavedModel API (``__call__(x,
training)``, ``variables``, ``trainable_variables``,
``regularization_losses``) with a BatchNorm-like moving mean that only moves
under ``training=True``.
"""

import socket
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerastl
from kerastl.errors import KerastlError
from kerastl.tfhub import HubLayer


KINDS = ["keras_export", "reusable"]


def data(shape, n=16, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n,) + shape).astype("float32"),
            rng.normal(size=(n, 2)).astype("float32"))


def make(kind_path, api, **kwargs):
    path, shape = kind_path
    layer = HubLayer(path, **kwargs)
    if api == "sequential":
        model = keras.Sequential([keras.Input(shape), layer,
                                  keras.layers.Dense(2, name="out")])
    elif api == "functional":
        inputs = keras.Input(shape)
        model = keras.Model(inputs, keras.layers.Dense(2, name="out")(
            layer(inputs)))
    else:
        class Sub(keras.Model):
            def __init__(self):
                super().__init__()
                self.hub = layer
                self.out = keras.layers.Dense(2)

            def call(self, x, training=False):
                return self.out(self.hub(x, training=training))

        model = Sub()
    return model, layer


def values(layer):
    return {n: v.numpy().copy() for n, v in layer.hub_variables.items()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("api", ["sequential", "functional", "subclassed"])
def test_trainable_moves_the_savedmodel_variables(saved_models, kind, api):
    model, layer = make(saved_models[kind], api, trainable=True)
    x, y = data(saved_models[kind][1])
    before = values(layer)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    after = values(layer)
    trainable = {v.hub_name for v in layer.trainable_weights}
    assert trainable, "no trainable variables were adopted"
    for name in trainable:
        assert not np.array_equal(before[name], after[name]), name
    # What predict computes is what the moved variables give: the layer's
    # variables are the SavedModel's own.
    np.testing.assert_allclose(model.predict(x, verbose=0),
                               model(x, training=False), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("api", ["sequential", "functional"])
def test_frozen_layer_stays_bit_identical(saved_models, kind, api):
    model, layer = make(saved_models[kind], api, trainable=False)
    x, y = data(saved_models[kind][1])
    before = values(layer)
    out_before = model.get_layer("out").kernel.numpy().copy()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    for name, value in values(layer).items():
        np.testing.assert_array_equal(before[name], value)
    assert not np.array_equal(out_before, model.get_layer("out").kernel)


@pytest.mark.parametrize("kind,frozen,moving", [
    ("keras_export", "^stem_", "^top_conv"),
    ("reusable", "^block1/", "^block2/")])
def test_partial_freezing_by_variable_path(saved_models, kind, frozen,
                                           moving):
    model, layer = make(saved_models[kind], "functional", trainable=True,
                        batchnorm_training=False)
    changed = layer.freeze_variables(frozen)
    assert changed and all(n.startswith(frozen[1:]) for n in changed)
    x, y = data(saved_models[kind][1])
    before = values(layer)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    after = values(layer)
    for name in before:
        if name.startswith(frozen[1:]):
            np.testing.assert_array_equal(before[name], after[name])
        elif name.startswith(moving[1:]):
            assert not np.array_equal(before[name], after[name]), name


def test_training_reaches_the_savedmodel(saved_models):
    model, layer = make(saved_models["reusable"], "functional",
                        trainable=True)
    assert layer.takes_training
    x, y = data((3,))
    mean = layer.hub_variables["block1/moving_mean:0"]
    np.testing.assert_array_equal(mean.numpy(), 0.0)
    model.predict(x, verbose=0)  # inference: the statistic stays
    np.testing.assert_array_equal(mean.numpy(), 0.0)
    model.compile(keras.optimizers.SGD(0.0), "mse")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)  # training: it moves
    assert np.abs(mean.numpy()).sum() > 0
    # Regularization losses of the SavedModel are added while trainable.
    assert len(model.losses) == 1
    # batchnorm_training=False keeps the SavedModel in inference mode.
    model, layer = make(saved_models["reusable"], "functional",
                        trainable=True, batchnorm_training=False)
    model.compile(keras.optimizers.SGD(0.0), "mse")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    np.testing.assert_array_equal(
        layer.hub_variables["block1/moving_mean:0"].numpy(), 0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_keras_file_round_trip_and_safe_mode(saved_models, kind, tmp_path,
                                             monkeypatch):
    model, layer = make(saved_models[kind], "functional", trainable=True)
    layer.freeze_variables("w$|kernel")
    x, y = data(saved_models[kind][1])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)  # weights != on disk
    path = str(tmp_path / "model.keras")
    model.save(path)
    with pytest.raises(KerastlError, match="safe mode"):
        keras.models.load_model(path)
    loaded = keras.models.load_model(path, safe_mode=False)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0),
                                  model.predict(x, verbose=0))
    reloaded = [l for l in loaded.layers if isinstance(l, HubLayer)][0]
    assert {v.hub_name for v in reloaded.trainable_weights} == \
        {v.hub_name for v in layer.trainable_weights}
    # A trusted folder loads in safe mode too.
    kerastl.tfhub.trust_hub_path(saved_models[kind][0])
    keras.models.load_model(path)


@pytest.mark.parametrize("kind", KINDS)
def test_containing_model_exports_to_savedmodel(saved_models, kind,
                                                tmp_path):
    model, layer = make(saved_models[kind], "functional", trainable=True)
    x, y = data(saved_models[kind][1])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    model.export(str(tmp_path / "export"), verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "export"))
    served = reloaded.serve(x)
    np.testing.assert_array_equal(served.numpy(), model.predict(x, verbose=0))
    # ...and the export is itself a handle HubLayer takes.
    again = HubLayer(str(tmp_path / "export"))
    np.testing.assert_array_equal(again(x).numpy(), served.numpy())


def test_unreachable_remote_handle_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(KerastlError, match="Cannot reach"):
        HubLayer("https://tfhub.invalid/google/imagenet/mobilenet_v2/"
                 "feature_vector/5", load_timeout=5)
    assert time.monotonic() - start < 30


def test_a_stalled_server_does_not_hang(tmp_path, monkeypatch):
    # A server that accepts connections and never answers: no hang.
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    try:
        start = time.monotonic()
        with pytest.raises(KerastlError, match="did not answer within"):
            HubLayer(f"http://127.0.0.1:{port}/google/model/1",
                     load_timeout=3)
        assert time.monotonic() - start < 30
    finally:
        server.close()


def test_bad_handles(tmp_path):
    with pytest.raises(KerastlError, match="not a SavedModel"):
        HubLayer(str(tmp_path))
    with pytest.raises(KerastlError, match="neither"):
        HubLayer("not a handle")
    with pytest.raises(KerastlError, match="kagglehub|Cannot reach"):
        HubLayer("google/mobilenet-v2/tensorFlow2/100-224-feature-vector",
                 load_timeout=5)
