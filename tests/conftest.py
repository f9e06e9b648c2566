"""Shared test setup: quiet TensorFlow, small shapes, offline by design."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import kerastl  # noqa: E402

# TensorFlow's graph optimizer (Grappler) rewrites each traced function
# before its first run: worth it over a long training, not over the few
# steps a test takes (a MobileNetV2 DANN's first epoch: 13.4 s without it,
# 16.8 s with it). The computation is the same, but fused kernels can
# differ in the last bits, so the tests that compare two different graphs
# bit for bit (marked `grappler`) run with it on, as users run.
# KERASTL_TEST_GRAPPLER=1 runs the whole suite with it.
GRAPPLER = os.environ.get("KERASTL_TEST_GRAPPLER") == "1"


def set_grappler(on):
    """Grappler on or off for the functions that run for the first time
    from now on (TensorFlow reads the setting then)."""
    tf.config.optimizer.set_experimental_options(
        {"disable_meta_optimizer": not on})


set_grappler(GRAPPLER)


@pytest.fixture(autouse=True)
def grappler_where_marked(request):
    """Grappler on for a test marked ``grappler``."""
    if GRAPPLER or request.node.get_closest_marker("grappler") is None:
        yield
        return
    set_grappler(True)
    try:
        yield
    finally:
        set_grappler(False)


M_LOW = 0.1  # the multiplier of the lower block in most layer-wise tests


@pytest.fixture(autouse=True, scope="session")
def ctrl_c_reaches_the_tests():
    """pytest-xdist workers ignore SIGINT (the controller handles Ctrl-C),
    and an ignored SIGINT is inherited by every process they start; the
    interrupt tests need Ctrl-C to behave as in a terminal."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture(scope="module")
def collect_only_this_modules_garbage():
    """For modules that call ``keras.backend.clear_session`` test after
    test (``pytestmark = pytest.mark.usefixtures(...)``): Python's cycle
    collector walks only what the module made; what earlier modules left
    alive is collected once, then frozen (``gc.freeze``) until the module
    ends. ``clear_session`` collects in full, and a worker's heap grows
    with every model it has traced: late in a run each of test_zoo_all's
    collections cost seconds (DenseNet121's test took 23 s there and 2 s
    alone; the module 373 s, then 139 s with this)."""
    import gc

    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def nothing_trusted():
    """No TF Hub folder or handle is trusted when a test starts or after it
    ends (kerastl.trust_hub_path is process-wide)."""
    kerastl.tfhub.clear_trusted()
    yield
    kerastl.tfhub.clear_trusted()


@pytest.fixture(scope="session")
def pretrained_cache(tmp_path_factory):
    """One KERASTL_CACHE_DIR for the whole run, shared by the pytest-xdist
    workers: the offline pretrained CNN (kerastl.pretrained) is trained
    once, by the first worker that needs it (the others wait on a file
    lock), and read from the cache by every test and notebook after."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder = root / "kerastl_cache"
    folder.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERASTL_CACHE_DIR", str(folder))
        with open(root / "kerastl_cache.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                kerastl.pretrained.pretrained_backbone()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        keras.backend.clear_session()
        yield folder


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def images(rng):
    """A small batch of RGB images in [0, 255]."""
    return rng.uniform(0, 255, size=(4, 64, 64, 3)).astype("float32")


# -- models and data shared by several test modules ----------------------

_STAND_INS = {}


def stand_in_weights(name, input_shape=(32, 32, 3)):
    """A weights file for zoo model ``name``, as a user who downloaded its
    pretrained weights passes them (``weights=PATH``, ``--weights PATH``):
    offline, the architecture's random initial weights, written once per
    process. ``load_backbone(name, weights=None)`` instead marks the
    backbone random, and fine_tune refuses to freeze it."""
    key = (name, tuple(input_shape))
    if key not in _STAND_INS:
        import atexit
        import shutil
        import tempfile
        folder = tempfile.mkdtemp(prefix="kerastl_weights_")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        path = os.path.join(folder, f"{name}.weights.h5")
        kerastl.load_backbone(name, weights=None, input_shape=input_shape) \
            .model.save_weights(path)
        _STAND_INS[key] = path
    return _STAND_INS[key]


def stand_in_backbone(name, input_shape=(32, 32, 3)):
    """``load_backbone(name)`` as offline tests can: from
    :func:`stand_in_weights`."""
    return kerastl.load_backbone(name, weights=stand_in_weights(
        name, input_shape), input_shape=input_shape)


def small_cnn(size=32, width=8):
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(width, 3, strides=2, activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Conv2D(width, 3, strides=2, activation="relu")(x)
    return keras.Model(inputs, x, name="small_cnn")


def toy_domains(n=64, seed=0):
    """Source: dark images; target: bright ones. Labels from one pixel."""
    rng = np.random.default_rng(seed)
    xs = rng.uniform(0, 120, (n, 32, 32, 3)).astype("float32")
    xt = rng.uniform(100, 255, (n, 32, 32, 3)).astype("float32")
    ys = (xs[:, 0, 0, 0] > 60).astype("int64")
    yt = (xt[:, 0, 0, 0] > 180).astype("int64")
    return xs, ys, xt, yt


class Reusable(tf.Module):
    def __init__(self):
        super().__init__()
        init = tf.random.stateless_normal
        self.w1 = tf.Variable(init((3, 5), seed=(1, 2)), name="block1/w")
        self.w2 = tf.Variable(init((5, 4), seed=(3, 4)), name="block2/w")
        self.moving_mean = tf.Variable(tf.zeros(5), trainable=False,
                                       name="block1/moving_mean")
        self.regularization_losses = [tf.function(
            lambda: 0.01 * tf.reduce_sum(self.w1 ** 2), input_signature=[])]

    @tf.function(input_signature=[tf.TensorSpec((None, 3), tf.float32),
                                  tf.TensorSpec((), tf.bool)])
    def __call__(self, x, training=False):
        h = tf.matmul(x, self.w1)

        def train():
            self.moving_mean.assign(0.5 * self.moving_mean
                                    + 0.5 * tf.reduce_mean(h, 0))
            return h - tf.reduce_mean(h, 0)

        h = tf.cond(training, train, lambda: h - self.moving_mean)
        return tf.matmul(tf.nn.relu(h), self.w2)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.Conv2D(6, 3, name="top_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, x).export(str(root / "keras_export"), verbose=False)
    tf.saved_model.save(Reusable(), str(root / "reusable"))
    return {"keras_export": (str(root / "keras_export"), (8, 8, 3)),
            "reusable": (str(root / "reusable"), (3,))}


def two_block_model(seed=0):
    """Blocks ``low`` and ``top`` (one Dense layer each)."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((6,), name="x")
    h = keras.layers.Dense(5, activation="tanh", name="low")(x)
    y = keras.layers.Dense(3, name="top")(h)
    return keras.Model(x, y)


def fit_data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 6)).astype("float32"),
            rng.normal(size=(n, 3)).astype("float32"))


def one_step_deltas(layerwise, jit_compile=False, model=None,
                    optimizer="adamw"):
    """Weight change of one full-batch step in ``fit``.

    For one step of Adam, and of AdamW's decoupled weight decay, the change
    is proportional to the learning rate: with the multiplier it must be
    exactly m times the plain optimizer's.
    """
    model = model or two_block_model()
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    opt = (keras.optimizers.AdamW(1e-2, weight_decay=0.5)
           if optimizer == "adamw" else keras.optimizers.Adam(1e-2))
    if layerwise:
        opt = kerastl.LayerwiseOptimizer(opt, {"low": M_LOW}, model)
    model.compile(opt, "mse", jit_compile=jit_compile)
    x, y = fit_data()
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    return model, {v.path: v.numpy() - before[v.path]
                   for v in model.trainable_variables}


def write_folder(root, per_class=10, size=24, classes=("cats", "dogs")):
    rng = np.random.default_rng(0)
    for i, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for j in range(per_class):
            image = rng.integers(0, 80, (size, size, 3)).astype("uint8")
            image[..., i] += 150  # the class is the dominant colour
            keras.utils.save_img(str(folder / f"{j}.png"), image,
                                 scale=False)
    return root


def step_with_references(optimizer, variables, references, rng):
    """One step of ``optimizer`` on random gradients, and the same gradient
    of each variable through its own ``(reference optimizer, reference
    variable)`` pair: the reference a multiplier must match."""
    grads = [rng.normal(size=v.shape).astype("float32") for v in variables]
    optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads],
                    variables)
    for g, (ref_opt, ref_var) in zip(grads, references):
        ref_opt.apply([keras.ops.convert_to_tensor(g)], [ref_var])


def save_load_and_resume(model, path, x, y=None, batch_size=4, save=None):
    """Saves ``model`` to ``path`` (``x`` and ``y`` arrays, or ``x`` a
    dataset), loads it with :func:`kerastl.load_model`
    and checks that training resumes where it stopped: the same trainable
    variables, the optimizer's state loaded (no "Skipping variable loading"
    warning, same iteration count, same slots), and one more epoch on both
    models ending at the same weights. ``save(model, path)``: default
    ``model.save``. Returns the loaded model."""
    import re
    import warnings

    (save or keras.Model.save)(model, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = kerastl.load_model(path)
    skipped = [str(w.message) for w in caught
               if "Skipping variable loading" in str(w.message)]
    assert not skipped, skipped
    # (An unnamed variable's number changes: SigLIP's probe, "variable_<n>".)
    paths = [[re.sub(r"variable_\d+$", "variable", v.path)
              for v in m.trainable_weights] for m in (model, loaded)]
    assert paths[0] == paths[1]
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations)
    assert int(model.optimizer.iterations) > 0
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    for m in (model, loaded):
        keras.utils.set_random_seed(1)
        if y is None:  # a dataset
            m.fit(x, epochs=1, verbose=0)
        else:
            m.fit(x, y, batch_size=batch_size, epochs=1, verbose=0,
                  shuffle=False)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5,
                                   atol=1e-6, err_msg=a.path)
    return loaded
