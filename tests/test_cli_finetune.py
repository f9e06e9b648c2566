"""kerastl finetune / demo: outputs, and one-line errors that write nothing."""

import json
import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerastl
from conftest import small_cnn, write_folder
from kerastl import cli
from kerastl.atomic import MARKER, write_marker


@pytest.fixture
def tf_log():
    """What TensorFlow's logger passes on during the test: a function of
    the level that returns the records at or above it."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("tensorflow")
    handler = Keep()
    logger.addHandler(handler)
    yield lambda level: [r for r in records if r.levelno >= level]
    logger.removeHandler(handler)


def run(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("data") / "images")


@pytest.mark.slow
def test_finetune_writes_every_output(images, tmp_path, capsys):
    from conftest import stand_in_weights
    config = tmp_path / "experiment.yaml"
    config.write_text(
        f"model: mobilenet_v2\nweights: {stand_in_weights('mobilenet_v2')}"
        "\nimage_size: 32\n"
        "strategy: partial\nhead_epochs: 2\nepochs: 2\nbatch_size: 8\n"
        "layer_decay: 0.7\n"
        "export_input: uint8\n")
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "finetune", "--config", str(config),
                            "--data", str(images), "--output", str(out))
    assert code == 0, err
    assert "validation accuracy" in stdout
    for name in ("model.keras", "metrics.json", "training_curves.png",
                 "confusion_matrix.png", "checkpoints/best.keras",
                 "savedmodel/saved_model.pb"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == ["cats", "dogs"]
    assert metrics["experiment"]["layer_decay"] == 0.7
    assert metrics["train_images"] + metrics["validation_images"] == 20
    assert np.sum(metrics["confusion_matrix"]) == metrics["validation_images"]
    assert len(metrics["history"]["val_loss"]) == metrics["epochs_run"]
    states = {r["block"]: r["state"] for r in metrics["trainable_summary"]}
    assert states["stem"] == "frozen" and states["head"] == "trainable"
    # The export serves uint8 images and agrees with the saved model.
    model = keras.models.load_model(str(out / "model.keras"))
    served = tf.saved_model.load(str(out / "savedmodel"))
    x = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3))
    np.testing.assert_allclose(
        served.serve(tf.constant(x.astype("uint8"))).numpy(),
        model.predict(x.astype("float32"), verbose=0), rtol=1e-5, atol=1e-5)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def corrupt(root):
    (root / "cats" / "5.png").write_bytes(b"not an image at all")


def empty_class(root):
    for f in (root / "dogs").iterdir():
        f.unlink()


@pytest.mark.parametrize("case,expected", [
    ("missing folder", "does not exist"),
    ("empty class", "holds no images"),
    ("corrupt image", "are not readable images"),
    # (Keras reads a class's subfolders too: so does the check)
    ("corrupt nested image", "are not readable images"),
    ("no validation image", "holds out 0: no validation image; raise "
                            "--validation-split"),
    ("negative seed", "'seed' is -1 (--seed): expected an integer from 0 "
                      "to 4294967295"),
    ("one class", "at least two"),
    ("unknown model", "Unknown model 'mobilenet_v9'"),
    ("unknown key", "Unknown experiment key 'epoch'"),
    ("bad value", "Experiment key 'strategy' is 'some'"),
    ("bad yaml", "not valid YAML"),
    ("missing config", "does not exist"),
    # --weights none with a strategy that freezes: refused before training,
    # the fix in flags (not strategy='full').
    ("random frozen", "has random weights (--weights none) and --strategy "
                      "partial freezes 3 of its 6 blocks"),
])
def test_bad_input_is_a_one_line_error_and_writes_nothing(
        tmp_path, capsys, case, expected):
    data = write_folder(tmp_path / "data", per_class=3)
    config = tmp_path / "experiment.yaml"
    config.write_text("model: mobilenet_v2\nweights: null\nimage_size: 32\n"
                      "epochs: 1\n")
    argv = ["finetune", "--config", str(config), "--data", str(data)]
    if case == "missing folder":
        argv[-1] = str(tmp_path / "nowhere")
    elif case == "empty class":
        empty_class(data)
    elif case == "corrupt image":
        corrupt(data)
    elif case == "corrupt nested image":
        (data / "cats" / "more").mkdir()
        (data / "cats" / "more" / "x.png").write_bytes(b"not an image")
    elif case == "no validation image":
        argv += ["--validation-split", "0.1"]
    elif case == "negative seed":
        argv += ["--seed", "-1"]
    elif case == "one class":
        for f in (data / "dogs").iterdir():
            f.unlink()
        (data / "dogs").rmdir()
    elif case == "unknown model":
        argv += ["--model", "mobilenet_v9"]
    elif case == "unknown key":
        config.write_text("model: mobilenet_v2\nepoch: 3\n")
    elif case == "bad value":
        config.write_text("model: mobilenet_v2\nstrategy: some\n")
    elif case == "bad yaml":
        config.write_text("model: [mobilenet_v2\n")
    elif case == "missing config":
        argv[2] = str(tmp_path / "nope.yaml")
    elif case == "random frozen":  # (the default, full, trains them all)
        argv += ["--strategy", "partial"]
    out = tmp_path / "out"
    out.mkdir()  # an existing, empty output folder must stay empty
    code, _, err = run(capsys, *argv, "--output", str(out))
    assert code != 0
    assert err.count("\n") == 0 and err.startswith("kerastl: error: "), err
    assert expected in err, err
    if case == "random frozen":
        assert "Train every block from its random start: --strategy full" \
            in err and "--model my_model.keras" in err, err
        assert "='" not in err, err  # no Python syntax for a CLI user
    assert os.listdir(out) == []
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_a_non_empty_output_folder_is_refused(images, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "finetune", "--model", "mobilenet_v2",
                       "--data", str(images), "--output", str(out))
    assert code != 0 and "was not written by kerastl" in err
    assert os.listdir(out) == ["keep.txt"]
    # --overwrite does not change that: only kerastl's own runs are replaced.
    code, _, err = run(capsys, "finetune", "--model", "mobilenet_v2",
                       "--data", str(images), "--output", str(out),
                       "--overwrite")
    assert code != 0 and "was not written by kerastl" in err
    assert os.listdir(out) == ["keep.txt"]
    # An earlier kerastl run asks for --overwrite.
    write_marker(str(out / MARKER))  # a verified marker, as kerastl writes it
    code, _, err = run(capsys, "finetune", "--model", "mobilenet_v2",
                       "--data", str(images), "--output", str(out))
    assert code != 0 and "pass --overwrite" in err


def test_a_yaml_number_without_a_decimal_point_is_a_number():
    """YAML reads 1e-4 (no decimal point) as a string; a number key takes
    it as the number, as its flag does."""
    from kerastl import schema
    key = {k.name: k for k in schema.KEYS}["learning_rate"]
    assert key.canonical("1e-4") == 1e-4
    assert key.canonical("fast") == "fast"  # (then refused by validate)
    assert key.canonical("inf") == "inf"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"kerastl {kerastl.__version__}"


def test_help_of_every_command(capsys):
    for argv in (["finetune", "--help"], ["demo", "--help"],
                 ["zoo", "list", "--help"], ["zoo", "show", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
        assert "usage: kerastl" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_runs_and_prints_its_table(tmp_path, capsys, pretrained_cache):
    """The real `kerastl demo` with its defaults, its source backbone from
    the run's shared cache (the cold-cache time is the benchmarks')."""
    code, out, err = run(capsys, "demo", "--output", str(tmp_path / "demo"))
    assert code == 0, err
    assert "from the cache" in out
    for strategy in ("feature extraction", "partial fine-tuning",
                     "full fine-tuning", "from scratch"):
        assert strategy in out
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    acc = {r["strategy"]: r["test_accuracy"] for r in results["rows"]}
    assert max(acc.values()) > 0.8
    # Transfer beats training from scratch on 10 images per class.
    assert max(acc[s] for s in acc if s != "from scratch") > \
        acc["from scratch"]
    for name in ("report.md", "accuracy.png", "curves.png", "model.keras",
                 "savedmodel/saved_model.pb"):
        assert (tmp_path / "demo" / name).exists(), name
    # A second run into the same folder needs --overwrite.
    code, _, err = run(capsys, "demo", "--output", str(tmp_path / "demo"),
                       "--epochs", "2")
    assert code == 2 and "pass --overwrite" in err


def plain_classifier(kind):
    """A Keras classifier not made by kerastl (10-way softmax top)."""
    keras.utils.set_random_seed(0)
    layers = [keras.layers.Rescaling(1 / 255.0),
              keras.layers.Conv2D(8, 3, activation="relu", name="conv_a"),
              keras.layers.MaxPooling2D(),
              keras.layers.Conv2D(16, 3, activation="relu", name="conv_b"),
              keras.layers.GlobalAveragePooling2D(name="gap"),
              keras.layers.Dense(10, activation="softmax", name="old_top")]
    if kind == "sequential":
        return keras.Sequential([keras.Input((32, 32, 3))] + layers)
    inputs = keras.Input((32, 32, 3))
    x = inputs
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x)


def test_flags_a_keras_file_does_not_take_are_refused(tmp_path, capsys):
    """A .keras file has its own weights and (usually) its own size:
    --weights and a different --image-size were ignored without a word;
    one of any size needs --image-size."""
    fixed = tmp_path / "fixed.keras"
    plain_classifier("functional").save(fixed)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    free = tmp_path / "free.keras"
    keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x)).save(free)
    data = write_folder(tmp_path / "data", per_class=3)
    for model, flags, message in (
            (fixed, ["--weights", "none"], "carries its own weights; drop "
                                           "--weights"),
            (fixed, ["--image-size", "64"], "takes 32x32 images; drop "
                                            "--image-size"),
            (free, [], "takes images of any size: pass --image-size N")):
        code, _, err = run(capsys, "finetune", "--model", str(model),
                           "--data", str(data), "--output",
                           str(tmp_path / "out"), *flags)
        assert code == 2 and message in err, err
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["kerastl demo model", "functional",
                                    "sequential"])
def test_finetune_a_users_keras_classifier(tmp_path, capsys, source,
                                           tf_log):
    if source == "kerastl demo model":
        from kerastl.pretrained import pretrain, small_cnn
        backbone = small_cnn()
        pretrain(backbone, samples=500, epochs=1)
        model = kerastl.build_classifier(backbone, 10)  # as the demo saves
        old_top = set()  # the new head takes the same names
    else:
        model = plain_classifier(source)
        old_top = {"gap", "old_top"}
    path = tmp_path / "mine.keras"
    model.save(path)
    images = write_folder(tmp_path / "images", per_class=30)
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "finetune", "--model", str(path),
                            "--data", str(images), "--output", str(out),
                            "--epochs", "15", "--batch-size", "8",
                            "--learning-rate", "0.01")
    assert code == 0, err
    # Nothing in TensorFlow's log: its "tf.function retracing" warning came
    # after the run's predictions with several models.
    assert not [r.getMessage()[:80] for r in tf_log(logging.WARNING)]
    metrics = json.loads((out / "metrics.json").read_text())
    # Two classes: chance is 0.5; the colours make it easy.
    assert metrics["validation"]["accuracy"] >= 0.75, metrics["validation"]
    tuned = keras.models.load_model(str(out / "model.keras"))
    dense = [l for l in tuned.layers if isinstance(l, keras.layers.Dense)]
    assert [d.units for d in dense] == [2]  # the old 10-way top is gone
    assert not {l.name for l in tuned.layers} & old_top
    assert tuned.output.shape == (None, 2)


def test_every_experiment_key_has_a_flag(monkeypatch, capsys, tmp_path):
    from kerastl import experiment
    seen = {}

    def fake_run(e, verbose, inputs=()):
        seen.update(e, verbose=verbose)
        raise kerastl.KerastlError("stop here")

    monkeypatch.setattr(experiment, "run_experiment", fake_run)
    # (A real folder: its layout is checked before TensorFlow is imported.)
    d = str(write_folder(tmp_path / "d", per_class=2, size=8))
    code, _, err = run(capsys, "finetune", "--model", "mobilenet_v2",
                       "--data", d, "--bn", "train", "--dropout", "0.3",
                       "--optimizer", "sgd", "--early-stopping", "none",
                       "--weights", "null", "--layer-decay", "none",
                       "--freeze-up-to", "2", "--image-size", "64")
    assert code == 2 and "stop here" in err
    assert (seen["bn"], seen["dropout"], seen["optimizer"]) == (
        "train", 0.3, "sgd")
    assert seen["early_stopping"] is None and seen["weights"] is None
    assert seen["layer_decay"] is None and seen["freeze_up_to"] == 2
    assert seen["image_size"] == 64 and seen["verbose"] == 2  # progress
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    help_text = capsys.readouterr().out
    from kerastl import schema
    for key in schema.defaults():
        assert "--" + key.replace("_", "-") in help_text, key
    assert "none: full, or partial when freeze_up_to is given" in " ".join(
        help_text.split())
    code, _, err = run(capsys, "finetune", "--model", "mobilenet_v2",
                       "--data", d, "--quiet")
    assert seen["verbose"] == 0


@pytest.mark.slow
def test_ctrl_c_keeps_the_best_checkpoint_and_resumes(tmp_path):
    import signal
    import subprocess
    import sys
    images = write_folder(tmp_path / "images", per_class=8, size=32)
    small_cnn().save(tmp_path / "net.keras")  # the signal is the point
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "kerastl.cli", "finetune", "--model",
            str(tmp_path / "net.keras"), "--data", str(images), "--output",
            str(out), "--batch-size", "4", "--early-stopping", "none",
            "--head-epochs", "1"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen(argv + ["--epochs", "30"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    main = False
    for line in proc.stdout:  # progress by default: wait for epoch 3 of
        main = main or line.startswith("Main phase: ")  # the main phase
        if main and line.startswith("Epoch 3/"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    last = [l for l in err.splitlines() if l.strip()]
    assert last[-1].startswith("kerastl: interrupted:") and \
        "--resume" in last[-1]
    assert not [l for l in err.splitlines() if "Traceback" in l], err
    assert (out / "checkpoints" / "best.keras").is_file()
    marker = json.loads((out / "INTERRUPTED.json").read_text())
    assert marker["epochs_completed"] >= 2
    resumed = subprocess.run(argv + ["--epochs", "30", "--resume"],
                             capture_output=True, text=True, env=env,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "metrics.json").is_file()
    assert not (out / "INTERRUPTED.json").exists()


def test_first_ctrl_c_waits_for_the_step_boundary_and_second_stops_now():
    """Ctrl-C during training only asks for a stop; the callback raises it
    between steps (never inside a checkpoint write); a second Ctrl-C
    interrupts at once; the previous handler is restored after."""
    import signal

    from kerastl.experiment import stop_between_steps

    before = signal.getsignal(signal.SIGINT)
    with stop_between_steps() as stopper:
        stopper.on_train_batch_end(0, logs={})  # nothing pending: no-op
        os.kill(os.getpid(), signal.SIGINT)     # first Ctrl-C: no exception
        assert stopper.requested
        with pytest.raises(KeyboardInterrupt):
            stopper.on_train_batch_end(1, logs={})
        with pytest.raises(KeyboardInterrupt):  # second Ctrl-C: at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_plots_number_epochs_as_the_log_and_keep_numbers_readable(
        tmp_path, monkeypatch):
    """Curves start at epoch 1 (Keras logs "Epoch 1/N"); a confusion-matrix
    count is white on a dark cell and black on a light one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kerastl import experiment

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    metrics = {"history": {"loss": [1.0, 0.5, 0.4],
                           "val_loss": [1.1, 0.7, 0.6],
                           "accuracy": [0.4, 0.7, 0.8],
                           "val_accuracy": [0.3, 0.6, 0.7]},
               "confusion_matrix": [[9, 1], [0, 10]],
               "classes": ["cats", "dogs"]}
    assert experiment.plots(str(tmp_path), metrics) == [
        "training_curves.png", "confusion_matrix.png"]
    assert (tmp_path / "training_curves.png").stat().st_size > 1000
    curves, confusion = figures
    for ax in curves.axes:
        for line in ax.lines:
            assert list(line.get_xdata()) == [1, 2, 3]
    texts = {t.get_text(): matplotlib.colors.to_hex(t.get_color())
             for t in confusion.axes[0].texts}
    assert texts["9"] == texts["10"] == "#ffffff"  # dark cells
    assert texts["0"] == texts["1"] == "#000000"   # light cells
    width, height = confusion.get_size_inches()
    assert width >= 4 and height >= 4
    monkeypatch.undo()
    plt.close("all")


def test_every_unreadable_image_is_named_in_one_error(tmp_path):
    """Two bad files: both named at once (not one per run); beyond ten,
    the rest are counted."""
    from kerastl.image_folders import scan_image_folder

    root = write_folder(tmp_path / "images", per_class=2, size=8)
    bad = [root / "cats" / f"bad{i:02d}.png" for i in range(12)]
    for path in bad[:2]:
        path.write_bytes(b"not an image")
    with pytest.raises(kerastl.KerastlError) as error:
        scan_image_folder(str(root))
    message = str(error.value)
    assert message.startswith("2 file(s)") and all(
        str(p) in message for p in bad[:2])
    for path in bad[2:]:
        path.write_bytes(b"not an image")
    with pytest.raises(kerastl.KerastlError, match="12 file.*and 2 more"):
        scan_image_folder(str(root))


@pytest.mark.parametrize("interrupted", [None, "training", "export"])
def test_finetune_keeps_the_head_phase_when_the_main_phase_ends_worse(
        tmp_path, capsys, monkeypatch, interrupted):
    # --learning-rate 100 diverges the main phase: the run ends with the
    # head phase's weights (model.keras and the best checkpoint alike),
    # says so in flags, and records it; so does a run stopped in its main
    # phase (which a resume no longer runs the head phase of) or after
    # training (a resume finishes the outputs), and resumed.
    from kerastl import experiment, resume
    images = write_folder(tmp_path / "images")
    keras.utils.set_random_seed(0)
    small_cnn().save(tmp_path / "net.keras")
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(tmp_path / "net.keras"), "--data",
            str(images), "--output", str(out), "--batch-size", "4",
            "--head-epochs", "2", "--epochs", "3", "--learning-rate", "100",
            "--seed", "0", "--export", "none"]
    if interrupted:
        epoch_end = resume.EpochLog.on_epoch_end  # (the epoch's last save)

        def stop_after_the_first(self, epoch, logs=None):
            epoch_end(self, epoch, logs)
            raise KeyboardInterrupt

        def stop(*args, **kwargs):
            raise KeyboardInterrupt
        with monkeypatch.context() as m:
            if interrupted == "training":
                m.setattr(resume.EpochLog, "on_epoch_end",
                          stop_after_the_first)
            else:  # (the plots come after the model is saved)
                m.setattr(experiment, "plots", stop)
            code, _, err = run(capsys, *argv)
        assert code == 130 and "--resume" in err
        argv.append("--resume")
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    if interrupted != "export":  # (training had ended before)
        assert "kerastl: warning: fine-tuning ended worse than the head " \
            "phase" in err
        assert "keeps the head phase's weights. Lower --learning-rate " \
            "(now 100), e.g. to 10, or freeze some blocks (--strategy " \
            "partial --freeze-up-to BLOCK)." in err
    assert "never rose above chance" not in err  # (the main phase's)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kept_head_phase"] is True
    losses = metrics["history"]["val_loss"]
    assert len(losses) == 3
    assert min([v for v in losses if np.isfinite(v)] or [np.inf]) > \
        metrics["validation"]["loss"]
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3))
    final = kerastl.load_model(str(out / "model.keras"))
    best = kerastl.load_model(str(out / "checkpoints" / "best.keras"))
    np.testing.assert_array_equal(final.predict(x, verbose=0),
                                  best.predict(x, verbose=0))
