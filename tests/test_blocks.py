"""The block map: rules, structural fallback, lookups, persistence."""

import keras
import numpy as np
import pytest

import kerastl
from kerastl import blocks
from kerastl.blocks import BlockRule, assign_blocks


def branching_model():
    """stem conv -> two auto-named branches -> concat 'cell' -> conv 'out'."""
    inputs = keras.Input((16, 16, 3), name="img")
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem_conv")(inputs)
    x = keras.layers.ReLU()(x)  # auto-named, no weights
    a = keras.layers.Conv2D(4, 1)(x)
    b = keras.layers.Conv2D(4, 3, padding="same")(x)
    b = keras.layers.BatchNormalization()(b)
    cell = keras.layers.Concatenate(name="cell")([a, b])
    out = keras.layers.Conv2D(8, 1, name="out")(cell)
    return keras.Model(inputs, out)


def test_until_takes_unnamed_layers_of_a_cell():
    model = branching_model()
    bm = assign_blocks(model, [BlockRule("stem", layers=["^stem_"]),
                               BlockRule("cell", until="cell"),
                               BlockRule("out", layers=["^out$"])])
    assert bm.names == ["stem", "cell", "out"]
    assert [l.name for l in bm.weighted_layers("stem")] == ["stem_conv"]
    assert len(bm.weighted_layers("cell")) == 3  # two convs + BN
    assert bm.block_of("img") == "stem"  # input stays with the stem
    assert bm.validate() == []


def test_before_stops_where_the_cell_branches_off():
    model = branching_model()
    bm = assign_blocks(model, [BlockRule("stem", before="cell"),
                               BlockRule("cell", until="cell"),
                               BlockRule("out", until="out")])
    # The ReLU feeds both branches: it is the immediate dominator of `cell`.
    relu = [l.name for l in bm.layers("stem")][-1]
    assert relu.startswith("re_lu")
    assert [l.name for l in bm.weighted_layers("stem")] == ["stem_conv"]
    assert len(bm.weighted_layers("cell")) == 3


def test_unmatched_weighted_layers_form_the_head():
    model = branching_model()
    bm = assign_blocks(model, [BlockRule("stem", layers=["^stem_"]),
                               BlockRule("cell", until="cell")])
    assert bm.names[-1] == blocks.HEAD
    assert [l.name for l in bm.weighted_layers("head")] == ["out"]


def test_depth_order_violation_is_reported():
    model = branching_model()
    bm = assign_blocks(model, [BlockRule("first", layers=["^out$"]),
                               BlockRule("second", layers=["^stem_"])])
    problems = bm.validate()
    assert any("'out' (block 'first') takes input from 'cell' in the later "
               "block 'head'" in p for p in problems), problems


@pytest.fixture(scope="module")
def backbone():
    return kerastl.load_backbone("mobilenet_v2", weights=None,
                                 input_shape=(32, 32, 3))


def test_lookups(backbone):
    bm = backbone.block_map
    assert bm.resolve(0) == "stem" and bm.resolve(-1) == "top"
    assert bm.index("stage2") == 2
    assert bm.block_of("block_4_expand") == "stage2"
    kernel = backbone.model.get_layer("Conv_1").kernel
    assert bm.block_of(kernel) == "top"
    assert bm.params("top") == sum(
        int(np.prod(v.shape)) for v in backbone.model.get_layer("Conv_1").weights
        + backbone.model.get_layer("Conv_1_bn").weights)


def test_unknown_block_lists_the_blocks(backbone):
    with pytest.raises(kerastl.errors.BlockError) as e:
        backbone.block_map.resolve("stage9")
    msg = str(e.value)
    assert "stem, stage1, stage2, stage3, stage4, top" in msg
    with pytest.raises(kerastl.errors.BlockError, match="out of range"):
        backbone.block_map.resolve(6)


def classifier(backbone):
    x = keras.layers.GlobalAveragePooling2D()(backbone.model.output)
    out = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    return keras.Model(backbone.model.input, out)


def test_classifier_on_a_backbone_gets_a_head_block(backbone):
    bm = kerastl.block_map(classifier(backbone))
    assert bm.names == backbone.blocks + ["head"]
    assert [l.name for l in bm.weighted_layers("head")] == ["predictions"]


def test_block_map_survives_keras_save_and_load(backbone, tmp_path):
    model = classifier(backbone)
    path = tmp_path / "clf.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    bm = kerastl.block_map(loaded)
    assert bm.source == "rules"
    assert bm.names == backbone.blocks + ["head"]
    assert bm.assignment() == kerastl.block_map(model).assignment()


def test_nested_backbone_in_sequential(backbone):
    model = keras.Sequential([
        keras.Input((32, 32, 3)), backbone.model,
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    bm = kerastl.block_map(model)
    assert bm.names == backbone.blocks + ["head"]
    assert bm.block_of("block_1_expand") == "stage1"
    assert bm.validate() == []


def test_cache_is_invalidated_when_layers_change():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    assert len(kerastl.block_map(model)) == 1
    model.add(keras.layers.Dense(2))
    assert len(kerastl.block_map(model)) == 2


def test_structural_fallback_splits_at_resolution_changes():
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    x = keras.layers.BatchNormalization(name="a_bn")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="b")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="c")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(3, name="fc")(x)
    bm = kerastl.block_map(keras.Model(inputs, x))
    assert bm.source == "structural"
    assert bm.names == ["block1", "block2", "block3", "head"]
    assert [l.name for l in bm.weighted_layers("block1")] == ["a", "a_bn"]
    assert [l.name for l in bm.weighted_layers("block2")] == ["b"]
    assert [l.name for l in bm.weighted_layers("head")] == ["fc"]
    assert bm.validate() == []


def test_block_map_rejects_non_models():
    with pytest.raises(kerastl.errors.BlockError, match="keras.Model"):
        kerastl.block_map("resnet50")


def _numbered_chain(names):
    """A chain of Dense layers with the given names."""
    inputs = keras.Input((4,))
    x = inputs
    for name in names:
        x = keras.layers.Dense(4, name=name)(x)
    return keras.Model(inputs, x)


def test_a_repeated_rule_gives_one_block_per_number_in_numeric_order():
    model = _numbered_chain(["embed", "blk_1", "blk_2", "blk_10", "norm"])
    rules = [BlockRule("embed", layers=["^embed$"]),
             BlockRule("layer{i}", layers=["^blk_{i}$"]),
             BlockRule("top", layers=["^norm$"])]
    bm = assign_blocks(model, rules)
    # Numbered from 0 whatever the names use; blk_10 after blk_2.
    assert bm.names == ["embed", "layer0", "layer1", "layer2", "top"]
    assert bm.block_of("blk_10") == "layer2"
    assert bm.validate() == []


def test_a_repeated_rule_skips_layers_earlier_blocks_took():
    model = _numbered_chain(["block_0_0", "block_1_0", "block_1_1",
                             "block_2_0"])
    rules = [BlockRule("stem", layers=["^block_0_"]),
             BlockRule("stage{i}", layers=["^block_{i}_"], first=1)]
    bm = assign_blocks(model, rules)
    assert bm.names == ["stem", "stage1", "stage2"]
    assert [l.name for l in bm.layers("stage1")] == ["block_1_0", "block_1_1"]


def test_a_repeated_rule_travels_in_the_config():
    rule = BlockRule("stage{i}", layers=["^(\\w+_)?stack{i}_"], first=1)
    assert rule.get_config() == {"name": "stage{i}",
                                 "layers": ["^(\\w+_)?stack{i}_"],
                                 "first": 1}
    again = BlockRule.from_config(rule.get_config())
    assert again == rule and again.number("pre_stack12_conv") == 12
    with pytest.raises(kerastl.errors.BlockError, match="repeated rule"):
        BlockRule("layer{i}", until="norm")
    with pytest.raises(kerastl.errors.BlockError, match="each contain"):
        BlockRule("layer{i}", layers=["^blk_{i}$", "^extra$"])
