"""GradientReversal, the DANN schedules and model, CORAL and AdaBN."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerastl
from kerastl import _keras_private as _private
from kerastl.adaptation.schedules import ganin_lambda
from conftest import (save_load_and_resume, small_cnn,
                      step_with_references, toy_domains)


# -- GradientReversal -----------------------------------------------------------

def grl_gradient(layer, x, upstream, jit=False):
    def f(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * upstream)
        return y, tape.gradient(loss, x)
    if jit is not None:
        f = tf.function(f, jit_compile=jit)
    return f(x)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("mode", ["eager", "graph", "jit"])
def test_gradient_is_minus_lambda_times_upstream(dtype, mode):
    layer = kerastl.GradientReversal(0.7, dtype=dtype)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(3, 5)), dtype=dtype)
    upstream = tf.constant(rng.normal(size=(3, 5)), dtype=dtype)
    jit = {"eager": None, "graph": False, "jit": True}[mode]
    y, g = grl_gradient(layer, x, upstream, jit)
    assert y.dtype == dtype and g.dtype == dtype
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    expected = (-np.asarray(0.7, dtype) * upstream.numpy()).astype(dtype)
    np.testing.assert_array_equal(g.numpy(), expected)


def test_mixed_float16_gradient_follows_the_input_dtype():
    layer = kerastl.GradientReversal(2.0, dtype="mixed_float16")
    x = tf.constant(np.ones((2, 3)), dtype="float16")
    y, g = grl_gradient(layer, x, tf.ones((2, 3), "float16"))
    assert y.dtype == tf.float16 and g.dtype == tf.float16
    np.testing.assert_array_equal(g.numpy(), -2.0 * np.ones((2, 3)))


def test_lambda_changes_without_retracing():
    layer = kerastl.GradientReversal(1.0)
    traces = []

    @tf.function(jit_compile=True)
    def grad(x):
        traces.append(1)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x))
        return tape.gradient(loss, x)

    x = tf.ones((2, 2))
    for lam in (0.0, 0.5, 3.0):
        layer.lambda_.assign(lam)
        np.testing.assert_array_equal(grad(x).numpy(), -lam * np.ones((2, 2)))
    assert len(traces) == 1


def test_gradient_reversal_config_and_model_round_trip(tmp_path):
    layer = kerastl.GradientReversal(0.3, name="grl")
    again = kerastl.GradientReversal.from_config(layer.get_config())
    assert again.initial_lambda == 0.3 and again.name == "grl"
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(1)(kerastl.GradientReversal(0.3)(inputs))
    model = keras.Model(inputs, outputs)
    model.save(tmp_path / "grl.keras")
    loaded = keras.models.load_model(tmp_path / "grl.keras")
    x = np.ones((2, 4), "float32")
    np.testing.assert_array_equal(model.predict(x, verbose=0),
                                  loaded.predict(x, verbose=0))
    with pytest.raises(kerastl.KerastlError, match=">= 0"):
        kerastl.GradientReversal(-1.0)


# -- schedules ------------------------------------------------------------------

def test_ganin_lambda_values():
    # Ganin & Lempitsky (2015)'s schedule: 0, .462, .848, .987, 1.0 at p = 0, .1, .25, .5, 1.
    got = [round(ganin_lambda(p), 3) for p in (0, 0.1, 0.25, 0.5, 1.0)]
    assert got == [0.0, 0.462, 0.848, 0.987, 1.0]


def fit_one_epoch(dann):
    """One epoch of batch-16 training on :func:`toy_domains`; the logs."""
    xs, ys, xt, _ = toy_domains()
    return dann.fit(kerastl.adaptation.domain_dataset((xs, ys), xt, batch_size=16),
                    epochs=1, verbose=0).history


def test_schedules_update_every_batch():
    xs, ys, xt, _ = toy_domains()
    keras.utils.set_random_seed(0)
    dann = kerastl.DANN(small_cnn(), 2)
    dann.compile(keras.optimizers.SGD(0.01, momentum=0.9))
    lam, lr = kerastl.adaptation.GaninLambda(), kerastl.adaptation.GaninLearningRate()
    ds = kerastl.adaptation.domain_dataset((xs, ys), xt, batch_size=16)  # 4 steps
    history = dann.fit(ds, epochs=2, callbacks=[lam, lr], verbose=0)
    total = 8
    expected = [ganin_lambda(s / total) for s in range(total)]
    np.testing.assert_allclose(lam.history, expected)
    np.testing.assert_allclose(
        lr.history, [0.01 / (1 + 10 * s / total) ** 0.75 for s in range(total)])
    assert float(dann.reversal.lambda_.numpy()) == pytest.approx(expected[-1])
    assert float(dann.optimizer.learning_rate.numpy()) == pytest.approx(
        lr.history[-1])
    assert history.history["grl_lambda"][-1] == pytest.approx(expected[-1])
    # A dataset of unknown length and no total_steps: a clear error.
    cb = kerastl.adaptation.GaninLambda()
    cb.set_model(dann)
    cb.set_params({"epochs": 3, "steps": None})
    with pytest.raises(kerastl.KerastlError, match="length of training"):
        cb.on_train_batch_begin(0)
    cb = kerastl.adaptation.GaninLambda(total_steps=10)
    cb.set_model(dann)
    cb.set_params({"epochs": 3, "steps": None})
    cb.on_train_batch_begin(0)


def test_ganin_lambda_warmup():
    """lambda = 0 for the warm-up fraction, then the paper's ramp."""
    cb = kerastl.adaptation.GaninLambda(warmup=0.5, total_steps=100)
    assert [cb.value(p) for p in (0.0, 0.25, 0.5)] == [0.0, 0.0, 0.0]
    assert cb.value(0.55) == pytest.approx(ganin_lambda(0.1))
    assert cb.value(1.0) == pytest.approx(ganin_lambda(1.0))
    with pytest.raises(kerastl.KerastlError, match="warmup"):
        kerastl.adaptation.GaninLambda(warmup=1.0)


# -- DANN -------------------------------------------------------------------------

def test_dann_trains_reports_and_predicts_on_the_label_path():
    xs, ys, xt, yt = toy_domains()
    keras.utils.set_random_seed(0)
    features = small_cnn()
    dann = kerastl.DANN(features, 2, domain_hidden=(16,))
    dann.compile(keras.optimizers.Adam(1e-3), metrics=["accuracy"])
    before = {v.path: v.numpy().copy() for v in features.trainable_weights}
    ds = kerastl.adaptation.domain_dataset((xs, ys), xt, batch_size=16)
    history = dann.fit(ds, epochs=2, callbacks=[kerastl.adaptation.GaninLambda()],
                       verbose=0)
    logs = history.history
    for key in ("loss", "class_loss", "domain_loss", "domain_accuracy",
                "accuracy"):
        assert key in logs and np.all(np.isfinite(logs[key])), key
    assert any(not np.array_equal(before[v.path], v.numpy())
               for v in features.trainable_weights)
    # The label path: images in, class probabilities out.
    p = dann.predict(xt[:5], verbose=0)
    assert p.shape == (5, 2)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    result = dann.evaluate(xt, yt, verbose=0, return_dict=True)
    assert 0.0 <= result["accuracy"] <= 1.0
    np.testing.assert_allclose(dann.classifier.predict(xt[:5], verbose=0), p,
                               rtol=1e-6)


def test_reversal_makes_domains_indistinguishable():
    """With reversal, the domain head is fooled; without, it wins.

    Source-only training separates these domains perfectly (the domain head
    alone reaches accuracy ~1.0 with lambda = 0); with the reversal at work
    the features stop carrying the domain and domain accuracy falls to ~0.5.
    """
    xs, ys, xt, _ = toy_domains(n=128)

    def domain_accuracy(lam):
        keras.utils.set_random_seed(1)
        # The plainest DANN (no bottleneck, no BN in the heads) shows the
        # reversal itself at work.
        dann = kerastl.DANN(small_cnn(width=16), 2, domain_hidden=(32,),
                            lambda_=lam, bottleneck=None, batchnorm=False,
                            entropy_weight=0, split_batchnorm=False)
        dann.compile(keras.optimizers.Adam(1e-3))
        ds = kerastl.adaptation.domain_dataset((xs, ys), xt, batch_size=32)
        h = dann.fit(ds, epochs=15, verbose=0)
        return h.history["domain_accuracy"][-1]

    assert domain_accuracy(0.0) > 0.95
    assert abs(domain_accuracy(1.0) - 0.5) < 0.15


def test_domain_weight_zero_is_the_label_path_only():
    """The source-only baseline: same network, no domain head (nothing
    would train it, and Keras would warn about its missing gradients at
    every step); fit on domain_dataset prints no shuffle warning."""
    import warnings

    keras.utils.set_random_seed(0)
    dann = kerastl.DANN(small_cnn(), 2, domain_hidden=(8,), domain_weight=0)
    dann.compile(keras.optimizers.Adam(1e-3), metrics=["accuracy"])
    assert dann.domain_head is None and dann.domain_layers == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logs = fit_one_epoch(dann)
    said = " ".join(str(w.message) for w in caught)
    assert "Gradients do not exist" not in said
    assert "shuffle=True" not in said
    assert "domain_loss" not in logs
    assert "domain_accuracy" not in logs
    assert np.isfinite(logs["class_loss"][-1])


def test_evaluate_reports_the_label_path_only():
    """dann.evaluate(x, y) gives the loss and the compiled metrics, not
    the training terms at 0."""
    xs, ys, xt, yt = toy_domains()
    keras.utils.set_random_seed(0)
    dann = kerastl.DANN(small_cnn(), 2, domain_hidden=(8,))
    dann.compile(keras.optimizers.Adam(1e-3), metrics=["accuracy"])
    fit_one_epoch(dann)
    result = dann.evaluate(xt, yt, verbose=0, return_dict=True)
    assert set(result) == {"loss", "accuracy"}, result
    assert 0 <= result["accuracy"] <= 1 and result["loss"] > 0


def test_semi_supervised_labels_join_the_class_loss():
    xs, ys, xt, yt = toy_domains()
    keras.utils.set_random_seed(0)
    dann = kerastl.DANN(small_cnn(), 2)
    dann.compile(keras.optimizers.Adam(1e-3), metrics=["accuracy"])
    ds = kerastl.adaptation.domain_dataset((xs, ys), xt, batch_size=16,
                                target_labeled=(xt[:8], yt[:8]))
    x, y = next(iter(ds))
    assert set(x) == {"source", "target", "labeled"}
    assert set(y) == {"source", "labeled"} and y["labeled"].shape == (8,)
    h = dann.fit(ds, epochs=1, verbose=0)
    assert np.isfinite(h.history["class_loss"][-1])


def test_coral_alignment():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6)).astype("float32")
    assert float(kerastl.adaptation.coral_loss(a, a)) == pytest.approx(0.0, abs=1e-7)
    b = 3.0 * a  # covariance x9
    ca = np.cov(a, rowvar=False)
    expected = np.sum((ca - 9 * ca) ** 2) / (4 * 36)
    assert float(kerastl.adaptation.coral_loss(a, b)) == pytest.approx(expected,
                                                            rel=1e-4)
    dann = kerastl.DANN(small_cnn(), 2, alignment="coral")
    dann.compile(keras.optimizers.Adam(1e-3))
    logs = fit_one_epoch(dann)
    assert "domain_accuracy" not in logs and dann.reversal is None
    assert np.isfinite(logs["domain_loss"][-1])


def test_information_loss():
    k = 4
    uniform = np.full((8, k), 1.0 / k, "float32")
    assert float(kerastl.adaptation.information_loss(uniform)) == pytest.approx(
        0.0, abs=1e-5)
    balanced = np.eye(k, dtype="float32")  # confident, every class used
    assert float(kerastl.adaptation.information_loss(balanced)) == pytest.approx(
        -np.log(k), abs=1e-4)
    collapsed = np.tile(np.eye(k, dtype="float32")[:1], (8, 1))
    assert float(kerastl.adaptation.information_loss(collapsed)) == pytest.approx(
        0.0, abs=1e-4)
    p = np.random.default_rng(0).dirichlet(np.ones(k), 16).astype("float32")
    mean = p.mean(axis=0)
    expected = (-np.mean(np.sum(p * np.log(p), axis=1))
                + np.sum(mean * np.log(mean)))
    assert float(kerastl.adaptation.information_loss(p)) == pytest.approx(expected,
                                                              rel=1e-4)


def test_mcc_loss_on_hand_computed_inputs():
    mcc = kerastl.adaptation.mcc_loss
    # Confident predictions confuse no class; uniform ones, on 2 classes:
    # C = q'q = [[.5, .5], [.5, .5]], columns sum to 1, off-diagonal 1,
    # divided by 2 classes.
    assert float(mcc(np.eye(2, dtype="float32"), temperature=1.0)) == \
        pytest.approx(0.0, abs=1e-6)
    assert float(mcc(np.full((4, 2), 0.5, "float32"))) == pytest.approx(0.5)
    # Two samples, temperature 1: q1 = (0.8, 0.2), q2 = (0.5, 0.5).
    q = np.array([[0.8, 0.2], [0.5, 0.5]])
    h = -(q * np.log(q + 1e-5)).sum(1)
    w = 1 + np.exp(-h)
    w = 2 * w / w.sum()
    c = np.array([[sum(w[i] * q[i, j] * q[i, k] for i in range(2))
                   for k in range(2)] for j in range(2)])
    c = c / c.sum(axis=1)  # each column k by the sum of row k (symmetric)
    expected = (c[0, 1] + c[1, 0]) / 2
    assert float(mcc(q.astype("float32"), temperature=1.0)) == \
        pytest.approx(expected, rel=1e-5)
    # The temperature rescales logits: from probabilities, the same.
    p = np.random.default_rng(0).dirichlet(np.ones(5), 8).astype("float32")
    assert float(mcc(p)) == pytest.approx(
        float(mcc(np.log(p), from_logits=True)), rel=1e-5)
    with pytest.raises(kerastl.KerastlError, match="mcc_loss takes class"):
        mcc(np.log(p))


@pytest.mark.parametrize("domain_weight", [0.0, 1.0])
def test_mcc_joins_the_total_with_any_alignment_or_none(domain_weight):
    keras.utils.set_random_seed(0)
    dann = kerastl.DANN(small_cnn(), 2, domain_hidden=(8,), lambda_=0.7,
                        domain_weight=domain_weight, entropy_weight=0,
                        mcc_weight=1.5)
    dann.compile(keras.optimizers.Adam(1e-3))
    logs = fit_one_epoch(dann)
    expected = logs["class_loss"][0] + 1.5 * logs["mcc_loss"][0]
    if domain_weight:
        expected += logs["domain_loss"][0]
    assert logs["loss"][0] == pytest.approx(expected, rel=1e-5)
    assert 0 < logs["mcc_loss"][0] < 1
    again = kerastl.DANN.from_config(dann.get_config())
    assert again.mcc_weight == 1.5
    with pytest.raises(kerastl.KerastlError, match="mcc_weight"):
        kerastl.DANN(small_cnn(), 2, mcc_weight=-1)


def test_cdan_conditions_the_domain_head_and_weights_by_entropy(tmp_path):
    """CDAN+E: the domain head sees the outer product of features and
    (fixed) predictions, behind the reversal; each sample's domain loss is
    weighted by 1 + exp(-H), normalised to a mean of 1."""
    from kerastl.adaptation.dann import MultilinearMap
    from kerastl.adaptation.losses import entropy_weights as cdan_weights

    p = np.array([[1.0, 0.0], [0.5, 0.5]], "float32")
    h = np.array([0.0, -np.log(0.5 + 1e-5)])
    w = 1 + np.exp(-h)
    np.testing.assert_allclose(cdan_weights(p), 2 * w / w.sum(), rtol=1e-5)
    f = np.array([[1.0, 2.0, 3.0]], "float32")
    g = np.array([[0.25, 0.75]], "float32")
    outer = MultilinearMap()
    outer.build([(None, 3), (None, 2)])
    np.testing.assert_allclose(outer([f, g]), [[0.25, 0.5, 0.75,
                                                0.75, 1.5, 2.25]])
    wide = MultilinearMap()
    wide.build([(None, 500), (None, 10)])  # 5,000 > 4,096: randomized
    assert wide.output_dim == 1024 and not wide.trainable_weights
    xs, ys, xt, _ = toy_domains(n=16)
    keras.utils.set_random_seed(0)
    dann = kerastl.DANN(small_cnn(), 2, domain_hidden=(8,), bottleneck=16,
                        alignment="cdan", entropy_weight=0, lambda_=1.0)
    assert dann.domain_layers[0].kernel.shape[0] == 32  # 16 features x 2
    assert kerastl.block_map(dann).validate() == []
    out = dann({"source": xs, "target": xt}, training=False)
    bce = keras.losses.binary_crossentropy(
        np.concatenate([np.zeros((16, 1)), np.ones((16, 1))]), out["domain"])
    expected = float(np.mean(np.asarray(cdan_weights(out["label"])) *
                             np.asarray(bce)))
    assert float(dann.alignment_loss(out, 16)) == pytest.approx(expected,
                                                               rel=1e-5)
    dann.compile(keras.optimizers.Adam(1e-3))
    logs = fit_one_epoch(dann)
    assert np.isfinite(logs["domain_loss"][0])
    dann.save(tmp_path / "cdan.keras")
    again = keras.models.load_model(tmp_path / "cdan.keras")
    assert again.alignment == "cdan" and again.multilinear is not None
    np.testing.assert_allclose(again.predict(xt, verbose=0),
                               dann.predict(xt, verbose=0), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("split", [True, False])
def test_split_batchnorm_normalises_each_domain_on_its_own(split):
    """With split_batchnorm the source features of a training step do not
    depend on the target half of the batch (own BN statistics); without,
    they do (one batch)."""
    xs, _, xt, _ = toy_domains(n=16)
    keras.utils.set_random_seed(0)
    dann = kerastl.DANN(small_cnn(), 2, domain_hidden=(8,),
                        split_batchnorm=split)

    def source_features(target):
        out = dann({"source": xs, "target": target}, training=True)
        return out["features"][:16].numpy()

    a, b = source_features(xt), source_features(xt[::-1] * 0.5)
    if split:
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    else:
        assert np.abs(a - b).max() > 1e-3


@pytest.mark.parametrize("alignment", ["adversarial", "coral"])
def test_entropy_loss_joins_the_total_times_lambda(alignment):
    """loss = class + domain_weight x domain + entropy_weight x lambda x
    entropy, with lambda the reversal strength (1 for CORAL)."""
    keras.utils.set_random_seed(0)
    lam = 0.7 if alignment == "adversarial" else 1.0
    dann = kerastl.DANN(small_cnn(), 2, domain_hidden=(8,), lambda_=0.7,
                        domain_weight=0.5, entropy_weight=2.0,
                        alignment=alignment)
    dann.compile(keras.optimizers.Adam(1e-3))
    logs = fit_one_epoch(dann)
    expected = (logs["class_loss"][0] + 0.5 * logs["domain_loss"][0]
                + 2.0 * lam * logs["entropy_loss"][0])
    assert logs["loss"][0] == pytest.approx(expected, rel=1e-5)
    assert -np.log(2) <= logs["entropy_loss"][0] <= np.log(2)


def test_entropy_weight_zero_is_the_papers_loss():
    keras.utils.set_random_seed(0)
    dann = kerastl.DANN(small_cnn(), 2, domain_hidden=(8,), lambda_=1.0,
                        entropy_weight=0)
    dann.compile(keras.optimizers.Adam(1e-3))
    logs = fit_one_epoch(dann)
    assert "entropy_loss" not in logs
    assert logs["loss"][0] == pytest.approx(
        logs["class_loss"][0] + logs["domain_loss"][0], rel=1e-5)


def test_dann_save_load_and_export(tmp_path):
    xt = toy_domains()[2]
    keras.utils.set_random_seed(0)
    dann = kerastl.DANN(small_cnn(), 2, domain_hidden=(8,), lambda_=0.5)
    dann.compile(keras.optimizers.Adam(1e-3), metrics=["accuracy"])
    fit_one_epoch(dann)
    dann.save(tmp_path / "dann.keras")
    loaded = keras.models.load_model(tmp_path / "dann.keras")
    assert isinstance(loaded, kerastl.DANN)
    assert loaded.compiled  # training continues: optimizer and metrics back
    assert loaded.alignment == "adversarial"
    options = {k: v for k, v in dann.get_config().items()
               if k != "feature_extractor"}
    assert {k: loaded.get_config()[k] for k in options} == options
    assert loaded.entropy_weight == 0.5 and loaded.split_batchnorm
    np.testing.assert_array_equal(dann.predict(xt[:6], verbose=0),
                                  loaded.predict(xt[:6], verbose=0))
    for a, b in zip(dann.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # The label path exports to a SavedModel without the domain parts.
    classifier = dann.classifier
    assert not any(isinstance(l, kerastl.GradientReversal)
                   for l in _private.all_sublayers(classifier))
    classifier.export(str(tmp_path / "exported"), verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "exported"))
    np.testing.assert_allclose(reloaded.serve(tf.constant(xt[:6])).numpy(),
                               dann.predict(xt[:6], verbose=0), rtol=1e-5,
                               atol=1e-6)
    # kerastl.load_model: the optimizer's state comes back, training resumes.
    xs, ys, _, _ = toy_domains()
    save_load_and_resume(
        loaded, str(tmp_path / "again.keras"),
        kerastl.adaptation.domain_dataset((xs, ys), xt, batch_size=16,
                                          shuffle=False))


def test_dann_bad_input():
    with pytest.raises(kerastl.KerastlError, match="num_classes"):
        kerastl.DANN(small_cnn(), 1)
    with pytest.raises(kerastl.KerastlError, match="alignment"):
        kerastl.DANN(small_cnn(), 2, alignment="mmd2")
    with pytest.raises(kerastl.KerastlError, match="Keras model"):
        kerastl.DANN(lambda x: x, 2)
    with pytest.raises(kerastl.KerastlError, match="domain_weight"):
        kerastl.DANN(small_cnn(), 2, domain_weight=-1)
    with pytest.raises(kerastl.KerastlError, match="entropy_weight"):
        kerastl.DANN(small_cnn(), 2, entropy_weight=float("nan"))
    xs, ys, xt, _ = toy_domains(8)
    with pytest.raises(kerastl.KerastlError, match="unlabelled"):
        kerastl.adaptation.domain_dataset((xs, ys), (xt, ys))
    with pytest.raises(kerastl.KerastlError, match="samples"):
        kerastl.adaptation.domain_dataset((xs, ys[:3]), xt)


# -- AdaBN ------------------------------------------------------------------------

def test_adapt_batch_norm_sets_target_statistics_only():
    keras.utils.set_random_seed(0)
    model = small_cnn()
    bn = [l for l in model.layers
          if isinstance(l, keras.layers.BatchNormalization)][0]
    bn.trainable = False
    _, _, xt, _ = toy_domains(n=96)
    others = {v.path: v.numpy().copy() for v in model.weights
              if "moving" not in v.path}
    # Batches of 40, 40 and 16: each counts by its images.
    assert kerastl.adaptation.adapt_batch_norm(model, xt, batch_size=40) == 1
    # The moving mean is the mean of the batch means weighted by their
    # sizes, i.e. the mean of the target activations entering BN (with
    # the short last batch counted as a full one it was not).
    upto = keras.Model(model.input, bn.input)
    acts = upto.predict(xt, verbose=0)
    np.testing.assert_allclose(bn.moving_mean.numpy(),
                               acts.mean(axis=(0, 1, 2)), rtol=1e-4,
                               atol=1e-5)
    batch_vars = [acts[i:i + 40].var(axis=(0, 1, 2)) for i in (0, 40, 80)]
    np.testing.assert_allclose(bn.moving_variance.numpy(),
                               np.average(batch_vars, axis=0,
                                          weights=[40, 40, 16]),
                               rtol=1e-3, atol=1e-5)
    # A dataset of single images gives the same statistics.
    mean = bn.moving_mean.numpy().copy()
    kerastl.adaptation.adapt_batch_norm(
        model, tf.data.Dataset.from_tensor_slices(xt), batch_size=40)
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-5,
                               atol=1e-6)
    for v in model.weights:
        if "moving" not in v.path:
            np.testing.assert_array_equal(v.numpy(), others[v.path])
    assert bn.trainable is False and bn.momentum == 0.99


def test_dann_fit_refuses_plain_images_and_says_when_nothing_aligns():
    import warnings

    xs, ys, xt, _ = toy_domains(n=32)
    dann = kerastl.DANN(small_cnn(), 2, domain_hidden=(8,))
    dann.compile(keras.optimizers.Adam(1e-3))
    with pytest.raises(kerastl.KerastlError, match="domain_dataset"):
        dann.fit(xs, ys, epochs=1, verbose=0)
    ds = kerastl.adaptation.domain_dataset((xs, ys), xt, batch_size=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dann.fit(ds, epochs=1, verbose=0)  # lambda_ 0, nothing ramps it
        said = [str(w.message) for w in caught if "source-only" in
                str(w.message)]
        assert len(said) == 1 and "GaninLambda" in said[0]
        caught.clear()
        dann.fit(ds, epochs=1, verbose=0,
                 callbacks=[kerastl.adaptation.GaninLambda()])
        assert not [w for w in caught if "source-only" in str(w.message)]
    # A source whose labels are not class indices: one line, not a
    # truncation to 0.
    with pytest.raises(kerastl.KerastlError, match="one class index"):
        kerastl.adaptation.domain_dataset((xs, ys * 0.9), xt)


def test_adapt_batch_norm_on_dann_adapts_the_bottleneck_too():
    _, _, xt, _ = toy_domains(n=48)
    keras.utils.set_random_seed(0)
    dann = kerastl.DANN(small_cnn(), 2, domain_hidden=(8,))
    others = {v.path: v.numpy().copy() for v in dann.weights
              if "moving" not in v.path}
    domain_bn = [v.numpy().copy() for v in dann.domain_layers[1].weights]
    # The feature extractor's BN and the bottleneck's.
    assert kerastl.adaptation.adapt_batch_norm(dann, xt, batch_size=48) == 2
    # One batch: every moving statistic is that batch's, so the inference
    # forward pass repeats the adaptation pass, and the bottleneck BN holds
    # the mean and variance of its Dense layer's outputs on the target.
    pooled = dann.pool(dann.feature_extractor(xt, training=False))
    dense = dann.bottleneck_layers[0](pooled).numpy()
    bn = dann.bottleneck_layers[1]
    np.testing.assert_allclose(bn.moving_mean.numpy(), dense.mean(axis=0),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(),
                               dense.var(axis=0), rtol=1e-3, atol=1e-5)
    for v in dann.weights:
        if "moving" not in v.path:
            np.testing.assert_array_equal(v.numpy(), others[v.path])
    for before, v in zip(domain_bn, dann.domain_layers[1].weights):
        np.testing.assert_array_equal(before, v.numpy())  # not the label path


# -- DANN through the block map -------------------------------------------------

def zoo_dann(**kwargs):
    """A DANN around a zoo backbone (MobileNetV2 at 32x32, random weights)."""
    keras.utils.set_random_seed(0)
    backbone = kerastl.load_backbone("mobilenet_v2", weights=None,
                                     input_shape=(32, 32, 3))
    return kerastl.DANN(backbone, 2, bottleneck=16, domain_hidden=(16,),
                        **kwargs)


def test_dann_block_map_lists_the_backbone_then_the_heads():
    dann = zoo_dann()
    bm = kerastl.block_map(dann)
    assert bm.names == ["stem", "stage1", "stage2", "stage3", "stage4", "top",
                        "bottleneck", "label_head", "domain_head"]
    assert bm.head_blocks == ["bottleneck", "label_head", "domain_head"]
    assert bm.validate() == []
    # Every weight of the DANN is in exactly one block.
    owned = [id(v) for b in bm.names for v in bm.variables(b)]
    assert sorted(owned) == sorted(id(v) for v in dann.weights)
    assert {v.path for v in bm.variables("domain_head")} >= {
        dann.domain_head.kernel.path, dann.reversal.lambda_.path}
    # Without a kerastl backbone: structural blocks, then the heads.
    cnn = small_cnn()
    plain = kerastl.DANN(cnn, 2, bottleneck=None, alignment="coral")
    structural = kerastl.block_map(cnn).names
    assert structural[0] == "block1"
    assert kerastl.block_map(plain).names == structural + ["label_head"]


def test_freeze_dann_keeps_frozen_blocks_bit_identical_through_fit():
    dann = zoo_dann()
    frozen = kerastl.freeze(dann, up_to="stage2")
    assert frozen == ["stem", "stage1", "stage2"]
    bm = kerastl.block_map(dann)
    before = {v.path: v.numpy().copy() for v in dann.weights}
    dann.compile(keras.optimizers.Adam(1e-2))
    fit_one_epoch(dann)
    for block in bm.names:
        moved = [v.path for v in bm.variables(block)
                 if not np.array_equal(v.numpy(), before[v.path])]
        if block in frozen:  # weights and BN statistics alike
            assert moved == [], block
        else:
            assert moved, f"{block} did not train"
    # BN of the new heads trains even under the default bn="frozen".
    assert dann.get_layer("bottleneck_0_bn").trainable
    # freeze(dann) with no block freezes the backbone, trains the heads.
    kerastl.freeze(dann)
    assert kerastl.freezing.trainable_blocks(dann) == ["bottleneck", "label_head",
                                              "domain_head"]


def test_layerwise_optimizer_on_dann_gives_exact_block_rates():
    dann = zoo_dann()
    bm = kerastl.block_map(dann)
    opt = kerastl.LayerwiseOptimizer(keras.optimizers.Adam(1e-3),
                                     {"stage1": 0.1, "domain_head": 1.0},
                                     dann)
    variables = dann.trainable_variables
    refs = []
    for v in variables:
        m = 0.1 if bm.block_of(v) == "stage1" else 1.0
        assert opt.multiplier(v) == m
        refs.append((keras.optimizers.Adam(1e-3 * m),
                     keras.Variable(v.numpy(), name="ref")))
    assert any(bm.block_of(v) == "stage1" for v in variables)
    rng = np.random.default_rng(0)
    for _ in range(3):
        step_with_references(opt, variables, refs, rng)
    for v, (_, ref_var) in zip(variables, refs):
        np.testing.assert_allclose(v.numpy(), ref_var.numpy(), rtol=1e-6,
                                   atol=1e-7, err_msg=v.path)
    rows = {r["block"]: r for r in kerastl.describe_learning_rates(dann, opt)}
    assert rows["stage1"]["learning_rate"] == pytest.approx((1e-4, 1e-4))
    assert rows["domain_head"]["multiplier"] == (1.0, 1.0)
    # And it trains inside fit.
    dann.compile(opt)
    assert np.isfinite(fit_one_epoch(dann)["loss"][-1])


def test_gradual_unfreezing_on_dann_trains_the_heads_first():
    dann = zoo_dann()
    dann.compile(keras.optimizers.Adam(1e-3))
    callback = kerastl.GradualUnfreezing(every=1, start_blocks=1)
    xs, ys, xt, _ = toy_domains()
    dann.fit(kerastl.adaptation.domain_dataset((xs, ys), xt, batch_size=32), epochs=2,
             callbacks=[callback], verbose=0)
    assert callback.history[0] == ["bottleneck", "label_head", "domain_head"]
    assert callback.history[1] == ["top", "bottleneck", "label_head",
                                   "domain_head"]


def test_unknown_subclassed_model_has_no_silent_block_map():
    class Opaque(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    with pytest.raises(kerastl.errors.BlockError, match="subclassed model"):
        kerastl.block_map(Opaque())
    with pytest.raises(kerastl.errors.BlockError, match="functional API"):
        kerastl.freeze(Opaque())
