"""An interrupted fit, resumed with keras.callbacks.BackupAndRestore, ends
bit-identical to an uninterrupted one: kerastl's callbacks derive their
state from the epoch index and keep the restored optimizer state.

As in Keras's own BackupAndRestore test, the data is not shuffled (the
order of a shuffled epoch is not part of the backup)."""

import os

import numpy as np
import pytest

import keras

import kerastl
from conftest import small_cnn, toy_domains, write_folder

EPOCHS, STOP_AFTER = 4, 2


class Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == STOP_AFTER:
            raise RuntimeError("interrupted")


def two_block_classifier():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(3, 3, name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Conv2D(4, 3, name="c2")(x)
    return kerastl.build_classifier(keras.Model(inputs, x), 2, dropout=0.0)


def classifier_data():
    rng = np.random.default_rng(0)
    return (rng.uniform(0, 255, (32, 8, 8, 3)).astype("float32"),
            rng.integers(0, 2, 32))


def compile_classifier(model, layerwise):
    opt = keras.optimizers.Adam(1e-2)
    if layerwise:
        opt = kerastl.LayerwiseOptimizer(opt, kerastl.LayerDecay(0.5), model)
    model.compile(opt, "sparse_categorical_crossentropy")


def dann_model(schedule):
    keras.utils.set_random_seed(0)
    dann = kerastl.DANN(small_cnn(32), 2, domain_hidden=(8,))
    dann.compile(keras.optimizers.SGD(1e-2, momentum=0.9))
    return dann


def run(make, fit, tmp_path, interrupted, order):
    """Weights after EPOCHS epochs, straight or interrupted and resumed."""
    if not interrupted:
        model = make()
        fit(model, [], [])
        return model
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    model = make()
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(model, [backup] if order == "backup first" else [],
            [Interrupt()] + ([backup] if order == "backup last" else []))
    model = make()  # a new process: everything rebuilt from scratch
    fit(model, [backup] if order == "backup first" else [],
        [backup] if order == "backup last" else [])
    return model


def max_difference(a, b):
    return max(float(np.max(np.abs(x - y)))
               for x, y in zip(a.get_weights(), b.get_weights()))


@pytest.mark.parametrize("order", ["backup first", "backup last"])
@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("gradual", [False, True])
def test_classifier_training_resumes_exactly(tmp_path, layerwise, order,
                                             gradual):
    """Plain Adam, LayerwiseOptimizer, each with and without
    GradualUnfreezing, BackupAndRestore before or after it."""
    x, y = classifier_data()

    def make():
        model = two_block_classifier()
        compile_classifier(model, layerwise)
        return model

    def fit(model, before, after):
        extra = [kerastl.GradualUnfreezing(every=1)] if gradual else []
        model.fit(x, y, batch_size=8, epochs=EPOCHS, shuffle=False,
                  verbose=0, callbacks=before + extra + after)

    straight = run(make, fit, tmp_path / "a", False, order)
    resumed = run(make, fit, tmp_path / "b", True, order)
    assert int(resumed.optimizer.iterations) == \
        int(straight.optimizer.iterations) == EPOCHS * 4
    assert kerastl.freezing.trainable_blocks(resumed) == \
        kerastl.freezing.trainable_blocks(straight)
    assert max_difference(straight, resumed) == 0.0


@pytest.mark.parametrize("schedule", [None, "lambda", "learning rate"])
def test_dann_schedules_resume_exactly(tmp_path, schedule):
    xs, ys, xt, _ = toy_domains(32)
    data = kerastl.adaptation.domain_dataset((xs, ys), xt, batch_size=8, shuffle=False)

    def make():
        return dann_model(schedule)

    def fit(model, before, after):
        callback = {None: [], "lambda": [kerastl.adaptation.GaninLambda()],
                    "learning rate": [kerastl.adaptation.GaninLearningRate()]}[schedule]
        model.fit(data, epochs=EPOCHS, verbose=0,
                  callbacks=before + callback + after)

    straight = run(make, fit, tmp_path / "a", False, "backup last")
    resumed = run(make, fit, tmp_path / "b", True, "backup last")
    if schedule is None:
        pass
    elif schedule == "lambda":
        assert float(resumed.reversal.lambda_.numpy()) == \
            float(straight.reversal.lambda_.numpy()) > 0.99
    else:
        assert float(resumed.optimizer.learning_rate) == \
            float(straight.optimizer.learning_rate)
    assert max_difference(straight, resumed) == 0.0


def test_a_resume_ends_on_the_epoch_early_stopping_chose(tmp_path):
    """A run's early stopping watches the second half of the epochs under
    the cosine schedule, and a resume takes its best weights from the best
    checkpoint. Here the lowest validation loss comes before the watched
    epochs: the checkpoint must be the best of the watched epochs, or the
    resumed run ends on other weights than an uninterrupted one."""
    from kerastl import resume

    losses = [0.1, 0.5, 0.4, 0.45, 0.6, 0.7]  # lowest at 0; watched from 2
    start, stop_after = 2, 4

    def train(path, first, last, before=(), losses=losses):
        model = keras.Sequential([keras.Input((1,)),
                                  keras.layers.Dense(1, use_bias=False)])
        callbacks = [resume.AtomicCheckpoint(path, before, start=start),
                     resume.ResumableEarlyStopping(10, before, path, start)]
        for c in callbacks:
            c.set_model(model)
            c.on_train_begin()
        for epoch in range(first, last):
            model.layers[0].kernel.assign([[float(epoch)]])  # "training"
            for c in callbacks:
                c.on_epoch_end(epoch, {"val_loss": losses[epoch]})
        for c in callbacks:
            c.on_train_end()
        return float(model.layers[0].kernel[0, 0])

    def checkpointed(path):
        return float(kerastl.load_model(path).layers[0].kernel[0, 0])

    straight = str(tmp_path / "straight.keras")
    assert train(straight, 0, len(losses)) == 2.0 == checkpointed(straight)
    resumed = str(tmp_path / "resumed.keras")
    train(resumed, 0, stop_after)  # interrupted after epoch 4
    assert checkpointed(resumed) == 2.0
    before = [{"val_loss": v} for v in losses[:stop_after]]
    assert train(resumed, stop_after, len(losses), before) == 2.0 == \
        checkpointed(resumed)
    # Before the watched epochs the checkpoint is the best so far (what a
    # Ctrl-C there keeps).
    early = str(tmp_path / "early.keras")
    train(early, 0, start)
    assert checkpointed(early) == 0.0
    train(early, start, start + 1, [{"val_loss": v} for v in losses[:start]])
    assert checkpointed(early) == 2.0
    # Keras's early stopping takes the first watched epoch as its best
    # even when its loss is NaN (and nothing beats a NaN): so does the
    # checkpoint.
    nan = str(tmp_path / "nan.keras")
    assert train(nan, 0, 4, losses=[0.1, 0.5, float("nan"), 0.3]) == 2.0 \
        == checkpointed(nan)


def test_a_run_that_early_stopping_had_ended_trains_no_more(tmp_path):
    """Killed after early stopping ended it (before the outputs were
    written), a run resumed trains no epoch more and ends on the best
    epoch's weights, as the uninterrupted run did; one epoch short of
    stopping, it trains on."""
    from kerastl import resume

    model = keras.Sequential([keras.Input((1,)),
                              keras.layers.Dense(1, use_bias=False)])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.layers[0].kernel.assign([[2.0]])
    best = str(tmp_path / "best.keras")
    kerastl.save_model(model, best)  # the best epoch's weights
    model.layers[0].kernel.assign([[5.0]])  # the last epoch's
    x = np.ones((4, 1), "float32")
    logged = [{"val_loss": v} for v in (0.5, 0.4, 0.45)]  # patience 1
    history = model.fit(x, x, epochs=10, verbose=0, callbacks=[
        resume.ResumableEarlyStopping(1, logged, best)])
    assert history.epoch == []
    assert float(model.layers[0].kernel[0, 0]) == 2.0
    history = model.fit(x, x, epochs=4, verbose=0, initial_epoch=2,
                        callbacks=[resume.ResumableEarlyStopping(
                            1, logged[:2], best)])
    assert history.epoch == [2, 3]  # and the next fit starts where asked


@pytest.mark.slow
def test_finetune_resume_continues_an_interrupted_run(tmp_path, capsys,
                                                      monkeypatch):
    import json

    from kerastl import cli, experiment, resume

    images = write_folder(tmp_path / "images", per_class=6, size=32)
    small_cnn().save(tmp_path / "net.keras")  # the run is the point
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(tmp_path / "net.keras"), "--data",
            str(images), "--output", str(out), "--epochs", "4",
            "--batch-size", "4"]
    real = experiment.fine_tune

    def interrupted(*args, **kwargs):
        kwargs["callbacks"] = list(kwargs["callbacks"]) + [Interrupt()]
        return real(*args, **kwargs)

    # The best checkpoint watches the epochs early stopping watches (the
    # second half of 4 under the cosine schedule), continuing on a resume.
    checkpoints = []

    class Checkpoint(resume.AtomicCheckpoint):
        def __init__(self, path, epochs=(), start=0):
            checkpoints.append((len(epochs), start))
            super().__init__(path, epochs, start)

    monkeypatch.setattr(resume, "AtomicCheckpoint", Checkpoint)

    monkeypatch.setattr(experiment, "fine_tune", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        cli.main(argv)
    monkeypatch.setattr(experiment, "fine_tune", real)
    assert not out.exists()
    backup = resume.backup_folder(out)
    assert os.path.isdir(backup)
    # Without --resume the interrupted run is not thrown away silently.
    assert cli.main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    # A backup whose epochs were of other passes over the data (another
    # kerastl version) is not continued under a new meaning.
    run_file = os.path.join(backup, resume.RUN_FILE)
    logged = json.loads(open(run_file).read())
    assert logged["epoch_passes"] == 1  # --epochs given: one pass each
    with open(run_file, "w") as f:
        json.dump(dict(logged, epoch_passes=5), f)
    assert cli.main(argv + ["--resume"]) == 2
    assert "epochs of 5 passes over the data" in capsys.readouterr().err
    with open(run_file, "w") as f:
        json.dump(logged, f)
    assert cli.main(argv + ["--resume"]) == 0
    assert checkpoints == [(0, 2), (2, 2)]
    metrics = json.loads((out / "metrics.json").read_text())
    # Epochs 3 and 4 ran; 1 and 2 came from the backup, and the history
    # holds all four (the backup's epoch log).
    assert len(metrics["history"]["loss"]) == EPOCHS == metrics["epochs_run"]
    assert not os.path.exists(backup)
    assert cli.main(argv + ["--resume", "--overwrite"]) == 2
    assert "Nothing to resume" in capsys.readouterr().err
