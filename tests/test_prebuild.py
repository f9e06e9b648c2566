"""kerastl.prebuild: the train step traced once, the training unchanged."""

import keras
import numpy as np
import pytest

import kerastl
from conftest import small_cnn
from kerastl import prebuild

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="what it fixes is TensorFlow's")


class CountingModel(keras.Model):
    """A functional classifier whose train step counts its traces (the
    Python body runs once per trace, never per step)."""

    traces = 0

    def train_step(self, data):
        CountingModel.traces += 1
        return super().train_step(data)


def counting_classifier():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return CountingModel(inputs, keras.layers.Dense(3, activation="softmax")(x))


@pytest.fixture
def count_traces(monkeypatch):
    """``count_traces(cls)``: a list that gets an item at each trace of
    ``cls``'s train step (Keras's own)."""
    def patch(cls):
        traces = []
        step = keras.Model.train_step

        def counting(self, data):
            traces.append(1)
            return step(self, data)

        monkeypatch.setattr(cls, "train_step", counting)
        return traces

    return patch


def deferred(monkeypatch):
    """kerastl's early build switched off: Keras builds in the trace."""
    monkeypatch.setattr(prebuild, "build_before_fit", lambda *a, **k: None)


def data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 255, (n, 16, 16, 3)).astype("float32"),
            rng.integers(0, 3, n))


@pytest.mark.parametrize("prebuilt", [False, True])
def test_the_train_step_is_traced_once_after_a_build(prebuilt):
    """Keras builds Adam's moments and the accuracy metric inside the first
    trace, and the step is traced again; built before, once."""
    x, y = data()
    model = counting_classifier()
    model.compile(keras.optimizers.Adam(1e-3),
                  "sparse_categorical_crossentropy", metrics=["accuracy"])
    if prebuilt:
        prebuild.build_before_fit(model, x, y)
        assert model.optimizer.built
    CountingModel.traces = 0
    model.fit(x, y, batch_size=24, epochs=2, verbose=0)
    assert CountingModel.traces == (1 if prebuilt else 2)


def test_a_dataset_gives_the_structure_too():
    import tensorflow as tf

    x, y = data()
    model = counting_classifier()
    model.compile("sgd", "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    prebuild.build_before_fit(model, ds)
    CountingModel.traces = 0
    model.fit(ds, epochs=1, verbose=0)
    assert CountingModel.traces == 1


def test_a_py_dataset_builds_the_optimizer_only():
    """fine_tune also takes a PyDataset or a generator: no structure to
    read before fit, so Keras builds the metrics in the trace."""
    x, y = data()

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return x[8 * i:8 * i + 8], y[8 * i:8 * i + 8]

    model = counting_classifier()
    model.compile("adam", "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    prebuild.build_before_fit(model, Batches())
    assert model.optimizer.built  # (before fit)
    CountingModel.traces = 0
    model.fit(Batches(), epochs=1, verbose=0)
    assert CountingModel.traces == 2  # the accuracy built in the trace
    model = kerastl.build_classifier(small_cnn(16), 3, seed=0)
    history = kerastl.fine_tune(model, Batches(), strategy="full",
                                head_epochs=1, epochs=1,
                                check_features=False)
    assert len(history.fine_tune.history["loss"]) == 1


def test_a_batch_keras_cannot_build_from_is_left_to_keras():
    """An optimisation only: a structure Keras cannot build from (a wrong
    shape, strings, a generator) leaves the metrics to the first trace, as
    without the call, and the optimizer built; fit trains as before."""
    x, y = data()

    def generator():
        while True:
            yield x[:8], y[:8]

    for arrays in ((x[:, :3], y, None), (x, y.astype(str), None),
                   (generator(), None, None)):
        model = counting_classifier()
        model.compile("adam", "sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        prebuild.build_before_fit(model, *arrays)
        assert model.optimizer.built
        CountingModel.traces = 0
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        assert CountingModel.traces == 2  # the accuracy built in the trace


@pytest.mark.grappler  # two graphs, bit for bit
@pytest.mark.parametrize("cache", [False, True])
def test_fine_tune_trains_the_same_weights_bit_for_bit(cache, monkeypatch,
                                                      count_traces):
    """fine_tune (both phases, Adam, accuracy; with and without the
    boundary cache) ends with the same weights and logs as without the
    early build."""
    x, y = data(40)
    val = data(16, seed=1)

    traces = count_traces(keras.Model)

    def run():
        keras.utils.set_random_seed(3)
        model = kerastl.build_classifier(small_cnn(16), 3, seed=0)
        del traces[:]
        history = kerastl.fine_tune(
            model, (x, y), val, strategy="partial", freeze_up_to=1,
            head_epochs=2, epochs=2, seed=0, batch_size=8,
            boundary_cache=cache, check_features=False)
        assert history.fine_tune.boundary_cache == ("used" if cache else
                                                    "boundary_cache=False")
        return model.get_weights(), history.fine_tune.history, len(traces)

    built = run()
    deferred(monkeypatch)
    keras_built = run()
    # Two phases, each step traced once (twice without the early build).
    assert (built[2], keras_built[2]) == (2, 4)
    assert len(built[0]) == len(keras_built[0])
    for a, b in zip(built[0], keras_built[0]):
        assert np.array_equal(a, b)
    assert built[1] == keras_built[1]


@pytest.mark.grappler  # two graphs, bit for bit
@pytest.mark.parametrize("kind", ["dann", "adamatch"])
def test_dann_and_adamatch_trace_their_step_once_and_train_alike(
        kind, monkeypatch, count_traces):
    from conftest import toy_domains

    xs, ys, xt, _ = toy_domains(32)
    make = kerastl.DANN if kind == "dann" else kerastl.adaptation.AdaMatch
    traces = count_traces(make)

    def run():
        keras.utils.set_random_seed(0)
        model = make(small_cnn(), 2)
        model.compile(keras.optimizers.Adam(1e-3), metrics=["accuracy"])
        del traces[:]
        model.fit(kerastl.adaptation.domain_dataset((xs, ys), xt,
                                                    batch_size=16, seed=0),
                  epochs=2, verbose=0)
        return len(traces), model.get_weights()

    built = run()
    deferred(monkeypatch)
    keras_built = run()
    assert (built[0], keras_built[0]) == (1, 2)
    assert len(built[1]) == len(keras_built[1])
    for a, b in zip(built[1], keras_built[1]):
        assert np.array_equal(a, b)
