"""kerastl on an accelerator, on the Keras JAX backend, without TensorFlow.

Runs, and prints as one table:

* the GradientReversal gradient (``-lambda x`` the upstream gradient) in
  float32, float16 and bfloat16;
* one DANN training step under ``jit`` (XLA), twice, loss finite;
* LayerwiseOptimizer exactness under the mixed precision policy of the
  device (``mixed_float16`` on a GPU, ``mixed_bfloat16`` elsewhere): each
  block's SGD update is its multiplier times the plain optimizer's, and
  every variable stays float32;
* the throughput of a MobileNetV2 classifier's train step (images/s).

TensorFlow is hidden from the import system (the GPU image has JAX and
PyTorch but no TensorFlow); the script fails if anything imports it.

    KERAS_BACKEND=jax python benchmarks/gpu_check.py [--quick] [--json F]

``--quick``: small inputs and few steps (what the test suite runs on CPU).
Exit status 0 only if every check passes.
"""

import argparse
import json
import os
import sys
import time

os.environ["KERAS_BACKEND"] = "jax"


class _NoTensorFlow:
    """Makes ``import tensorflow`` (and TF Hub, tf_keras) fail."""

    HIDDEN = ("tensorflow", "tensorflow_hub", "tf_keras", "tensorflow_text")

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.HIDDEN:
            raise ImportError(f"{name} is hidden by gpu_check.py")
        return None


sys.meta_path.insert(0, _NoTensorFlow())

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerastl  # noqa: E402


def reversal_gradient(dtype):
    layer = kerastl.GradientReversal(0.7, dtype=dtype)
    x = jnp.linspace(-1, 1, 12, dtype=dtype).reshape(3, 4)
    w = jnp.arange(1, 13, dtype=dtype).reshape(3, 4) / 8

    def f(x):
        return jnp.sum(layer(x) * w)

    grad = np.asarray(jax.grad(f)(x), dtype="float32")
    expected = -0.7 * np.asarray(w, dtype="float32")
    tol = {"float32": 1e-6, "float16": 2e-3, "bfloat16": 1e-2}[dtype]
    ok = np.allclose(grad, expected, rtol=tol, atol=tol) and \
        np.asarray(layer(x)).dtype == np.dtype(jnp.dtype(dtype))
    return ok, f"max |err| {np.abs(grad - expected).max():.1e}"


def dann_jit_step(size):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    features = keras.Model(inputs, x)
    dann = kerastl.DANN(features, num_classes=3, domain_hidden=(16,),
                        bottleneck=16, lambda_=0.5)
    dann.compile(keras.optimizers.Adam(1e-3), jit_compile=True)
    rng = np.random.default_rng(0)
    batch = {"source": rng.uniform(0, 255, (8, size, size, 3)).astype(
        "float32"), "target": rng.uniform(0, 255, (8, size, size, 3))
        .astype("float32")}
    labels = rng.integers(0, 3, 8)
    losses = [dann.train_on_batch(batch, labels, return_dict=True)["loss"]
              for _ in range(2)]
    ok = all(np.isfinite(losses))
    return ok, f"loss {losses[0]:.3f} -> {losses[1]:.3f}"


def layerwise_mixed(policy):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        deltas = {}
        for layerwise in (False, True):
            keras.utils.set_random_seed(0)
            inputs = keras.Input((4,))
            h = keras.layers.Dense(8, activation="relu", name="low")(inputs)
            out = keras.layers.Dense(1, name="high", dtype="float32")(h)
            model = keras.Model(inputs, out)
            opt = keras.optimizers.SGD(0.1)
            if layerwise:
                opt = kerastl.LayerwiseOptimizer(opt, {"low": 0.25}, model)
            model.compile(opt, "mse")
            x = np.linspace(-1, 1, 32, dtype="float32").reshape(8, 4)
            y = x.sum(axis=1, keepdims=True)
            before = [keras.ops.convert_to_numpy(v)
                      for v in model.trainable_weights]
            model.train_on_batch(x, y)
            deltas[layerwise] = {
                v.path: keras.ops.convert_to_numpy(v) - b
                for v, b in zip(model.trainable_weights, before)}
            dtypes = {v.dtype for v in model.trainable_weights}
        worst = 0.0
        for path, plain in deltas[False].items():
            m = 0.25 if path.startswith("low/") else 1.0
            scale = np.abs(plain).max() + 1e-12
            worst = max(worst, float(np.abs(deltas[True][path] - m * plain)
                                     .max() / scale))
        ok = worst < 1e-3 and dtypes == {"float32"}
        return ok, f"max rel. err {worst:.1e}, variables {sorted(dtypes)}"
    finally:
        keras.mixed_precision.set_global_policy(previous)


def throughput(size, batch, steps):
    keras.utils.set_random_seed(0)
    backbone = kerastl.load_backbone("mobilenet_v2", weights=None,
                                     input_shape=(size, size, 3))
    model = kerastl.build_classifier(backbone, 10, freeze=False)
    model.compile(keras.optimizers.Adam(1e-3),
                  "sparse_categorical_crossentropy", jit_compile=True)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
    y = rng.integers(0, 10, batch)
    for _ in range(2):  # compile and warm up
        model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        loss = model.train_on_batch(x, y)
    jax.block_until_ready(loss)
    seconds = time.perf_counter() - start
    return np.isfinite(loss), f"{batch * steps / seconds:.0f} images/s " \
        f"({size}x{size}, batch {batch})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    gpu = device.platform == "gpu"
    policy = "mixed_float16" if gpu else "mixed_bfloat16"
    size, batch, steps = (32, 8, 3) if args.quick else \
        ((224, 64, 20) if gpu else (96, 32, 5))
    rows = []
    for dtype in ("float32", "float16", "bfloat16"):
        rows.append(("GradientReversal gradient", dtype,
                     *reversal_gradient(dtype)))
    rows.append(("DANN train step under jit", "float32",
                 *dann_jit_step(16 if args.quick else 64)))
    rows.append(("LayerwiseOptimizer exact", policy,
                 *layerwise_mixed(policy)))
    rows.append(("MobileNetV2 classifier step", "float32",
                 *throughput(size, batch, steps)))
    assert "tensorflow" not in sys.modules, "something imported TensorFlow"
    print(f"device: {device.device_kind} ({device.platform}), "
          f"jax {jax.__version__}, keras {keras.__version__}, "
          f"backend {keras.backend.backend()}, TensorFlow not importable")
    width = max(len(r[0]) for r in rows)
    for name, dtype, ok, detail in rows:
        print(f"{name:<{width}}  {dtype:<14}  {'ok  ' if ok else 'FAIL'}  "
              f"{detail}")
    passed = all(r[2] for r in rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.device_kind, "rows": [
                dict(check=r[0], dtype=r[1], ok=bool(r[2]), detail=r[3])
                for r in rows]}, f, indent=2)
    print("GPU CHECK OK" if passed else "GPU CHECK FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
