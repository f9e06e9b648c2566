"""Borrowing source data: nearest-neighbour selection and joint fine-tuning."""

import keras
import numpy as np
import pytest

import kerastl
from kerastl.errors import KerastlError


def brute_force(source, target, k, metric):
    if metric == "cosine":
        s = source / np.linalg.norm(source, axis=1, keepdims=True)
        t = target / np.linalg.norm(target, axis=1, keepdims=True)
        d = 1 - t @ s.T
    else:
        d = np.linalg.norm(target[:, None] - source[None], axis=2)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_selects_the_true_nearest_neighbours(metric):
    rng = np.random.default_rng(0)
    source = rng.normal(size=(500, 16)).astype("float32")
    target = rng.normal(size=(37, 16)).astype("float32")
    sel = kerastl.adaptation.select_source_samples(source, target, k=5, metric=metric,
                                        chunk_size=10)
    np.testing.assert_array_equal(sel.neighbours,
                                  brute_force(source, target, 5, metric))
    np.testing.assert_array_equal(sel.indices, np.unique(sel.neighbours))
    assert np.all(np.diff(sel.distances, axis=1) >= 0)


def test_constructed_example_picks_the_planted_neighbours():
    # Each target sits next to two planted source points; the rest are far.
    rng = np.random.default_rng(1)
    target = rng.normal(size=(4, 8)) * 10
    planted = np.concatenate([target + 0.01, target - 0.01])
    far = rng.normal(size=(200, 8)) * 10 + 100
    source = np.concatenate([far, planted])
    sel = kerastl.adaptation.select_source_samples(source, target, k=2, metric="l2")
    expected = np.concatenate([200 + np.arange(8)])
    np.testing.assert_array_equal(sel.indices, expected)
    for t in range(4):
        assert set(sel.neighbours[t]) == {200 + t, 204 + t}


def test_hard_targets_get_more_neighbours():
    rng = np.random.default_rng(2)
    source = rng.normal(size=(100, 4))
    target = rng.normal(size=(6, 4))
    probs = np.full((6, 3), 0.05)
    probs[np.arange(6), [0, 1, 2, 0, 1, 2]] = 0.9
    labels = np.array([0, 1, 2, 0, 1, 0])  # the last one is misclassified
    hard = kerastl.adaptation.hard_examples(probs, labels, entropy_quantile=None)
    np.testing.assert_array_equal(hard, [False] * 5 + [True])
    # Labels of shape (n, 1): the same mask (not an n x n comparison).
    np.testing.assert_array_equal(kerastl.adaptation.hard_examples(
        probs, labels[:, None], entropy_quantile=None), hard)
    sel = kerastl.adaptation.select_source_samples(source, target, k=3, hard=hard)
    np.testing.assert_array_equal(sel.k, [3, 3, 3, 3, 3, 6])
    assert (sel.neighbours[:5, 3:] == -1).all()
    assert (sel.neighbours[5] >= 0).all()
    sel = kerastl.adaptation.select_source_samples(source, target, k=3, hard=[0],
                                        k_hard=4)
    np.testing.assert_array_equal(sel.k, [4, 3, 3, 3, 3, 3])


def test_selection_errors():
    with pytest.raises(KerastlError, match="same layer"):
        kerastl.adaptation.select_source_samples(np.ones((5, 3)), np.ones((2, 4)))
    with pytest.raises(KerastlError, match="metric"):
        kerastl.adaptation.select_source_samples(np.ones((5, 3)), np.ones((2, 3)),
                                      metric="manhattan")
    src, tgt = np.ones((5, 3)), np.ones((2, 3))
    nan = tgt.copy()
    nan[1, 0] = np.nan
    for kwargs, message in ((dict(target_features=nan), "NaN"),
                            (dict(chunk_size=0), "chunk_size=0"),
                            (dict(k=[1, 2, 3]), "one int per target"),
                            (dict(hard=[5]), "indices of hard targets"),
                            (dict(hard=[-1]), "indices of hard targets")):
        with pytest.raises(KerastlError, match=message):
            kerastl.adaptation.select_source_samples(
                **{"source_features": src, "target_features": tgt,
                   **kwargs})


def test_joint_fine_tune_trains_both_heads():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu",
                            name="conv")(x)
    backbone = keras.Model(inputs, x, name="tiny")
    rng = np.random.default_rng(0)
    target = (rng.uniform(0, 255, (6, 16, 16, 3)), np.array([0, 1, 2] * 2))
    source = (rng.uniform(0, 255, (20, 16, 16, 3)), rng.integers(0, 5, 20))
    conv_before = backbone.get_layer("conv").kernel.numpy().copy()
    initial = {}

    class Snapshot(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            for name in ("target", "source"):
                initial[name] = self.model.get_layer(name).kernel.numpy()

    joint = kerastl.adaptation.joint_fine_tune(backbone, target, source, epochs=2,
                                    batch_size=8,
                                    validation_data=target,
                                    callbacks=[Snapshot()])
    t_head = joint.model.get_layer("target")
    s_head = joint.model.get_layer("source")
    assert t_head.units == 3 and s_head.units == 5
    assert not np.array_equal(conv_before,
                              backbone.get_layer("conv").kernel.numpy())
    # Both heads learned: each gets gradients from its own samples only.
    for name in ("target", "source"):
        assert not np.array_equal(initial[name],
                                  joint.model.get_layer(name).kernel.numpy())
    h = joint.history.history
    assert {"target_loss", "source_loss"} <= set(h)
    assert "val_target_accuracy" in h
    p = joint.target_model.predict(target[0], verbose=0)
    assert p.shape == (6, 3)
    np.testing.assert_allclose(
        p, joint.model.predict(target[0], verbose=0)["target"], rtol=1e-6)
    assert joint.source_model.predict(source[0], verbose=0).shape == (20, 5)


def test_joint_fine_tuning_model_has_a_real_block_map():
    backbone = kerastl.load_backbone("mobilenet_v2", weights=None,
                                     input_shape=(32, 32, 3))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    y = np.arange(8) % 2
    before = {v.path: v.numpy().copy()
              for v in kerastl.block_map(backbone).variables("stem")}
    joint = kerastl.adaptation.joint_fine_tune(backbone, (x, y), (x, y), epochs=1,
                                    batch_size=4, freeze="stage1")
    bm = kerastl.block_map(joint.model)
    assert bm.names == backbone.blocks + ["head"]
    assert [l.name for l in bm.weighted_layers("head")] == ["target",
                                                            "source"]
    assert kerastl.freezing.trainable_blocks(joint.model) == backbone.blocks[2:] + [
        "head"]
    for v in bm.variables("stem"):  # frozen through fit, to the bit
        np.testing.assert_array_equal(v.numpy(), before[v.path])
    opt = kerastl.LayerwiseOptimizer("adam", kerastl.LayerDecay(0.5),
                                     joint.model)
    rows = {r["block"]: r for r in kerastl.describe_learning_rates(
        joint.model, opt)}
    assert rows["head"]["multiplier"] == (1.0, 1.0)
    assert rows["top"]["multiplier"] == (0.5, 0.5)
