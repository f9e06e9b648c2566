"""kerastl.export: SavedModel, LiteRT and ONNX files, each checked by
running the written file with its own runtime (tf.saved_model.load, the
LiteRT interpreter, onnxruntime) against the Keras model."""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import kerastl  # noqa: E402
from conftest import small_cnn, write_folder  # noqa: E402
from kerastl import cli  # noqa: E402
from kerastl.errors import ExportError  # noqa: E402
from kerastl.serving import litert_interpreter  # noqa: E402

SIZE = 32
FORMATS = ["savedmodel", "litert", "onnx"]


def images(n=16, seed=1):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")


def application(name):
    def build(tmp_path):
        keras.utils.set_random_seed(0)
        backbone = kerastl.load_backbone(name, weights=None,
                                         input_shape=(SIZE, SIZE, 3))
        model = kerastl.build_classifier(backbone, 3, freeze=False,
                                         bn="train", dropout=0.0, seed=0)
        return calibrated(model)
    return build


def all_layers(model):
    for layer in getattr(model, "layers", ()):
        yield layer
        yield from all_layers(layer)


def calibrated(model):
    """Random weights with BatchNorm statistics of real activations (one
    forward pass in training mode at momentum 0), so that the outputs differ
    from image to image as a trained model's do."""
    for layer in all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(images(32, seed=2), training=True)
    return model


def user_keras_file(tmp_path):
    keras.utils.set_random_seed(0)
    model = kerastl.build_classifier(small_cnn(SIZE), 3, dropout=0.0, seed=0)
    path = str(tmp_path / "mine.keras")
    model.save(path)
    return kerastl.load_model(path)


def dann(tmp_path):
    keras.utils.set_random_seed(0)
    return kerastl.DANN(small_cnn(SIZE), 3)


MODELS = {
    "mobilenet_v2": application("mobilenet_v2"),
    "mobilenet_v3_small": application("mobilenet_v3_small"),
    "efficientnet_b0": application("efficientnet_b0"),
    "resnet50": application("resnet50"),
    "user .keras": user_keras_file,
    "dann": dann,
}


def run_file(folder, format, x):
    """The exported file run by its own runtime, as a user would."""
    if format == "savedmodel":
        served = tf.saved_model.load(folder)
        return np.asarray(served.serve(tf.constant(x)))
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(
            os.path.join(folder, "model.onnx"),
            providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0]
    interpreter = litert_interpreter(os.path.join(folder, "model.tflite"))
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


BUILT = {}


@pytest.mark.slow
@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xdist_group(f"deploy-{n}"))
    for n in MODELS])  # (one worker builds each model once)
def test_every_format_runs_and_matches_keras(name, format, tmp_path_factory):
    """Each model of the coverage list in each format: the file, run by its
    runtime, gives the Keras model's outputs within 1e-4."""
    if name not in BUILT:
        BUILT[name] = MODELS[name](tmp_path_factory.mktemp("model"))
    model = BUILT[name]
    tmp_path = tmp_path_factory.mktemp("export")
    x = images()
    expected = np.asarray(kerastl.inference_model(model)(x, training=False))
    assert np.ptp(expected, axis=0).max() > 1e-4  # outputs that differ
    folder = str(tmp_path / "export")
    # ResNet50 with random weights (no pretrained ones offline) at 32x32
    # amplifies float rounding more than a trained net: measured 1.3e-4
    # (ONNX) and 1.6e-4 (LiteRT) largest difference in a probability.
    tolerance = 5e-4 if name == "resnet50" else 1e-4
    report = kerastl.export(model, folder, format=format,
                            labels=["a", "b", "c"], rtol=tolerance,
                            atol=tolerance)
    got = run_file(folder, format, x)
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance)
    assert report.checked_on == 8 and report.agreement == 1.0
    assert report.max_difference <= tolerance
    assert open(os.path.join(folder, "labels.txt")).read() == "a\nb\nc\n"
    saved = json.load(open(os.path.join(folder, "export.json")))
    assert saved["format"] == format and saved["bytes"] == report.bytes > 0
    assert os.listdir(tmp_path) == ["export"]  # nothing else left


@pytest.fixture(scope="module")
def digits_model():
    """The demo's task: the offline pretrained CNN fine-tuned on
    scikit-learn's digits at 10 labels per class."""
    from kerastl import datasets
    from kerastl.pretrained import pretrained_backbone
    from kerastl.sampling import few_shot

    backbone, _, _ = pretrained_backbone(samples=4000, epochs=10, seed=0)
    (x, y), (xt, yt) = datasets.digits("train"), datasets.digits("test")
    pick = few_shot(y, 10, seed=0)
    xs, ys = x[pick], y[pick]
    keras.utils.set_random_seed(0)
    model = kerastl.build_classifier(backbone, 10, freeze=False, seed=0)
    model.compile(keras.optimizers.Adam(1e-3),
                  "sparse_categorical_crossentropy")
    model.fit(xs, ys, batch_size=32, epochs=30, verbose=0)
    return model, xs, (xt, yt)


@pytest.mark.xdist_group("tutorials")  # the pretrained CNN is shared there
def test_int8_litert_on_the_demo_digits_keeps_the_accuracy(
        pretrained_cache, digits_model, tmp_path):
    model, train, (xt, yt) = digits_model
    folder = str(tmp_path / "int8")
    report = kerastl.export(model, folder, format="litert", input="uint8",
                            quantize="int8", representative_data=train,
                            validation_data=(xt, yt))
    print(f"\nint8 on digits: agreement {report.agreement:.4f}, accuracy "
          f"{report.accuracy:.4f} (float {report.keras_accuracy:.4f}), "
          f"{report.bytes} bytes")
    assert report.checked_on == len(xt) == 449
    assert report.agreement >= 0.98
    assert report.keras_accuracy - report.accuracy <= 0.01
    # uint8 in and out: the file takes raw pixels as they are.
    interpreter = litert_interpreter(os.path.join(folder, "model.tflite"))
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    assert inp["dtype"] == np.uint8 and out["dtype"] == np.uint8
    scale, zero = inp["quantization"]
    assert abs(scale - 1.0) < 1e-3 and zero == 0
    raw = xt[:32].astype("uint8")
    got = run_file(folder, "litert", raw)
    keras_top1 = model.predict(raw.astype("float32"), verbose=0).argmax(-1)
    assert np.mean(got.argmax(-1) == keras_top1) >= 0.95
    # Float LiteRT of the same model: exact within 1e-4.
    float_report = kerastl.export(model, str(tmp_path / "float"),
                                  format="litert", validation_data=(xt, yt))
    assert float_report.max_difference <= 1e-4
    assert float_report.accuracy == float_report.keras_accuracy
    assert report.bytes < float_report.bytes / 2.5  # measured 2.9x


class Odd(keras.layers.Layer):
    """A layer built on an op that neither LiteRT nor ONNX has."""

    def call(self, x):
        return tf.math.bessel_i1e(x)


@pytest.mark.parametrize("format,named", [
    ("litert", "tf.BesselI1e in layer 'odd' has no LiteRT builtin kernel"),
    ("onnx", "op BesselI1e in layer 'odd' has no ONNX equivalent")])
def test_a_model_a_format_cannot_take_is_refused_with_the_op_and_layer(
        format, named, tmp_path):
    inputs = keras.Input((8, 8, 3))
    x = Odd(name="odd")(keras.layers.Rescaling(1 / 255)(inputs))
    x = keras.layers.GlobalAveragePooling2D()(x)
    # (a layer named "dense" is not blamed: the converter's text prints
    # constants as dense<...>)
    model = keras.Model(inputs, keras.layers.Dense(2, name="dense")(x),
                        name="odd_model")
    with pytest.raises(ExportError, match=named):
        kerastl.export(model, tmp_path / "a" / "b" / "out", format=format)
    # No file that fails at load time, and no empty folders made for it.
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("format", ["litert", "onnx"])
def test_destination_safety_as_for_the_savedmodel(format, tmp_path):
    model = kerastl.build_classifier(small_cnn(SIZE), 2, seed=0)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(ExportError, match="not written by kerastl"):
            kerastl.export(model, mine, format=format, overwrite=overwrite)
    assert os.listdir(mine) == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep"
    ours = tmp_path / "ours"
    kerastl.export(model, ours, format=format)
    with pytest.raises(ExportError, match="overwrite"):
        kerastl.export(model, ours, format=format)
    kerastl.export(model, ours, format=format, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["mine", "ours"]  # no leftovers
    assert os.path.isfile(ours / ("model.tflite" if format == "litert"
                                  else "model.onnx"))


@pytest.mark.parametrize("kwargs,message", [
    (dict(format="tflite"), "format='tflite': expected one of savedmodel, "
                            "litert, onnx"),
    (dict(format="litert", input="bytes"), "input='bytes'.*savedmodel"),
    (dict(format="onnx", quantize="int8"), "quantize='int8' is for "
                                           "format='litert'"),
    (dict(format="litert", quantize="int4"), "quantize='int4'"),
    (dict(format="litert", quantize="int8"), "needs representative_data"),
    (dict(format="litert", labels=["a"]), "1 names for a model with 2"),
    (dict(format="litert", labels="ab"), "list of class names"),
    (dict(format="litert", validation_data=np.zeros((3, 32, 32))),
     "validation_data: expected images"),
    (dict(format="litert", quantize="dynamic",
          representative_data=images(2)), "representative_data is for "
                                          "quantize='int8'"),
    (dict(format="litert", image_size="abc"), "image_size='abc': expected "
                                              r"\(height, width\)"),
    (dict(format="litert", image_size=(16, 16)), "takes 32x32 images"),
    (dict(format="litert", validation_data=images(2)[:, :16, :16]),
     "validation_data: images of 16x16, but the model takes 32x32"),
    (dict(format="litert", validation_data=images(2)[..., :1]),
     "1 channel"),
    (dict(format="litert", quantize="int8", representative_data=images(2),
          max_representative=0), "max_representative=0"),
    (dict(format="litert", min_agreement=0.9), "min_agreement is for a "
                                               "quantized file"),
    (dict(format="litert", quantize="dynamic", min_agreement=95),
     r"min_agreement=95: expected a share in \(0, 1\]"),
    (dict(format="litert", rtol=-1), "rtol=-1"),
])
def test_bad_arguments_get_a_clear_error_and_write_nothing(kwargs, message,
                                                           tmp_path):
    model = kerastl.build_classifier(small_cnn(SIZE), 2, seed=0)
    with pytest.raises(ExportError, match=message):
        kerastl.export(model, tmp_path / "out", **kwargs)
    assert os.listdir(tmp_path) == []


def test_overwrite_replaces_only_an_earlier_export(tmp_path):
    """An export never replaces another kind of kerastl folder (a training
    run's output), overwrite or not."""
    from kerastl.atomic import atomic_folder
    run = tmp_path / "run1"
    with atomic_folder(run, "output folder") as tmp:
        with open(os.path.join(tmp, "model.keras"), "w") as f:
            f.write("trained")
    before = sorted(os.listdir(run))
    model = kerastl.build_classifier(small_cnn(SIZE), 2, seed=0)
    for overwrite in (False, True):
        with pytest.raises(ExportError, match="holds a kerastl output "
                           "folder, not an earlier export folder"):
            kerastl.export(model, run, overwrite=overwrite)
    assert sorted(os.listdir(run)) == before
    assert (run / "model.keras").read_text() == "trained"


def test_savedmodel_takes_the_models_size_and_channels(tmp_path):
    """A model of one image size is served at that size only (another
    would give outputs the Keras model refuses to give); a grayscale
    model exports with its own probe and decoder."""
    model = kerastl.build_classifier(small_cnn(SIZE), 2, seed=0)
    kerastl.export(model, tmp_path / "rgb")
    served = tf.saved_model.load(str(tmp_path / "rgb"))
    spec = served.signatures["serve"].structured_input_signature[1]
    assert list(spec.values())[0].shape.as_list() == [None, SIZE, SIZE, 3]
    with pytest.raises(ExportError, match="tflite=True with input='bytes'"):
        kerastl.export_savedmodel(model, tmp_path / "x", input="bytes",
                                  tflite=True)
    inputs = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 255)(inputs))
    x = keras.layers.GlobalAveragePooling2D()(x)
    gray = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    report = kerastl.export(gray, tmp_path / "gray", input="bytes")
    assert report.checked_on == 8 and report.max_difference < 1e-4
    assert not (tmp_path / "x").exists()


class Doubled(keras.layers.Layer):
    """A user's own layer, not registered for saving."""

    def call(self, x):
        return 2.0 * x


def test_a_lora_model_that_cannot_be_merged_names_the_fix(tmp_path):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(Doubled()(inputs))
    hidden = keras.layers.Dense(4)
    model = keras.Model(inputs, keras.layers.Dense(2)(hidden(x)))
    hidden.enable_lora(2)  # merging saves and reloads the model
    with pytest.raises(ExportError, match="register_keras_serializable"):
        kerastl.export(model, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_a_model_of_several_outputs_is_refused_with_the_fix(tmp_path):
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(3)(x),
                                 keras.layers.Dense(2)(x)])
    with pytest.raises(ExportError, match=r"2 outputs.*model.outputs\[0\]"):
        kerastl.export(model, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_a_missing_onnx_package_names_its_install_command(monkeypatch,
                                                          tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                        if name == "tf2onnx" else real(name, *a))
    model = kerastl.build_classifier(small_cnn(SIZE), 2, seed=0)
    with pytest.raises(ExportError, match=r"pip install 'kerastl\[onnx\]'"):
        kerastl.export(model, tmp_path / "out", format="onnx")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    write_folder(root / "images", per_class=12, size=SIZE)
    small_cnn(SIZE).save(root / "net.keras")
    return root


def test_finetune_exports_every_format_and_each_file_runs(folder, capfd):
    """The CLI's acceptance: --export savedmodel,litert,onnx --quantize
    int8; each file checked here again with its own runtime."""
    out = folder / "run"
    code = cli.main(["finetune", "--model", str(folder / "net.keras"),
                     "--data", str(folder / "images"), "--output", str(out),
                     "--epochs", "2", "--batch-size", "4", "--quiet",
                     "--export", "savedmodel,litert,onnx",
                     "--quantize", "int8"])
    printed = capfd.readouterr()  # (the file descriptors: C++ output too)
    assert code == 0, printed.err
    for line in ("savedmodel:", "litert (int8):", "onnx:"):
        assert line in printed.out
    assert "fully_quantize" not in printed.out + printed.err
    model = kerastl.load_model(str(out / "model.keras"))
    x = images(6)
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(run_file(str(out / "savedmodel"),
                                        "savedmodel", x), expected,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(run_file(str(out / "onnx"), "onnx", x),
                               expected, rtol=1e-4, atol=1e-4)
    quantized = run_file(str(out / "litert"), "litert", x)  # float in/out
    assert quantized.shape == expected.shape
    assert np.abs(quantized - expected).max() < 0.1
    metrics = json.load(open(out / "metrics.json"))
    assert set(metrics["exports"]) == {"savedmodel", "litert", "onnx"}
    assert metrics["exports"]["litert"]["quantize"] == "int8"
    assert metrics["exports"]["litert"]["checked_on"] == 4  # validation
    for name in ("savedmodel", "litert", "onnx"):
        assert (out / name / "labels.txt").read_text() == "cats\ndogs\n"


def test_export_command_for_a_model_trained_earlier(folder, capsys):
    model = folder / "trained.keras"
    kerastl.build_classifier(small_cnn(SIZE), 2, seed=0).save(model)
    out = folder / "phone"
    code = cli.main(["export", str(model), "--format", "litert",
                     "--quantize", "int8", "--input", "uint8", "--data",
                     str(folder / "images"), "--output", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "litert (int8)" in printed.out and "accuracy" in printed.out
    assert sorted(os.listdir(out)) == [".kerastl", "export.json",
                                       "labels.txt", "model.tflite"]
    # int8 without images to calibrate on: the flag to add is named.
    code = cli.main(["export", str(model), "--format", "litert",
                     "--quantize", "int8", "--output", str(folder / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "pass --data FOLDER" in err and "\n" not in \
        err.strip()
    code = cli.main(["export", str(model), "--format", "onnx",
                     "--input", "bytes", "--output", str(folder / "x")])
    assert code == 2 and "--input bytes is for --format savedmodel" in \
        capsys.readouterr().err
    assert not (folder / "x").exists()
    # A model without a fixed input size: the flag that sets it is named,
    # and given, the export runs.
    inputs = keras.Input((None, None, 3))
    x = keras.layers.GlobalAveragePooling2D()(
        keras.layers.Conv2D(4, 3)(inputs))
    free = folder / "free.keras"
    keras.Model(inputs, keras.layers.Dense(
        2, activation="softmax")(x)).save(free)
    code = cli.main(["export", str(free), "--format", "litert",
                     "--output", str(folder / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "pass --image-size N" in err, err
    code = cli.main(["export", str(free), "--format", "litert",
                     "--image-size", "24", "--output", str(folder / "x")])
    assert code == 0, capsys.readouterr().err
    assert litert_interpreter(str(folder / "x" / "model.tflite")) \
        .get_input_details()[0]["shape"].tolist() == [1, 24, 24, 3]


def test_export_command_takes_an_adapted_model(folder, capsys):
    """What kerastl.adapt returns, saved: the command exports its
    classifier, checked on --data's images (it needs the classifier's input
    size and classes, which the AdaMatch model itself does not carry)."""
    keras.utils.set_random_seed(0)
    model = folder / "adapted.keras"
    adapted = kerastl.adaptation.AdaMatch(small_cnn(SIZE), 2, bottleneck=8)
    adapted.save(model)
    out = folder / "adapted"
    code = cli.main(["export", str(model), "--format", "savedmodel",
                     "--data", str(folder / "images"), "--output", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert (out / "labels.txt").read_text() == "cats\ndogs\n"
    x = images(4)
    served = tf.saved_model.load(str(out))
    np.testing.assert_allclose(served.serve(tf.constant(x)).numpy(),
                               adapted.predict(x, verbose=0), rtol=1e-5,
                               atol=1e-5)


def test_finetune_flags_are_checked_before_training(folder, capsys):
    for flags, message in (
            (["--quantize", "int8"], "add litert to export (--export "
                                     "savedmodel,litert)"),
            (["--export", "litert,tflite"], "formats among savedmodel"),
            (["--export", "onnx", "--export-input", "bytes"],
             "--export-input bytes) is for the SavedModel only")):
        code = cli.main(["finetune", "--model", str(folder / "net.keras"),
                         "--data", str(folder / "images"), "--output",
                         str(folder / "never")] + flags)
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
    assert not (folder / "never").exists()


def test_a_failed_export_after_training_keeps_the_trained_model(
        folder, capsys, monkeypatch):
    """An export that fails after training (a refused op, a failed check)
    keeps model.keras and says how to finish: --resume with another
    --export exports without training again."""
    from kerastl import experiment

    real = experiment.export

    def failing(model, path, format="savedmodel", **kwargs):
        if format == "litert":
            raise ExportError("The LiteRT format cannot take 'net': "
                              "tf.Odd in layer 'odd' has no LiteRT builtin "
                              "kernel.")
        return real(model, path, format=format, **kwargs)

    out = folder / "failed"
    argv = ["finetune", "--model", str(folder / "net.keras"), "--data",
            str(folder / "images"), "--output", str(out), "--epochs", "1",
            "--head-epochs", "0",
            "--batch-size", "4", "--quiet"]
    monkeypatch.setattr(experiment, "export", failing)
    code = cli.main(argv + ["--export", "savedmodel,litert"])
    monkeypatch.undo()
    err = [line for line in capsys.readouterr().err.splitlines()
           if not line.startswith("kerastl: warning:")]  # (1 epoch)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("kerastl: error: training finished")
    assert "tf.Odd" in err[0] and "--resume" in err[0]
    assert (out / "model.keras").is_file() and (out / "INTERRUPTED.json") \
        .is_file()
    code = cli.main(argv + ["--export", "savedmodel", "--resume"])
    assert code == 0, capsys.readouterr().err
    assert (out / "savedmodel" / "saved_model.pb").is_file()
    assert not (out / "litert").exists()
    assert not (out / "INTERRUPTED.json").exists()


def test_uint8_int8_input_takes_raw_pixels_whatever_the_calibration_range(
        tmp_path):
    """Calibration images darker than 255 still give an input of scale 1
    and zero point 0 (kerastl pins the range to the pixels' own)."""
    model = kerastl.build_classifier(small_cnn(SIZE), 2, seed=0)
    dark = images(16) * (200 / 255)
    report = kerastl.export(model, tmp_path / "q", format="litert",
                            input="uint8", quantize="int8",
                            representative_data=dark)
    interpreter = litert_interpreter(report.file)
    scale, zero = interpreter.get_input_details()[0]["quantization"]
    assert abs(scale - 1.0) < 1e-3 and zero == 0
    assert dark.max() <= 200  # the user's images are not changed
