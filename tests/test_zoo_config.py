"""Zoo configs: schema checks, the allow-list, and name lookup."""

import textwrap

import pytest

import kerastl
from kerastl.zoo import config as zc

GOOD = textwrap.dedent("""\
    name: tiny_test
    source: keras.applications
    constructor: MobileNetV2
    input: {default_size: 96, min_size: 32}
    preprocessing: tf
    blocks:
      - {name: stem, layers: ['^Conv1']}
      - {name: rest, until: out_relu}
    """)


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_packaged_zoo_has_all_40_keras_applications():
    configs = kerastl.list_configs("keras.applications")
    assert len(configs) == 40
    assert {c.constructor for c in configs} == zc.KERAS_APPLICATIONS
    for c in configs:
        assert c.blocks, c.name
        assert c.preprocessing in ("caffe", "tf", "torch", "builtin")
        assert c.reference.get("top1"), c.name


def test_good_config_parses(tmp_path):
    cfg = zc.load_config_file(write(tmp_path, GOOD))
    assert cfg.name == "tiny_test"
    assert cfg.block_names == ["stem", "rest"]
    assert cfg.blocks[1].until == "out_relu"


def test_bad_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "name: [unclosed\n")
    with pytest.raises(kerastl.errors.ConfigError, match="not valid YAML") as e:
        zc.load_config_file(path)
    assert str(path) in str(e.value)


def test_yaml_tags_are_not_executed(tmp_path):
    path = write(tmp_path, "name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(kerastl.errors.ConfigError, match="not valid YAML"):
        zc.load_config_file(path)


def test_constructor_outside_the_allow_list_is_refused(tmp_path):
    path = write(tmp_path, GOOD.replace("MobileNetV2", "os.system"))
    with pytest.raises(kerastl.errors.ConfigError) as e:
        zc.load_config_file(path)
    msg = str(e.value)
    assert str(path) in msg and "'constructor'" in msg
    assert "allow-listed" in msg


def test_reserved_constructor_args_are_refused(tmp_path):
    path = write(tmp_path, GOOD + "constructor_args: {weights: evil.h5}\n")
    with pytest.raises(kerastl.errors.ConfigError, match="constructor_args.weights"):
        zc.load_config_file(path)


@pytest.mark.parametrize("bad, key", [
    (GOOD.replace("preprocessing: tf", "preprocessing: magic"), "preprocessing"),
    (GOOD.replace("min_size: 32", "min_size: 500"), "input.min_size"),
    (GOOD.replace("'^Conv1'", "'^(Conv1'"), "blocks[0].layers[0]"),
    (GOOD.replace("until: out_relu", "until: out_relu, layers: [x]"), "blocks[1]"),
    (GOOD + "blokcs: []\n", "blokcs"),
    (GOOD.replace("name: tiny_test", "name: Tiny Test"), "name"),
])
def test_schema_errors_name_the_key(tmp_path, bad, key):
    path = write(tmp_path, bad)
    with pytest.raises(kerastl.errors.ConfigError) as e:
        zc.load_config_file(path)
    assert f"key '{key}'" in str(e.value)
    assert str(path) in str(e.value)


def test_unknown_key_suggests_the_right_one(tmp_path):
    with pytest.raises(kerastl.errors.ConfigError, match="did you mean 'blocks'"):
        zc.load_config_file(write(tmp_path, GOOD + "blokcs: []\n"))


@pytest.mark.parametrize("name", ["resnet50", "ResNet50", "RESNET50",
                                  "mobilenet_v2", "MobileNetV2", "mobilenetv2"])
def test_names_are_case_insensitive(name):
    assert kerastl.zoo_entry(name).constructor in ("ResNet50", "MobileNetV2")


def test_unknown_name_lists_the_closest_names():
    with pytest.raises(kerastl.errors.UnknownModelError) as e:
        kerastl.zoo_entry("resnet5O")
    msg = str(e.value)
    assert "Unknown model 'resnet5O'" in msg
    assert "resnet50" in msg
    assert isinstance(e.value, kerastl.KerastlError)


def test_user_config_folder_is_searched(tmp_path, monkeypatch):
    write(tmp_path, GOOD, "tiny_test.yaml")
    monkeypatch.setenv("KERASTL_ZOO_PATH", str(tmp_path))
    assert kerastl.zoo_entry("TinyTest").name == "tiny_test"
    monkeypatch.delenv("KERASTL_ZOO_PATH")
    with pytest.raises(kerastl.errors.UnknownModelError):
        kerastl.zoo_entry("tiny_test")


def test_broken_user_config_fails_loudly(tmp_path, monkeypatch):
    write(tmp_path, GOOD.replace("MobileNetV2", "Evil"), "evil.yaml")
    monkeypatch.setenv("KERASTL_ZOO_PATH", str(tmp_path))
    with pytest.raises(kerastl.errors.ConfigError, match="evil.yaml"):
        kerastl.zoo_entry("resnet50")


def test_repeated_blocks_are_checked(tmp_path):
    ok = GOOD.replace("- {name: rest, until: out_relu}",
                      "- {name: 'stage{i}', first: 1, layers: ['^block_{i}_']}")
    cfg = zc.load_config_file(write(tmp_path, ok))
    assert cfg.blocks[1].repeated and cfg.blocks[1].first == 1
    no_i = GOOD.replace("- {name: rest, until: out_relu}",
                        "- {name: 'stage{i}', layers: ['^block_']}")
    with pytest.raises(kerastl.errors.ConfigError, match=r"each\s+contain"):
        zc.load_config_file(write(tmp_path, no_i, "b.yaml"))
    stray = GOOD.replace("- {name: rest, until: out_relu}",
                         "- {name: rest, first: 2, until: out_relu}")
    with pytest.raises(kerastl.errors.ConfigError, match="first number"):
        zc.load_config_file(write(tmp_path, stray, "c.yaml"))


def test_kerashub_entries_parse_and_name_their_architecture():
    entries = kerastl.list_configs("kerashub")
    assert len(entries) >= 8
    for e in entries:
        assert e.preset and e.architecture and e.preprocessing == "builtin"
        assert any(b.repeated for b in e.blocks), e.name
