"""TENT (test-time entropy minimisation): only the normalisation layers'
scale and offset move, the entropy on a shifted domain falls, the model's
trainable flags and compiled state come back."""

import keras
import numpy as np
import pytest

import kerastl
from kerastl.adaptation import mean_entropy, tent


@pytest.fixture(scope="module")
def source_and_shift():
    """A small CNN with BatchNorm trained on scikit-learn digits, and the
    same digits' test images with the contrast of digits_m (a real shift:
    colour photos behind the strokes)."""
    keras.utils.set_random_seed(0)
    xs, ys = kerastl.datasets.digits("train", size=16)
    xt, yt = kerastl.datasets.digits_m("test", size=16)
    inputs = keras.Input((16, 16, 3))
    h = keras.layers.Rescaling(1 / 255)(inputs)
    for width in (16, 32):
        h = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(h)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.ReLU()(h)
        h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.LayerNormalization()(h)
    outputs = keras.layers.Dense(10, activation="softmax", name="head")(h)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(3e-3),
                  "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(xs, ys, epochs=8, batch_size=64, verbose=0)
    return model, xt[:512], yt[:512]


def test_tent_moves_only_scale_and_offset_and_lowers_the_entropy(
        source_and_shift):
    model, xt, yt = source_and_shift
    model = keras.models.clone_model(model)
    model.set_weights(source_and_shift[0].get_weights())
    model.compile("sgd", "sparse_categorical_crossentropy")
    optimizer = model.optimizer
    # Flags that must come back; a frozen BatchNorm adapts all the same.
    model.get_layer("head").trainable = False
    [l for l in model.layers
     if isinstance(l, keras.layers.BatchNormalization)][0].trainable = False
    flags = {v.path: v.trainable for v in model.weights}
    before = {v.path: v.numpy().copy() for v in model.weights}
    accuracy = float(np.mean(model.predict(xt, verbose=0).argmax(-1) == yt))

    report = tent(model, xt, batch_size=64)

    assert report["steps"] == 50 and report["layers"] == 3
    # Lower than where it started, AdaBN's target statistics.
    assert report["entropy_after"] < report["entropy_adabn"] - 0.05
    assert report["entropy_before"] == pytest.approx(
        mean_entropy(source_and_shift[0], xt), rel=1e-5)
    moved = set()
    for v in model.weights:
        name = v.path.split("/")[-1]
        if name in ("gamma", "beta"):
            if not np.array_equal(v.numpy(), before[v.path]):
                moved.add(v.path)
        elif name in ("moving_mean", "moving_variance"):
            continue  # re-estimated on the target (AdaBN), checked below
        else:  # kernels, the head: bit-identical
            np.testing.assert_array_equal(v.numpy(), before[v.path], v.path)
    assert len(moved) == 6  # two BatchNorms and a LayerNorm, scale+offset
    assert {v.path: v.trainable for v in model.weights} == flags
    assert model.optimizer is optimizer
    # Inference uses the target's statistics under the adapted scales: a
    # second AdaBN pass changes nothing.
    stats = [v.numpy().copy() for v in model.weights if "moving" in v.path]
    kerastl.adaptation.adapt_batch_norm(model, xt, batch_size=64)
    for a, v in zip(stats, [v for v in model.weights if "moving" in v.path]):
        np.testing.assert_allclose(v.numpy(), a, rtol=1e-5, atol=1e-6)
    adapted = float(np.mean(model.predict(xt, verbose=0).argmax(-1) == yt))
    print(f"digits -> digits_m: accuracy {accuracy:.3f} -> {adapted:.3f}, "
          f"entropy {report}")


def test_tent_steps_and_refusals(source_and_shift):
    model, xt, _ = source_and_shift
    model = keras.models.clone_model(model)
    assert tent(model, xt[:100], steps=3, batch_size=32)["steps"] == 3
    with pytest.raises(kerastl.KerastlError, match="steps=0"):
        tent(model, xt, steps=0)
    with pytest.raises(kerastl.KerastlError, match="n >= 1"):
        tent(model, xt[:0])
    with pytest.raises(kerastl.KerastlError, match="batch_size=1"):
        tent(model, xt, batch_size=1)
    logits = keras.Model(model.input, model.get_layer("head").output)
    logits.get_layer("head").activation = keras.activations.linear
    with pytest.raises(kerastl.KerastlError, match="softmax"):
        tent(logits, xt)
    plain = keras.Sequential([keras.Input((4,)),
                              keras.layers.Dense(3, activation="softmax")])
    with pytest.raises(kerastl.KerastlError, match="nothing to adapt"):
        tent(plain, np.zeros((4, 2, 2, 1)))
