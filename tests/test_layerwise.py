"""Layer-wise learning-rate multipliers: exact, for every optimizer."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import kerastl
from kerastl import _keras_private as _private

from conftest import (M_LOW, fit_data, one_step_deltas, step_with_references,
                      two_block_model)


class Scaled(keras.optimizers.schedules.LearningRateSchedule):
    """``m x schedule``: the reference rate of a variable with multiplier m."""

    def __init__(self, schedule, m):
        self.schedule, self.m = schedule, m

    def __call__(self, step):
        return self.schedule(step) * self.m


def schedule():
    return keras.optimizers.schedules.ExponentialDecay(
        0.1, decay_steps=1, decay_rate=0.7)


OPTIMIZERS = {
    "sgd_momentum": lambda lr: keras.optimizers.SGD(lr, momentum=0.9),
    "adam": lambda lr: keras.optimizers.Adam(lr),
    "adamw": lambda lr: keras.optimizers.AdamW(lr, weight_decay=0.05),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("rate", ["constant", "schedule", "plateau"])
@pytest.mark.parametrize("steps", [1, 6])
def test_multiplier_equals_plain_optimizer_with_scaled_rate(name, rate, steps):
    make = OPTIMIZERS[name]
    model = two_block_model()
    variables = model.trainable_variables
    base_lr = schedule() if rate == "schedule" else 0.1
    opt = kerastl.LayerwiseOptimizer(make(base_lr), {"low": M_LOW}, model)
    # The reference: each variable alone, under the plain optimizer with
    # learning rate lr x m.
    refs = []
    for v in variables:
        m = M_LOW if v.path.startswith("low/") else 1.0
        lr = Scaled(schedule(), m) if rate == "schedule" else 0.1 * m
        refs.append((m, make(lr), keras.Variable(v.numpy(), name="ref")))
    rng = np.random.default_rng(1)
    for step in range(steps):
        if rate == "plateau" and step == steps // 2:
            # What ReduceLROnPlateau and LearningRateScheduler do.
            opt.learning_rate = 0.1 * 0.3
            for m, ref_opt, _ in refs:
                ref_opt.learning_rate = 0.1 * 0.3 * m
        step_with_references(opt, variables,
                             [(o, r) for _, o, r in refs], rng)
    for v, (m, _, ref_var) in zip(variables, refs):
        np.testing.assert_allclose(v.numpy(), ref_var.numpy(), rtol=2e-6,
                                   atol=1e-7, err_msg=f"{v.path} (m={m})")
    assert int(opt.iterations.numpy()) == steps


EVERY_OPTIMIZER = ["Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW",
                   "Adamax", "Ftrl", "Lamb", "Lion", "Muon", "Nadam", "RMSprop",
                   "SGD", "ScheduleFreeAdamW"]


@pytest.mark.parametrize("name", EVERY_OPTIMIZER)
def test_every_keras_optimizer(name):
    cls = getattr(keras.optimizers, name, None)
    if cls is None:
        pytest.skip(f"this Keras has no {name}")
    model = two_block_model()
    variables = model.trainable_variables
    opt = kerastl.LayerwiseOptimizer(cls(learning_rate=0.05),
                                     {"low": M_LOW}, model)
    refs = []
    for v in variables:
        m = M_LOW if v.path.startswith("low/") else 1.0
        refs.append((cls(learning_rate=0.05 * m),
                     keras.Variable(v.numpy(), name=v.name)))
    rng = np.random.default_rng(2)
    for _ in range(4):
        step_with_references(opt, variables, refs, rng)
    for v, (_, ref_var) in zip(variables, refs):
        np.testing.assert_allclose(v.numpy(), ref_var.numpy(), rtol=1e-5,
                                   atol=1e-6, err_msg=f"{name}: {v.path}")


def test_adam_update_shrinks_with_the_multiplier_unlike_gradient_scaling():
    """Equal gradients, multipliers 0.1 and 1: Adam's updates differ by 10x.

    Scaling the gradient instead (the usual workaround) leaves Adam's update
    unchanged, which the last assertion shows.
    """
    x = keras.Input((4,), name="x")
    y = keras.layers.Dense(4, use_bias=False, name="top")(
        keras.layers.Dense(4, use_bias=False, name="low")(x))
    model = keras.Model(x, y)
    low, top = model.trainable_variables
    top.assign(low.numpy())
    opt = kerastl.LayerwiseOptimizer(keras.optimizers.Adam(1e-2),
                                     {"low": 0.1, "top": 1.0}, model)
    rng = np.random.default_rng(0)
    start = [low.numpy(), top.numpy()]
    for _ in range(5):
        g = keras.ops.convert_to_tensor(
            rng.normal(size=(4, 4)).astype("float32"))
        opt.apply([g, g], [low, top])
    d_low = np.abs(low.numpy() - start[0]).sum()
    d_top = np.abs(top.numpy() - start[1]).sum()
    assert d_low / d_top == pytest.approx(0.1, rel=1e-4)
    # Gradient scaling: the plain Adam update hardly changes.
    a, b = keras.Variable(start[0]), keras.Variable(start[0])
    plain_a, plain_b = keras.optimizers.Adam(1e-2), keras.optimizers.Adam(1e-2)
    rng = np.random.default_rng(0)
    for _ in range(5):
        g = rng.normal(size=(4, 4)).astype("float32")
        plain_a.apply([keras.ops.convert_to_tensor(0.1 * g)], [a])
        plain_b.apply([keras.ops.convert_to_tensor(g)], [b])
    ratio = (np.abs(a.numpy() - start[0]).sum()
             / np.abs(b.numpy() - start[0]).sum())
    assert ratio > 0.99


# -- inside model.fit ---------------------------------------------------------

def assert_scaled(deltas, plain, rtol=1e-4):
    for path, d in deltas.items():
        m = M_LOW if path.startswith("low/") else 1.0
        assert np.abs(d).max() > 0, f"{path} did not move"
        np.testing.assert_allclose(d, m * plain[path], rtol=rtol, atol=1e-8,
                                   err_msg=path)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_applies_the_multiplier(jit_compile, optimizer):
    _, plain = one_step_deltas(False, jit_compile, optimizer=optimizer)
    _, deltas = one_step_deltas(True, jit_compile, optimizer=optimizer)
    assert_scaled(deltas, plain)


def test_mixed_float16_inside_loss_scale_optimizer():
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        _, plain = one_step_deltas(False, model=two_block_model())
        model, deltas = one_step_deltas(True, model=two_block_model())
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert isinstance(model.optimizer.inner_optimizer,
                          kerastl.LayerwiseOptimizer)
        assert model.layers[1].compute_dtype == "float16"
        assert_scaled(deltas, plain, rtol=1e-3)
        table = kerastl.describe_learning_rates(model)
        assert [r["multiplier"] for r in table] == [(M_LOW, M_LOW), (1.0, 1.0)]
    finally:
        keras.mixed_precision.set_global_policy(policy)


MIRRORED = textwrap.dedent("""
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, kerastl
    sys_path_tests = os.environ["KERASTL_TESTS"]
    import sys; sys.path.insert(0, sys_path_tests)
    from conftest import one_step_deltas, two_block_model
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {"replicas": strategy.num_replicas_in_sync}
    for layerwise in (False, True):
        with strategy.scope():
            model = two_block_model()
            _, deltas = one_step_deltas(layerwise, model=model)
        out[str(layerwise)] = {k: v.tolist() for k, v in deltas.items()}
    print("RESULT" + json.dumps(out))
""")


def test_mirrored_strategy_on_two_logical_cpus():
    # Logical devices must be set before TensorFlow starts: a fresh process.
    env = dict(os.environ, KERASTL_TESTS=os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-c", MIRRORED], env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
    assert lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT"):])
    assert out["replicas"] == 2
    plain = {k: np.array(v) for k, v in out["False"].items()}
    deltas = {k: np.array(v) for k, v in out["True"].items()}
    assert_scaled(deltas, plain)


def test_reduce_lr_on_plateau_reaches_every_block():
    model = two_block_model()
    opt = kerastl.LayerwiseOptimizer(keras.optimizers.SGD(0.1),
                                     {"low": M_LOW}, model)
    model.compile(opt, "mse")
    x, y = fit_data()
    # min_delta so large that no epoch after the first counts as an
    # improvement: the rate halves after epochs 2 and 3.
    plateau = keras.callbacks.ReduceLROnPlateau("loss", factor=0.5,
                                                patience=0, min_delta=1e9)
    model.fit(x, y, batch_size=len(x), epochs=3, verbose=0,
              callbacks=[plateau])
    assert float(opt.inner_optimizer.learning_rate.numpy()) == \
        pytest.approx(0.1 * 0.5 ** 2)
    table = kerastl.describe_learning_rates(model)
    assert table[0]["learning_rate"][0] == pytest.approx(M_LOW * 0.025)
    assert table[1]["learning_rate"][0] == pytest.approx(0.025)
    # The next SGD step moves "low" by m x the reduced rate x the gradient.
    low = model.get_layer("low").kernel
    before = low.numpy().copy()
    import tensorflow as tf
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, model(x))
    grad = tape.gradient(loss, low).numpy()
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    np.testing.assert_allclose(low.numpy() - before,
                               -M_LOW * 0.025 * grad, rtol=1e-3, atol=1e-9)


def test_save_load_keeps_multipliers_and_state(tmp_path):
    model = two_block_model()
    opt = kerastl.LayerwiseOptimizer(keras.optimizers.Adam(1e-2),
                                     {"low": M_LOW}, model)
    model.compile(opt, "mse")
    x, y = fit_data()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, kerastl.LayerwiseOptimizer)
    assert loaded.optimizer.multipliers == opt.multipliers
    for a, b in zip(opt.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Continued training: the same steps from the same state.
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6,
                                   atol=1e-7)
    # get_config round trip.
    again = kerastl.LayerwiseOptimizer.from_config(opt.get_config())
    assert again.multipliers == opt.multipliers
    assert again.inner_optimizer.get_config() == \
        opt.inner_optimizer.get_config()


def test_nested_model_after_load_matches_by_suffix(tmp_path):
    inner = two_block_model()
    outer = keras.Sequential([keras.Input((6,)), inner,
                              keras.layers.Dense(2, name="new_head")])
    opt = kerastl.LayerwiseOptimizer(keras.optimizers.SGD(0.1),
                                     {"low": M_LOW, "top": 0.5}, outer)
    outer.compile(opt, "mse")
    path = tmp_path / "nested.keras"
    outer.save(path)
    loaded = keras.models.load_model(path)
    got = {v.path: loaded.optimizer.multiplier(v)
           for v in loaded.trainable_variables}
    assert sorted(got.values()) == sorted([M_LOW] * 2 + [0.5] * 2 + [1.0] * 2)
    assert got[loaded.get_layer("new_head").kernel.path] == 1.0


# -- ways to say the multipliers ----------------------------------------------

@pytest.fixture(scope="module")
def mobilenet():
    backbone = kerastl.load_backbone("mobilenet_v2", weights=None,
                                     input_shape=(32, 32, 3))
    return kerastl.build_classifier(backbone, 3)


def block_multipliers(opt, model):
    bm = kerastl.block_map(model)
    return {b: {opt.multiplier(v) for v in bm.variables(b)} for b in bm.names}


def test_layer_decay_and_spread(mobilenet):
    names = kerastl.block_map(mobilenet).names
    assert names == ["stem", "stage1", "stage2", "stage3", "stage4", "top",
                     "head"]
    opt = kerastl.LayerwiseOptimizer("adam", kerastl.LayerDecay(0.5),
                                     mobilenet)
    got = block_multipliers(opt, mobilenet)
    for i, b in enumerate(names):
        assert got[b] == {0.5 ** (len(names) - 1 - i)}
    opt = kerastl.LayerwiseOptimizer("adam", kerastl.LRSpread(0.01, 1.0),
                                     mobilenet)
    got = block_multipliers(opt, mobilenet)
    expected = np.geomspace(0.01, 1.0, len(names))
    for b, e in zip(names, expected):
        (m,) = got[b]
        assert m == pytest.approx(e)


def test_mapping_with_blocks_indices_and_layer_regexes(mobilenet):
    opt = kerastl.LayerwiseOptimizer(
        "sgd", {"stem": 0.01, -1: 2.0, "stage4": 0.3, "Conv_1": 0.7},
        mobilenet, default=0.5)
    got = block_multipliers(opt, mobilenet)
    assert got["stem"] == {0.01}
    assert got["head"] == {2.0}
    assert got["stage2"] == {0.5}
    assert got["stage4"] == {0.3}
    # The regex "Conv_1" overrides the "top" block's default for its layers
    # ("Conv_1" and "Conv_1_bn").
    assert got["top"] == {0.7}
    table = kerastl.describe_learning_rates(mobilenet, opt)
    text = str(table)
    assert "stage4" in text and "0.3" in text
    row = {r["block"]: r for r in table}
    # build_classifier froze the backbone: a frozen block shows rate 0.
    assert row["stem"]["state"] == "frozen"
    assert row["stem"]["learning_rate"] == (0.0, 0.0)
    assert row["stem"]["multiplier"] == (0.01, 0.01)
    assert row["head"]["learning_rate"][0] == pytest.approx(2.0 * 0.01)


def test_zero_multiplier_freezes_the_block(mobilenet):
    backbone = kerastl.load_backbone("mobilenet_v2", weights=None,
                                     input_shape=(32, 32, 3))
    model = kerastl.build_classifier(backbone, 3, dropout=0.0)
    opt = kerastl.LayerwiseOptimizer(keras.optimizers.Adam(1e-3),
                                     {"stem": 0, "stage1": 0}, model)
    bm = kerastl.block_map(model)
    assert all(not l.trainable for b in ("stem", "stage1")
               for l in bm.weighted_layers(b))
    model.compile(opt, "sparse_categorical_crossentropy")
    frozen = {v.path: v.numpy().copy()
              for b in ("stem", "stage1") for v in bm.variables(b)}
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 3, 8)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    # No gradient computed, no zero-size update: not in the optimizer at all.
    opt_ids = {id(v) for v in _private.optimizer_variables(opt)}
    for b in ("stem", "stage1"):
        for v in bm.variables(b):
            assert id(v) not in opt_ids
            np.testing.assert_array_equal(v.numpy(), frozen[v.path])
    states = {r["block"]: r["state"] for r in kerastl.trainable_summary(model)}
    assert states["stem"] == states["stage1"] == "frozen"
    rows = {r["block"]: r for r in kerastl.describe_learning_rates(model)}
    assert rows["stem"]["learning_rate"] == (0.0, 0.0)


def test_freeze_recompile_keeps_the_multipliers():
    model = two_block_model()
    opt = kerastl.LayerwiseOptimizer(keras.optimizers.Adam(1e-2),
                                     {"low": M_LOW}, model)
    model.compile(opt, "mse")
    kerastl.unfreeze(model, 0, learning_rate=5e-3)  # recompiles
    assert isinstance(model.optimizer, kerastl.LayerwiseOptimizer)
    assert model.optimizer is not opt
    assert model.optimizer.multipliers == opt.multipliers
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(5e-3)


def test_a_recompile_keeps_adamws_weight_decay_exclusions():
    """exclude_from_weight_decay is not in an optimizer's config: the fresh
    optimizer of kerastl's recompile gets it from the old one (inside a
    LayerwiseOptimizer too)."""
    def adamw():
        opt = keras.optimizers.AdamW(0.1, weight_decay=0.5)
        opt.exclude_from_weight_decay(var_names=["bias"])
        return opt
    for wrap in (False, True):
        model = two_block_model()
        opt = kerastl.LayerwiseOptimizer(adamw(), {"low": M_LOW}, model) \
            if wrap else adamw()
        model.compile(opt, "mse")
        kerastl.unfreeze(model, 0)  # recompiles
        assert model.optimizer is not opt
        # A step with zero gradients is weight decay alone: the kernel
        # shrinks by 1 - 0.1 x 0.5, the excluded bias stays bit-identical.
        top = model.get_layer("top")
        top.bias.assign(np.ones(3, "float32"))  # (zeros would not decay)
        kernel, bias = top.kernel.numpy(), top.bias.numpy()
        variables = model.trainable_variables
        model.optimizer.apply_gradients(
            [(keras.ops.zeros_like(v), v) for v in variables])
        np.testing.assert_array_equal(top.bias.numpy(), bias)
        np.testing.assert_allclose(top.kernel.numpy(), 0.95 * kernel,
                                   rtol=1e-6)


def test_a_bad_learning_rate_changes_nothing():
    model = two_block_model()
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    kerastl.freeze(model, up_to="low")
    for rate, message in (("fast", "learning_rate='fast'"),
                          (-1e-3, "expected a number > 0")):
        with pytest.raises(kerastl.KerastlError, match=message):
            kerastl.unfreeze(model, 0, learning_rate=rate)
        assert kerastl.freezing.trainable_blocks(model) == ["top"]
    model.compile(keras.optimizers.Adam(
        keras.optimizers.schedules.CosineDecay(1e-2, 10)), "mse")
    with pytest.raises(kerastl.KerastlError, match="follows a schedule "
                       "\\(CosineDecay\\)"):
        kerastl.unfreeze(model, 0, learning_rate=1e-3)
    assert kerastl.freezing.trainable_blocks(model) == ["top"]


def test_gradual_unfreezing_keeps_the_multipliers():
    model = two_block_model()
    opt = kerastl.LayerwiseOptimizer(keras.optimizers.SGD(0.1),
                                     {"low": M_LOW}, model)
    model.compile(opt, "mse")
    x, y = fit_data()
    cb = kerastl.GradualUnfreezing(every=1, start_blocks=1)
    model.fit(x, y, batch_size=len(x), epochs=2, verbose=0, callbacks=[cb])
    assert cb.history == {0: ["top"], 1: ["low", "top"]}
    assert isinstance(model.optimizer, kerastl.LayerwiseOptimizer)
    assert model.optimizer.multipliers == opt.multipliers
    assert [model.optimizer.multiplier(v) for v in
            _private.optimizer_variables(model.optimizer)] == \
        [M_LOW, M_LOW, 1.0, 1.0]


def test_fine_tune_phase_two_uses_the_multipliers(mobilenet):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 3, 8)
    kerastl.fine_tune(mobilenet, (x, y), (x, y), freeze_up_to="stage3",
                      head_epochs=1, epochs=1, schedule="constant",
                      multipliers=kerastl.LayerDecay(0.5),
                      check_features=False)  # random weights, on purpose
    opt = mobilenet.optimizer
    assert isinstance(opt, kerastl.LayerwiseOptimizer)
    rows = {r["block"]: r for r in kerastl.describe_learning_rates(mobilenet)}
    assert rows["stage3"]["state"] == "frozen"
    assert rows["stage4"]["multiplier"] == (0.25, 0.25)  # 2 below head
    assert rows["stage4"]["learning_rate"][1] == pytest.approx(
        0.25 * kerastl.TrainingPlan().learning_rate)


# -- bad input ----------------------------------------------------------------

def test_unknown_block_lists_the_blocks():
    model = two_block_model()
    with pytest.raises(kerastl.errors.BlockError, match="low, top"):
        kerastl.LayerwiseOptimizer("adam", {"stage9": 0.1}, model)
    with pytest.raises(kerastl.errors.BlockError, match="out of range"):
        kerastl.LayerwiseOptimizer("adam", {5: 0.1}, model)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), "fast", None])
def test_bad_multiplier_values(bad):
    with pytest.raises(kerastl.KerastlError, match=">= 0"):
        kerastl.LayerwiseOptimizer("adam", {"low": bad}, two_block_model())


def test_bad_optimizer_and_rules():
    model = two_block_model()
    with pytest.raises(kerastl.KerastlError, match="wraps a Keras optimizer"):
        kerastl.LayerwiseOptimizer(object(), {"low": 0.1}, model)
    with pytest.raises(kerastl.KerastlError, match="plain optimizer"):
        kerastl.LayerwiseOptimizer(keras.optimizers.LossScaleOptimizer(
            keras.optimizers.Adam()), {}, model)
    with pytest.raises(kerastl.KerastlError, match="needs the model"):
        kerastl.LayerwiseOptimizer("adam", {"low": 0.1})
    with pytest.raises(kerastl.KerastlError, match=r"\(0, 1\]"):
        kerastl.LayerDecay(1.5)
    with pytest.raises(kerastl.KerastlError, match="list of block names"):
        kerastl.LayerDecay(0.5, shared=3)
    with pytest.raises(kerastl.KerastlError, match="no optimizer of that "
                       "name"):
        kerastl.LayerwiseOptimizer("adamm", {"low": 0.1}, model)
    with pytest.raises(kerastl.KerastlError, match="lo <= hi"):
        kerastl.LRSpread(1.0, 0.1)
    with pytest.raises(kerastl.KerastlError, match="expected a dict"):
        kerastl.LayerwiseOptimizer("adam", [0.1, 1.0], model)
    used = keras.optimizers.Adam()
    used.build(model.trainable_variables)
    with pytest.raises(kerastl.KerastlError, match="already built"):
        kerastl.LayerwiseOptimizer(used, {}, model)
