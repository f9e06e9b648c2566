"""Mixed precision and XLA options of fine_tune (and the CLI)."""

import keras
import numpy as np
import pytest

import kerastl
from kerastl.training import set_precision


def classifier(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    backbone = keras.Model(inputs, x)
    return kerastl.build_classifier(backbone, 2, seed=seed)


def data(n=128, seed=0):
    """The class is which half of the image is bright."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 60, (n, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 2, n)
    for i, label in enumerate(y):
        x[i, :, 8 * label:8 * label + 8] += 150
    return x, y


def test_half_precision_everywhere_but_the_outputs():
    model = classifier()
    set_precision(model, "mixed_bfloat16")
    out = model.get_layer("head_predictions")
    assert out.compute_dtype == "float32"
    conv = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert {l.compute_dtype for l in conv} == {"bfloat16"}
    assert {l.variable_dtype for l in conv} == {"float32"}
    assert model.predict(data(4)[0], verbose=0).dtype == np.float32


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_learns_what_float32_learns(policy):
    x, y = data()
    xt, yt = data(64, seed=1)
    accuracy = {}
    for p in (None, policy):
        model = classifier()
        kerastl.fine_tune(model, (x, y), (xt, yt), strategy="full",
                          head_epochs=0, epochs=8, patience=None,
                          optimizer=keras.optimizers.Adam(1e-2),
                          batch_size=16, mixed_precision=p)
        accuracy[p] = model.evaluate(xt, yt, verbose=0)[1]
        if p == "mixed_float16":  # Keras's dynamic loss scaling
            assert isinstance(model.optimizer,
                              keras.optimizers.LossScaleOptimizer)
    assert accuracy[None] >= 0.9
    assert abs(accuracy[policy] - accuracy[None]) <= 0.05, accuracy


def test_jit_compile_reaches_compile():
    x, y = data(32)
    model = classifier()
    kerastl.fine_tune(model, (x, y), strategy="full", head_epochs=0,
                      epochs=1, jit_compile=False, check_features=False)
    assert model.jit_compile is False


@pytest.mark.parametrize("kwargs, match", [
    ({"mixed_precision": "float16"}, "mixed_float16"),
    ({"jit_compile": "yes"}, "jit_compile='yes'"),
])
def test_bad_precision_options(kwargs, match):
    x, y = data(16)
    with pytest.raises(kerastl.KerastlError, match=match):
        kerastl.fine_tune(classifier(), (x, y), **kwargs)
