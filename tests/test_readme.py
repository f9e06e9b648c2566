"""The Python examples of the README and of the documentation (docs/) are
complete: each is run here as written, or checked here name by name.

Every ```python block carries a marker on the line before it (a block
without one fails this test):

* ``<!-- readme-test: SETUP -->``: executed unchanged, after SETUP (below)
  has made what the page leaves to the reader: a model, ``train``/``val``
  data, a folder of photos.
* ``<!-- readme-test: static -->`` or ``<!-- readme-test: static:SETUP -->``:
  a block that needs downloads (ImageNet weights, TF Hub handles), so it
  cannot run here. It is compiled and checked with pyflakes: every name it
  uses must be defined by the block itself, be one that every block gets
  (``BASE``: keras, kerastl, tf, np) or one that SETUP provides.

``PROVIDES`` declares the names each setup makes; an executed block checks
the declaration against what the setup really made. Every block, executed
or static, gets the pyflakes check.
"""

import ast
import os
import re
from pathlib import Path

import keras
import numpy as np
import pyflakes.checker
import pyflakes.messages
import pytest
import tensorflow as tf

import kerastl
from conftest import stand_in_backbone

ROOT = Path(__file__).resolve().parents[1]
# The pages whose examples are checked: the README and every page of the
# documentation site.
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))

# The names every block gets without importing them.
BASE = {"keras": keras, "kerastl": kerastl, "tf": tf, "np": np}

# What each setup makes for the blocks that name it.
PROVIDES = {
    "efficientnet_classifier": {"model", "train", "val"},
    "photo_folder": {"backbone", "x_test", "y_test"},  # and photos/
    "digits_model": {"model"},  # and seven.png
    "digits_deploy": {"model", "x_train", "x_val", "y_val", "class_names"},
    "exported_files": {"images_uint8", "images_float32"},  # and export/
    "quick": set(),
    "mobilenet_backbone": {"backbone"},
    "kerashub_preset": {"x_train", "y_train", "x_val", "y_val"},
}

MARKED = re.compile(r"(?:<!-- readme-test: ([\w:]+) -->\n)?```python\n(.*?)```",
                    re.S)


def blocks():
    """``(where, marker, code)`` of every Python block, page by page."""
    found = []
    for page in PAGES:
        name = page.relative_to(ROOT).as_posix()
        for i, m in enumerate(MARKED.finditer(page.read_text())):
            found.append((f"{name}#{i}", m.group(1), m.group(2)))
    return found


def setup_of(marker):
    """``(setup name or None, static?)`` of a marker."""
    static, _, setup = marker.partition(":")
    if static == "static":
        return (setup or None), True
    return marker, False


def undefined_names(code, where, provided):
    """pyflakes' undefined-name messages for ``code``, given the names
    ``provided`` to it."""
    tree = ast.parse(code, filename=where)  # a syntax error fails here
    checker = pyflakes.checker.Checker(tree, filename=where,
                                       builtins=set(provided))
    undefined = (pyflakes.messages.UndefinedName,
                 pyflakes.messages.UndefinedLocal,
                 pyflakes.messages.UndefinedExport)
    return [str(m) for m in checker.messages if isinstance(m, undefined)]


def digits(n, size):
    x, y = kerastl.datasets.digits("train")
    x = tf.image.resize(x[:n], (size, size)).numpy()
    return x, y[:n]


def efficientnet_classifier(ns, tmp_path):
    backbone = stand_in_backbone("efficientnet_b0")
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


def exported_files(ns, tmp_path):
    """The files the Deploy section calls: the digits model as an int8
    LiteRT file with uint8 input and as an ONNX file, and images for them."""
    pytest.importorskip("ai_edge_litert")  # kerastl[litert]; not in [test]
    pytest.importorskip("onnxruntime")
    digits_deploy(ns, tmp_path)
    model, x = ns["model"], ns["x_train"]
    kerastl.export(model, "export/digits-int8", format="litert",
                   input="uint8", quantize="int8", representative_data=x)
    kerastl.export(model, "export/digits-onnx", format="onnx")
    ns.clear()
    ns.update(BASE, images_uint8=x[:4].astype("uint8"),
              images_float32=x[:4].astype("float32"))


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
                                  digits_model, digits_deploy, exported_files,
                                  quick, mobilenet_backbone,
                                  kerashub_preset)}


def test_every_python_block_is_marked():
    found = blocks()
    assert len(found) >= 17, [w for w, _, _ in found]
    unmarked = [where for where, marker, _ in found if marker is None]
    assert not unmarked, (
        "Python blocks without a <!-- readme-test: ... --> marker (run it "
        "with a setup, or mark it static[:SETUP]): " + ", ".join(unmarked))
    assert set(SETUPS) == set(PROVIDES)
    for where, marker, _ in found:
        setup, static = setup_of(marker)
        assert setup is None and static or setup in SETUPS, (where, marker)


@pytest.mark.parametrize("where, marker, code", blocks(),
                         ids=[w for w, _, _ in blocks()])
def test_every_python_block_uses_only_defined_names(where, marker, code):
    setup, _ = setup_of(marker or "static")
    provided = set(BASE) | PROVIDES.get(setup, set())
    undefined = undefined_names(code, where, provided)
    assert not undefined, f"{where} ({marker}): " + "; ".join(undefined)


def test_the_name_check_finds_an_undefined_name():
    code = "import keras\nmodel = build(keras.Input((4,)))\nmodel.fit(train)\n"
    assert len(undefined_names(code, "planted", set(BASE))) == 2
    assert not undefined_names(code, "planted", {"build", "train"})


@pytest.mark.slow
@pytest.mark.parametrize("where, marker, code",
                         [b for b in blocks()
                          if b[1] and not setup_of(b[1])[1]],
                         ids=[b[0] for b in blocks()
                              if b[1] and not setup_of(b[1])[1]])
def test_block_runs_as_written(where, marker, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # the FeatureCache example
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    # The documented small-size switch (for the DANN example).
    monkeypatch.setenv("KERASTL_QUICK", "1")
    keras.utils.set_random_seed(0)
    ns = dict(BASE)
    SETUPS[marker](ns, tmp_path)
    assert set(ns) - set(BASE) == PROVIDES[marker], \
        "PROVIDES does not say what this setup makes"
    exec(compile(code, where, "exec"), ns)
