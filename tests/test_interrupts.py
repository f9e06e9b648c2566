"""Nothing lost at any instant: `kerastl finetune` stopped inside training,
inside a checkpoint write or inside the final save and export; resume that
is exact; outputs and inputs that an overwrite must not touch.

Interrupts are made deterministic: a callback or a patched writer raises
the KeyboardInterrupt (or sends SIGINT) at the chosen point, never timing.
"""

import json
import os
import signal

import keras
import numpy as np
import pytest

from conftest import small_cnn, write_folder
from kerastl import cli, experiment, resume, schema


def run(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err.strip()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 2-class folder of 32x32 images and a small user model file."""
    root = tmp_path_factory.mktemp("inputs")
    write_folder(root / "images", per_class=10, size=32)
    keras.utils.set_random_seed(0)
    small_cnn().save(root / "net.keras")
    return root


def argv(inputs, out, *more):
    return ["finetune", "--model", str(inputs / "net.keras"), "--data",
            str(inputs / "images"), "--output", str(out), "--epochs", "4",
            "--head-epochs", "0", "--batch-size", "4", "--dropout", "0.3",
            "--quiet", *more]


class StopAt(keras.callbacks.Callback):
    """Ctrl-C (a KeyboardInterrupt) as epoch ``epoch`` begins."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


@pytest.fixture
def interrupt_at(monkeypatch):
    """Makes the next run's training stop as the given epoch begins."""
    real = experiment.fine_tune

    def arm(epoch):
        def stopped(*args, **kwargs):
            kwargs["callbacks"] = list(kwargs["callbacks"]) + [StopAt(epoch)]
            return real(*args, **kwargs)
        monkeypatch.setattr(experiment, "fine_tune", stopped)
        return lambda: monkeypatch.setattr(experiment, "fine_tune", real)
    return arm


def weights(path):
    return keras.models.load_model(path).get_weights()


def assert_same_model(straight, out):
    """``out``'s model is bit-identical to the uninterrupted run's."""
    for a, b in zip(weights(straight / "model.keras"),
                    weights(out / "model.keras")):
        assert np.abs(a - b).max() == 0.0


def assert_same_run(straight, out):
    """... and so is its whole history, all four epochs."""
    assert_same_model(straight, out)
    full = json.loads((straight / "metrics.json").read_text())
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["history"] == full["history"]
    assert len(resumed["history"]["loss"]) == resumed["epochs_run"] == 4


@pytest.fixture(scope="module")
def straight(inputs, tmp_path_factory):
    """The uninterrupted run: what a resumed run must equal."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert cli.main(argv(inputs, out)) == 0
    return out


# -- 5. resume is exact, keeps the history, refuses another config -------------

def test_resume_equals_the_uninterrupted_run_with_its_whole_history(
        inputs, straight, tmp_path, capsys, interrupt_at):
    out = tmp_path / "run"
    restore = interrupt_at(2)
    code, err = run(capsys, *argv(inputs, out))
    restore()
    assert code == 130
    assert err.endswith("stopped after epoch 2 of 4: the best checkpoint so "
                        f"far is in {out}/checkpoints/best.keras; run the "
                        "same command with --resume to continue from epoch "
                        "3."), err
    assert json.loads((out / "INTERRUPTED.json").read_text())[
        "epochs_completed"] == 2
    # A resume that would train otherwise is refused, naming the keys.
    rate = schema.defaults()["learning_rate"]
    for more, named in ((["--learning-rate", "0.5"], f"learning_rate was "
                         f"{rate}, now 0.5"),
                        (["--image-size", "24"], "image_size was None, now "
                         "24")):
        code, err = run(capsys, *argv(inputs, out, "--resume", *more))
        assert code == 2 and named in err, err
    code, err = run(capsys, *argv(inputs, out, "--resume"))
    assert code == 0, err
    assert_same_run(straight, out)
    assert not (out / "INTERRUPTED.json").exists()
    assert not os.path.exists(resume.backup_folder(out))


def test_an_interrupt_before_the_first_epoch_ends_keeps_nothing(
        inputs, tmp_path, capsys, interrupt_at):
    out = tmp_path / "run"
    interrupt_at(0)
    code, err = run(capsys, *argv(inputs, out))
    assert code == 130 and "nothing was kept. Run the command again" in err
    assert not out.exists() and not os.path.exists(resume.backup_folder(out))
    assert os.listdir(tmp_path) == []
    code, err = run(capsys, *argv(inputs, out, "--resume"))
    assert code == 2 and "Nothing to resume" in err


# -- 1. a second Ctrl-C inside a checkpoint write --------------------------------

def test_an_interrupt_inside_a_checkpoint_write_publishes_no_partial_file(
        inputs, straight, tmp_path, capsys, monkeypatch):
    """Interrupted inside the second checkpoint write (the epoch being
    saved is not in the run's log yet: the run stopped after the epoch
    before, and the checkpoint is the first one, whole)."""
    out = tmp_path / "run"
    real_save = keras.Model.save
    writes = []

    def interrupted_save(model, path, *args, **kwargs):
        if ".best.keras.tmp-" in str(path):
            writes.append(path)
            if len(writes) == 2:  # half a file, then Ctrl-C
                with open(path, "wb") as f:
                    f.write(b"PK\x03\x04 half of a zip")
                raise KeyboardInterrupt
        return real_save(model, path, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save", interrupted_save)
    code, err = run(capsys, *argv(inputs, out))
    monkeypatch.setattr(keras.Model, "save", real_save)
    assert code == 130
    done = json.loads((out / "INTERRUPTED.json").read_text())[
        "epochs_completed"]
    assert done in (1, 2)  # the second write: epoch 2 or 3
    assert f"stopped after epoch {done} of 4: the best checkpoint so far is " \
           f"in {out}/checkpoints/best.keras; run the same command with " \
           f"--resume to continue from epoch {done + 1}." in err, err
    assert os.listdir(out / "checkpoints") == ["best.keras"]  # not partial
    keras.models.load_model(out / "checkpoints" / "best.keras")
    assert [f for f in os.listdir(resume.backup_folder(out))
            if "best" in f] == ["best.keras"]
    code, err = run(capsys, *argv(inputs, out, "--resume"))
    assert code == 0, err
    assert_same_model(straight, out)
    assert (out / "checkpoints" / "best.keras").is_file()


# -- 2. Ctrl-C during the final save or export ------------------------------------

def test_ctrl_c_during_the_final_save_keeps_the_trained_model(
        inputs, straight, tmp_path, capsys, monkeypatch):
    """A first Ctrl-C while model.keras is written waits for the save; the
    export after it stops; --resume finishes the export without training."""
    out = tmp_path / "run"
    real_save = keras.Model.save

    def save_with_ctrl_c(model, path, *args, **kwargs):
        if str(path).endswith("model.keras.tmp-%d.keras" % os.getpid()) \
                or "/.model.keras.tmp-" in str(path):
            os.kill(os.getpid(), signal.SIGINT)  # mid-save: deferred
        return real_save(model, path, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save", save_with_ctrl_c)
    code, err = run(capsys, *argv(inputs, out))
    monkeypatch.setattr(keras.Model, "save", real_save)
    assert code == 130
    assert err.endswith(f"training finished: the trained model is in "
                        f"{out}/model.keras; the export was stopped: run the "
                        "same command with --resume to finish it (training "
                        "is not repeated)."), err
    assert json.loads((out / "INTERRUPTED.json").read_text())["stage"] == \
        "export"
    assert_same_model(straight, out)
    assert not (out / "savedmodel").exists()
    trained = []
    monkeypatch.setattr(experiment, "fine_tune",
                        lambda *a, **k: trained.append(1))
    code, err = run(capsys, *argv(inputs, out, "--resume"))
    assert code == 0 and not trained, err
    assert (out / "savedmodel" / "saved_model.pb").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]["loss"]) == 4
    assert not (out / "INTERRUPTED.json").exists()


def test_ctrl_c_during_the_export_keeps_the_finished_run(
        inputs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"

    def interrupted_export(*args, **kwargs):
        raise KeyboardInterrupt  # the second Ctrl-C: at once

    monkeypatch.setattr(experiment, "export", interrupted_export)
    code, err = run(capsys, *argv(inputs, out))
    monkeypatch.undo()
    assert code == 130 and "the export was stopped" in err
    assert (out / "model.keras").is_file() and not (out / "savedmodel").exists()
    code, err = run(capsys, *argv(inputs, out, "--resume"))
    assert code == 0, err
    assert (out / "savedmodel" / "saved_model.pb").is_file()


# -- 3. --overwrite never deletes the run's own inputs -----------------------------

@pytest.mark.parametrize("which", ["--data", "--config", "--model"])
def test_overwrite_refuses_an_output_that_holds_an_input(
        inputs, straight, tmp_path, capsys, which):
    import shutil

    from test_safety import snapshot

    out = tmp_path / "run1"
    shutil.copytree(straight, out)
    shutil.copytree(inputs / "images", out / "mydata")
    shutil.copy(inputs / "net.keras", out / "mine.keras")
    (out / "experiment.yaml").write_text("epochs: 4\n")
    args = ["finetune", "--model", str(inputs / "net.keras"), "--data",
            str(inputs / "images"), "--output", str(out), "--overwrite",
            "--quiet"]
    if which == "--data":
        args[4] = str(out / "mydata")
    elif which == "--model":
        args[2] = str(out / "mine.keras")
    else:
        args += ["--config", str(out / "experiment.yaml")]
    before = snapshot(out)
    code, err = run(capsys, *args)
    assert code == 2 and f"{which} " in err and "inside the output folder" \
        in err, err
    assert snapshot(out) == before


# -- 11. a backup that says the run ended, or that is damaged ------------------------

def test_a_run_killed_after_training_resumes_to_the_same_model(
        inputs, straight, tmp_path, capsys, monkeypatch):
    """Killed during the export (SystemExit stands for the kill: nothing is
    published): the backup says every epoch ran; --resume trains nothing
    and publishes the same model with the whole history."""
    out = tmp_path / "run"

    def killed(*args, **kwargs):
        raise SystemExit("killed")

    monkeypatch.setattr(experiment, "export", killed)
    with pytest.raises(SystemExit):
        cli.main(argv(inputs, out))
    monkeypatch.undo()
    assert not out.exists()
    backup = resume.backup_folder(out)
    assert json.loads(open(os.path.join(
        backup, "training_metadata.json")).read())["epoch"] == 4
    code, err = run(capsys, *argv(inputs, out, "--resume"))
    assert code == 0, err
    assert_same_model(straight, out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]["loss"]) == metrics["epochs_run"] == 4


@pytest.mark.parametrize("kill,epoch", [
    ("inside the weights write", 2),
    ("after the weights, before their epoch", 2),
    ("after the backup, before the log", 2),
    ("after the backup, before the log", 3),  # early stopping watches it
    ("after the backup, before the log", 1)])  # nothing to continue
def test_a_run_killed_while_an_epoch_is_saved_resumes_exactly(
        inputs, straight, tmp_path, capsys, monkeypatch, kill, epoch):
    """Killed (SystemExit stands for the kill) at the end of an epoch,
    between the writes that save it: the backup's files are then of
    different epochs. --resume continues from the last epoch the run's log
    holds, with that epoch's weights, optimizer and random states, and ends
    on the uninterrupted run's weights and history. Killed in the first
    epoch's, the run has nothing to continue and starts over."""
    out = tmp_path / "run"
    saves = []
    real_save = keras.Model.save_weights

    def save_weights(self, filepath, *args, **kwargs):
        saves.append(filepath)
        if str(filepath).endswith("latest.weights.h5") and \
                len(saves) == epoch:
            if kill == "inside the weights write":
                with open(filepath, "wb") as f:
                    f.write(b"\x89HDF")  # a file cut short
                raise SystemExit("killed")
            real_save(self, filepath, *args, **kwargs)
            if kill == "after the weights, before their epoch":
                raise SystemExit("killed")
            return
        real_save(self, filepath, *args, **kwargs)

    real_write = resume.EpochLog.write

    def write(self, epochs=None):
        if kill == "after the backup, before the log" and \
                len(epochs or ()) == epoch:
            raise SystemExit("killed")
        real_write(self, epochs)

    monkeypatch.setattr(keras.Model, "save_weights", save_weights)
    monkeypatch.setattr(resume.EpochLog, "write", write)
    with pytest.raises(SystemExit):
        cli.main(argv(inputs, out))
    monkeypatch.undo()
    assert not out.exists()
    if epoch == 1:
        code, err = run(capsys, *argv(inputs, out, "--resume"))
        assert code == 2 and "Nothing to resume" in err, err
    code, err = run(capsys, *argv(inputs, out,
                                  *(["--resume"] if epoch > 1 else [])))
    assert code == 0, err
    assert_same_run(straight, out)


@pytest.mark.parametrize("damage", ["metadata not JSON", "weights truncated",
                                    "random states missing"])
def test_a_damaged_backup_names_its_folder_and_the_fix(
        inputs, tmp_path, capsys, interrupt_at, damage):
    out = tmp_path / "run"
    restore = interrupt_at(2)
    assert run(capsys, *argv(inputs, out))[0] == 130
    restore()
    backup = resume.backup_folder(out)
    for name in os.listdir(backup):
        path = os.path.join(backup, name)
        if damage == "metadata not JSON" and "training_metadata" in name:
            open(path, "w").write("{epoch: two")
        if damage == "weights truncated" and ".weights.h5" in name:
            data = open(path, "rb").read()
            open(path, "wb").write(data[:len(data) // 3])
        if damage == "random states missing" and "random_state" in name:
            os.remove(path)  # (dropout would draw other masks)
    code, err = run(capsys, *argv(inputs, out, "--resume"))
    assert code == 2 and "\n" not in err, err
    assert f"The backup of the interrupted run in {backup!r} cannot be " \
           "read" in err and "--overwrite instead of --resume" in err
