"""Training-time augmentation (kerastl.augment): named policies of Keras's own
layers on the training batches only; the model, its saved file and its
export contain none."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerastl
from conftest import small_cnn, write_folder
from kerastl import augment
from kerastl.errors import KerastlError


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 255, (n, 32, 32, 3)).astype("float32"),
            np.arange(n) % 4)


def classifier(seed=0):
    keras.utils.set_random_seed(seed)
    return kerastl.build_classifier(small_cnn(), 4, seed=seed)


def layer_names(layer):
    """Every layer inside ``layer``, nested models included."""
    out = [type(layer).__name__]
    for sub in getattr(layer, "layers", []):
        out += layer_names(sub)
    return out


def test_policies_are_keras_layers_and_never_flip_by_default():
    x, _ = data(8)
    for policy in ("light", "strong"):
        layer = augment.augmentation(policy, seed=1)
        assert isinstance(layer, keras.layers.Pipeline)
        kinds = [type(l).__name__ for l in layer.layers]
        assert all(k.startswith("Random") for k in kinds), kinds
        assert "RandomFlip" not in kinds
        assert "RandomFlip" in [type(l).__name__ for l in augment.augmentation(
            policy + "+flip").layers]
        out = augment.augment_batch(layer, x)
        assert out.shape == x.shape and out.dtype == np.float32
        assert not np.allclose(out, x)  # it changed the images
        assert out.min() >= 0 and out.max() <= 255  # the input contract
    assert augment.augmentation("none") is None
    assert augment.augmentation(None) is None
    own = keras.layers.RandomFlip("vertical")
    assert augment.augmentation(own) is own
    with pytest.raises(KerastlError, match="none, light, strong.*\\+flip"):
        augment.augmentation("heavy")
    with pytest.raises(KerastlError, match="light\\+flop"):
        augment.augmentation("light+flop")
    with pytest.raises(KerastlError, match="augment=3"):
        kerastl.TrainingPlan(augment=3)


def test_fine_tune_augments_training_batches_reproducibly():
    x, y = data()
    settings = dict(strategy="full", head_epochs=1, epochs=2, batch_size=8,
                    seed=3, optimizer={"class_name": "adam",
                                        "config": {"learning_rate": 1e-3}},
                    check_features=False)
    runs = {}
    for name, policy in (("none", "none"), ("a", "light"), ("b", "light")):
        model = classifier()
        history = kerastl.fine_tune(model, (x, y), (x[:8], y[:8]),
                                    augment=policy, **settings)
        runs[name] = (model.get_weights(), history)
    same = lambda a, b: all(np.array_equal(u, v)  # noqa: E731
                            for u, v in zip(runs[a][0], runs[b][0]))
    assert same("a", "b")  # the same seed: the same augmented batches
    assert not same("none", "a")  # and they were augmented
    # Nothing frozen: end to end, augmented batch by batch (with frozen
    # blocks the cache replays augmented views: test_boundary.py).
    assert "no frozen block" in runs["a"][1].fine_tune.boundary_cache
    # The model holds no augmentation layer (the pipeline ran on the data).
    model = classifier()
    kerastl.fine_tune(model, (x, y), augment="strong", **settings)
    names = layer_names(model)
    assert not [n for n in names if n.startswith("Random") or
                n == "Pipeline"], names


def test_a_dataset_is_augmented_in_its_pipeline():
    x, y = data(16)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(batch)

    model = classifier()
    kerastl.fine_tune(model, ds, augment="light", strategy="full",
                      head_epochs=0, epochs=1, callbacks=[Spy()],
                      check_features=False)
    assert len(seen) == 2
    out = next(iter(augment.augment_dataset(ds, augment.augmentation(
        "light", seed=0))))
    assert out[0].shape == (8, 32, 32, 3) and not np.allclose(out[0], x[:8])
    np.testing.assert_array_equal(out[1], y[:8])  # labels untouched


def test_the_cli_and_its_export_carry_no_augmentation(tmp_path, capsys):
    from kerastl import cli
    images = write_folder(tmp_path / "images", per_class=6, size=32)
    small_cnn().save(tmp_path / "net.keras")
    out = tmp_path / "run"
    code = cli.main(["finetune", "--model", str(tmp_path / "net.keras"),
                     "--data", str(images), "--output", str(out),
                     "--augment", "light", "--epochs", "1", "--head-epochs",
                     "0", "--quiet",
                     "--batch-size", "4", "--strategy", "partial"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["experiment"]["augment"] == "light"
    # (partial: the cache replayed an augmented view of the
    # folder's images through the frozen block)
    assert metrics["boundary_cache"] == "used"
    model = kerastl.load_model(out / "model.keras")
    assert not [n for n in layer_names(model) if n.startswith("Random")]
    saved = tf.saved_model.load(str(out / "savedmodel"))
    graph = saved.signatures["serving_default"].graph.as_graph_def()
    ops = {n.op for n in graph.node} | {
        n.op for f in graph.library.function for n in f.node_def}
    assert ops and not [op for op in ops if "Random" in op], ops
    with pytest.raises(SystemExit):  # argparse: the choices listed
        cli.main(["finetune", "--model", str(tmp_path / "net.keras"),
                  "--data", str(images), "--output", str(tmp_path / "x"),
                  "--augment", "heavy"])
    err = capsys.readouterr().err
    assert "--augment: invalid choice: 'heavy'" in err and "light+flip" in err
