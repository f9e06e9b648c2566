"""Freezing by block: frozen weights and BN statistics stay bit-identical."""

import keras
import numpy as np
import pytest

import kerastl

from conftest import save_load_and_resume


def data(n=32, size=32, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, size=(n, size, size, 3)).astype("float32")
    y = rng.integers(0, classes, size=n)
    return x, y


def snapshot(model):
    return {v.path: v.numpy().copy() for v in model.weights}


def calibrate_batch_norm(model):
    """Gives BN realistic moving statistics, as pretrained weights would have.

    With random weights and BN statistics at their initial values (mean 0,
    variance 1), MobileNetV2's ReLU6 units saturate and deep gradients
    vanish. One full-batch step with momentum 0 and learning rate 0 sets
    every moving statistic to the data's statistics without touching any
    other weight.
    """
    bns = [l for l in kerastl.block_map(model).layers()
           if isinstance(l, keras.layers.BatchNormalization)]
    kerastl.freeze(model, up_to=0, bn="train")
    for l in bns:
        l.momentum = 0.0
    model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    x, y = data()
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    for l in bns:
        l.momentum = 0.99
    model.compiled = False  # let each test compile its own optimizer


# The calibrated weights, computed once for the module (a MobileNetV2 with
# realistic BN statistics); every test builds its own model from them.
_CALIBRATED = []


def classifier(freeze=True, bn="frozen"):
    backbone = kerastl.load_backbone("mobilenet_v2", weights=None,
                                     input_shape=(32, 32, 3))
    model = kerastl.build_classifier(backbone, 3, dropout=0.0)
    if not _CALIBRATED:
        calibrate_batch_norm(model)
        _CALIBRATED.append(model.get_weights())
    else:
        model.set_weights(_CALIBRATED[0])
    if freeze is True:
        kerastl.freeze(model, bn=bn)
    else:
        kerastl.freeze(model, up_to=0 if freeze is False else freeze, bn=bn)
    return model


def moved(before, model, variables):
    return [v.path for v in variables if not np.array_equal(before[v.path], v.numpy())]


def fit_one_epoch(model, lr=0.05):
    x, y = data()
    if not model.compiled:
        model.compile(keras.optimizers.SGD(lr), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_frozen_blocks_are_bit_identical_after_fit(bn):
    model = classifier(freeze="stage2", bn=bn)
    bm = kerastl.block_map(model)
    before = snapshot(model)
    fit_one_epoch(model)
    for block in ["stem", "stage1", "stage2"]:  # every weight, BN stats too
        assert moved(before, model, bm.variables(block)) == [], block
    for block in ["stage3", "stage4", "top", "head"]:
        weights = [v for l in bm.weighted_layers(block)
                   if not isinstance(l, keras.layers.BatchNormalization)
                   for v in l.weights]
        assert len(moved(before, model, weights)) == len(weights), block
    bns = [l for b in ["stage3", "stage4", "top"]
           for l in bm.weighted_layers(b)
           if isinstance(l, keras.layers.BatchNormalization)]
    bn_vars = [v for l in bns for v in l.weights]
    if bn == "frozen":  # inference mode: gamma, beta and statistics fixed
        assert moved(before, model, bn_vars) == []
    else:  # trained: gamma/beta and moving statistics all move
        stats = [l.moving_mean for l in bns] + [l.moving_variance for l in bns]
        assert len(moved(before, model, stats)) == len(stats)
        assert len(moved(before, model, [l.gamma for l in bns])) == len(bns)


def test_a_frozen_keras_applications_classifier_resumes_after_load(
        tmp_path):
    """Frozen blocks, layer-wise AdamW rates and the optimizer's state come
    back from .keras; one more epoch gives the same weights."""
    model = classifier(freeze="stage2")
    model.compile(kerastl.LayerwiseOptimizer(keras.optimizers.AdamW(1e-3),
                                             kerastl.LayerDecay(0.7), model),
                  "sparse_categorical_crossentropy")
    x, y = data(n=16)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    loaded = save_load_and_resume(model, str(tmp_path / "m.keras"), x, y,
                                  batch_size=8)
    assert loaded.optimizer.multipliers == model.optimizer.multipliers
    assert kerastl.trainable_summary(loaded) == \
        kerastl.trainable_summary(model)


def test_freezing_after_compile_recompiles_itself():
    model = classifier(freeze=False)
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    fit_one_epoch(model)  # trains everything once
    assert kerastl.freeze(model, up_to="stage3") == [
        "stem", "stage1", "stage2", "stage3"]
    before = snapshot(model)
    fit_one_epoch(model)
    bm = kerastl.block_map(model)
    frozen = [v for b in ["stem", "stage1", "stage2", "stage3"]
              for v in bm.variables(b)]
    assert moved(before, model, frozen) == []
    assert moved(before, model, bm.variables("head"))
    assert isinstance(model.optimizer, keras.optimizers.SGD)


def test_unfreeze_with_a_new_learning_rate():
    model = classifier()
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    assert kerastl.freezing.trainable_blocks(model) == ["head"]
    trainable = kerastl.unfreeze(model, from_block=-3, learning_rate=1e-5)
    assert trainable == ["stage4", "top", "head"]
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-5)
    fit_one_epoch(model)


def test_freeze_by_count_and_the_whole_backbone():
    model = classifier(freeze=2)
    assert kerastl.freezing.trainable_blocks(model) == ["stage2", "stage3", "stage4",
                                               "top", "head"]
    assert kerastl.freeze(model) == ["stem", "stage1", "stage2", "stage3",
                                     "stage4", "top"]
    assert kerastl.freezing.trainable_blocks(model) == ["head"]


def test_trainable_summary():
    model = classifier(freeze="stage3")
    rows = kerastl.trainable_summary(model)
    by_block = {r["block"]: r for r in rows}
    assert by_block["stage3"]["state"] == "frozen"
    assert by_block["stage3"]["trainable_params"] == 0
    assert by_block["stage4"]["state"] == "partial"  # convs train, BN frozen
    assert by_block["head"]["state"] == "trainable"
    assert by_block["head"]["trainable_params"] == 1280 * 3 + 3
    total = sum(r["trainable_params"] + r["frozen_params"] for r in rows)
    assert total == model.count_params()
    assert "stage4" in str(rows) and "total" in str(rows)


def test_gradual_unfreezing_inside_one_fit():
    model = classifier()
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    bm = kerastl.block_map(model)
    snaps = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: snaps.append(snapshot(model)))
    gradual = kerastl.GradualUnfreezing(every=1, start_blocks=1)
    before = snapshot(model)
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=3, verbose=0,
              callbacks=[gradual, record])
    assert gradual.history == {0: ["head"], 1: ["top", "head"],
                               2: ["stage4", "top", "head"]}

    def changed(block, a, b):
        return [v.path for v in bm.variables(block)
                if not np.array_equal(a[v.path], b[v.path])]

    # `top` is frozen in epoch 0, trains from epoch 1; `stage4` from epoch 2.
    assert changed("top", before, snaps[0]) == []
    assert changed("top", snaps[0], snaps[1])
    assert changed("stage4", before, snaps[1]) == []
    assert changed("stage4", snaps[1], snaps[2])
    for block in ["stem", "stage1", "stage2", "stage3"]:
        assert changed(block, before, snaps[2]) == []


def test_unknown_block_lists_the_blocks():
    model = classifier()
    with pytest.raises(kerastl.errors.BlockError) as e:
        kerastl.freeze(model, up_to="stage7")
    assert "stem, stage1, stage2, stage3, stage4, top, head" in str(e.value)
    with pytest.raises(kerastl.errors.BlockError, match="between 0 and 7"):
        kerastl.freeze(model, up_to=9)
    with pytest.raises(kerastl.KerastlError, match="bn="):
        kerastl.freeze(model, bn="sometimes")
