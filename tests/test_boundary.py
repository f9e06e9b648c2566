"""Boundary-activation caching: the frozen prefix runs once, the result is
the training end to end would give, and every invalid case is refused."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerastl
from kerastl import boundary
from kerastl.boundary import BoundaryCacheError


def net(first=None, name="net"):
    """Input -> [first] -> conv/BN (block1) -> conv/pool (block2) -> head."""
    inputs = keras.Input((32, 32, 3))
    x = first(inputs) if first is not None else inputs
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="c1")(x)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="out")(x)
    return keras.Model(inputs, outputs, name=name)


def mobilenet_classifier(seed=1):
    keras.utils.set_random_seed(seed)
    backbone = kerastl.load_backbone("mobilenet_v2", weights=None,
                                     input_shape=(32, 32, 3))
    return kerastl.build_classifier(backbone, 3)


def data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, (n, 32, 32, 3)).astype("float32")
    return x, rng.integers(0, 3, n)


def train_both_ways(make, train, validation, **kwargs):
    """Predictions and histories of fine_tune with and without the cache,
    from the same model, seed and batches."""
    out = {}
    for cache in (False, True):
        model = make()
        keras.utils.set_random_seed(2)
        history = kerastl.fine_tune(
            model, train, validation, head_epochs=0,
            optimizer=keras.optimizers.Adam(1e-3), check_features=False,
            boundary_cache=cache, **kwargs).fine_tune
        out[cache] = (model, history)
    return out


@pytest.mark.grappler  # two graphs, bit for bit
def test_cached_partial_fine_tuning_equals_end_to_end():
    x, y = data()
    runs = train_both_ways(mobilenet_classifier, (x, y), data(16, 1),
                           strategy="partial", freeze_up_to="stage3",
                           epochs=3, batch_size=16)
    (plain, h_plain), (cached, h_cached) = runs[False], runs[True]
    assert h_cached.boundary_cache == "used"
    assert h_plain.boundary_cache == "boundary_cache=False"
    np.testing.assert_allclose(h_cached.history["loss"],
                               h_plain.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(cached.predict(x, verbose=0),
                               plain.predict(x, verbose=0), atol=1e-5)
    # The frozen prefix did not move; the trained top did.
    bm = kerastl.block_map(cached)
    fresh = mobilenet_classifier()
    for block in bm.names:
        same = all(np.array_equal(a, b) for a, b in zip(
            [v.numpy() for v in bm.variables(block)],
            [v.numpy() for v in kerastl.block_map(fresh).variables(block)]))
        assert same == (bm.index(block) < bm.index("stage4")), block


def seeded_net(seed=1):
    keras.utils.set_random_seed(seed)
    return net()


@pytest.mark.grappler  # two graphs, bit for bit
def test_replayed_augmented_views_equal_end_to_end_on_the_same_views():
    """With augmentation the prefix runs once per view; training after the
    boundary equals end-to-end training on the very same augmented views
    (epoch e on view e % views, the same seeded order)."""
    from kerastl import augment
    from kerastl.batch_order import ViewBatches
    x, y = data(40)
    views, epochs, batch, seed = 2, 3, 16, 5

    def augmenter():  # a fresh layer per run: the same draws in the same order
        layer = augment.augmentation("strong", seed=11)
        return lambda images: augment.augment_batch(layer, images)

    histories, models = {}, {}
    for cached in (False, True):
        model = seeded_net()
        kerastl.freezing.apply_trainable(
            model, kerastl.freezing.resolve_trainable(model, "partial",
                                                      "block1"))
        keras.utils.set_random_seed(2)
        if cached:
            history, reason = boundary.cached_fit(
                model, 1, x, y, optimizer=keras.optimizers.Adam(1e-2),
                loss="sparse_categorical_crossentropy", epochs=epochs,
                batch_size=batch, seed=seed, augment=augmenter(),
                views=views, required=True)
            assert reason is None and history.boundary_views == views
            assert history.boundary_bytes == views * 40 * 15 * 15 * 8 * 4
        else:
            fn, chunk = augmenter(), max(batch, boundary.PREDICT_BATCH)
            images = [boundary.augmented_images(fn, x, chunk)
                      for _ in range(views)]
            assert not np.allclose(images[0], images[1])  # two views
            batches = ViewBatches([(v, y) for v in images], batch, seed)
            model.compile(keras.optimizers.Adam(1e-2),
                          "sparse_categorical_crossentropy")
            history = model.fit(batches, epochs=epochs, shuffle=False,
                                callbacks=[batches.callback()], verbose=0)
        histories[cached], models[cached] = history, model
    losses = histories[True].history["loss"]
    assert losses[0] != losses[1]  # the epochs saw different views
    np.testing.assert_allclose(losses, histories[False].history["loss"],
                               rtol=1e-5)
    np.testing.assert_allclose(models[True].predict(x, verbose=0),
                               models[False].predict(x, verbose=0),
                               atol=1e-5)


def test_fine_tune_with_augmentation_keeps_the_cache():
    x, y = data(32)
    history = kerastl.fine_tune(
        seeded_net(), (x, y), data(16, 1), strategy="partial",
        freeze_up_to="block1", head_epochs=0, epochs=5, batch_size=16,
        seed=0, augment="light", check_features=False).fine_tune
    assert history.boundary_cache == "used"
    assert history.boundary_views == boundary.view_count(5) == 2
    # A view per epoch at most: 3 epochs, 1 view; 9 epochs, 3 views.
    assert [boundary.view_count(e) for e in (1, 3, 4, 5, 9)] == \
        [1, 1, 1, 2, 3]


def test_features_strategy_on_a_dataset_keeps_the_full_model_for_callbacks(
        tmp_path):
    x, y = data()
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    val = tf.data.Dataset.from_tensor_slices(data(16, 1)).batch(8)
    path = str(tmp_path / "best.keras")
    model = net()
    history = kerastl.fine_tune(
        model, train, val, strategy="features", head_epochs=0, epochs=2,
        optimizer=keras.optimizers.Adam(1e-2), check_features=False,
        boundary_cache=True,
        callbacks=[keras.callbacks.ModelCheckpoint(path)]).fine_tune
    assert history.boundary_cache == "used"
    assert history.model is model  # not the internal suffix
    assert set(history.history) >= {"loss", "val_loss", "val_accuracy"}
    # The checkpoint is the whole model (images in), not the cached top.
    saved = keras.models.load_model(path)
    assert saved.input_shape == (None, 32, 32, 3)
    np.testing.assert_allclose(saved.predict(x, verbose=0),
                               model.predict(x, verbose=0), atol=1e-6)
    # The full model is compiled with the optimizer that trained it.
    assert model.optimizer.iterations.numpy() == 2 * 3
    model.evaluate(val, verbose=0)


def test_early_stopping_restores_and_stops_through_the_full_model():
    x, y = data()
    model = net()
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=0,
                                         min_delta=10.0)
    history = kerastl.fine_tune(
        model, (x, y), None, strategy="features", head_epochs=0, epochs=5,
        check_features=False, callbacks=[stop]).fine_tune
    assert history.boundary_cache == "used"
    assert len(history.history["loss"]) == 2  # stopped after patience 0


# -- refusals (boundary_cache=True) and the fallback ("auto") -----------------

def refusal(model, depth=1, callbacks=(), **kwargs):
    x, y = data(16)
    kerastl.freeze(model, up_to=depth)
    with pytest.raises(BoundaryCacheError) as e:
        boundary.cached_fit(model, depth, x, y, optimizer="adam",
                            loss="sparse_categorical_crossentropy",
                            callbacks=callbacks, required=True, **kwargs)
    return str(e.value)


def test_refuses_augmentation_before_the_boundary():
    message = refusal(net(keras.layers.RandomFlip(name="flip")))
    assert "'flip'" in message and "random" in message
    assert "boundary_cache=False" in message


def test_refuses_a_prefix_that_is_not_frozen():
    model = net()
    with pytest.raises(BoundaryCacheError, match="'c1'.*not frozen"):
        boundary.split_at_block(model, 1)


def test_refuses_batch_norm_in_training_mode_before_the_boundary():
    model = net()
    model.get_layer("c1").trainable = False
    with pytest.raises(BoundaryCacheError, match="'bn1'.*training mode"):
        boundary.split_at_block(model, 1)


def test_refuses_gradual_unfreezing():
    model = net()
    unfreezing = kerastl.GradualUnfreezing(every=1)
    assert "GradualUnfreezing" in refusal(model, callbacks=[unfreezing])


def test_refuses_nothing_frozen():
    assert "no frozen block" in refusal(net(), depth=0)


def test_refuses_a_boundary_inside_a_nested_model():
    inner = net(name="inner")
    inner = keras.Model(inner.input, inner.get_layer("c2").output,
                        name="inner")
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(inner(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    assert "inside the nested model 'inner'" in refusal(model)


def test_refuses_a_dataset_that_repeats_forever():
    x, y = data(16)
    model = net()
    kerastl.freeze(model, up_to=1)
    forever = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    with pytest.raises(BoundaryCacheError, match="repeats forever"):
        boundary.cached_fit(model, 1, forever, optimizer="adam",
                            loss="sparse_categorical_crossentropy",
                            required=True)


def test_refuses_activations_over_the_memory_limit():
    message = refusal(net(), max_bytes=1000)
    assert "GiB" in message and "limit" in message


def test_auto_falls_back_to_end_to_end_and_says_why():
    x, y = data()
    model = net(keras.layers.RandomFlip(name="flip"))
    history = kerastl.fine_tune(
        model, (x, y), None, strategy="partial", freeze_up_to=1,
        head_epochs=0, epochs=1, check_features=False).fine_tune
    assert "'flip'" in history.boundary_cache
    assert len(history.history["loss"]) == 1


def test_bad_boundary_cache_value():
    x, y = data(16)
    with pytest.raises(kerastl.KerastlError, match="boundary_cache='yes'"):
        kerastl.fine_tune(net(), (x, y), boundary_cache="yes")


def test_cli_records_whether_the_cache_was_used(tmp_path):
    from conftest import stand_in_weights, write_folder
    from kerastl import cli
    import json

    folder = write_folder(tmp_path / "images", per_class=6, size=32)
    out = tmp_path / "run"
    assert cli.main(["finetune", "--model", "mobilenet_v2", "--weights",
                     stand_in_weights("mobilenet_v2"), "--data", str(folder), "--output", str(out),
                     "--image-size", "32", "--epochs", "1", "--head-epochs",
                     "0", "--strategy",
                     "partial", "--boundary-cache", "on", "--quiet",
                     "--mixed-precision", "bfloat16", "--jit", "off"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["boundary_cache"] == "used"
    assert metrics["experiment"]["boundary_cache"] == "on"
    assert metrics["experiment"]["mixed_precision"] == "bfloat16"
    model = keras.models.load_model(out / "model.keras")
    assert model.get_layer("Conv1").compute_dtype == "bfloat16"
    assert model.get_layer("head_predictions").compute_dtype == "float32"
    assert os.path.exists(out / "savedmodel")


def test_auto_replays_only_pipelines_kerastl_made(tmp_path):
    """A user's tf.data pipeline may augment: "auto" trains it end to end;
    image_folder_datasets (what kerastl finetune reads with) is replayed."""
    from conftest import write_folder
    from kerastl.image_folders import image_folder_datasets

    x, y = data()
    theirs = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    history = kerastl.fine_tune(net(), theirs, strategy="features",
                                head_epochs=0, epochs=1,
                                check_features=False).fine_tune
    assert "may augment" in history.boundary_cache
    folder = write_folder(tmp_path / "images", per_class=6, size=32)
    ours, val = image_folder_datasets(str(folder), (32, 32), batch_size=4)
    model = kerastl.build_classifier(mobilenet_classifier_backbone(), 2)
    history = kerastl.fine_tune(model, ours, val, strategy="partial",
                                head_epochs=0, epochs=1,
                                check_features=False).fine_tune
    assert history.boundary_cache == "used"


def mobilenet_classifier_backbone():
    return kerastl.load_backbone("mobilenet_v2", weights=None,
                                 input_shape=(32, 32, 3))


def test_a_dropout_after_the_frozen_blocks_runs_after_the_boundary():
    """build_classifier's dropout sits in the backbone's last block (a
    layer without weights takes its input's block): the head phase, the
    whole backbone frozen, still runs it once, the dropout after the cut,
    and trains as end to end does; a dropout between frozen blocks is
    still refused."""
    def classifier():
        keras.utils.set_random_seed(3)
        inputs = keras.Input((32, 32, 3))
        x = keras.layers.Conv2D(8, 3, strides=2, name="c1")(inputs)
        x = keras.layers.Conv2D(8, 3, strides=2, name="c2")(x)
        return kerastl.build_classifier(keras.Model(inputs, x), 3,
                                        dropout=0.5, seed=4)
    model = classifier()
    bm = kerastl.block_map(model)
    assert bm.block_of("head_dropout") == bm.base_blocks[-1]
    depth = len(bm.base_blocks)
    prefix, suffix = boundary.split_at_block(model, depth)
    assert prefix.output.shape == (None, 8)  # head_pool's output
    assert "head_dropout" in [l.name for l in suffix.layers]
    x, y = data(32)
    histories = {}
    for cache in (True, False):
        model = classifier()
        histories[cache] = kerastl.fine_tune(
            model, (x, y), data(16, 1), strategy="features", head_epochs=0,
            epochs=3, batch_size=8, seed=0, boundary_cache=cache,
            optimizer=keras.optimizers.Adam(1e-2),
            check_features=False).fine_tune
    assert histories[True].boundary_cache == "used"
    np.testing.assert_allclose(histories[True].history["loss"],
                               histories[False].history["loss"], rtol=1e-5)
    assert "'drop'" in refusal(net(keras.layers.Dropout(0.5, name="drop")))


def test_refuses_random_layers_inside_a_container():
    flips = keras.layers.Pipeline([keras.layers.RandomFlip(),
                                   keras.layers.RandomRotation(0.1)],
                                  name="augment")
    assert "'augment'" in refusal(net(flips))


def test_a_callback_that_unfreezes_the_prefix_stops_the_run():
    class Unfreeze(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            kerastl.unfreeze(self.model)

    x, y = data(32)
    with pytest.raises(BoundaryCacheError, match="a callback changed"):
        kerastl.fine_tune(net(), (x, y), strategy="features", head_epochs=0,
                          epochs=3, check_features=False,
                          callbacks=[Unfreeze()], boundary_cache=True)


def test_images_of_any_size_are_measured_not_crashed_on():
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu",
                            name="c1")(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax",
                                                   name="out")(x))
    x, y = data(16)
    history = kerastl.fine_tune(model, (x, y), strategy="partial",
                                freeze_up_to=1, head_epochs=0, epochs=1,
                                check_features=False).fine_tune
    assert history.boundary_cache == "used"
