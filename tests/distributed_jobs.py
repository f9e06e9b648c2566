"""Training jobs that tests/test_distribute.py runs on one and on several
devices, each in a fresh process (device setup must precede TensorFlow's
start, and Keras picks its backend once per process).

    python distributed_jobs.py JOB[,JOB...] MODE OUT_FOLDER

JOB: ``classifier`` (a kerastl classifier with LayerwiseOptimizer and
GradualUnfreezing) or ``dann`` (a DANN with per-domain BatchNorm, the
information loss and GaninLambda); several jobs run one after the other in
the one process (one TensorFlow start for all of them), always in the order
given, so that their layers get the same names in every mode. MODE:
``single``, ``mirrored`` (two logical CPUs), ``multi_worker`` (TF_CONFIG
set by the caller; worker 0 writes) or ``jax_data_parallel``
(keras.distribution.DataParallel over two host devices). Every mode sees
the same global batches in the same order and starts from the same weights;
``OUT_FOLDER/JOB.npz`` holds every weight of JOB after training.
"""

import os
import sys

MODE = sys.argv[2] if len(sys.argv) > 2 else "single"
if MODE == "jax_data_parallel":
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

GLOBAL_BATCH = 16
STEPS_PER_EPOCH = 4
EPOCHS = 3
SIZE = 16


def _setup():
    """The strategy (or None) for MODE, created before any model."""
    if MODE == "jax_data_parallel":
        import keras
        devices = keras.distribution.list_devices("cpu")
        assert len(devices) == 2, devices
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=devices))
        return None
    import tensorflow as tf
    if MODE == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    if MODE == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return None


def _deterministic_weights(model):
    """The same starting weights in every mode, whatever the initialisers'
    random streams do under a strategy."""
    rng = np.random.default_rng(0)
    for v in model.weights:
        if "moving_variance" in v.path or v.path.endswith("/gamma"):
            v.assign(np.ones(v.shape, "float32"))
        elif "moving_mean" in v.path or v.path.endswith("/beta") or \
                v.path.endswith("/bias"):
            v.assign(np.zeros(v.shape, "float32"))
        else:
            fan_in = int(np.prod(v.shape[:-1])) or 1
            v.assign(rng.normal(0, 1 / np.sqrt(fan_in), v.shape)
                     .astype("float32"))


def _cnn(keras, name):
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0, name=f"{name}_scale")(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu",
                            name=f"{name}_conv1")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn1")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu",
                            name=f"{name}_conv2")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn2")(x)
    return keras.Model(inputs, x, name=name)


def _data(n, seed, bright=0.0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")
    y = (x[:, :4, :4, 0].mean(axis=(1, 2)) > 127).astype("int32")
    return np.clip(x * (1 - bright) + 255 * bright, 0, 255), y


def classifier_job():
    import keras
    import kerastl

    strategy = _setup()
    scope = strategy.scope() if strategy else _nullcontext()
    with scope:
        backbone = _cnn(keras, "cnn")
        model = kerastl.build_classifier(backbone, 2, dropout=0.0,
                                         freeze=True)
        _deterministic_weights(model)
        opt = kerastl.LayerwiseOptimizer(keras.optimizers.Adam(1e-2),
                                         kerastl.LayerDecay(0.5), model)
        model.compile(opt, "sparse_categorical_crossentropy")
    x, y = _data(GLOBAL_BATCH * STEPS_PER_EPOCH, seed=1)
    if MODE == "multi_worker":
        kerastl.distribute.prepare_distributed_fit(model, _batches((x, y)))
    model.fit(_batches((x, y)), epochs=EPOCHS, verbose=0,
              callbacks=[kerastl.GradualUnfreezing(every=1)])
    return model


def dann_job():
    import keras
    import kerastl

    strategy = _setup()
    scope = strategy.scope() if strategy else _nullcontext()
    with scope:
        dann = kerastl.DANN(_cnn(keras, "features"), num_classes=2,
                            domain_hidden=(8,), bottleneck=8)
        _deterministic_weights(dann)
        # SGD: an update linear in the gradient. (Adam divides by
        # sqrt(v): where a gradient is ~0, float rounding of the replica
        # sums, 1e-7 relative, turns into updates of order lr.)
        dann.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                     jit_compile="auto")
    half = GLOBAL_BATCH // 2
    xs, ys = _data(half * STEPS_PER_EPOCH, seed=2)
    xt, _ = _data(half * STEPS_PER_EPOCH, seed=3, bright=0.5)
    data = kerastl.adaptation.domain_dataset((xs, ys), xt, batch_size=half,
                                  shuffle=False)
    if MODE == "multi_worker":
        kerastl.distribute.prepare_distributed_fit(dann, data)
    dann.fit(data, epochs=EPOCHS, verbose=0, callbacks=
             # scale 0.3: at full reversal strength the adversarial game
             # amplifies float rounding (1e-7) into 1e-3 differences within
             # a few steps on any two runs that sum in another order.
             [kerastl.adaptation.GaninLambda(scale=0.3, warmup=0.25)])
    return dann


def _batches(arrays):
    """A tf.data pipeline of global batches, in order."""
    import tensorflow as tf
    ds = tf.data.Dataset.from_tensor_slices(arrays).batch(GLOBAL_BATCH)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = \
        tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main():
    jobs, out = sys.argv[1].split(","), sys.argv[3]
    task = os.environ.get("TF_CONFIG")
    for job in jobs:
        model = {"classifier": classifier_job, "dann": dann_job}[job]()
        if MODE == "multi_worker" and '"index": 0' not in (task or ""):
            continue  # only worker 0 reports
        import keras
        np.savez(os.path.join(out, f"{job}.npz"),
                 **{v.path: keras.ops.convert_to_numpy(v)
                    for v in model.weights})
    print("JOB OK")


if __name__ == "__main__":
    main()
