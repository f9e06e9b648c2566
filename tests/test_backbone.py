"""Loading backbones: weights, input contract, errors."""

import time
import os

import keras
import numpy as np
import pytest

import kerastl


@pytest.fixture(scope="module")
def mobilenet():
    return kerastl.load_backbone("mobilenet_v2", weights=None,
                                 input_shape=(64, 64, 3))


def test_backbone_is_a_plain_model_with_preprocessing_inside(mobilenet):
    assert isinstance(mobilenet.model, keras.Model)
    assert mobilenet.input_shape == (64, 64, 3)
    assert mobilenet.output_shape == (2, 2, 1280)
    first = mobilenet.model.get_layer("kerastl_preprocessing")
    assert isinstance(first, kerastl.preprocessing.ImagePreprocessing)
    assert first.mode == "tf" and first.zoo_name == "mobilenet_v2"
    assert mobilenet.blocks == ["stem", "stage1", "stage2", "stage3",
                                "stage4", "top"]


def test_weights_file_round_trip_is_bit_exact(tmp_path, images):
    source = kerastl.load_backbone("mobilenet_v2", weights=None,
                                   input_shape=(64, 64, 3))
    # Random init gives different weights on every build; make BN statistics
    # non-trivial too, so that all weights really travel through the file.
    for v in source.model.weights:
        v.assign(np.random.default_rng(1).normal(size=v.shape).astype(v.dtype)
                 if "variance" not in v.path else
                 np.random.default_rng(2).uniform(0.5, 2, size=v.shape))
    path = tmp_path / "mnv2.weights.h5"
    source.model.save_weights(path)
    loaded = kerastl.load_backbone("mobilenet_v2", weights=str(path),
                                   input_shape=(64, 64, 3))
    fresh = kerastl.load_backbone("mobilenet_v2", weights=None,
                                  input_shape=(64, 64, 3))
    expected = source.model.predict(images, verbose=0)
    np.testing.assert_array_equal(loaded.model.predict(images, verbose=0),
                                  expected)
    assert not np.array_equal(fresh.model.predict(images, verbose=0), expected)
    for a, b in zip(source.model.weights, loaded.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_plain_keras_weights_file_loads_too(tmp_path, images):
    """A file written from keras.applications itself (no kerastl layer)."""
    plain = keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(64, 64, 3))
    path = tmp_path / "plain.weights.h5"
    plain.save_weights(path)
    loaded = kerastl.load_backbone("mobilenet_v2", weights=str(path),
                                   input_shape=(64, 64, 3))
    x = images / 127.5 - 1.0  # what plain Keras needs; kerastl does it inside
    np.testing.assert_allclose(loaded.model.predict(images, verbose=0),
                               plain.predict(x, verbose=0), atol=1e-5)


def test_missing_weights_file_is_a_clear_error():
    with pytest.raises(kerastl.errors.WeightsError, match="does not exist"):
        kerastl.load_backbone("mobilenet_v2", weights="/nope/w.weights.h5",
                              input_shape=(64, 64, 3))


def test_wrong_architecture_weights_file(tmp_path):
    other = kerastl.load_backbone("vgg16", weights=None,
                                  input_shape=(32, 32, 3))
    path = tmp_path / "vgg.weights.h5"
    other.model.save_weights(path)
    with pytest.raises(kerastl.errors.WeightsError, match="same architecture"):
        kerastl.load_backbone("mobilenet_v2", weights=str(path),
                              input_shape=(64, 64, 3))


def test_imagenet_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    import socket

    fname = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"
    cache = os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser(
        "~/.keras")), "models")
    if os.path.exists(os.path.join(cache, fname)):
        pytest.skip("the weights are in this machine's Keras cache")

    def offline(*args, **kwargs):  # what an offline machine's DNS answers
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    start = time.monotonic()
    with pytest.raises(kerastl.errors.WeightsError) as e:
        kerastl.load_backbone("mobilenet_v2", weights="imagenet",
                              input_shape=(96, 96, 3))
    assert time.monotonic() - start < 30
    msg = str(e.value)
    assert "offline" in msg
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5" in msg
    assert "weights='/path/to/" in msg and ".keras" in msg


@pytest.mark.parametrize("shape, match", [
    ((16, 16, 3), "at least 32"),
    ((64, 64, 1), "RGB"),
    ((64, 64), None),
])
def test_input_shape_checks(shape, match):
    if match is None:  # (h, w) means RGB
        assert kerastl.load_backbone("resnet50", weights=None,
                                     input_shape=shape).input_shape == (64, 64, 3)
        return
    with pytest.raises(kerastl.errors.InputShapeError, match=match):
        kerastl.load_backbone("resnet50", weights=None, input_shape=shape)


def test_inception_minimum_is_75():
    with pytest.raises(kerastl.errors.InputShapeError, match="at least 75"):
        kerastl.load_backbone("InceptionV3", weights=None, input_shape=64)


def test_unknown_model_name():
    with pytest.raises(kerastl.errors.UnknownModelError, match="mobilenet_v2"):
        kerastl.load_backbone("mobilenet_v9", weights=None)


def test_feature_model_returns_named_endpoints(mobilenet, images):
    fm = kerastl.feature_model(mobilenet, ["stride8", "stage2", "stride32"],
                               pooling=None)
    out = fm.predict(images, verbose=0)
    assert out["stride8"].shape == (4, 8, 8, 32)
    assert out["stage2"].shape == out["stride8"].shape
    assert out["stride32"].shape == (4, 2, 2, 1280)
    with pytest.raises(kerastl.errors.BlockError, match="endpoints are"):
        mobilenet.endpoint_layer("stride64")


def test_user_keras_file_gets_a_structural_block_map(tmp_path):
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same")(x)
    model = keras.Model(inputs, x)
    path = tmp_path / "mine.keras"
    model.save(path)
    backbone = kerastl.load_backbone(str(path))
    assert backbone.config is None
    assert backbone.blocks == ["block1", "block2", "block3"]
    assert backbone.block_map.source == "structural"
    # Its own size: the same is taken, another refused (it was ignored).
    assert kerastl.load_backbone(str(path), input_shape=32).input_shape == \
        (32, 32, 3)
    with pytest.raises(kerastl.KerastlError, match="takes .32, 32, 3.; "
                       "leave input_shape out"):
        kerastl.load_backbone(str(path), input_shape=64)
    with pytest.raises(kerastl.KerastlError, match="weights=True"):
        kerastl.load_backbone(str(path), weights=True)
    with pytest.raises(kerastl.KerastlError, match="does not exist; create"):
        kerastl.save_model(model, str(tmp_path / "nowhere" / "m.keras"))
    with pytest.raises(kerastl.KerastlError, match="expected a keras.Model"):
        kerastl.save_model("abc", str(tmp_path / "m.keras"))
