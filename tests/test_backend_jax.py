"""kerastl on the Keras JAX backend, in a fresh process (JAX on CPU).

The test session runs on TensorFlow; Keras picks its backend once per
process, so these checks run in a subprocess with ``KERAS_BACKEND=jax``.
Skipped where JAX is not installed (``pip install -e ".[test]"`` installs it).
"""

import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

pytest.importorskip("jax")

TESTS = os.path.dirname(os.path.abspath(__file__))


def run_on_jax(code, timeout=600):
    script = f"import sys; sys.path.insert(0, {TESTS!r})\n" + \
        textwrap.dedent(code)
    with tempfile.TemporaryDirectory() as tmp:  # the script's mkdtemp()s
        env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
                   TF_CPP_MIN_LOG_LEVEL="3", TMPDIR=tmp)
        proc = subprocess.run([sys.executable, "-c", script], env=env,
                              capture_output=True, text=True,
                              timeout=timeout)
    assert proc.returncode == 0 and "BACKEND OK" in proc.stdout, \
        proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_layerwise_optimizer_on_jax():
    run_on_jax("""
        import keras
        assert keras.backend.backend() == "jax"
        import test_layerwise as t
        for name in ("sgd_momentum", "adam", "adamw"):
            for rate in ("constant", "schedule", "plateau"):
                t.test_multiplier_equals_plain_optimizer_with_scaled_rate(
                    name, rate, 6)
        t.test_adam_update_shrinks_with_the_multiplier_unlike_gradient_scaling()
        for jit in (False, True):  # stateless_apply inside the jitted step
            for name in ("adam", "adamw"):
                t.test_fit_applies_the_multiplier(jit, name)
        for name in t.EVERY_OPTIMIZER:
            t.test_every_keras_optimizer(name)
        t.test_mixed_float16_inside_loss_scale_optimizer()
        print("BACKEND OK")
    """)


@pytest.mark.slow
def test_gradient_reversal_dann_and_lora_on_jax():
    run_on_jax("""
        import jax, jax.numpy as jnp, numpy as np, keras, kerastl
        assert keras.backend.backend() == "jax"
        for dtype in ("float32", "float16"):
            layer = kerastl.GradientReversal(0.7, dtype=dtype)
            x = jnp.ones((2, 3), dtype)
            up = jnp.arange(6, dtype=dtype).reshape(2, 3)
            for fn in (jax.grad, lambda f: jax.jit(jax.grad(f))):
                g = fn(lambda x: jnp.sum(layer(x) * up))(x)
                assert g.dtype == dtype, g.dtype
                expected = (-np.asarray(0.7, dtype) * np.asarray(up))
                np.testing.assert_array_equal(np.asarray(g),
                                              expected.astype(dtype))
        # DANN in fit, from plain arrays (no tf.data), jit-compiled step.
        import conftest as t
        xs, ys, xt, yt = t.toy_domains()
        keras.utils.set_random_seed(0)
        dann = kerastl.DANN(t.small_cnn(), 2, domain_hidden=(16,))
        dann.compile(keras.optimizers.Adam(1e-3), metrics=["accuracy"])
        h = dann.fit({"source": xs, "target": xt}, ys, batch_size=16,
                     epochs=2, callbacks=[kerastl.adaptation.GaninLambda()], verbose=0)
        for key in ("class_loss", "domain_loss", "domain_accuracy",
                    "entropy_loss"):
            assert np.all(np.isfinite(h.history[key])), key
        assert float(dann.reversal.lambda_.numpy()) > 0.9
        assert kerastl.adaptation.adapt_batch_norm(dann, xt) == 2
        assert dann.predict(xt[:4], verbose=0).shape == (4, 2)
        # LoRA by block: only the factors move, exact layer-wise rates,
        # an exact resume from kerastl.save_model.
        import pathlib, tempfile
        import test_peft as p
        p.test_lora_trains_only_its_factors_and_the_head()
        p.test_layerwise_multiplier_on_a_lora_block_is_exact(False)
        p.test_layerwise_multiplier_on_a_lora_block_is_exact(True)
        p.test_save_model_resumes_exactly(
            "lora", pathlib.Path(tempfile.mkdtemp()))
        print("BACKEND OK")
    """)


@pytest.mark.slow
def test_jax_paths_run_with_tensorflow_hidden():
    """benchmarks/gpu_check.py --quick: the reversal gradient in three
    dtypes, a jitted DANN step, LayerwiseOptimizer under mixed precision
    and a MobileNetV2 classifier step, with TensorFlow unimportable (the
    GPU machine's image has none)."""
    script = os.path.join(TESTS, "..", "benchmarks", "gpu_check.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, script, "--quick"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "GPU CHECK OK" in proc.stdout, \
        proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TensorFlow not importable" in proc.stdout
