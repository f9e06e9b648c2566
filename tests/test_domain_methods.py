"""MMD, domain confusion, ADDA and label-free model selection (DEV)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerastl
from kerastl.adaptation.selection import density_ratio
from conftest import small_cnn, toy_domains


def batch(n=16, seed=0):
    xs, ys, xt, _ = toy_domains(n, seed)
    return {"source": tf.constant(xs), "target": tf.constant(xt)}, \
        tf.constant(ys)


def gradients(model, x, y, variables, part=None):
    """Gradients of the model's training loss (or of one of its parts,
    ``part(y_pred)``) with respect to ``variables``."""
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        loss = (part(y_pred) if part is not None
                else model.compute_loss(x, y, y_pred))
    return tape.gradient(loss, variables)


def assert_same_gradients(got, expected):
    for g, e in zip(got, expected):
        if e is None:
            assert g is None or np.all(np.asarray(g) == 0)
        else:
            np.testing.assert_allclose(np.asarray(g), np.asarray(e),
                                       rtol=1e-5, atol=1e-7)


def trainable(layers):
    return [v for layer in layers for v in layer.trainable_variables]


# -- the losses on inputs where the answer is known ------------------------------

def test_mmd_is_zero_for_identical_samples_and_grows_with_a_mean_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, 5)).astype("float32")
    assert float(kerastl.adaptation.mmd_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    b = rng.normal(size=(64, 5)).astype("float32")
    values = [float(kerastl.adaptation.mmd_loss(a, b + shift))
              for shift in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(x < y for x, y in zip(values, values[1:])), values
    # Same distribution, different samples: small next to a real shift.
    assert values[0] < 0.25 * values[2]
    # Symmetric, and a hand computation for one kernel.
    assert float(kerastl.adaptation.mmd_loss(b, a)) == pytest.approx(
        float(kerastl.adaptation.mmd_loss(a, b)), rel=1e-5)
    x, y = np.array([[0.0], [1.0]], "float32"), np.array([[3.0]], "float32")
    d2 = np.array([[0, 1, 9], [1, 0, 4], [9, 4, 0]], "float64")
    k = np.exp(-d2 / d2.mean())
    expected = k[:2, :2].mean() + k[2:, 2:].mean() - 2 * k[:2, 2:].mean()
    assert float(kerastl.adaptation.mmd_loss(x, y, bandwidths=(1.0,))) == \
        pytest.approx(expected, rel=1e-5)
    with pytest.raises(kerastl.KerastlError, match="bandwidths"):
        kerastl.adaptation.mmd_loss(a, b, bandwidths=(0.0,))


def test_confusion_loss_is_minimal_at_uniform_domain_predictions():
    p = tf.Variable(np.full((6, 1), 0.5, "float32"))
    with tf.GradientTape() as tape:
        loss = kerastl.adaptation.confusion_loss(p)
    assert float(loss) == pytest.approx(np.log(2.0), rel=1e-6)
    np.testing.assert_allclose(tape.gradient(loss, p).numpy(), 0.0,
                               atol=1e-7)
    for q in (0.01, 0.2, 0.7, 0.99):
        assert float(kerastl.adaptation.confusion_loss(np.full((6, 1), q))) > np.log(2)
    # Confident in either direction costs the same.
    assert float(kerastl.adaptation.confusion_loss([[0.2]])) == pytest.approx(
        float(kerastl.adaptation.confusion_loss([[0.8]])), rel=1e-6)


# -- DANN(alignment="confusion" | "mmd") ---------------------------------------------

def test_confusion_splits_the_gradients_between_the_two_players():
    """The domain head learns from the domain loss only; the feature
    extractor from the class loss and lambda x the confusion loss only."""
    model = kerastl.DANN(small_cnn(), 2, alignment="confusion",
                         entropy_weight=0, lambda_=0.7)
    x, y = batch()
    head = trainable(model.domain_layers + [model.domain_head])
    features = model.feature_extractor.trainable_variables + trainable(
        model.bottleneck_layers)
    n = x["source"].shape[0]

    def domain_bce(p):
        truth = tf.concat([tf.zeros((n, 1)), tf.ones((n, 1))], axis=0)
        return tf.reduce_mean(keras.losses.binary_crossentropy(
            truth, p["domain"]))

    def class_and_confusion(p):
        class_loss = tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(y, p["label"][:n]))
        return class_loss + 0.7 * kerastl.adaptation.confusion_loss(p["confusion"])

    assert_same_gradients(gradients(model, x, y, head),
                          gradients(model, x, y, head, domain_bce))
    assert_same_gradients(gradients(model, x, y, features),
                          gradients(model, x, y, features,
                                    class_and_confusion))
    # And it is a real force on the features.
    confusion = gradients(model, x, y, features,
                          lambda p: kerastl.adaptation.confusion_loss(p["confusion"]))
    assert max(float(tf.reduce_max(tf.abs(g))) for g in confusion) > 0


def test_mmd_alignment_is_the_features_mmd_times_the_ramped_strength():
    model = kerastl.DANN(small_cnn(), 2, alignment="mmd", entropy_weight=0)
    x, y = batch()
    y_pred = model(x, training=True)
    n = x["source"].shape[0]
    f = y_pred["features"]
    assert model.domain_head is None and model.reversal is None
    assert float(model.alignment_loss(y_pred, n)) == 0.0  # lambda_ = 0
    model.alignment_strength.assign(0.6)
    assert float(model.alignment_loss(y_pred, n)) == pytest.approx(
        0.6 * float(kerastl.adaptation.mmd_loss(f[:n], f[n:])), rel=1e-5)
    # GaninLambda ramps it like the reversal.
    model.compile(keras.optimizers.Adam(1e-3))
    ramp = kerastl.adaptation.GaninLambda()
    model.fit(kerastl.adaptation.domain_dataset(toy_domains(32)[:2], toy_domains(32)[2],
                                     batch_size=8),
              epochs=1, verbose=0, callbacks=[ramp])
    assert float(model.alignment_strength) == pytest.approx(
        ramp.history[-1], rel=1e-6) and ramp.history[-1] > 0


@pytest.mark.parametrize("alignment", ["confusion", "mmd"])
def test_new_alignments_train_save_and_export(alignment, tmp_path):
    xs, ys, xt, yt = toy_domains(48)
    model = kerastl.DANN(small_cnn(), 2, alignment=alignment)
    model.compile(keras.optimizers.Adam(1e-3), metrics=["accuracy"])
    history = model.fit(kerastl.adaptation.domain_dataset((xs, ys), xt, batch_size=16),
                        epochs=2, verbose=0,
                        callbacks=[kerastl.adaptation.GaninLambda()])
    assert np.all(np.isfinite(history.history["domain_loss"]))
    assert ("domain_accuracy" in history.history) == (
        alignment == "confusion")
    names = kerastl.block_map(model).names
    assert names[-1] == ("domain_head" if alignment == "confusion"
                         else "label_head")
    assert kerastl.block_map(model).validate() == []
    model.save(tmp_path / "m.keras")
    loaded = kerastl.load_model(tmp_path / "m.keras")
    assert loaded.alignment == alignment
    np.testing.assert_array_equal(model.predict(xt, verbose=0),
                                  loaded.predict(xt, verbose=0))
    kerastl.export_savedmodel(model.classifier, tmp_path / "sm")
    reloaded = tf.saved_model.load(str(tmp_path / "sm"))
    served = reloaded.serve(tf.constant(xt))
    np.testing.assert_allclose(np.asarray(served),
                               model.predict(xt, verbose=0), atol=1e-5)


# -- ADDA ------------------------------------------------------------------------------

def source_model():
    encoder = keras.Sequential([keras.Input((32, 32, 3)),
                                keras.layers.Rescaling(1 / 255.0),
                                keras.layers.Conv2D(4, 3, strides=2,
                                                    activation="relu"),
                                keras.layers.GlobalAveragePooling2D(),
                                keras.layers.Dense(8, activation="relu")],
                               name="encoder")
    head = keras.Sequential([keras.Input((8,)),
                             keras.layers.Dense(2, activation="softmax")],
                            name="head")
    return encoder, head


def test_adda_gradients_fixed_parts_and_round_trip(tmp_path):
    xs, ys, xt, _ = toy_domains(32)
    encoder, head = source_model()
    stage1 = keras.Sequential([encoder, head])
    stage1.compile("adam", "sparse_categorical_crossentropy")
    stage1.fit(xs, ys, epochs=1, verbose=0)
    adda = kerastl.adaptation.ADDA(encoder, head, discriminator_hidden=(16,))
    # Starts as the source model.
    np.testing.assert_array_equal(adda.predict(xt, verbose=0),
                                  stage1.predict(xt, verbose=0))
    x, y = batch(16)
    disc = trainable(adda.discriminator_layers + [adda.discriminator])
    target = adda.target_encoder.trainable_variables
    assert adda.trainable_variables and not adda.source_encoder.trainable \
        and not adda.head.trainable
    n = x["source"].shape[0]

    def discriminator_loss(p):
        truth = tf.concat([tf.zeros((n, 1)), tf.ones((n, 1))], axis=0)
        return tf.reduce_mean(keras.losses.binary_crossentropy(
            truth, p["domain"]))

    def mapping_loss(p):
        return tf.reduce_mean(keras.losses.binary_crossentropy(
            tf.zeros_like(p["mapping"]), p["mapping"]))

    assert_same_gradients(gradients(adda, x, y, disc),
                          gradients(adda, x, y, disc, discriminator_loss))
    assert_same_gradients(gradients(adda, x, y, target),
                          gradients(adda, x, y, target, mapping_loss))
    source_before = [v.numpy().copy() for v in adda.source_encoder.weights
                     + adda.head.weights]
    target_before = [v.numpy().copy() for v in target]
    adda.compile(keras.optimizers.Adam(1e-3, beta_1=0.5),
                 metrics=["accuracy"])
    history = adda.fit(kerastl.adaptation.domain_dataset((xs, ys), xt, batch_size=8),
                       epochs=2, verbose=0)
    assert {"domain_loss", "mapping_loss", "domain_accuracy"} <= set(
        history.history)
    for before, v in zip(source_before, adda.source_encoder.weights
                         + adda.head.weights):
        np.testing.assert_array_equal(before, v.numpy())
    assert any(np.any(b != v.numpy()) for b, v in zip(target_before, target))
    assert kerastl.block_map(adda).validate() == []
    assert kerastl.block_map(adda).names[-3:] == [
        "source_head", "source_encoder", "discriminator"]
    adda.save(tmp_path / "adda.keras")
    loaded = kerastl.load_model(tmp_path / "adda.keras")
    np.testing.assert_array_equal(adda.predict(xt, verbose=0),
                                  loaded.predict(xt, verbose=0))
    # Exported as it is, like a DANN: its label path (target encoder and
    # source head), without the discriminator or the source encoder.
    kerastl.export_savedmodel(adda, tmp_path / "sm")
    reloaded = tf.saved_model.load(str(tmp_path / "sm"))
    served_weights = sum(int(np.prod(v.shape)) for v in reloaded.variables)
    assert served_weights == adda.classifier.count_params()
    assert served_weights < adda.count_params()
    served = reloaded.serve(tf.constant(xt))
    np.testing.assert_allclose(np.asarray(served),
                               adda.predict(xt, verbose=0), atol=1e-5)


def test_adda_refuses_what_it_cannot_clone():
    _, head = source_model()
    with pytest.raises(kerastl.KerastlError, match="encoder"):
        kerastl.adaptation.ADDA("encoder.keras", head)


# -- label-free model selection -----------------------------------------------------

def test_density_ratio_recovers_a_known_ratio():
    rng = np.random.default_rng(0)
    fs = rng.normal(0.0, 1.0, (4000, 1))
    ft = rng.normal(1.0, 1.0, (4000, 1))
    ratio = density_ratio(fs, ft)
    truth = np.exp(fs[:, 0] - 0.5)  # N(1, 1) / N(0, 1)
    inside = np.abs(fs[:, 0]) < 2
    np.testing.assert_allclose(np.log(ratio[inside]), np.log(truth[inside]),
                               atol=0.2)


class Rule:
    """A fixed classifier: ``predict`` gives probabilities by a rule."""

    def __init__(self, correct_where):
        self.correct_where = correct_where

    def predict(self, x, **kwargs):
        y = (x[:, 1] > 0).astype(int)
        right = self.correct_where(x)
        guess = np.where(right, y, 1 - y)
        probs = np.full((len(x), 2), 0.1)
        probs[np.arange(len(x)), guess] = 0.9
        return probs


def test_dev_picks_the_model_that_is_right_where_the_target_is():
    """Covariate shift: the target lives at x0 > 1, rare in the source.
    Model "near" is right only there, "far" only elsewhere; "far" has the
    lower source loss, DEV must still prefer "near"."""
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(3000, 2))
    ys = (xs[:, 1] > 0).astype(int)
    xt = rng.normal(size=(1000, 2)) * [0.5, 1.0] + [2.0, 0.0]
    near = Rule(lambda x: x[:, 0] > 1)
    far = Rule(lambda x: x[:, 0] <= 1)
    identity = {"near": lambda x: x, "far": lambda x: x}
    choice = kerastl.adaptation.select_model({"near": near, "far": far}, (xs, ys), xt,
                                  method="dev", features=identity)
    e = choice.estimates
    assert e["far"].source_loss < e["near"].source_loss
    assert choice.best == "near" and e["near"].risk < e["far"].risk
    assert choice.ranking() == ["near", "far"]
    assert "<- chosen" in choice.table().splitlines()[1]
    # One-hot labels give the same estimate; labels past the model's
    # classes, or max_samples too small, are clear errors.
    onehot = kerastl.adaptation.deep_embedded_validation(
        near, (xs, np.eye(2)[ys]), xt, features=lambda x: x)
    assert onehot.risk == pytest.approx(e["near"].risk)
    with pytest.raises(kerastl.KerastlError, match="labels go from 0 to 2"):
        kerastl.adaptation.deep_embedded_validation(
            near, (xs, 2 * ys), xt, features=lambda x: x)
    with pytest.raises(kerastl.KerastlError, match="max_samples=None"):
        kerastl.adaptation.deep_embedded_validation(
            near, (xs, ys), xt, features=lambda x: x, max_samples=None)
    # No shift: the estimate is the plain source loss, nearly.
    same = kerastl.adaptation.deep_embedded_validation(
        near, (xs, ys), rng.normal(size=(1000, 2)), features=lambda x: x)
    assert same.risk == pytest.approx(same.source_loss, rel=0.05)
    assert same.ess > 0.9 * same.n


def test_select_model_finds_the_features_of_kerastl_and_keras_models():
    xs, ys, xt, _ = toy_domains(24)
    dann = kerastl.DANN(small_cnn(), 2)
    encoder, head = source_model()
    plain = keras.Sequential([encoder, head])
    adda = kerastl.adaptation.ADDA(encoder, head, discriminator_hidden=(4,))
    candidates = {"dann": dann, "keras": plain, "adda": adda.classifier}
    choice = kerastl.adaptation.select_model(candidates, (xs, ys), xt, method="dev")
    assert set(choice.estimates) == {"dann", "keras", "adda"}
    assert all(np.isfinite(e.risk) for e in choice.estimates.values())
    # The default without source data is EnsV.
    ensv = kerastl.adaptation.select_model(candidates, target=xt)
    assert ensv.method == "ensemble" and ensv.best in candidates
    assert all(0 <= e.agreement <= 1 for e in ensv.estimates.values())
    with pytest.raises(kerastl.KerastlError, match="source_val"):
        kerastl.adaptation.select_model({"dann": dann}, xs, xt, method="dev")
    with pytest.raises(kerastl.KerastlError, match="dict"):
        kerastl.adaptation.select_model([dann], (xs, ys), xt)
    with pytest.raises(kerastl.KerastlError, match="method='ensv'; expected one of 'auto', 'ensemble'"):
        kerastl.adaptation.select_model(candidates, (xs, ys), xt, method="ensv")
    with pytest.raises(kerastl.KerastlError, match="target="):
        kerastl.adaptation.select_model(candidates, (xs, ys))


def test_ensemble_validation_scores_agreement_with_the_averaged_vote():
    """Three candidates on 4 target samples whose ensemble vote is known:
    the one that matches it everywhere wins; a lone dissenter scores its
    agreement exactly; mismatched shapes are refused."""
    def onehot(labels, p=0.8):
        out = np.full((len(labels), 3), (1 - p) / 2)
        out[np.arange(len(labels)), labels] = p
        return out
    predictions = {"a": onehot([0, 1, 2, 0]), "b": onehot([0, 1, 2, 1]),
                   "c": onehot([1, 1, 2, 0])}
    # Votes: [0, 1, 2, 0] (two of three agree on every sample).
    e = kerastl.adaptation.ensemble_validation(predictions)
    assert e["a"].agreement == 1.0
    assert e["b"].agreement == 0.75 and e["c"].agreement == 0.75
    assert max(e, key=lambda k: e[k].score) == "a"
    # Ties in agreement are broken by the probability given to the vote.
    tied = kerastl.adaptation.ensemble_validation(
        {"sure": onehot([0, 1], 0.9), "unsure": onehot([0, 1], 0.5)})
    assert tied["sure"].score > tied["unsure"].score
    with pytest.raises(kerastl.KerastlError, match="same target images"):
        kerastl.adaptation.ensemble_validation({"a": onehot([0, 1]),
                                     "b": onehot([0, 1, 2])})
    with pytest.raises(kerastl.KerastlError, match="probabilities"):
        kerastl.adaptation.ensemble_validation({"a": np.zeros(4)})


def _brightness_model(threshold):
    """Class 1 when an image's mean pixel exceeds ``threshold``."""
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    x = keras.layers.Lambda(lambda t: keras.ops.mean(t, axis=-1,
                                                     keepdims=True))(x)
    dense = keras.layers.Dense(2, activation="softmax")
    model = keras.Model(inputs, dense(x))
    dense.set_weights([np.array([[-1.0, 1.0]]),
                       np.array([threshold, -threshold])])
    return model


def test_mix_validation_scores_decisions_that_follow_the_majority_image():
    """Dark (mean 50, 60) and bright (250, 240) target images; a mix is 55%
    its first image. Dark-majority mixes have means 140 to 141 and
    bright-majority ones 159 to 160: a boundary at 150 follows the majority
    on every pair with different labels, one at 128 only where the bright
    image leads, which is half of them (a permutation takes as many dark
    images to bright partners as bright to dark)."""
    levels = [50, 250, 60, 240, 50, 250, 60, 240]
    x = np.stack([np.full((4, 4, 3), v, "float32") for v in levels])
    clean = kerastl.adaptation.mix_validation(_brightness_model(150.0), x)
    assert clean.pairs > 0 and clean.inter == 1.0 and clean.intra == 1.0
    skewed = kerastl.adaptation.mix_validation(_brightness_model(128.0), x)
    assert skewed.pairs == clean.pairs and skewed.inter == 0.5
    # One class everywhere: no boundary to probe, the lowest score.
    flat = kerastl.adaptation.mix_validation(_brightness_model(-1e4), x)
    assert flat.pairs == 0 and flat.score == 0.0
    chosen = kerastl.adaptation.select_model(
        {"150": _brightness_model(150.0), "128": _brightness_model(128.0),
         "flat": _brightness_model(-1e4)}, target=x, method="mixval")
    assert chosen.best == "150" and "inter" in chosen.table()
    with pytest.raises(kerastl.KerastlError, match="lam=0.4"):
        kerastl.adaptation.mix_validation(_brightness_model(150.0), x,
                                          lam=0.4)


def test_average_thresholded_confidence_on_hand_computed_scores():
    """Source confidences 0.9, 0.8, 0.6, 0.55 with 3 of 4 right: the
    threshold is the 25th percentile, 0.5875 (0.55 + 0.75 x 0.05), above
    which 3 of 4 source samples lie; 2 of the 4 target confidences (0.95,
    0.7) are above it, so the predicted target accuracy is 0.5. With two
    classes the negative entropy orders samples as the top probability
    does, so ATC-NE predicts the same."""
    atc = kerastl.adaptation.average_thresholded_confidence

    def binary(p):
        p = np.asarray(p)
        return np.stack([p, 1 - p], axis=1)
    ps, ys = binary([0.9, 0.8, 0.4, 0.55]), [0, 0, 0, 0]
    pt = binary([0.95, 0.7, 0.5, 0.52])
    mc = atc(ps, ys, pt, score="confidence")
    assert mc.source_accuracy == 0.75 and mc.n == 4
    assert mc.threshold == pytest.approx(0.5875) and mc.accuracy == 0.5
    assert atc(ps, ys, pt).accuracy == 0.5  # score="entropy"
    # One-hot labels are read as their argmax.
    assert atc(ps, np.eye(2)[ys], pt, score="confidence") == mc
    # Every score tied (saturated outputs): the tied samples count as
    # above the threshold in the share that gives the source accuracy.
    saturated = binary([1.0, 1.0, 0.0, 0.0])
    e = atc(saturated, [0, 1, 0, 1], binary([1.0, 0.0]))
    assert e.source_accuracy == 0.5 and e.accuracy == 0.5
    # Some tied: source confidences 0.6, 0.9, 0.9, 1.0 with two of four
    # right: the threshold is 0.9, one sample (1.0) lies above it and two
    # at it, of which half count (0.25 + 0.5 x 0.5 = 0.5); on the target
    # 0.9, 0.9, 1.0, 0.6 that gives 0.25 + 0.5 x 0.5 = 0.5 (counting every
    # tied sample, or none, would give 0.75 or 0.25).
    partly = atc(binary([0.6, 0.9, 0.9, 1.0]), [0, 0, 1, 1],
                 binary([0.9, 0.9, 1.0, 0.6]), score="confidence")
    assert partly.threshold == 0.9 and partly.source_accuracy == 0.5
    assert partly.accuracy == pytest.approx(0.5)
    with pytest.raises(kerastl.KerastlError, match="score='margin'"):
        atc(ps, ys, pt, score="margin")
    with pytest.raises(kerastl.KerastlError, match="2 classes and the "
                       "target predictions 3"):
        atc(ps, ys, np.full((4, 3), 1 / 3))
    with pytest.raises(kerastl.KerastlError, match="4 source predictions "
                       "but 3 labels"):
        atc(ps, ys[:3], pt)
    with pytest.raises(kerastl.KerastlError, match="logits"):
        atc(ps * 4, ys, pt)
    with pytest.raises(kerastl.KerastlError, match="labels go from 1 to 2"):
        atc(ps, [1, 1, 2, 1], pt)
    with pytest.raises(kerastl.KerastlError, match="no predictions"):
        atc(ps, ys, pt[:0])


def test_select_model_by_atc_prefers_the_model_right_on_the_source():
    """Two brightness models, both sure of every image: the one right on
    all the source images is predicted right on the target too (1.0); the
    one that calls everything class 1 is right on half the source, so half
    of its (equally sure) target predictions count (0.5)."""
    levels = [50, 250, 60, 240, 50, 250, 60, 240]
    x = np.stack([np.full((4, 4, 3), v, "float32") for v in levels])
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    candidates = {"150": _brightness_model(150.0),
                  "flat": _brightness_model(-1e4)}
    chosen = kerastl.adaptation.select_model(candidates, (x, y), x + 5,
                                             method="atc")
    assert chosen.best == "150" and chosen.method == "atc"
    assert chosen.estimates["150"].accuracy == 1.0
    assert chosen.estimates["flat"].accuracy == 0.5
    assert "predicted" in chosen.table()
    # The default, "auto", is ATC given source data (two candidates are
    # enough for it), and EnsV without (which refuses two).
    auto = kerastl.adaptation.select_model(candidates, (x, y), x + 5)
    assert auto.method == "atc" and auto.best == "150"
    assert auto.estimates["flat"].accuracy == 0.5
    with pytest.raises(kerastl.KerastlError, match="method='atc' with "
                       "source_val"):
        kerastl.adaptation.select_model(candidates, target=x + 5)
    with pytest.raises(kerastl.KerastlError, match="source_val=\\(x, y\\)"):
        kerastl.adaptation.select_model(candidates, target=x, method="atc")
