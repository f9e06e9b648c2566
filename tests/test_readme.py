"""The Python examples of the README and of docs/ run as written.

A block preceded by ``<!-- readme-test: SETUP -->`` is executed unchanged,
after SETUP (below) has made what the README leaves to the reader: a model,
``train``/``val`` data, a folder of photos. Blocks that need downloads
(ImageNet weights, TF Hub handles) are
run by a tutorial instead, offline with the bundled data; ``COVERED_BY``
names which, and a new unmarked block fails this test until it is either
marked or listed.
"""

import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerastl

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
# The pages whose examples run here: the README and the guide in docs/.
PAGES = [README] + sorted(
    os.path.join(folder, name)
    for folder, _, names in os.walk(os.path.join(os.path.dirname(README),
                                                 "docs"))
    for name in names if name.endswith(".md"))

COVERED_BY = {
    'backbone = kerastl.load_backbone("mobilenet_v2")':
        "tutorials/01_feature_extraction.ipynb",
    'backbone = kerastl.load_backbone("efficientnet_b0", input_shape':
        "tutorials/02_fine_tuning.ipynb",
    "layer = kerastl.HubLayer(": "tutorials/03_tf_hub.ipynb",
    'backbone = kerastl.load_backbone("hub:mobilenet_v2_100_224")':
        "tutorials/03_tf_hub.ipynb",
    "strategy = tf.distribute.MirroredStrategy()":
        "tests/distributed_jobs.py",  # the same calls, on two devices
}


def blocks():
    pattern = re.compile(
        r"(?:<!-- readme-test: (\w+) -->\n)?```python\n(.*?)```", re.S)
    return [(m.group(1), m.group(2)) for page in PAGES
            for m in pattern.finditer(open(page).read())]


def digits(n, size):
    x, y = kerastl.datasets.digits("train")
    x = tf.image.resize(x[:n], (size, size)).numpy()
    return x, y[:n]


def efficientnet_classifier(ns, tmp_path):
    backbone = kerastl.load_backbone("efficientnet_b0", weights=None,
                                     input_shape=(32, 32, 3))
    x, y = digits(40, 32)
    ns["model"] = kerastl.build_classifier(backbone, num_classes=10)
    ns["train"] = tf.data.Dataset.from_tensor_slices((x[:32], y[:32])) \
        .batch(16)
    ns["val"] = tf.data.Dataset.from_tensor_slices((x[32:], y[32:])).batch(8)


def photo_folder(ns, tmp_path):
    x, y = digits(30, 32)
    for i, (image, label) in enumerate(zip(x, y)):
        folder = tmp_path / "photos" / "train" / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        keras.utils.save_img(str(folder / f"{i}.png"), image, scale=False)
    ns["backbone"] = kerastl.load_backbone(
        "mobilenet_v2", weights=None, input_shape=(32, 32, 3))
    ns["x_test"], ns["y_test"] = digits(20, 32)


def digits_model(ns, tmp_path):
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    ns["model"] = kerastl.build_classifier(keras.Model(inputs, x), 10)
    image, _ = digits(1, 32)
    keras.utils.save_img(str(tmp_path / "seven.png"), image[0], scale=False)


def digits_deploy(ns, tmp_path):
    """A digits classifier and its data, as the Deploy section assumes."""
    digits_model(ns, tmp_path)
    (x, y), (xv, yv) = digits(40, 32), digits(20, 32)
    ns.update(x_train=x, x_val=xv, y_val=yv,
              class_names=[str(d) for d in range(10)])
    model = ns["model"]
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=3, verbose=0)


def quick(ns, tmp_path):
    """Nothing to make: the block is complete (the test sets its documented
    small-size switch, KERASTL_QUICK=1)."""


def mobilenet_backbone(ns, tmp_path):
    ns["backbone"] = kerastl.load_backbone(
        "mobilenet_v2", weights=None, input_shape=(32, 32, 3))


def kerashub_preset(ns, tmp_path):
    """A small DINOv2 in the kagglehub cache under the name of the real
    preset (as a download leaves it), and digits to probe."""
    keras_hub = pytest.importorskip("keras_hub")
    from kerastl.zoo import kerashub

    handle = kerashub.builtin_presets()["dinov2_small"]
    cache = tmp_path / "kagglehub"
    os.environ["KAGGLEHUB_CACHE"] = str(cache)  # restored by monkeypatch
    folder = kerashub.kaggle_cache(handle)
    keras_hub.models.DINOV2Backbone(
        patch_size=8, num_layers=2, hidden_dim=16, num_heads=2,
        intermediate_dim=32, image_shape=(32, 32, 3),
        position_embedding_shape=(32, 32, 3)).save_to_preset(folder)
    keras_hub.layers.DINOV2ImageConverter(
        image_size=(32, 32), scale=1 / 255.0).save_to_preset(folder)
    version = os.path.basename(folder)
    open(folder + ".complete", "w").close()
    os.makedirs(os.path.join(os.path.dirname(folder), ".complete", version))
    for name in os.listdir(folder):
        open(os.path.join(os.path.dirname(folder), ".complete", version,
                          name + ".complete"), "w").close()
    x, y = digits(60, 32)
    ns.update(x_train=x[:40], y_train=y[:40], x_val=x[40:], y_val=y[40:])


SETUPS = {f.__name__: f for f in (efficientnet_classifier, photo_folder,
                                  digits_model, digits_deploy, quick,
                                  mobilenet_backbone,
                                  kerashub_preset)}


def test_every_python_block_is_run_here_or_by_a_tutorial():
    for setup, code in blocks():
        if setup is None:
            first = [line for line in code.strip().splitlines()
                     if line and not line.startswith("import ")][0]
            covered = [t for k, t in COVERED_BY.items() if first.startswith(k)]
            assert covered, f"README block not run anywhere: {first!r}"
            assert os.path.exists(os.path.join(
                os.path.dirname(README), covered[0]))
        else:
            assert setup in SETUPS, setup


@pytest.mark.slow
@pytest.mark.parametrize("index", [i for i, (s, _) in enumerate(blocks())
                                   if s is not None])
def test_readme_block_runs_as_written(index, tmp_path, monkeypatch):
    setup, code = blocks()[index]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # the FeatureCache example
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    # The README's documented small-size switch (for the DANN example).
    monkeypatch.setenv("KERASTL_QUICK", "1")
    keras.utils.set_random_seed(0)
    ns = {"keras": keras, "kerastl": kerastl, "tf": tf, "np": np}
    SETUPS[setup](ns, tmp_path)
    exec(compile(code, f"README.md block {index}", "exec"), ns)
