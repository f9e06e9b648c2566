"""kerastl finetune / demo: outputs, and one-line errors that write nothing."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerastl import cli
from conftest import write_folder


def run(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("data") / "images")


@pytest.mark.slow
def test_finetune_writes_every_output(images, tmp_path, capsys):
    config = tmp_path / "experiment.yaml"
    config.write_text(
        "model: mobilenet_v2\nweights: null\nimage_size: 32\n"
        "strategy: partial\nepochs: 2\nbatch_size: 8\nlayer_decay: 0.7\n"
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
    ("corrupt image", "not a readable image"),
    ("one class", "at least two"),
    ("unknown model", "Unknown model 'mobilenet_v9'"),
    ("unknown key", "Unknown experiment key 'epoch'"),
    ("bad value", "Experiment key 'strategy' is 'some'"),
    ("bad yaml", "not valid YAML"),
    ("missing config", "does not exist"),
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
    out = tmp_path / "out"
    out.mkdir()  # an existing, empty output folder must stay empty
    code, _, err = run(capsys, *argv, "--output", str(out))
    assert code != 0
    assert err.count("\n") == 0 and err.startswith("kerastl: error: "), err
    assert expected in err, err
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
    (out / ".kerastl").write_text("{}")
    code, _, err = run(capsys, "finetune", "--model", "mobilenet_v2",
                       "--data", str(images), "--output", str(out))
    assert code != 0 and "pass --overwrite" in err


def test_help_of_every_command(capsys):
    for argv in (["finetune", "--help"], ["demo", "--help"],
                 ["zoo", "list", "--help"], ["zoo", "show", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
        assert "usage: kerastl" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_runs_and_prints_its_table(tmp_path, capsys, monkeypatch):
    """The real `kerastl demo` with its defaults (the figure in the note)."""
    import time

    monkeypatch.setenv("KERASTL_CACHE_DIR", str(tmp_path / "cache"))
    start = time.time()
    code, out, err = run(capsys, "demo", "--output", str(tmp_path / "demo"))
    seconds = time.time() - start
    assert code == 0, err
    print(out)
    print(f"kerastl demo (cold cache): {seconds:.0f} s")
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
    # A second run reuses the cached source backbone.
    code, out, _ = run(capsys, "demo", "--output", str(tmp_path / "demo2"),
                       "--epochs", "2")
    assert code == 0 and "from the cache" in out
