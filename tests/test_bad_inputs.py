"""The bad-input matrix: every row is one wrong argument to the public API
or the CLI. Each must raise a kerastl error (or, for the CLI, exit with a
one-line ``kerastl: error:``) whose message names the argument, and write
nothing."""

import os

import keras
import numpy as np
import pytest

import kerastl
from kerastl import cli, datasets

NAN = float("nan")


def conv():
    inputs = keras.Input((8, 8, 3))
    return keras.Model(inputs, keras.layers.Conv2D(2, 3, name="c1")(inputs))


def clf():
    return kerastl.build_classifier(conv(), 2, dropout=0.0)


def bb():
    return kerastl.load_backbone("mobilenet_v2", weights=None,
                                 input_shape=(32, 32, 3))


def user_entry(t, extra):
    """A user zoo entry (MobileNetV2 at 32x32) with ``extra`` YAML lines,
    loaded from its own folder (KERASTL_ZOO_PATH for this call only)."""
    folder = t.parent / "zoo"  # beside the work folder, which stays empty
    folder.mkdir()
    (folder / "mine.yaml").write_text(
        "name: mine\nsource: keras.applications\nconstructor: MobileNetV2\n"
        "input: {default_size: 32, min_size: 32}\npreprocessing: tf\n"
        "blocks:\n  - {name: stem, layers: ['^Conv1', '^bn_Conv1', "
        "'^expanded_conv_']}\n  - {name: rest, until: out_relu}\n" + extra)
    previous = os.environ.get("KERASTL_ZOO_PATH")
    os.environ["KERASTL_ZOO_PATH"] = str(folder)
    try:
        return kerastl.load_backbone("mine", weights=None)
    finally:
        if previous is None:
            del os.environ["KERASTL_ZOO_PATH"]
        else:
            os.environ["KERASTL_ZOO_PATH"] = previous


def with_tf_config(config, make):
    previous = os.environ.get("TF_CONFIG")
    os.environ["TF_CONFIG"] = config
    try:
        return make()
    finally:
        if previous is None:
            del os.environ["TF_CONFIG"]
        else:
            os.environ["TF_CONFIG"] = previous


def garbage(t, name="g.keras"):
    (t.parent / name).write_bytes(b"not a zip archive at all")
    return str(t.parent / name)


IMAGES = np.zeros((4, 8, 8, 3), "float32")
FEATURES = np.random.default_rng(0).normal(size=(10, 3)).astype("float32")
LABELS = np.arange(10) % 2

# (id, callable taking the test's tmp_path, error type, message regex)
CASES = [
    # -- backbones and the zoo
    ("load_backbone unknown name", lambda t: kerastl.load_backbone(
        "resnet5O", weights=None), kerastl.errors.UnknownModelError, "resnet5O"),
    ("load_backbone input_shape float", lambda t: kerastl.load_backbone(
        "mobilenet_v2", weights=None, input_shape=(32.5, 32, 3)),
     kerastl.errors.InputShapeError, "input_shape.*32.5"),
    ("load_backbone input_shape string", lambda t: kerastl.load_backbone(
        "mobilenet_v2", weights=None, input_shape="32x32"),
     kerastl.errors.InputShapeError, "input_shape='32x32'"),
    ("load_backbone input_shape string dim", lambda t: kerastl.load_backbone(
        "mobilenet_v2", weights=None, input_shape=("32", 32, 3)),
     kerastl.errors.InputShapeError, "input_shape.*'32'"),
    ("load_backbone input_shape grey", lambda t: kerastl.load_backbone(
        "mobilenet_v2", weights=None, input_shape=(32, 32, 1)),
     kerastl.errors.InputShapeError, "input_shape.*RGB"),
    ("load_backbone input_shape too small", lambda t: kerastl.load_backbone(
        "mobilenet_v2", weights=None, input_shape=(8, 8, 3)),
     kerastl.errors.InputShapeError, "input_shape.*too small"),
    ("predict with too-small images", lambda t: kerastl.load_backbone(
        "mobilenet_v2", weights=None, input_shape=(None, None, 3)
    ).model.predict(np.zeros((1, 8, 8, 3), "float32"), verbose=0),
     kerastl.errors.InputShapeError, "at least 32x32 pixels; got 8x8.*Resizing"),
    ("call with too-small images", lambda t: kerastl.load_backbone(
        "mobilenet_v2", weights=None, input_shape=(None, None, 3)
    ).model(np.zeros((1, 16, 40, 3), "float32")),
     kerastl.errors.InputShapeError, "got 16x40"),
    ("load_backbone missing .keras", lambda t: kerastl.load_backbone(
        str(t / "nope.keras")), kerastl.KerastlError, "nope.keras"),
    ("zoo_entry unknown", lambda t: kerastl.zoo_entry("vgg99"),
     kerastl.errors.UnknownModelError, "vgg99"),
    ("list_configs bad source", lambda t: kerastl.list_configs("torch"),
     kerastl.errors.ConfigError, "source='torch'"),
    ("zoo entry reference.top1 not a number", lambda t: kerastl.zoo
     .parse_config({"name": "x", "source": "keras.applications",
                    "constructor": "MobileNetV2", "preprocessing": "tf",
                    "input": {"default_size": 32, "min_size": 32},
                    "blocks": [{"name": "a", "until": "out_relu"}],
                    "reference": {"top1": "high"}}, "x.yaml"),
     kerastl.errors.ConfigError, "reference.top1.*accuracy in"),
    ("zoo entry reference.params negative", lambda t: kerastl.zoo
     .parse_config({"name": "x", "source": "keras.applications",
                    "constructor": "MobileNetV2", "preprocessing": "tf",
                    "input": {"default_size": 32, "min_size": 32},
                    "blocks": [{"name": "a", "until": "out_relu"}],
                    "reference": {"params": -3}}, "x.yaml"),
     kerastl.errors.ConfigError, "reference.params.*>= 0"),
    ("zoo entry constructor_args wrong value", lambda t: user_entry(
        t, "constructor_args: {alpha: big}\n"), kerastl.KerastlError,
     "rejected the zoo entry 'mine'.*constructor_args"),
    ("zoo entry endpoint to a missing layer", lambda t: user_entry(
        t, "endpoints: {stride8: no_such_layer}\n"),
     kerastl.errors.BlockError, "endpoint 'stride8' names layer "
     "'no_such_layer'"),
    ("load_backbone garbage .keras", lambda t: kerastl.load_backbone(
        garbage(t)), kerastl.KerastlError, "not a .keras model file"),
    ("load_model garbage .keras", lambda t: kerastl.load_model(
        garbage(t)), kerastl.KerastlError, "not a .keras model file"),
    ("load_model missing file", lambda t: kerastl.load_model(
        str(t / "none.keras")), kerastl.KerastlError, "does not exist"),
    # -- block maps and freezing
    ("freeze unknown block", lambda t: kerastl.freeze(clf(), up_to="c9"),
     kerastl.errors.BlockError, "c9"),
    ("freeze depth out of range", lambda t: kerastl.freeze(clf(), up_to=7),
     kerastl.errors.BlockError, "7"),
    ("freeze bad bn", lambda t: kerastl.freeze(clf(), bn="sometimes"),
     kerastl.KerastlError, "bn='sometimes'"),
    ("unfreeze unknown block", lambda t: kerastl.unfreeze(
        clf(), from_block="zzz"), kerastl.errors.BlockError, "zzz"),
    ("GradualUnfreezing every 0", lambda t: kerastl.GradualUnfreezing(
        every=0), kerastl.KerastlError, "every"),
    ("block_map of a subclassed model", lambda t: kerastl.block_map(
        type("Mine", (keras.Model,), {"call": lambda s, x: x})()),
     kerastl.errors.BlockError, "subclassed"),
    ("GradualUnfreezing every 1.5", lambda t: kerastl.GradualUnfreezing(
        every=1.5), kerastl.KerastlError, r"every=1.5.*whole number"),
    ("GradualUnfreezing max_blocks 0", lambda t: kerastl.GradualUnfreezing(
        max_blocks=0), kerastl.KerastlError, "max_blocks=0"),
    ("build_classifier dropout 2", lambda t: kerastl.build_classifier(
        conv(), 2, dropout=2.0), kerastl.KerastlError, r"dropout=2.0.*\[0, 1\)"),
    ("build_classifier hidden_units string", lambda t: kerastl
     .build_classifier(conv(), 2, hidden_units="64"), kerastl.KerastlError,
     "hidden_units='64'.*sequence of layer widths"),
    ("build_classifier unknown activation", lambda t: kerastl
     .build_classifier(conv(), 2, activation="relu6x"), kerastl.KerastlError,
     "activation='relu6x'"),
    ("fine_tune train as a list", lambda t: kerastl.fine_tune(
        clf(), [IMAGES, np.zeros(4)]), kerastl.KerastlError,
     r"train is a list.*\(x, y\) tuple"),
    # -- heads and recipes
    ("build_classifier num_classes 0", lambda t: kerastl.build_classifier(
        conv(), 0), kerastl.KerastlError, "num_classes=0"),
    ("build_classifier num_classes float", lambda t: kerastl.build_classifier(
        conv(), 2.5), kerastl.KerastlError, "num_classes=2.5"),
    ("build_classifier num_classes str", lambda t: kerastl.build_classifier(
        conv(), "3"), kerastl.KerastlError, "num_classes='3'"),
    ("build_classifier one softmax unit", lambda t: kerastl.build_classifier(
        conv(), 1), kerastl.KerastlError, "num_classes=1"),
    ("build_classifier bad pooling", lambda t: kerastl.build_classifier(
        conv(), 2, pooling="mean"), kerastl.KerastlError, "pooling='mean'"),
    ("replace_classifier without Dense", lambda t: kerastl.replace_classifier(
        conv(), 2), kerastl.KerastlError, "no Dense classifier"),
    ("recommend_strategy 0 labels", lambda t: kerastl.recommend_strategy(
        0, "high"), kerastl.KerastlError, "n_labelled_per_class=0"),
    ("recommend_strategy nan", lambda t: kerastl.recommend_strategy(
        NAN, "high"), kerastl.KerastlError, "n_labelled_per_class=nan"),
    ("recommend_strategy similarity", lambda t: kerastl.recommend_strategy(
        10, "medium"), kerastl.KerastlError, "similarity='medium'"),
    ("recommend_strategy similarity > 1", lambda t: kerastl.recommend_strategy(
        10, 1.5), kerastl.KerastlError, "similarity=1.5"),
    ("fine_tune strategy", lambda t: kerastl.fine_tune(
        clf(), (IMAGES, np.zeros(4)), strategy="most"),
     kerastl.KerastlError, "strategy='most'"),
    ("fine_tune freeze_up_to unknown", lambda t: kerastl.fine_tune(
        clf(), (IMAGES, np.zeros(4)), freeze_up_to="c7"),
     kerastl.KerastlError, "freeze_up_to='c7'"),
    ("fine_tune freeze_up_to with full", lambda t: kerastl.fine_tune(
        clf(), (IMAGES, np.zeros(4)), strategy="full", freeze_up_to=1),
     kerastl.KerastlError, "freeze_up_to"),
    ("fine_tune optimizer name", lambda t: kerastl.fine_tune(
        clf(), (IMAGES, np.zeros(4)), optimizer="adamz", head_epochs=0),
     kerastl.KerastlError, "optimizer 'adamz'"),
    ("fine_tune optimizer type", lambda t: kerastl.fine_tune(
        clf(), (IMAGES, np.zeros(4)), optimizer=0.1, head_epochs=0),
     kerastl.KerastlError, "optimizer=0.1"),
    ("fine_tune images of another shape", lambda t: kerastl.fine_tune(
        clf(), (np.zeros((4, 16, 16, 3)), np.zeros(4)), head_epochs=0,
        strategy="full"), kerastl.KerastlError,
     r"images have shape \(16, 16, 3\).*takes \(8, 8, 3\)"),
    ("fine_tune labels beyond the classes", lambda t: kerastl.fine_tune(
        clf(), (IMAGES, np.array([0, 1, 2, 7])), head_epochs=0,
        strategy="full"), kerastl.KerastlError,
     "labels go from 0 to 7.*2 outputs.*num_classes=8"),
    ("fine_tune fewer labels than images", lambda t: kerastl.fine_tune(
        clf(), (IMAGES, np.zeros(3)), head_epochs=0, strategy="full"),
     kerastl.KerastlError, "4 images but 3 labels"),
    ("fine_tune validation labels", lambda t: kerastl.fine_tune(
        clf(), (IMAGES, np.zeros(4)), (IMAGES, np.full(4, 5)),
        head_epochs=0, strategy="full"), kerastl.KerastlError,
     "validation labels go from 5 to 5"),
    # -- layer-wise rates
    ("LayerwiseOptimizer unknown block", lambda t: kerastl.LayerwiseOptimizer(
        "adam", {"c9": 0.1}, clf()), kerastl.errors.BlockError, "c9"),
    ("LayerwiseOptimizer negative", lambda t: kerastl.LayerwiseOptimizer(
        "adam", {"c1": -1.0}, clf()), kerastl.KerastlError, "-1.0"),
    ("LayerwiseOptimizer nan", lambda t: kerastl.LayerwiseOptimizer(
        "adam", {"c1": NAN}, clf()), kerastl.KerastlError, "nan"),
    ("LayerwiseOptimizer no model", lambda t: kerastl.LayerwiseOptimizer(
        "adam", {"c1": 0.1}), kerastl.KerastlError, "needs the model"),
    ("LayerDecay > 1", lambda t: kerastl.LayerDecay(1.5),
     kerastl.KerastlError, r"LayerDecay\(1.5\)"),
    ("LayerDecay bool", lambda t: kerastl.LayerDecay(True),
     kerastl.KerastlError, r"LayerDecay\(True\)"),
    ("LRSpread reversed", lambda t: kerastl.LRSpread(1.0, 0.1),
     kerastl.KerastlError, r"LRSpread\(1.0, 0.1\)"),
    # -- domain adaptation
    ("GaninLambda warmup 1", lambda t: kerastl.adaptation.GaninLambda(warmup=1.0),
     kerastl.KerastlError, "warmup=1.0"),
    ("GaninLambda gamma nan", lambda t: kerastl.adaptation.GaninLambda(gamma=NAN),
     kerastl.KerastlError, "gamma=nan"),
    ("GaninLambda gamma 0", lambda t: kerastl.adaptation.GaninLambda(gamma=0),
     kerastl.KerastlError, "gamma=0"),
    ("GaninLearningRate mu0 negative", lambda t: kerastl.adaptation.GaninLearningRate(
        mu0=-0.1), kerastl.KerastlError, "mu0=-0.1"),
    ("GaninLambda total_steps 0", lambda t: kerastl.adaptation.GaninLambda(
        total_steps=0), kerastl.KerastlError, "total_steps=0"),
    ("domain_dataset batch_size 0", lambda t: kerastl.adaptation.domain_dataset(
        (IMAGES, np.zeros(4)), IMAGES, batch_size=0),
     kerastl.KerastlError, "batch_size=0"),
    ("domain_dataset source not a pair", lambda t: kerastl.adaptation.domain_dataset(
        IMAGES, IMAGES, batch_size=2), kerastl.KerastlError, "source"),
    ("domain_dataset labelled target", lambda t: kerastl.adaptation.domain_dataset(
        (IMAGES, np.zeros(4)), (IMAGES, np.zeros(4)), batch_size=2),
     kerastl.KerastlError, "target is unlabelled"),
    ("domain_dataset length mismatch", lambda t: kerastl.adaptation.domain_dataset(
        (IMAGES, np.zeros(3)), IMAGES, batch_size=2),
     kerastl.KerastlError, "Source x has 4 samples but y has 3"),
    ("domain_dataset empty target", lambda t: kerastl.adaptation.domain_dataset(
        (IMAGES, np.zeros(4)), IMAGES[:0], batch_size=2),
     kerastl.KerastlError, "target has 0 samples"),
    ("domain_dataset small source", lambda t: kerastl.adaptation.domain_dataset(
        (IMAGES, np.zeros(4)), IMAGES, batch_size=8),
     kerastl.KerastlError, "source has 4 samples.*batch_size=8"),
    ("adapt_batch_norm empty", lambda t: kerastl.adaptation.adapt_batch_norm(
        keras.Sequential([keras.Input((8, 8, 3)),
                          keras.layers.BatchNormalization()]), IMAGES[:0]),
     kerastl.KerastlError, "target images"),
    ("tent on feature maps", lambda t: kerastl.adaptation.tent(
        keras.Sequential([keras.Input((8, 8, 3)),
                          keras.layers.BatchNormalization()]), IMAGES),
     kerastl.KerastlError, "class probabilities"),
    ("tent steps", lambda t: kerastl.adaptation.tent(
        keras.Sequential([keras.Input((8, 8, 3)),
                          keras.layers.BatchNormalization(),
                          keras.layers.GlobalAveragePooling2D(),
                          keras.layers.Dense(2, activation="softmax")]),
        IMAGES, steps=0), kerastl.KerastlError, "steps=0: expected an int"),
    ("rank_backbones max_samples", lambda t: kerastl.analysis.rank_backbones(
        [conv()], (IMAGES, np.zeros(4)), max_samples="half"),
     kerastl.KerastlError, "max_samples='half'"),
    ("information_loss logits", lambda t: kerastl.adaptation.information_loss(
        np.array([[3.0, -1.0]], "float32")), kerastl.KerastlError,
     "from_logits"),
    ("joint_fine_tune empty source", lambda t: kerastl.adaptation.joint_fine_tune(
        conv(), (IMAGES, np.zeros(4)), (IMAGES[:0], np.zeros(0))),
     kerastl.KerastlError, "source"),
    ("GradientReversal lambda string", lambda t: kerastl.GradientReversal(
        "a"), kerastl.KerastlError, "lambda_='a'"),
    ("select_model candidates not models", lambda t: kerastl.adaptation
     .select_model({"a": 1, "b": 2, "c": 3}, target=IMAGES),
     kerastl.KerastlError, "candidate 'a' is a int, not a model"),
    ("mmd_loss feature widths differ", lambda t: kerastl.adaptation
     .mmd_loss(np.zeros((4, 2)), np.zeros((4, 3))), kerastl.KerastlError,
     r"mmd_loss.*same d; got \(4, 2\) and \(4, 3\)"),
    ("coral_loss 1-D", lambda t: kerastl.adaptation.coral_loss(
        np.zeros(4), np.zeros(4)), kerastl.KerastlError, "coral_loss"),
    ("joint_fine_tune target without labels", lambda t: kerastl.adaptation
     .joint_fine_tune(conv(), IMAGES, (IMAGES, np.zeros(4))),
     kerastl.KerastlError, r"target must be an \(images, labels\) tuple"),
    # -- features
    ("extract_features dtype", lambda t: kerastl.extract_features(
        conv(), IMAGES, dtype="int8"), kerastl.KerastlError, "dtype='int8'"),
    ("extract_features batch_size", lambda t: kerastl.extract_features(
        conv(), IMAGES, batch_size=0), kerastl.KerastlError, "batch_size=0"),
    ("extract_features 3-D images", lambda t: kerastl.extract_features(
        conv(), IMAGES[0]), kerastl.KerastlError, "4-D array"),
    ("extract_features label mismatch", lambda t: kerastl.extract_features(
        conv(), (IMAGES, np.zeros(3))), kerastl.KerastlError,
     "4 images but 3 labels"),
    ("extract_features 3-tuple", lambda t: kerastl.extract_features(
        conv(), (IMAGES, IMAGES, IMAGES)), kerastl.KerastlError,
     "tuple of 3"),
    ("extract_features missing folder", lambda t: kerastl.extract_features(
        conv(), str(t / "nowhere")), kerastl.KerastlError, "nowhere"),
    ("extract_features pooling", lambda t: kerastl.extract_features(
        conv(), IMAGES, pooling="median"), kerastl.KerastlError,
     "pooling='median'"),
    ("extract_features unknown layer", lambda t: kerastl.extract_features(
        conv(), IMAGES, layers="c9"), kerastl.KerastlError, "c9"),
    ("extract_features layers list", lambda t: kerastl.extract_features(
        conv(), IMAGES, layers=[]), kerastl.KerastlError, "layers=\\[\\]"),
    ("extract_features cache type", lambda t: kerastl.extract_features(
        conv(), IMAGES, cache=3), kerastl.KerastlError, "cache=3"),
    ("extract_features NaN images", lambda t: kerastl.extract_features(
        conv(), np.full((2, 8, 8, 3), NAN, "float32"), verbose=0),
     kerastl.KerastlError, "NaN"),
    ("LinearProbe kind", lambda t: kerastl.LinearProbe(kind="tree"),
     kerastl.KerastlError, "kind='tree'"),
    ("LinearProbe one class", lambda t: kerastl.LinearProbe().fit(
        FEATURES, np.zeros(10)), kerastl.KerastlError, "two classes"),
    ("LinearProbe length mismatch", lambda t: kerastl.LinearProbe().fit(
        FEATURES, LABELS[:5]), kerastl.KerastlError, "10 feature rows"),
    ("LinearProbe unfitted", lambda t: kerastl.LinearProbe().predict(
        FEATURES), kerastl.KerastlError, "not fitted"),
    ("LinearProbe set_params", lambda t: kerastl.LinearProbe().set_params(
        depth=3), kerastl.KerastlError, "depth"),
    ("LinearProbe epochs ten", lambda t: kerastl.LinearProbe(
        epochs="ten"), kerastl.KerastlError, "epochs='ten'.*whole number"),
    ("LinearProbe learning_rate negative", lambda t: kerastl.LinearProbe(
        learning_rate=-1), kerastl.KerastlError, "learning_rate=-1"),
    ("LinearProbe set_params batch_size 0", lambda t: kerastl.LinearProbe()
     .set_params(batch_size=0), kerastl.KerastlError, "batch_size=0"),
    ("extract_features layers int", lambda t: kerastl.extract_features(
        conv(), IMAGES, layers=3), kerastl.KerastlError, "layers=3"),
    ("FeatureCache int", lambda t: kerastl.FeatureCache(5),
     kerastl.KerastlError, r"FeatureCache\(5\).*folder path"),
    # -- analysis
    ("transfer_depth_sweep depth", lambda t: kerastl.analysis.transfer_depth_sweep(
        conv(), (IMAGES, np.zeros(4)), (IMAGES, np.zeros(4)), depths=[5]),
     kerastl.KerastlError, "depth 5"),
    ("stratified few_shot too many", lambda t: datasets.few_shot(
        LABELS, 6), kerastl.KerastlError, "6 per class"),
    ("few_shot per_class 0", lambda t: datasets.few_shot(LABELS, 0),
     kerastl.KerastlError, "per_class=0"),
    ("transfer_depth_sweep images without labels", lambda t: kerastl
     .analysis.transfer_depth_sweep(conv(), IMAGES, (IMAGES, np.zeros(4))),
     kerastl.KerastlError, r"train must be an \(images, labels\) tuple"),
    # -- datasets
    ("digits dtype", lambda t: datasets.digits(dtype="int8"),
     kerastl.KerastlError, "dtype='int8'"),
    ("digits split", lambda t: datasets.digits(split="val"),
     kerastl.KerastlError, "split='val'"),
    ("digits size", lambda t: datasets.digits(size=4),
     kerastl.KerastlError, "size=4"),
    ("datasets.load unknown", lambda t: datasets.load("mnist"),
     kerastl.KerastlError, "mnist"),
    # -- export (writes nothing)
    ("export input mode", lambda t: kerastl.export_savedmodel(
        clf(), t / "e", input="jpeg"), kerastl.errors.ExportError, "input='jpeg'"),
    ("export not a model", lambda t: kerastl.export_savedmodel(
        "model", t / "e"), kerastl.errors.ExportError, "keras.Model"),
    ("export onto a file", lambda t: (t / "f").write_text("x") and
     kerastl.export_savedmodel(clf(), t / "f"), kerastl.errors.ExportError,
     "not a folder"),
    ("export into cwd", lambda t: kerastl.export_savedmodel(clf(), "."),
     kerastl.errors.ExportError, "working directory"),
    ("HubLayer int", lambda t: kerastl.HubLayer(5), kerastl.KerastlError,
     r"HubLayer\(5\): expected a handle"),
    ("trust_hub_path int", lambda t: kerastl.trust_hub_path(5),
     kerastl.KerastlError, r"trust_hub_path\(5\)"),
    # -- devices
    ("TF_CONFIG not JSON", lambda t: with_tf_config(
        "{cluster", lambda: kerastl.distribute.strategy("multi-worker")),
     kerastl.KerastlError, "TF_CONFIG is not a cluster and a task"),
    ("TF_CONFIG task outside the cluster", lambda t: with_tf_config(
        '{"cluster": {"worker": ["localhost:1", "localhost:2"]}, '
        '"task": {"type": "worker", "index": 3}}',
        lambda: kerastl.distribute.strategy("multi-worker")),
     kerastl.KerastlError, "task .* is not in its cluster"),
    ("TF_CONFIG addresses", lambda t: with_tf_config(
        '{"cluster": {"worker": ["localhost"]}, '
        '"task": {"type": "worker", "index": 0}}',
        lambda: kerastl.distribute.strategy("multi-worker")),
     kerastl.KerastlError, "host:port"),
    # -- hub
    ("HubLayer missing folder", lambda t: kerastl.HubLayer(
        str(t / "no_model")), kerastl.KerastlError, "no_model"),
    ("resolve_handle not a handle", lambda t: kerastl.tfhub.resolve_handle(
        "just-a-name"), kerastl.KerastlError, "just-a-name"),
]


@pytest.mark.parametrize("name, make, error, match", CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input(name, make, error, match, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(error, match=match):
        make(work)
    leftovers = [f for f in os.listdir(work) if f != "f"]
    assert leftovers == [], leftovers


CLI_CASES = [
    ("demo --per-class 0", ["demo", "--per-class", "0"], "--per-class"),
    ("demo --per-class 500", ["demo", "--per-class", "500"], "--per-class"),
    ("demo --epochs 0", ["demo", "--epochs", "0"], "--epochs"),
    ("demo --source-samples 1", ["demo", "--source-samples", "1"],
     "--source-samples"),
    ("demo --source-epochs -1", ["demo", "--source-epochs", "-1"],
     "--source-epochs"),
    ("demo into cwd", ["demo", "--output", "."], "working directory"),
    ("finetune without model", ["finetune", "--data", "d"], "'model'"),
    ("finetune missing config", ["finetune", "--config", "nope.yaml"],
     "nope.yaml"),
    ("finetune unknown model", ["finetune", "--model", "mobilenet_v9",
                                "--data", "d"], "mobilenet_v9"),
    ("finetune epochs 0", ["finetune", "--model", "mobilenet_v2", "--data",
                           "d", "--epochs", "0"], "'epochs'"),
    ("finetune step budget", ["finetune", "--model", "mobilenet_v2", "--data",
                              "d", "--max-steps", "100"], "--min-steps"),
    ("finetune validation split", ["finetune", "--model", "mobilenet_v2",
                                   "--data", "d", "--validation-split", "1.5"],
     "'validation_split'"),
    ("finetune layer decay", ["finetune", "--model", "mobilenet_v2",
                              "--data", "d", "--layer-decay", "2"],
     "'layer_decay'"),
    ("finetune resume nothing", ["finetune", "--model", "mobilenet_v2",
                                 "--data", "IMAGES", "--resume"],
     "Nothing to resume"),
    ("zoo show unknown", ["zoo", "show", "resnet9000"], "resnet9000"),
]


@pytest.mark.parametrize("name, argv, match", CLI_CASES,
                         ids=[c[0] for c in CLI_CASES])
def test_bad_cli_input(name, argv, match, tmp_path, monkeypatch, capsys):
    from conftest import write_folder

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KERASTL_CACHE_DIR", str(tmp_path / "cache"))
    if "IMAGES" in argv:
        write_folder(tmp_path / "images", per_class=2)
        argv = [str(tmp_path / "images") if a == "IMAGES" else a
                for a in argv]
    before = sorted(os.listdir(tmp_path))
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("kerastl: error: ") and "\n" not in err, err
    assert match in err, err
    assert sorted(os.listdir(tmp_path)) == before


def test_the_matrix_is_large():
    assert len(CASES) + len(CLI_CASES) >= 60
