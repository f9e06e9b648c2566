"""KerasHub presets as a zoo source (kerastl.zoo.kerashub).

Presets download at run time, which tests cannot; each family is built
small from its KerasHub architecture (random weights), saved as a local
preset folder with an image converter, and loaded through
``kerastl.load_backbone(folder)``: the real loading path.
"""

import sys
import time

import keras
import os

import numpy as np
import pytest

import kerastl
from kerastl import blocks
from kerastl.errors import KerastlError, UnknownModelError, WeightsError
from kerastl.zoo import kerashub

from conftest import save_load_and_resume, step_with_references

# One worker runs this module (pytest-xdist), and its costly fixtures are
# session-scoped: computed once, however the worker interleaves modules.
pytestmark = [pytest.mark.xdist_group("kerashub"),
              # (clear_session after each test: see the fixture)
              pytest.mark.usefixtures("collect_only_this_modules_garbage")]

SIZE = 32
TORCH_SCALE = [1 / (255 * 0.229), 1 / (255 * 0.224), 1 / (255 * 0.225)]
TORCH_OFFSET = [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]


def _families():
    kh = pytest.importorskip("keras_hub")
    m, L = kh.models, kh.layers

    def conv(cls, scale=TORCH_SCALE, offset=TORCH_OFFSET):
        return cls(image_size=(SIZE, SIZE), scale=scale, offset=offset)

    shape = (SIZE, SIZE, 3)
    return {
        "resnet": (lambda: m.ResNetBackbone(
            input_conv_filters=[8], input_conv_kernel_sizes=[7],
            stackwise_num_filters=[64, 8, 16, 16],
            stackwise_num_blocks=[1, 1, 1, 1],
            stackwise_num_strides=[1, 2, 2, 2],
            block_type="bottleneck_block", image_shape=shape),
            lambda: conv(L.ResNetImageConverter),
            ["stem", "stage1", "stage2", "stage3", "stage4"]),
        "resnet_v2": (lambda: m.ResNetBackbone(
            input_conv_filters=[8, 8, 64], input_conv_kernel_sizes=[3, 3, 3],
            stackwise_num_filters=[64, 8, 16, 16],
            stackwise_num_blocks=[1, 1, 1, 1],
            stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block",
            use_pre_activation=True, image_shape=shape),
            lambda: conv(L.ResNetImageConverter),
            ["stem", "stage1", "stage2", "stage3", "stage4", "top"]),
        "efficientnet": (lambda: m.EfficientNetBackbone(
            stackwise_kernel_sizes=[3, 3, 3, 3],
            stackwise_num_repeats=[1, 2, 1, 1],
            stackwise_input_filters=[8, 8, 16, 16],
            stackwise_output_filters=[8, 16, 16, 24],
            stackwise_expansion_ratios=[1, 4, 4, 4],
            stackwise_squeeze_and_excite_ratios=[0.25] * 4,
            stackwise_strides=[1, 2, 2, 2], stackwise_block_types=["v1"] * 4,
            stackwise_width_coefficients=[1.0] * 4,
            # num_features stays at its default: keras-hub 0.32 does not
            # write it into the preset's config.
            stackwise_depth_coefficients=[1.0] * 4, input_shape=shape),
            lambda: conv(L.EfficientNetImageConverter),
            ["stem", "stage1", "stage2", "stage3", "stage4", "top"]),
        "mobilenet_v3": (lambda: m.MobileNetBackbone(
            stackwise_expansion=[[16], [32, 32], [48]],
            stackwise_num_blocks=[1, 2, 1],
            stackwise_num_filters=[[16], [24, 24], [32]],
            stackwise_kernel_size=[[3], [3, 3], [5]],
            stackwise_num_strides=[[2], [2, 1], [2]],
            stackwise_se_ratio=[[None], [0.25, 0.25], [0.25]],
            stackwise_activation=[["relu"], ["hard_swish"] * 2,
                                  ["hard_swish"]],
            stackwise_padding=[[1], [1, 1], [2]],
            output_num_filters=64, depthwise_filters=8, depthwise_stride=2,
            depthwise_residual=False, last_layer_filter=64,
            input_activation="hard_swish", output_activation="hard_swish",
            input_num_filters=8, image_shape=shape, squeeze_and_excite=0.5),
            lambda: conv(L.MobileNetImageConverter, 1 / 127.5, -1.0),
            ["stem", "stage1", "stage2", "stage3", "stage4"]),
        "densenet": (lambda: m.DenseNetBackbone(
            stackwise_num_repeats=[1, 1, 1, 1], image_shape=shape,
            growth_rate=4),
            lambda: conv(L.DenseNetImageConverter),
            ["stem", "stage1", "stage2", "stage3", "stage4", "top"]),
        "vit": (lambda: m.ViTBackbone(
            image_shape=shape, patch_size=8, num_layers=3, num_heads=2,
            hidden_dim=16, mlp_dim=32),
            lambda: conv(L.ViTImageConverter, 1 / 127.5, -1.0),
            ["embed", "layer0", "layer1", "layer2", "top"]),
        "dinov2": (lambda: m.DINOV2Backbone(
            patch_size=8, num_layers=3, hidden_dim=16, num_heads=2,
            intermediate_dim=32, image_shape=shape,
            position_embedding_shape=shape, num_register_tokens=2),
            lambda: conv(L.DINOV2ImageConverter),
            ["embed", "layer0", "layer1", "layer2", "top"]),
        "siglip": (lambda: m.SigLIPBackbone(
            m.SigLIPVisionEncoder(
                patch_size=8, hidden_dim=16, num_layers=3, num_heads=2,
                intermediate_dim=32, image_shape=shape,
                name="vision_encoder"),
            m.SigLIPTextEncoder(
                vocabulary_size=20, embedding_dim=16, hidden_dim=16,
                num_layers=1, num_heads=2, intermediate_dim=32,
                max_sequence_length=8, name="text_encoder")),
            lambda: conv(L.SigLIPImageConverter, 1 / 127.5, -1.0),
            ["embed", "layer0", "layer1", "layer2", "top"]),
        "clip": (lambda: m.CLIPBackbone(
            m.CLIPVisionEncoder(
                patch_size=8, hidden_dim=16, num_layers=3, num_heads=2,
                intermediate_dim=32, image_shape=shape,
                name="vision_encoder"),
            m.CLIPTextEncoder(
                vocabulary_size=20, embedding_dim=16, hidden_dim=16,
                num_layers=1, num_heads=2, intermediate_dim=32,
                max_sequence_length=8, name="text_encoder"),
            projection_dim=16),
            lambda: conv(L.CLIPImageConverter),
            ["embed", "layer0", "layer1", "layer2", "top"]),
    }


FAMILIES = ["resnet", "resnet_v2", "efficientnet", "mobilenet_v3",
            "densenet", "vit", "dinov2", "siglip", "clip"]
# The families whose resume (one more epoch after save and load, equal to
# the original's) is checked: one CNN, and the transformers, whose
# sublayers Keras brings back trainable (kerastl.load_model's fix). The
# other CNNs keep layer-level flags only, as the ResNet does.
RESUMED = ["resnet", "vit", "dinov2", "siglip", "clip"]


@pytest.fixture(scope="session")
def presets(tmp_path_factory):
    """family -> (preset folder, expected blocks); each saved once."""
    root = tmp_path_factory.mktemp("kerashub_presets")
    out = {}
    for family, (backbone, converter, expected) in _families().items():
        folder = str(root / family)
        backbone().save_to_preset(folder)
        converter().save_to_preset(folder)
        out[family] = (folder, expected)
    keras.backend.clear_session()
    return out


def _images(n=8, seed=0):
    return np.random.default_rng(seed).uniform(
        0, 255, (n, SIZE, SIZE, 3)).astype("float32")


def _reference(folder, x):
    """What KerasHub itself computes: its converter, then its backbone."""
    import keras_hub
    backbone = keras_hub.models.Backbone.from_preset(folder)
    vision = getattr(backbone, "vision_encoder", None) or backbone
    images = keras_hub.layers.ImageConverter.from_preset(folder)(x)
    if isinstance(vision.input, dict):
        images = {"images": images}
    return keras.ops.convert_to_numpy(vision(images))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_with_a_block_map_and_keras_hub_outputs(presets, family):
    folder, expected = presets[family]
    backbone = kerastl.load_backbone(folder)
    bm = backbone.block_map
    assert bm.names == expected
    assert bm.validate() == []
    # Every layer that owns weights in exactly one block; every weight once.
    weighted = [l for l, _ in blocks.layer_graph(backbone.model)
                if getattr(l, "weights", None)]
    owners = {}
    for b in bm.names:
        for layer in bm.weighted_layers(b):
            assert id(layer) not in owners, layer.name
            owners[id(layer)] = b
    assert len(owners) == len(weighted)
    assert sum(len(bm.variables(b)) for b in bm.names) == len(
        backbone.model.weights)
    # The input contract: raw pixels in, the preset's converter inside.
    x = _images(2)
    np.testing.assert_allclose(backbone.model.predict(x, verbose=0),
                               _reference(folder, x), rtol=1e-5, atol=1e-5)
    # Every block has an output: a feature endpoint.
    assert all(bm.has_output(b) for b in bm.names)
    # DINOv2's mask token gets no gradient in fine-tuning: not trainable.
    assert not [v.path for v in backbone.model.trainable_weights
                if "mask_token" in v.path]
    keras.backend.clear_session()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_freeze_save_and_export(presets, family, tmp_path):
    """freeze(up_to=...) keeps frozen weights bit-identical through fit;
    .keras keeps the block map and outputs; the SavedModel reloads with
    identical outputs."""
    import tensorflow as tf

    folder, expected = presets[family]
    backbone = kerastl.load_backbone(folder)
    model = kerastl.build_classifier(backbone, 3, freeze=expected[1],
                                     dropout=0.0, seed=0)
    bm = kerastl.block_map(model)
    frozen = [v for b in expected[:2] for v in bm.variables(b)]
    before = [np.array(v.numpy()) for v in frozen]
    moving = [v for b in expected[2:] for v in bm.variables(b)
              if v.trainable]
    moving_before = [np.array(v.numpy()) for v in moving]
    model.compile(kerastl.LayerwiseOptimizer(keras.optimizers.AdamW(1e-2),
                                             kerastl.LayerDecay(0.7), model),
                  "sparse_categorical_crossentropy")
    x, y = _images(8), np.arange(8) % 3
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    for v, b in zip(frozen, before):
        assert np.array_equal(v.numpy(), b), v.path
    assert any(not np.array_equal(v.numpy(), b)
               for v, b in zip(moving, moving_before))

    # The frozen blocks stay frozen in the reloaded model (Keras alone
    # brings a frozen KerasHub layer's sublayers back trainable), so the
    # optimizer's state loads and training resumes where it stopped.
    path = str(tmp_path / "model.keras")
    if family in RESUMED:
        loaded = save_load_and_resume(model, path, x, y)
    else:
        model.save(path)
        loaded = kerastl.load_model(path)
    assert kerastl.block_map(loaded).names == expected + ["head"]
    for v, b in zip(frozen, before):
        assert np.array_equal(v.numpy(), b), v.path
    reference = model.predict(x, verbose=0)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), reference,
                               rtol=1e-5, atol=1e-5)

    export = str(tmp_path / "export")
    kerastl.export_savedmodel(model, export)
    reloaded = tf.saved_model.load(export)  # kept: serve needs it alive
    served = reloaded.serve(tf.constant(x))
    served = served if not isinstance(served, dict) else next(
        iter(served.values()))
    np.testing.assert_allclose(served.numpy(), reference, rtol=1e-5,
                               atol=1e-5)
    keras.backend.clear_session()


@pytest.mark.parametrize("family", ["vit", "dinov2"])
def test_layer_decay_gives_the_beit_schedule_exactly(presets, family):
    folder, _ = presets[family]
    model = kerastl.build_classifier(kerastl.load_backbone(folder), 3,
                                     freeze=False)
    rule = kerastl.LayerDecay(0.75, shared=("top",))
    per_block = rule.per_block(kerastl.block_map(model).names)
    n = 3  # encoder layers
    assert per_block == pytest.approx(
        {"embed": 0.75 ** (n + 1), "layer0": 0.75 ** 3, "layer1": 0.75 ** 2,
         "layer2": 0.75, "top": 1.0, "head": 1.0})
    opt = kerastl.LayerwiseOptimizer(keras.optimizers.AdamW(1e-2), rule,
                                     model)
    bm = kerastl.block_map(model)
    variables = model.trainable_variables
    refs = [(keras.optimizers.AdamW(1e-2 * per_block[bm.block_of(v)]),
             keras.Variable(v.numpy(), name=v.name)) for v in variables]
    rng = np.random.default_rng(0)
    for _ in range(3):
        step_with_references(opt, variables, refs, rng)
    for v, (_, ref) in zip(variables, refs):
        np.testing.assert_allclose(v.numpy(), ref.numpy(), rtol=2e-6,
                                   atol=1e-7, err_msg=v.path)
    keras.backend.clear_session()


def test_transformer_features_per_block(presets, tmp_path):
    folder, expected = presets["dinov2"]
    backbone = kerastl.load_backbone(folder)
    x = _images(6)
    tokens = kerastl.extract_features(backbone, x, layers=["layer1"],
                                      pooling=None)
    assert tokens.shape == (6, 2 + 1 + 16, 16)  # class + 2 registers + 16
    cls = kerastl.extract_features(backbone, x, layers=["layer1"],
                                   pooling="cls")
    avg = kerastl.extract_features(backbone, x, layers=["layer1"],
                                   pooling="avg")
    both = kerastl.extract_features(backbone, x, layers=["layer1"],
                                    pooling="cls_avg")
    np.testing.assert_allclose(cls, tokens[:, 0], rtol=1e-6)
    np.testing.assert_allclose(avg, tokens[:, 3:].mean(axis=1), rtol=1e-5,
                               atol=1e-6)  # registers left out
    np.testing.assert_allclose(both, np.concatenate([cls, avg], axis=1),
                               rtol=1e-6)
    cache = kerastl.FeatureCache(str(tmp_path / "cache"))
    first = kerastl.extract_features(backbone, x, layers=expected,
                                     pooling="cls", cache=cache,
                                     as_dict=True)
    again = kerastl.extract_features(backbone, x, layers=expected,
                                     pooling="cls", cache=cache,
                                     as_dict=True)
    assert cache.hits >= 1
    for b in expected:
        np.testing.assert_array_equal(first[b], again[b])
    # (The embed block's class token is the same for every image: "avg".)
    cka = kerastl.analysis.cka_by_block(backbone, backbone, x, pooling="avg")
    cka = cka.diagonal()
    assert set(cka) == set(expected)
    assert all(v == pytest.approx(1.0, abs=1e-4) for v in cka.values())
    y = np.arange(6) % 2
    sweep = kerastl.analysis.transfer_depth_sweep(backbone, (x, y), (x, y),
                                         depths=[0, 3, len(expected)],
                                         epochs=1, pooling="cls")
    assert [r["frozen_up_to"] for r in sweep] == ["-", "layer1", "top"]
    keras.backend.clear_session()


def test_siglip_has_no_class_token(presets):
    backbone = kerastl.load_backbone(presets["siglip"][0])
    with pytest.raises(KerastlError, match="no class token"):
        kerastl.extract_features(backbone, _images(2), layers=["layer0"],
                                 pooling="cls")
    keras.backend.clear_session()


def test_an_unreachable_preset_fails_fast_and_says_what_to_do(
        monkeypatch, tmp_path):
    pytest.importorskip("keras_hub")
    # A host that never resolves, and an empty kagglehub cache: what an
    # offline machine sees, without depending on this one's network.
    monkeypatch.setattr(kerashub, "KAGGLE_URL",
                        "https://kerastl-offline.invalid")
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(WeightsError) as info:
        kerastl.load_backbone("kerashub:dinov2_small")
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "dinov2_small" in message and "save_to_preset" in message
    assert "kerashub:/path/to/my_preset" in message


def test_a_preset_without_its_image_converter_is_refused(tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    folder = str(tmp_path / "no_converter")
    keras_hub.models.DINOV2Backbone(
        patch_size=8, num_layers=1, hidden_dim=8, num_heads=2,
        intermediate_dim=16, image_shape=(32, 32, 3),
        position_embedding_shape=(32, 32, 3)).save_to_preset(folder)
    with pytest.raises(KerastlError, match="no image converter"):
        kerastl.load_backbone(folder)
    keras.backend.clear_session()


def test_unknown_preset_names_close_ones():
    pytest.importorskip("keras_hub")
    with pytest.raises(UnknownModelError, match="dinov2_small"):
        kerastl.load_backbone("kerashub:dinov2_smal")


def test_a_missing_extra_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # import fails
    with pytest.raises(KerastlError, match=r'pip install "kerastl\[kerashub\]"'):
        kerastl.load_backbone("kerashub:dinov2_small")


def test_every_kerashub_entry_is_listed_with_its_preset():
    from kerastl.cli import main
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["zoo", "list"]) == 0
    text = out.getvalue()
    entries = kerastl.list_configs("kerashub")
    assert {e.architecture for e in entries} >= {
        "ResNetBackbone", "EfficientNetBackbone", "MobileNetBackbone",
        "DenseNetBackbone", "ViTBackbone", "DINOV2Backbone",
        "SigLIPVisionEncoder", "CLIPVisionEncoder"}
    for e in entries:
        line = next(l for l in text.splitlines() if l.startswith(e.name))
        assert f"kerashub:{e.preset}" in line and "M" in line


@pytest.mark.slow
def test_finetune_a_kerashub_preset_from_the_command_line(presets, tmp_path,
                                                           capsys):
    """kerastl finetune --model kerashub:<folder> trains, with layer decay,
    and leaves a model that loads with its block map."""
    import json

    from conftest import write_folder
    from kerastl.cli import main

    images = write_folder(tmp_path / "images", per_class=20, size=32)
    out = tmp_path / "run"
    code = main(["finetune", "--model", "kerashub:" + presets["vit"][0],
                 "--weights", "none", "--data", str(images), "--output",
                 str(out), "--strategy", "full", "--layer-decay", "0.75",
                 "--epochs", "6", "--batch-size", "8", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    metrics = json.loads((out / "metrics.json").read_text())
    # Two colour-coded classes: chance is 0.5.
    assert metrics["validation"]["accuracy"] >= 0.75, metrics["validation"]
    tuned = kerastl.load_model(str(out / "model.keras"))
    assert kerastl.block_map(tuned).names == presets["vit"][1] + ["head"]
    keras.backend.clear_session()


@pytest.mark.parametrize("format", ["litert", "onnx"])
def test_a_vit_classifier_exports_to_litert_and_onnx(presets, format,
                                                     tmp_path):
    """A KerasHub ViT classifier: the LiteRT file, run by its runtime
    (inside kerastl.export, then here on other images), matches Keras
    within 1e-4. ONNX has no Erfc (the exact GELU of the transformer
    blocks): the export is refused naming the op and the layer, and
    nothing is written."""
    folder, _ = presets["vit"]
    model = kerastl.build_classifier(kerastl.load_backbone(folder), 3,
                                     dropout=0.0, seed=0)
    x = _images(4, seed=3)
    if format == "onnx":
        with pytest.raises(kerastl.errors.ExportError,
                           match="op Erfc in layer 'transformer_block"):
            kerastl.export(model, tmp_path / "vit", format=format)
        assert os.listdir(tmp_path) == []
        return
    report = kerastl.export(model, tmp_path / "vit", format=format,
                            validation_data=x)
    assert report.checked_on == 4 and report.max_difference <= 1e-4
    expected = model.predict(x, verbose=0)
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(report.file)
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
    else:
        from kerastl.serving import litert_interpreter

        interpreter = litert_interpreter(report.file)
        inp = interpreter.get_input_details()[0]
        interpreter.resize_tensor_input(inp["index"], x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        got = interpreter.get_tensor(
            interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    keras.backend.clear_session()
