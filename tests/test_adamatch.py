"""AdaMatch: its loss on hand-computed inputs, the ramp, augmentation that
stays out of the exported model, save/load and resume."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerastl
from kerastl.adaptation import AdaMatch, adamatch_loss
from kerastl.adaptation.adamatch import adamatch_weight

from conftest import small_cnn, toy_domains


def ce(logits, label):
    return float(np.log(np.exp(logits).sum()) - logits[label])


def test_adamatch_loss_on_hand_computed_inputs():
    labels = np.array([0, 1])
    # source: weak views, then strong views
    source = np.array([[2, 0], [0, 1], [1, 0], [0, 2]], "float32")
    # target: weak views, then strong views
    target = np.array([[3, 0], [0, 0.8], [1, 1], [0, 1]], "float32")
    source_loss, target_loss, mask = adamatch_loss(labels, source, None,
                                                   target, tau=0.9)
    # Source: the mean cross-entropy of the four views.
    assert float(source_loss) == pytest.approx(np.mean(
        [ce(source[0], 0), ce(source[1], 1), ce(source[2], 0),
         ce(source[3], 1)]), rel=1e-6)
    # The source's weak confidences are 0.881 and 0.731: the threshold is
    # 0.9 x 0.806 = 0.725. The second target image's weak prediction,
    # [0.310, 0.690], is below it; aligned to the source's class balance
    # (x [0.911, 1.153], renormalised) it is [0.262, 0.738], above: both
    # images are pseudo-labelled, as 0 and 1.
    np.testing.assert_array_equal(np.asarray(mask), [1.0, 1.0])
    p = np.exp([0, 0.8]) / np.exp([0, 0.8]).sum()
    assert p.max() < 0.9 * np.mean([0.8808, 0.7311])
    assert float(target_loss) == pytest.approx(
        np.mean([np.log(2.0), ce(target[3], 1)]), rel=1e-5)
    assert float(target_loss) == pytest.approx(0.5032, abs=1e-4)
    # Random logit interpolation at 1/2 with a source-only pass of zeros
    # halves the source logits.
    source_loss, _, _ = adamatch_loss(labels, source, np.zeros_like(source),
                                      target, interpolation=np.full(
                                          source.shape, 0.5, "float32"))
    assert float(source_loss) == pytest.approx(np.mean(
        [ce(source[i] / 2, [0, 1, 0, 1][i]) for i in range(4)]), rel=1e-6)
    # At tau=1 the threshold is the source's mean confidence, 0.806: the
    # first image (aligned 0.941) stays, the second (0.738) is masked out.
    _, target_loss, mask = adamatch_loss(labels, source, None, target,
                                         tau=1.0)
    np.testing.assert_array_equal(np.asarray(mask), [1.0, 0.0])
    assert float(target_loss) == pytest.approx(np.log(2.0) / 2, rel=1e-5)


def test_alignment_flips_a_pseudo_label_and_the_threshold_reads_weak_views():
    labels = np.array([1, 1])
    # The source is confident in class 1 on its weak views (0.881, 0.953:
    # threshold 0.9 x 0.917 = 0.825), much less on its strong ones (0.622).
    source = np.array([[0, 2], [0, 3], [0, 0.5], [0, 0.5]], "float32")
    # The target's weak predictions lean to class 0 ([0.881, 0.119] and
    # [0.550, 0.450]); aligned to the source's balance (x [0.116, 3.22],
    # renormalised) they become [0.21, 0.79] and [0.042, 0.958]: the second
    # image's pseudo-label flips to 1 and passes the threshold; the first
    # (0.79) does not, though it would against all four source views
    # (0.9 x 0.770 = 0.693).
    target = np.array([[2, 0], [0.2, 0], [0, 0], [1, 0]], "float32")
    _, target_loss, mask = adamatch_loss(labels, source, None, target)
    np.testing.assert_array_equal(np.asarray(mask), [0.0, 1.0])
    # The masked mean over both images: the second's strong view [1, 0]
    # against label 1.
    assert float(target_loss) == pytest.approx(
        np.log(1 + np.e) / 2, rel=1e-5)


def test_the_target_weight_ramps_in_by_a_half_cosine():
    values = [float(adamatch_weight(s, 10)) for s in (0, 5, 10, 25)]
    np.testing.assert_allclose(values, [0.0, 0.5, 1.0, 1.0], atol=1e-6)


@pytest.fixture(scope="module")
def trained():
    xs, ys, xt, yt = toy_domains(48)
    keras.utils.set_random_seed(0)
    model = AdaMatch(small_cnn(), 2, seed=0)
    model.compile(keras.optimizers.Adam(1e-3), metrics=["accuracy"])
    history = model.fit(kerastl.adaptation.domain_dataset(
        (xs, ys), xt, batch_size=16), epochs=2, verbose=0)
    return model, history, (xs, ys, xt, yt)


def test_adamatch_trains_in_fit_and_logs_its_terms(trained):
    model, history, _ = trained
    for key in ("source_loss", "target_loss", "mask_rate", "accuracy"):
        assert np.all(np.isfinite(history.history[key])), key
    # 3 steps per epoch, 2 epochs: the ramp spans the first half.
    assert float(model.ramp_steps) == 3.0
    assert float(model.step) == 6.0
    assert kerastl.block_map(model).names[-1] == "label_head"
    assert kerastl.block_map(model).validate() == []
    # Label-free selection embeds it like a DANN: the features the head
    # reads.
    from kerastl.adaptation.selection import feature_function
    _, _, xt, _ = toy_domains(8)
    assert feature_function(model)(xt).shape == (8, 8)


def test_augmentation_reaches_training_steps_but_never_the_export(
        trained, tmp_path):
    model, _, (xs, ys, xt, yt) = trained
    batch = {"source": tf.constant(xs[:8]), "target": tf.constant(xt[:8])}
    # In a training step the views differ from call to call...
    a = np.asarray(model(batch, training=True)["source"])
    b = np.asarray(model(batch, training=True)["source"])
    assert not np.allclose(a, b)
    # ... the label path and the classifier see the images as they are.
    np.testing.assert_array_equal(model.predict(xt, verbose=0),
                                  model.predict(xt, verbose=0))
    classifier = model.classifier
    augmenting = (keras.layers.RandAugment, keras.layers.RandomTranslation,
                  keras.layers.RandomZoom)
    def walk(layer):
        yield layer
        for inner in getattr(layer, "layers", []):
            yield from walk(inner)
    assert not [layer for layer in walk(classifier)
                if isinstance(layer, augmenting)]
    assert [layer for layer in walk(model.strong)
            if isinstance(layer, augmenting)]  # (what the walk looks for)
    # The model itself exports as its classifier (as kerastl.adapt's
    # docstring shows), with the classifier's weights only.
    kerastl.export_savedmodel(model, tmp_path / "sm")
    reloaded = tf.saved_model.load(str(tmp_path / "sm"))
    assert sum(int(np.prod(v.shape)) for v in reloaded.variables) == \
        classifier.count_params()
    served = reloaded.serve(tf.constant(xt))
    np.testing.assert_allclose(np.asarray(served),
                               model.predict(xt, verbose=0), atol=1e-5)


def test_adamatch_saves_loads_and_resumes(trained, tmp_path):
    model, _, (xs, ys, xt, yt) = trained
    model.save(tmp_path / "m.keras")
    loaded = kerastl.load_model(tmp_path / "m.keras")
    assert isinstance(loaded, AdaMatch)
    assert (loaded.tau, loaded.warmup, loaded.num_classes) == (0.9, 0.5, 2)
    assert [type(layer).__name__ for layer in loaded.strong.layers] == [
        "RandomTranslation", "RandomZoom", "RandAugment", "RandomErasing"]
    def config(layer):  # (as JSON: tuples come back as lists)
        return json.loads(json.dumps(layer.get_config()))
    assert config(loaded.strong) == config(model.strong)
    assert config(loaded.weak) == config(model.weak)
    np.testing.assert_array_equal(model.predict(xt, verbose=0),
                                  loaded.predict(xt, verbose=0))
    history = loaded.fit(kerastl.adaptation.domain_dataset(
        (xs, ys), xt, batch_size=16), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_the_loss_is_source_plus_the_ramped_target_and_only_training_ramps():
    xs, ys, xt, _ = toy_domains(16)
    model = AdaMatch(small_cnn(), 2, seed=0)
    batch = {"source": tf.constant(xs), "target": tf.constant(xt)}
    y = tf.constant(ys)
    model.ramp_steps.assign(10.0)
    for step, weight in ((0.0, 0.0), (5.0, 0.5), (10.0, 1.0)):
        model.step.assign(step)
        for tracker in (model.source_loss_tracker, model.target_loss_tracker):
            tracker.reset_state()
        total = model.compute_loss(batch, y, model(batch, training=True),
                                   training=True)
        source = float(model.source_loss_tracker.result())
        target = float(model.target_loss_tracker.result())
        assert target > 0
        assert float(total) == pytest.approx(source + weight * target,
                                             rel=1e-5)
        assert float(model.step) == step + 1  # a training step counts
    model.compute_loss(batch, y, model(batch), training=False)
    assert float(model.step) == 11.0  # validation does not


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
def test_the_source_only_pass_leaves_the_moving_statistics_alone(traced):
    xs, _, xt, _ = toy_domains(16)
    identity = keras.layers.Identity
    model = AdaMatch(small_cnn(), 2, weak=identity(), strong=identity())
    reference = AdaMatch(small_cnn(), 2, weak=identity(), strong=identity())
    reference.set_weights(model.get_weights())
    batch = {"source": tf.constant(xs), "target": tf.constant(xt)}
    step = tf.function(model.call) if traced else model.call
    step(batch, training=True)
    # The reference sees only the pass over both domains' views.
    reference.logits(tf.constant(np.concatenate([xs, xs, xt, xt])),
                     training=True)
    def moving(m):
        return [v for layer in m.feature_extractor.layers
                if isinstance(layer, keras.layers.BatchNormalization)
                for v in layer.non_trainable_variables]
    assert moving(model) and len(moving(model)) == len(moving(reference))
    for got, expected in zip(moving(model), moving(reference)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected),
                                   rtol=1e-6)
    # (the pass over the source alone would have moved them)
    reference.logits(tf.constant(np.concatenate([xs, xs])), training=True)
    assert not np.allclose(np.asarray(moving(model)[0]),
                           np.asarray(moving(reference)[0]))


def test_a_dataset_of_unknown_length_warns_that_nothing_ramps():
    xs, ys, xt, _ = toy_domains(32)
    data = kerastl.adaptation.domain_dataset((xs, ys), xt, batch_size=16)
    data = data.filter(lambda x, y: True)  # (cardinality unknown)
    model = AdaMatch(small_cnn(), 2, seed=0)
    model.compile(keras.optimizers.Adam(1e-3))
    with pytest.warns(UserWarning, match="steps_per_epoch"):
        model.fit(data, epochs=1, verbose=0)
    # steps_per_epoch and initial_epoch: the ramp spans all the epochs and
    # a resumed run continues it.
    model.fit(data.repeat(), epochs=3, steps_per_epoch=2, initial_epoch=1,
              verbose=0)
    assert float(model.ramp_steps) == 3.0
    assert float(model.step) == 2.0 + 4.0


def test_bad_arguments_are_clear_errors():
    with pytest.raises(kerastl.KerastlError, match="tau"):
        AdaMatch(small_cnn(), 2, tau=1.5)
    with pytest.raises(kerastl.KerastlError, match="num_classes"):
        AdaMatch(small_cnn(), 1)
    with pytest.raises(kerastl.KerastlError, match="feature extractor"):
        AdaMatch("resnet50", 2)
    with pytest.raises(kerastl.KerastlError, match="strong"):
        AdaMatch(small_cnn(), 2, strong=lambda x: x)
    for bad in (dict(value_range=None), dict(value_range=(1, 0)),
                dict(seed="1"), dict(dropout=1.5), dict(bottleneck=0)):
        with pytest.raises(kerastl.KerastlError, match=list(bad)[0]):
            AdaMatch(small_cnn(), 2, **bad)
    xs, ys, xt, yt = toy_domains(16)
    model = AdaMatch(small_cnn(), 2)
    model.compile(keras.optimizers.Adam(1e-3))
    with pytest.raises(kerastl.KerastlError, match="target_labeled"):
        model.fit(kerastl.adaptation.domain_dataset(
            (xs, ys), xt, batch_size=8, target_labeled=(xt[:4], yt[:4])),
            epochs=1, verbose=0)


def test_zoom_sets_the_default_strong_views_zoom_and_survives_a_round_trip():
    model = AdaMatch(small_cnn(), 2, seed=3, zoom=(-0.4, 0.5))
    def configs(view):  # (without the layers' numbered names)
        return [{k: v for k, v in layer.get_config().items()
                 if k != "name"} for layer in view.layers]
    # The default strong view, seeds and all, with only the zoom changed.
    assert configs(model.strong) == configs(
        kerastl.adaptation.strong_augmentation((0, 255), 4, (-0.4, 0.5)))
    assert tuple(model.strong.layers[1].height_factor) == (-0.4, 0.5)
    assert tuple(AdaMatch(small_cnn(), 2).strong.layers[1]
                 .height_factor) == (-0.2, 0.5)
    # The config keeps the strong view it built (not zoom= beside it).
    config = model.get_config()
    assert "zoom" not in config
    loaded = AdaMatch.from_config(json.loads(json.dumps(
        keras.saving.serialize_keras_object(model)))["config"])
    assert tuple(loaded.strong.layers[1].height_factor) == (-0.4, 0.5)
    with pytest.raises(kerastl.KerastlError, match="not both"):
        AdaMatch(small_cnn(), 2, zoom=(-0.4, 0.5),
                 strong=kerastl.adaptation.weak_augmentation())
    with pytest.raises(kerastl.KerastlError, match="low <= high"):
        AdaMatch(small_cnn(), 2, zoom=(0.5, -0.2))
    with pytest.raises(kerastl.KerastlError, match="<= 1"):
        AdaMatch(small_cnn(), 2, zoom=(-0.2, 1.5))


# -- kerastl.adapt: the default recipe in one call ------------------------------


def _bn_state(model):
    return [np.array(v) for layer in model.bottleneck_layers
            if isinstance(layer, keras.layers.BatchNormalization)
            for v in (layer.moving_mean, layer.moving_variance)]


@pytest.mark.parametrize("adabn", [True, False])
def test_adapt_trains_adamatch_for_the_steps_then_adabn(adabn):
    xs, ys, xt, _ = toy_domains(64)
    ys = ys + np.arange(64) % 2  # labels 0..2: three classes
    keras.utils.set_random_seed(0)
    if adabn:  # datasets of single samples
        source = tf.data.Dataset.from_tensor_slices((xs, ys))
        target, classes = tf.data.Dataset.from_tensor_slices(xt), 3
    else:  # arrays; the number of classes is inferred from labels of
        # shape (n, 1), as keras.datasets gives them
        source, target, classes = (xs, ys[:, None]), xt, None
    # (zoom: the strong view's RandomZoom, default (-0.2, 0.5))
    zoom = {} if adabn else {"zoom": (-0.4, 0.5)}
    model = kerastl.adapt(small_cnn(), source, target, classes, steps=8,
                          batch_size=16, adabn=adabn, seed=1, verbose=0,
                          callbacks=None, **zoom)
    assert isinstance(model, AdaMatch)
    # The strong view is AdaMatch's own (seeded from seed + 1), with the
    # zoom asked for.
    factor = zoom.get("zoom", (-0.2, 0.5))
    assert tuple(model.strong.layers[1].height_factor) == factor
    def configs(view):  # (without the layers' numbered names)
        return [{k: v for k, v in layer.get_config().items()
                 if k != "name"} for layer in view.layers]
    assert configs(model.strong) == configs(
        kerastl.adaptation.strong_augmentation((0, 255), 2, factor))
    # 64 images in batches of 16: 4 steps a pass, 2 passes for 8 steps.
    assert int(model.optimizer.iterations) == 8
    assert model.predict(xt, verbose=0).shape == (64, 3)
    assert len(model.history.history["loss"]) == 2
    # AdaBN replaces the statistics from scratch (the first batch enters
    # with weight 1), so running it again changes nothing after adabn=True
    # and changes the training-time statistics after adabn=False.
    before = _bn_state(model)
    kerastl.adaptation.adapt_batch_norm(model, xt)
    same = all(np.allclose(a, b, rtol=1e-5, atol=1e-6)
               for a, b in zip(before, _bn_state(model)))
    assert same == adabn


def test_adapt_refuses_what_it_cannot_train_on():
    xs, ys, xt, _ = toy_domains(32)
    with pytest.raises(kerastl.KerastlError, match="labels too"):
        kerastl.adapt(small_cnn(), xs, xt)
    with pytest.raises(kerastl.KerastlError, match="one-hot labels"):
        kerastl.adapt(small_cnn(), (xs, np.eye(2)[ys]), xt)
    with pytest.raises(kerastl.KerastlError, match="all 0"):
        kerastl.adapt(small_cnn(), (xs, 0 * ys), xt)
    with pytest.raises(kerastl.KerastlError, match="no labelled images"):
        kerastl.adapt(small_cnn(), (xs[:0], ys[:0]), xt)
    with pytest.raises(kerastl.KerastlError, match="num_classes='2'"):
        kerastl.adapt(small_cnn(), (xs, ys), xt, num_classes="2")
    with pytest.raises(kerastl.KerastlError, match="epochs=: not an arg"):
        kerastl.adapt(small_cnn(), (xs, ys), xt, epochs=2)
    # Images the default strong view would draw outside of: pixels
    # outside value_range, or scaled images under the default (0, 255).
    with pytest.raises(kerastl.KerastlError, match="target images go from "
                       "100.* outside value_range=.0, 1."):
        kerastl.adapt(small_cnn(), (xs / 255, ys), xt, value_range=(0, 1))
    with pytest.raises(kerastl.KerastlError, match="value_range=.0, 1."):
        kerastl.adapt(small_cnn(), (xs / 255, ys), xt / 255)
    with pytest.raises(kerastl.KerastlError, match="grayscale"):
        kerastl.adapt(small_cnn(), (xs, ys), xt[..., :1])
    with pytest.raises(kerastl.KerastlError, match="steps=0"):
        kerastl.adapt(small_cnn(), (xs, ys), xt, steps=0)
    source = tf.data.Dataset.from_tensor_slices((xs, ys))
    with pytest.raises(kerastl.KerastlError, match="num_classes="):
        kerastl.adapt(small_cnn(), source, xt)
    with pytest.raises(kerastl.KerastlError, match="length is unknown"):
        kerastl.adapt(small_cnn(), source.filter(lambda x, y: True), xt,
                      num_classes=2)
    with pytest.raises(kerastl.KerastlError, match="target is a list"):
        kerastl.adapt(small_cnn(), (xs, ys), list(xt))
    with pytest.raises(kerastl.KerastlError, match="unbatch"):
        kerastl.adapt(small_cnn(), source.batch(8), xt, num_classes=2)
    with pytest.raises(kerastl.KerastlError, match="target images only"):
        kerastl.adapt(small_cnn(), (xs, ys), source, num_classes=2)
    with pytest.raises(kerastl.KerastlError, match="num_classes=2"):
        kerastl.adapt(small_cnn(), (xs, ys), xt, num_classes=1)
    with pytest.raises(kerastl.KerastlError, match="fewer than batch_size"):
        kerastl.adapt(small_cnn(), (xs, ys), xt, batch_size=64)
    with pytest.raises(kerastl.KerastlError, match="zoom='in'.*pair"):
        kerastl.adapt(small_cnn(), (xs, ys), xt, zoom="in")
    with pytest.raises(kerastl.KerastlError, match="low <= high"):
        kerastl.adapt(small_cnn(), (xs, ys), xt, zoom=(0.5, -0.2))
    with pytest.raises(kerastl.KerastlError, match="not both"):
        kerastl.adapt(small_cnn(), (xs, ys), xt, zoom=(-0.4, 0.5),
                      strong=kerastl.adaptation.weak_augmentation())


@pytest.mark.grappler  # two graphs, bit for bit
def test_kerastls_rand_augment_gives_keras_images_bit_for_bit():
    from kerastl.augment import RandAugment
    images = tf.constant(np.random.default_rng(0).uniform(
        0, 255, (16, 32, 32, 3)).astype("float32"))
    for kwargs in ({"factor": 0.1}, {"factor": 0.5, "num_ops": 3}):
        kwargs = dict(value_range=(0, 255), seed=7, **kwargs)
        ours, theirs = RandAugment(**kwargs), keras.layers.RandAugment(
            **kwargs)
        # Eagerly, call after call (the seed generators advance alike)...
        for _ in range(3):
            np.testing.assert_array_equal(ours(images, training=True),
                                          theirs(images, training=True))
        # ... and not at all outside training.
        np.testing.assert_array_equal(ours(images, training=False), images)
    # In a graph (where Keras's where runs every operation)...
    ours_fn = tf.function(lambda x: ours(x, training=True))
    theirs_fn = tf.function(lambda x: theirs(x, training=True))
    for _ in range(6):
        np.testing.assert_array_equal(ours_fn(images), theirs_fn(images))
    # ... in a tf.data pipeline, and back from its config.
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(RandAugment(
            value_range=(0, 255), factor=0.1, seed=3)))
    assert type(restored) is RandAugment and restored.seed == 3
    reference = keras.layers.RandAugment(value_range=(0, 255), factor=0.1,
                                         seed=3)
    def run(layer):
        data = tf.data.Dataset.from_tensor_slices(images).batch(4).map(
            lambda x: layer(x, training=True))
        return np.concatenate(list(data.as_numpy_iterator()))
    np.testing.assert_array_equal(run(restored), run(reference))


@pytest.mark.grappler  # two graphs, bit for bit
def test_adamatch_trains_the_same_weights_as_with_kerass_rand_augment():
    # The default strong view's RandAugment is kerastl's: the run is the
    # one Keras's own layer gives, weight for weight (the measured
    # benchmark figures stay those of this recipe).
    xs, ys, xt, _ = toy_domains(32)
    weights = []
    for strong in ("kerastl", "keras"):
        keras.utils.set_random_seed(0)
        model = AdaMatch(small_cnn(), 2, seed=0)
        if strong == "keras":
            layers = model.strong.layers
            assert type(layers[2]).__module__ == "kerastl.augment"
            model.strong = keras.Sequential(
                [layers[0], layers[1], keras.layers.RandAugment.from_config(
                    layers[2].get_config()), layers[3]])
        model.compile(keras.optimizers.Adam(1e-3))
        model.fit(kerastl.adaptation.domain_dataset(
            (xs, ys), xt, batch_size=8, seed=0), epochs=1, verbose=0)
        weights.append(model.get_weights())
    for ours, theirs in zip(*weights):
        np.testing.assert_array_equal(ours, theirs)
