"""Hub zoo entries and variable-path block maps.

Nothing is downloaded. The block regexes of each Hub config are checked
against variable names generated from the architecture (stage repeats and
strides), not copied from the configs; and one entry is loaded through
exactly the path users run (``load_backbone("hub:...")`` -> tensorflow_hub's
cache folder for its handle) from a SavedModel the test writes there.
"""

import hashlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerastl
from kerastl.errors import BlockError, ConfigError
from kerastl.tfhub import HubLayer
from kerastl.zoo.config import parse_config

STRIDE_BLOCK = {2: "stem", 4: "stage1", 8: "stage2", 16: "stage3",
                32: "stage4"}


def _conv(scope, bn="BatchNorm"):
    return [f"{scope}/weights:0", f"{scope}/{bn}/gamma:0",
            f"{scope}/{bn}/beta:0"]


def mobilenet(prefix, strides, head):
    """Slim MobileNet scopes; ``strides[i]``: output stride of expanded_conv_i."""
    out = [(n, "stem") for n in _conv(f"{prefix}/Conv")]
    for i, stride in enumerate(strides):
        scope = f"{prefix}/expanded_conv" + (f"_{i}" if i else "")
        names = _conv(f"{scope}/depthwise") + _conv(f"{scope}/project")
        if i:
            names += _conv(f"{scope}/expand")
        out += [(n, STRIDE_BLOCK[stride]) for n in names]
    for scope in head:
        out += [(n, "top") for n in _conv(f"{prefix}/{scope}")]
    return out


def efficientnet(prefix, repeats, strides, tf2=True):
    """Reference-code EfficientNet scopes: stem, blocks_N, head."""
    suffix = ":0" if tf2 else ""
    out = [(f"{prefix}/stem/conv2d/kernel{suffix}", "stem")]
    stride, n = 2, 0
    for r, s in zip(repeats, strides):
        stride *= s
        for _ in range(r):
            out += [(f"{prefix}/blocks_{n}/{v}{suffix}", STRIDE_BLOCK[stride])
                    for v in ("conv2d/kernel", "tpu_batch_normalization/gamma",
                              "depthwise_conv2d/depthwise_kernel")]
            n += 1
    out.append((f"{prefix}/head/conv2d/kernel{suffix}", "top"))
    return out


def resnet(prefix, unit, tail=None):
    out = [(n, "stem") for n in _conv(f"{prefix}/conv1")]
    for b, units in enumerate([3, 4, 6, 3], start=1):
        for u in range(1, units + 1):
            scope = f"{prefix}/block{b}/{unit.format(u)}"
            out += [(n, f"stage{b}") for n in _conv(f"{scope}/conv1")
                    + _conv(f"{scope}/conv3")]
    if tail:
        out += [(f"{prefix}/{tail}/gamma:0", "top")]
    return out


def bit():
    out = [("resnet/root_block/standardized_conv2d/kernel:0", "stem")]
    for b, units in enumerate([3, 4, 6, 3], start=1):
        for u in range(1, units + 1):
            for part in "abc":
                out += [(f"resnet/block{b}/unit{u:02d}/{part}/{v}:0",
                         f"stage{b}") for v in
                        ("standardized_conv2d/kernel", "group_norm/gamma")]
    return out + [("resnet/group_norm/gamma:0", "top"),
                  ("resnet/group_norm/beta:0", "top")]


def inception():
    out = [(f"InceptionV3/{c}/weights:0", "stem")
           for c in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3")]
    out += [(f"InceptionV3/{c}/BatchNorm/beta:0", "stage1")
            for c in ("Conv2d_3b_1x1", "Conv2d_4a_3x3")]
    for group, cells in (("5", "bcd"), ("6", "abcde"), ("7", "abc")):
        for cell in cells:
            out += [(f"InceptionV3/Mixed_{group}{cell}/Branch_{b}/"
                     "Conv2d_0a_1x1/weights:0", f"mixed{group}")
                    for b in range(3)]
    return out


# Variable names per Hub entry, each with the block its depth puts it in.
ARCHITECTURES = {
    # expanded_conv_i output strides: 16 blocks + the first.
    "hub_mobilenet_v2_100_224": mobilenet(
        "MobilenetV2", [2] + [4] * 2 + [8] * 3 + [16] * 7 + [32] * 4,
        ["Conv_1"]),
    "hub_mobilenet_v3_large_100_224": mobilenet(
        "MobilenetV3", [2] + [4] * 2 + [8] * 3 + [16] * 6 + [32] * 3,
        ["Conv_1", "Conv_2"]),
    "hub_mobilenet_v3_small_100_224": mobilenet(
        "MobilenetV3", [4] + [8] * 2 + [16] * 5 + [32] * 3,
        ["Conv_1", "Conv_2"]),
    "hub_efficientnet_b0": efficientnet(
        "efficientnet-b0", [1, 2, 2, 3, 3, 4, 1], [1, 2, 2, 2, 1, 2, 1],
        tf2=False),
    "hub_efficientnet_v2_b0": efficientnet(
        "efficientnetv2-b0", [1, 2, 2, 3, 5, 8], [1, 2, 2, 2, 1, 2]),
    "hub_efficientnet_v2_s": efficientnet(
        "efficientnetv2-s", [2, 4, 4, 6, 9, 15], [1, 2, 2, 2, 1, 2]),
    "hub_resnet_v1_50": resnet("resnet_v1_50", "unit_{}/bottleneck_v1"),
    "hub_resnet_v2_50": resnet("resnet_v2_50", "unit_{}/bottleneck_v2",
                               tail="postnorm"),
    "hub_inception_v3": inception(),
    "hub_bit_m_r50x1": bit(),
}


def test_every_hub_entry_is_covered():
    names = {c.name for c in kerastl.list_configs("tfhub")}
    assert names == set(ARCHITECTURES)
    for c in kerastl.list_configs("tfhub"):
        assert c.handle.startswith("https://") and c.output_size > 0
        assert c.preprocessing == "unit"  # TF Hub images are in [0, 1]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_block_regexes_follow_the_architecture(name):
    config = kerastl.zoo_entry(name)
    got, expected = [], []
    for variable, block in ARCHITECTURES[name]:
        rule = next((r.name for r in config.blocks
                     if r.matches_variable(variable)), None)
        got.append((variable, rule))
        expected.append((variable, block))
    assert got == expected
    # Every block owns variables, and blocks follow depth.
    order = [b for _, b in got]
    assert set(order) == set(config.block_names)
    assert order == sorted(order, key=config.block_names.index)
    # A wrapper's prefix does not break the regexes (re.search).
    variable, block = ARCHITECTURES[name][-1]
    assert next(r.name for r in config.blocks
                if r.matches_variable("module/" + variable)) == block


class SlimLike(tf.Module):
    """A Reusable SavedModel whose variables are named like a Hub model's."""

    def __init__(self, names, output_size):
        super().__init__()
        self._vars = []
        for i, name in enumerate(names):
            value = 1.0 + 0.01 * np.arange(3, dtype="float32") * (i % 7)
            self._vars.append(tf.Variable(value, name=name.split(":")[0]))
        self._out = tf.constant(np.random.default_rng(0).normal(
            size=(3, output_size)).astype("float32") / 30)

    @tf.function(input_signature=[tf.TensorSpec((None, None, None, 3)),
                                  tf.TensorSpec((), tf.bool)])
    def __call__(self, images, training=False):
        h = tf.reduce_mean(images, axis=[1, 2])
        for v in self._vars:
            h = h + 0.05 * tf.tanh(h * v)  # every variable has a gradient
        return tf.matmul(h, self._out)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A TFHUB_CACHE_DIR holding a SavedModel under MobileNet V2's handle."""
    cache = tmp_path_factory.mktemp("tfhub_cache")
    config = kerastl.zoo_entry("hub_mobilenet_v2_100_224")
    names = [n for n, _ in ARCHITECTURES[config.name]]
    folder = cache / hashlib.sha1(config.handle.encode()).hexdigest()
    tf.saved_model.save(SlimLike(names, config.output_size), str(folder))
    return cache


@pytest.fixture
def cached_hub(hub_cache, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(hub_cache))
    return hub_cache


def images(n=8, size=224, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n, size, size, 3)).astype("float32")


def classifier(backbone):
    return keras.Sequential([backbone.model,
                             keras.layers.Dense(3, name="head_dense")])


def snapshot(model):
    return {v.path: v.numpy().copy() for v in model.weights}


def test_load_backbone_hub_zoo_name_offline_from_the_cache(cached_hub):
    backbone = kerastl.load_backbone("hub:mobilenet_v2_100_224")
    assert backbone.blocks == ["stem", "stage1", "stage2", "stage3",
                               "stage4", "top"]
    assert backbone.input_shape == (224, 224, 3)
    assert backbone.output_shape == (1280,)
    assert backbone.config.name == "hub_mobilenet_v2_100_224"
    # The full name works too, without "hub:".
    assert kerastl.load_backbone("hub_mobilenet_v2_100_224").blocks == \
        backbone.blocks
    # Inner blocks have no output of their own; the last one has.
    assert list(backbone.endpoints) == ["top"]
    with pytest.raises(BlockError, match="ends inside"):
        backbone.endpoint_layer("stage2")
    # The [0, 255] contract: preprocessing to [0, 1] is inside.
    x = images(2)
    layer = backbone.model.get_layer("hub")
    np.testing.assert_allclose(backbone.model.predict(x, verbose=0),
                               layer(x / 255.0), rtol=1e-5, atol=1e-5)


def test_freeze_by_variable_block_map_keeps_frozen_variables_bit_identical(
        cached_hub):
    backbone = kerastl.load_backbone("hub:mobilenet_v2_100_224")
    model = classifier(backbone)
    model.compile(keras.optimizers.SGD(0.5), "mse")
    frozen = kerastl.freeze(model, up_to="stage2")
    assert frozen == ["stem", "stage1", "stage2"]
    summary = {r["block"]: r for r in kerastl.trainable_summary(model)}
    assert summary["stage2"]["trainable_params"] == 0
    assert summary["stage3"]["frozen_params"] == 0
    assert summary["stage3"]["trainable_params"] > 0
    bm = kerastl.block_map(model)
    before = snapshot(model)
    x, y = images(8), np.random.default_rng(1).normal(size=(8, 3))
    model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    after = snapshot(model)
    for block in bm.names:
        for v in bm.variables(block):
            if block in frozen:
                np.testing.assert_array_equal(before[v.path], after[v.path])
            else:
                assert not np.array_equal(before[v.path], after[v.path]), \
                    (block, v.path)


def test_layerwise_multiplier_shows_in_the_exact_update(cached_hub):
    x, y = images(4), np.random.default_rng(2).normal(size=(4, 3))

    def one_step(multipliers):
        backbone = kerastl.load_backbone("hub:mobilenet_v2_100_224")
        keras.utils.set_random_seed(0)
        model = classifier(backbone)
        opt = keras.optimizers.SGD(5.0)
        if multipliers is not None:
            opt = kerastl.LayerwiseOptimizer(opt, multipliers, model)
        model.compile(opt, "mse")
        before = snapshot(model)
        model.train_on_batch(x, y)
        bm = kerastl.block_map(model)
        return {b: [model_delta(v, before) for v in bm.variables(b)]
                for b in bm.names}, model

    def model_delta(v, before):
        return v.numpy() - before[v.path]

    # Float32 weights near 1 round updates to ~1e-7 absolute: the update
    # is m times the plain one to that precision.
    plain, _ = one_step(None)
    scaled, model = one_step({"stem": 0.0, "stage3": 0.25})
    for b, deltas in scaled.items():
        m = {"stem": 0.0, "stage3": 0.25}.get(b, 1.0)
        for d_scaled, d_plain in zip(deltas, plain[b]):
            np.testing.assert_allclose(d_scaled, m * d_plain, rtol=1e-3,
                                       atol=3e-7)
    assert all(np.abs(d).max() > 0 for d in plain["stage3"])
    assert max(np.abs(d).max() for d in plain["stage3"]) > 1e-4
    rows = {r["block"]: r for r in kerastl.describe_learning_rates(model)}
    assert rows["stem"]["state"] == "frozen"
    assert rows["stage3"]["multiplier"] == (0.25, 0.25)


def test_keras_file_round_trip_keeps_the_blocks(cached_hub, tmp_path,
                                                monkeypatch):
    backbone = kerastl.load_backbone("hub:mobilenet_v2_100_224")
    model = classifier(backbone)
    kerastl.freeze(model, up_to="stage1")
    path = str(tmp_path / "m.keras")
    model.save(path)
    # No host is trusted by default; the user trusts this handle.
    with pytest.raises(kerastl.KerastlError, match="safe mode"):
        keras.models.load_model(path)
    kerastl.trust_hub_path(kerastl.zoo_entry("hub_mobilenet_v2_100_224")
                           .handle)
    loaded = keras.models.load_model(path)
    assert kerastl.block_map(loaded).names == kerastl.block_map(model).names
    x = images(2)
    np.testing.assert_allclose(loaded.predict(x, verbose=0),
                               model.predict(x, verbose=0), rtol=1e-5,
                               atol=1e-6)


def test_a_config_that_does_not_fit_names_the_variables(
        cached_hub, tmp_path, monkeypatch):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "mine.yaml").write_text(
        "name: hub_mine\nsource: tfhub\n"
        f"handle: {kerastl.zoo_entry('hub_mobilenet_v2_100_224').handle}\n"
        "input: {default_size: 224, min_size: 224}\npreprocessing: unit\n"
        "output_size: 1280\nblocks:\n"
        "- {name: early, variables: ['MobilenetV2/Conv/']}\n"
        "- {name: late, variables: ['MobilenetV2/expanded_conv_1[3-6]/']}\n")
    monkeypatch.setenv("KERASTL_ZOO_PATH", str(zoo))
    with pytest.raises(BlockError, match="variables match no block.*"
                                         "MobilenetV2/expanded_conv/"):
        kerastl.load_backbone("hub:mine")


def test_hub_config_schema_errors():
    good = {"name": "hub_x", "source": "tfhub",
            "handle": "https://tfhub.dev/x/y/1",
            "input": {"default_size": 224, "min_size": 32},
            "preprocessing": "unit", "output_size": 8,
            "blocks": [{"name": "a", "variables": ["x/"]}]}
    assert parse_config(good).blocks[0].variables == ("x/",)
    for change, key in [
            ({"blocks": [{"name": "a", "layers": ["x"]}]}, "variables"),
            ({"handle": "not a handle"}, "handle"),
            ({"constructor": "MobileNetV2"}, "constructor"),
            ({"blocks": [{"name": "a", "variables": ["(x"]}]},
             "invalid regex")]:
        with pytest.raises(ConfigError, match=key):
            parse_config({**good, **change})
    bad = dict(good)
    del bad["output_size"]
    with pytest.raises(ConfigError, match="output_size"):
        parse_config(bad)


# -- the two SavedModel kinds of test_hub.py, with HubLayer(blocks=...) -------

# Block rules for the SavedModels of test_hub.py's fixture.
SMALL_BLOCKS = {"keras_export": {"early": "^stem_", "late": "^top_"},
                "reusable": {"early": "^block1/", "late": "^block2/"}}


@pytest.mark.parametrize("kind", ["keras_export", "reusable"])
def test_freeze_by_block_on_both_savedmodel_kinds(saved_models, kind):
    path, shape = saved_models[kind]
    blocks = SMALL_BLOCKS[kind]
    layer = HubLayer(path, trainable=True, blocks=blocks)
    inputs = keras.Input(shape)
    model = keras.Model(inputs, keras.layers.Dense(2)(layer(inputs)))
    model.compile(keras.optimizers.SGD(0.1), "mse")
    assert kerastl.block_map(model).names == ["early", "late", "head"]
    assert kerastl.freeze(model, up_to="early") == ["early"]
    assert not layer.batchnorm_training  # bn="frozen": inference mode
    before = {n: v.numpy().copy() for n, v in layer.hub_variables.items()}
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(16,) + shape).astype("float32"),
              rng.normal(size=(16, 2)), epochs=2, batch_size=8, verbose=0)
    for name, v in layer.hub_variables.items():
        if name.startswith(blocks["early"][1:]):
            np.testing.assert_array_equal(before[name], v.numpy())
        elif v.hub_trainable:
            assert not np.array_equal(before[name], v.numpy()), name
    # The block rules survive get_config.
    config = layer.get_config()["blocks"]
    assert config == [{"name": n, "variables": [p]} for n, p in
                      blocks.items()]
    clone = HubLayer(path, blocks=config)
    assert [r.name for r in clone.block_rules] == ["early", "late"]


def test_bare_handle_is_one_block(saved_models):
    path, _ = saved_models["keras_export"]
    backbone = kerastl.load_backbone("hub:" + path, input_shape=(8, 8, 3))
    assert backbone.blocks == ["hub"]
    assert backbone.config is None
    with pytest.raises(kerastl.KerastlError, match="own weights"):
        kerastl.load_backbone("hub:" + path, weights=None,
                              input_shape=(8, 8, 3))
