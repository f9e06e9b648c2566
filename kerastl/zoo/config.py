"""Zoo configs: YAML data files that describe each backbone.

A config is data, never code: it is read with ``yaml.safe_load`` (bounded: see ``kerastl._yaml``), checked
against a schema (errors name the file and the key), and its constructor is
looked up in an allow-list of ``keras.applications`` names, so a config can
never make kerastl import or call anything else.

Configs are found in the ``zoo_configs`` folder installed with kerastl and in
every folder listed in the ``KERASTL_ZOO_PATH`` environment variable
(``os.pathsep``-separated); a user's config may not take the name of a
packaged one (it is refused, naming both files: docs/zoo.md).
"""

import dataclasses
import difflib
import os
import re
from pathlib import Path

from kerastl import _yaml

from kerastl.errors import ConfigError, KerastlError, UnknownModelError
from kerastl.spec import KAGGLE_HANDLE, BlockRule
from kerastl.spec import PREPROCESSING_MODES as MODES

# Every constructor in Keras 3's keras.applications. A config may name only
# these; nothing else is ever resolved from a config.
KERAS_APPLICATIONS = frozenset({
    "ConvNeXtTiny", "ConvNeXtSmall", "ConvNeXtBase", "ConvNeXtLarge",
    "ConvNeXtXLarge", "DenseNet121", "DenseNet169", "DenseNet201",
    "EfficientNetB0", "EfficientNetB1", "EfficientNetB2", "EfficientNetB3",
    "EfficientNetB4", "EfficientNetB5", "EfficientNetB6", "EfficientNetB7",
    "EfficientNetV2B0", "EfficientNetV2B1", "EfficientNetV2B2",
    "EfficientNetV2B3", "EfficientNetV2S", "EfficientNetV2M",
    "EfficientNetV2L", "InceptionResNetV2", "InceptionV3", "MobileNet",
    "MobileNetV2", "MobileNetV3Small", "MobileNetV3Large", "NASNetMobile",
    "NASNetLarge", "ResNet50", "ResNet101", "ResNet152", "ResNet50V2",
    "ResNet101V2", "ResNet152V2", "VGG16", "VGG19", "Xception",
})

SOURCES = ("keras.applications", "tfhub", "kerashub")
_HUB_KEYS = {"signature", "output_key", "tags"}

# Arguments that kerastl itself sets; a config may not override them.
_RESERVED_ARGS = frozenset({
    "include_top", "weights", "input_tensor", "input_shape", "pooling",
    "classes", "classifier_activation", "name"})

_TOP_KEYS = {
    "name": True, "source": True, "constructor": False, "input": True,
    "preprocessing": True, "blocks": True, "aliases": False,
    "constructor_args": False, "endpoints": False, "reference": False,
    "description": False, "handle": False, "output_size": False,
    "hub": False, "preset": False, "architecture": False,
}
_REFERENCE_KEYS = {"params", "top1", "top5", "size_mb", "depth", "source"}


@dataclasses.dataclass(frozen=True)
class ZooConfig:
    """One zoo entry, as read from its YAML file.

    Attributes:
        name: canonical name (``mobilenet_v2``).
        source: where the model comes from: ``keras.applications`` or
            ``tfhub`` (a TF Hub SavedModel).
        constructor: the ``keras.applications`` constructor name.
        handle: (tfhub) the TF Hub handle of the SavedModel.
        output_size: (tfhub) the length of the feature vector.
        hub: (tfhub) ``signature``, ``output_key`` and ``tags`` for
            :class:`~kerastl.HubLayer`, where the default call does not do.
        preset: (kerashub) the KerasHub preset: a preset name as KerasHub
            spells it, a ``kaggle://`` or ``hf://`` handle.
        architecture: (kerashub) the KerasHub class whose layers the blocks
            name (``ViTBackbone``); a local preset folder of that class
            gets this entry's blocks.
        constructor_args: extra scalar keyword arguments for it.
        default_size: the input size the weights were trained at.
        min_size: the smallest input size kerastl accepts.
        preprocessing: ``caffe``, ``tf``, ``torch`` or ``builtin``.
        blocks: the ordered :class:`~kerastl.blocks.BlockRule` list.
        endpoints: named feature endpoints, name to layer name (or block
            name: the block's last layer).
        reference: facts from the Keras Applications table.
        path: the file it was read from.
    """

    name: str
    source: str
    constructor: str
    default_size: int
    min_size: int
    preprocessing: str
    blocks: tuple
    aliases: tuple = ()
    constructor_args: dict = dataclasses.field(default_factory=dict)
    endpoints: dict = dataclasses.field(default_factory=dict)
    reference: dict = dataclasses.field(default_factory=dict)
    description: str = ""
    path: str = ""
    handle: str = ""
    output_size: int = None
    hub: dict = dataclasses.field(default_factory=dict)
    preset: str = ""
    architecture: str = ""

    @property
    def is_hub(self):
        return self.source == "tfhub"

    @property
    def is_kerashub(self):
        return self.source == "kerashub"

    @property
    def block_names(self):
        return [b.name for b in self.blocks]


def _fail(path, key, message):
    raise ConfigError(f"{path}: key '{key}': {message}")


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _expect(path, key, value, types, what):
    if not isinstance(value, types) or isinstance(value, bool) and bool not in (
            types if isinstance(types, tuple) else (types,)):
        _fail(path, key, f"expected {what}, got {type(value).__name__} "
                         f"{_yaml.short(value)}")
    return value


def _regex(path, key, pattern):
    _expect(path, key, pattern, str, "a regex string")
    try:
        re.compile(pattern)
    except re.error as e:
        _fail(path, key, f"invalid regex {pattern!r}: {e}")
    return pattern


def parse_config(data, path="<config>"):
    """Validates a config mapping (as loaded from YAML) into a ZooConfig."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping at the top level, got "
            f"{type(data).__name__}.")
    for key in data:
        if key not in _TOP_KEYS:
            close = difflib.get_close_matches(str(key), list(_TOP_KEYS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            _fail(path, key, f"unknown key{hint}; known keys: "
                             f"{', '.join(_TOP_KEYS)}")
    for key, required in _TOP_KEYS.items():
        if required and key not in data:
            _fail(path, key, "required key is missing")

    name = _expect(path, "name", data["name"], str, "a string")
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name):
        _fail(path, "name", f"{name!r} must be lowercase letters, digits, "
                            "'_', '-' or '.'")
    source = data["source"]
    if source not in SOURCES:
        _fail(path, "source", f"{source!r} is not one of {', '.join(SOURCES)}")
    hub_only = ("handle", "output_size", "hub")
    if source == "kerashub":
        return _parse_kerashub_config(data, path, name)
    for key in ("preset", "architecture"):
        if key in data:
            _fail(path, key, f"applies only to source: kerashub, not {source}")
    if source == "tfhub":
        for key in ("handle", "output_size"):
            if key not in data:
                _fail(path, key, "required key is missing (source: tfhub)")
        for key in ("constructor", "constructor_args", "endpoints"):
            if key in data:
                _fail(path, key, "does not apply to source: tfhub (a Hub "
                                 "SavedModel exposes only its final output)")
        return _parse_hub_config(data, path, name)
    for key in hub_only:
        if key in data:
            _fail(path, key, f"applies only to source: tfhub, not {source}")
    if "constructor" not in data:
        _fail(path, "constructor", "required key is missing")
    constructor = _expect(path, "constructor", data["constructor"], str,
                          "a string")
    if constructor not in KERAS_APPLICATIONS:
        close = difflib.get_close_matches(constructor, KERAS_APPLICATIONS, n=3)
        _fail(path, "constructor",
              f"{constructor!r} is not an allow-listed keras.applications "
              f"constructor (closest: {', '.join(close) or 'none'}); a config "
              "can only name one of the 40 Keras Applications models")

    args = data.get("constructor_args") or {}
    _expect(path, "constructor_args", args, dict, "a mapping")
    for k, v in args.items():
        if k in _RESERVED_ARGS:
            _fail(path, f"constructor_args.{k}", "is set by kerastl and may "
                                                 "not appear in a config")
        _expect(path, f"constructor_args.{k}", v, (int, float, str, bool),
                "a scalar (number, string or boolean)")

    default_size, min_size, preprocessing, blocks = _parse_common(
        data, path, variables=False)

    endpoints = data.get("endpoints") or {}
    _expect(path, "endpoints", endpoints, dict, "a mapping")
    for k, v in endpoints.items():
        _expect(path, f"endpoints.{k}", v, str, "a layer or block name")

    return ZooConfig(
        name=name, source=source, constructor=constructor,
        constructor_args=dict(args), default_size=default_size,
        min_size=min_size, preprocessing=preprocessing, blocks=tuple(blocks),
        endpoints=dict(endpoints), path=str(path), **_parse_extras(data, path))


def _parse_extras(data, path):
    reference = data.get("reference") or {}
    _expect(path, "reference", reference, dict, "a mapping")
    for k, v in reference.items():
        if k not in _REFERENCE_KEYS:
            _fail(path, f"reference.{k}", "unknown key; expected "
                                          f"{', '.join(sorted(_REFERENCE_KEYS))}")
        if k == "source":
            _expect(path, f"reference.{k}", v, str, "a string")
        elif k in ("top1", "top5"):
            if not _number(v) or not 0 <= v <= 1:
                _fail(path, f"reference.{k}", f"expected an accuracy in "
                                              f"[0, 1], got {_yaml.short(v)}")
        elif not _number(v) or v < 0:
            _fail(path, f"reference.{k}", f"expected a number >= 0, got "
                                          f"{_yaml.short(v)}")

    aliases = data.get("aliases") or []
    _expect(path, "aliases", aliases, list, "a list of strings")
    for j, a in enumerate(aliases):
        _expect(path, f"aliases[{j}]", a, str, "a string")
    return dict(
        aliases=tuple(aliases), reference=dict(reference),
        description=_expect(path, "description", data.get("description", ""),
                            str, "a string"))


def _parse_hub_config(data, path, name):
    """The ``source: tfhub`` part of :func:`parse_config`."""
    handle = _expect(path, "handle", data["handle"], str, "a string")
    if not (handle.startswith(("https://", "gs://"))
            or KAGGLE_HANDLE.match(handle)):
        _fail(path, "handle", f"{handle!r} is not an https:// or gs:// URL "
                              "or a Kaggle handle owner/model/framework/"
                              "variation")
    output_size = _expect(path, "output_size", data["output_size"], int,
                          "an integer")
    hub = data.get("hub") or {}
    _expect(path, "hub", hub, dict, "a mapping")
    for k, v in hub.items():
        if k not in _HUB_KEYS:
            _fail(path, f"hub.{k}", "unknown key; expected "
                                    f"{', '.join(sorted(_HUB_KEYS))}")
        if k == "tags":
            _expect(path, "hub.tags", v, list, "a list of strings")
        else:
            _expect(path, f"hub.{k}", v, str, "a string")
    default_size, min_size, preprocessing, blocks = _parse_common(
        data, path, variables=True)
    return ZooConfig(
        name=name, source="tfhub", constructor="", default_size=default_size,
        min_size=min_size, preprocessing=preprocessing, blocks=tuple(blocks),
        path=str(path), handle=handle, output_size=output_size, hub=dict(hub),
        **_parse_extras(data, path))


def _parse_kerashub_config(data, path, name):
    """The ``source: kerashub`` part of :func:`parse_config`."""
    for key in ("preset", "architecture"):
        if key not in data:
            _fail(path, key, "required key is missing (source: kerashub)")
    for key in ("constructor", "constructor_args", "handle", "hub"):
        if key in data:
            _fail(path, key, "does not apply to source: kerashub")
    preset = _expect(path, "preset", data["preset"], str, "a string")
    architecture = _expect(path, "architecture", data["architecture"], str,
                           "a string")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", architecture):
        _fail(path, "architecture", f"{architecture!r} is not a KerasHub "
                                    "class name (e.g. ViTBackbone)")
    output_size = data.get("output_size")
    if output_size is not None:
        _expect(path, "output_size", output_size, int, "an integer")
    default_size, min_size, preprocessing, blocks = _parse_common(
        data, path, variables=False)
    if preprocessing != "builtin":
        _fail(path, "preprocessing", "must be builtin for source: kerashub "
                                     "(the preset's own image converter)")
    endpoints = data.get("endpoints") or {}
    _expect(path, "endpoints", endpoints, dict, "a mapping")
    return ZooConfig(
        name=name, source="kerashub", constructor="",
        default_size=default_size, min_size=min_size,
        preprocessing=preprocessing, blocks=tuple(blocks),
        endpoints=dict(endpoints), path=str(path), output_size=output_size,
        preset=preset, architecture=architecture, **_parse_extras(data, path))


def _parse_common(data, path, variables):
    """input, preprocessing and blocks (layer or variable-path rules)."""
    inp = _expect(path, "input", data["input"], dict, "a mapping")
    for k in inp:
        if k not in ("default_size", "min_size"):
            _fail(path, f"input.{k}", "unknown key; expected default_size "
                                      "and min_size")
    default_size = _expect(path, "input.default_size", inp.get("default_size"),
                           int, "an integer")
    min_size = _expect(path, "input.min_size", inp.get("min_size"), int,
                       "an integer")
    if not 0 < min_size <= default_size:
        _fail(path, "input.min_size", f"{min_size} must be positive and at "
                                      f"most default_size ({default_size})")

    preprocessing = data["preprocessing"]
    if preprocessing not in MODES:
        _fail(path, "preprocessing", f"{preprocessing!r} is not one of "
                                     f"{', '.join(MODES)}")

    blocks_data = _expect(path, "blocks", data["blocks"], list, "a list")
    if not blocks_data:
        _fail(path, "blocks", "at least one block is required")
    blocks, seen = [], set()
    for i, b in enumerate(blocks_data):
        key = f"blocks[{i}]"
        _expect(path, key, b, dict, "a mapping with 'name' and one of "
                                    "'layers', 'until', 'before'")
        allowed = ("variables",) if variables else ("layers", "until",
                                                    "before")
        for k in b:
            if k not in ("name", "first") and k not in allowed:
                _fail(path, f"{key}.{k}", "unknown key; expected name and "
                                          f"{' or '.join(allowed)}"
                      + (" (source: tfhub blocks are regexes over variable "
                         "paths)" if variables else ""))
        bname = _expect(path, f"{key}.name", b.get("name"), str, "a string")
        if bname in seen:
            _fail(path, f"{key}.name", f"block {bname!r} appears twice")
        seen.add(bname)
        if "first" in b and "{i}" not in bname:
            _fail(path, f"{key}.first", "only a repeated block ('{i}' in "
                  "its name) has a first number")
        selectors = [k for k in allowed if k in b]
        if len(selectors) != 1:
            _fail(path, key, f"needs exactly one of {', '.join(allowed)} "
                             f"(found: {selectors or 'none'})")
        if selectors[0] in ("layers", "variables"):
            sel = selectors[0]
            pats = b[sel]
            if isinstance(pats, str):
                pats = [pats]
            _expect(path, f"{key}.{sel}", pats, list, "a list of regexes")
            pats = [_regex(path, f"{key}.{sel}[{j}]", p)
                    for j, p in enumerate(pats)]
            first = b.get("first", 0)
            if "{i}" in bname:
                _expect(path, f"{key}.first", first, int, "an integer")
                if sel != "layers" or not all("{i}" in p for p in pats):
                    _fail(path, f"{key}.{sel}", "a repeated block ('{i}' in "
                          "its name) needs 'layers' regexes that each "
                          "contain '{i}'")
            blocks.append(BlockRule(bname, first=first, **{sel: pats}))
        else:
            sel = selectors[0]
            anchor = _expect(path, f"{key}.{sel}", b[sel], str, "a layer name")
            blocks.append(BlockRule(bname, **{sel: anchor}))

    return default_size, min_size, preprocessing, blocks


def load_config_file(path):
    """Reads and validates one YAML zoo config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config: {e}") from None
    return parse_config(_yaml.load(text, str(path)), path)


# --------------------------------------------------------------------------
# The registry.
# --------------------------------------------------------------------------


def _key(name):
    """Lookup key: case-insensitive, ignoring '_', '-', '.' and spaces."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _user_dirs():
    extra = os.environ.get("KERASTL_ZOO_PATH", "")
    return [Path(p) for p in extra.split(os.pathsep) if p]


def config_dirs():
    """Folders searched for configs: the packaged zoo, then the user's."""
    dirs = [Path(__file__).resolve().parent.parent / "zoo_configs"]
    # A source checkout keeps the configs at the repository root.
    dirs.append(Path(__file__).resolve().parents[2] / "zoo_configs")
    dirs.extend(_user_dirs())
    seen, out = set(), []
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


_REGISTRY = {}


def _registry():
    dirs = tuple(config_dirs())
    state = tuple((str(d), tuple(sorted(os.listdir(d)))) for d in dirs)
    if _REGISTRY.get("state") != state:
        user = {d.resolve() for d in _user_dirs() if d.is_dir()}
        configs, files, keys = {}, {}, {}
        for d in dirs:
            for f in sorted(d.glob("*.yaml")):
                cfg = load_config_file(f)
                if d.resolve() in user:
                    _check_no_collision(cfg, f, configs, files, keys)
                configs[cfg.name] = cfg
                files[cfg.name] = f
                # Names and aliases are the entry's own; a constructor
                # (MobileNetV2) names the first entry that uses it, the
                # packaged one before a user's variant of it.
                for k in (cfg.name, *cfg.aliases):
                    keys[_key(k)] = cfg.name
                if cfg.constructor:
                    keys.setdefault(_key(cfg.constructor), cfg.name)
        _REGISTRY.update(state=state, configs=configs, keys=keys)
    return _REGISTRY["configs"], _REGISTRY["keys"]


def _check_no_collision(cfg, path, configs, files, keys):
    """A user entry may not take a name another entry answers to."""
    for k in (cfg.name, *cfg.aliases):
        other = keys.get(_key(k))
        if other is not None:
            raise ConfigError(
                f"{path}: the name {k!r} is already taken by the zoo entry "
                f"{other!r} ({files[other]}); a user entry cannot replace "
                "another model. Give yours a name of its own.")


def list_configs(source=None):
    """All zoo configs, sorted by name; ``source`` filters
    (``"keras.applications"``, ``"tfhub"`` or ``"kerashub"``)."""
    if source is not None and source not in SOURCES:
        raise ConfigError(f"source={source!r}: expected one of "
                          f"{', '.join(SOURCES)}.")
    configs, _ = _registry()
    return [configs[n] for n in sorted(configs)
            if source is None or configs[n].source == source]


# How a KerasHub preset is named where a zoo name could stand.
KERASHUB_PREFIX = "kerashub:"


def check_model_reference(model, is_model_folder=os.path.isdir):
    """Checks a model reference as far as it can without Keras: a
    ``.keras`` file exists, a zoo name is known (close names suggested).
    ``hub:`` and ``kerashub:`` references and folders that
    ``is_model_folder`` accepts pass: they are checked when loaded.

    Raises:
        KerastlError: a missing ``.keras`` file.
        UnknownModelError: an unknown zoo name.
    """
    if model.endswith(".keras"):
        if not os.path.isfile(model):
            raise KerastlError(f"Model file {model!r} does not exist.")
    elif not model.startswith(("hub:", KERASHUB_PREFIX)) and \
            not is_model_folder(model):
        zoo_entry(model)


def zoo_entry(name):
    """The :class:`ZooConfig` for ``name`` (case-insensitive).

    ``mobilenet_v2``, ``MobileNetV2`` and ``mobilenetv2`` all name the same
    entry.

    Raises:
        UnknownModelError: listing the closest known names.
    """
    configs, keys = _registry()
    if isinstance(name, ZooConfig):
        return name
    found = keys.get(_key(name))
    if found is None:
        by_key = {}
        for k, canonical in keys.items():
            by_key.setdefault(k, canonical)
        close = difflib.get_close_matches(_key(name), list(by_key), n=5,
                                          cutoff=0.5)
        names = list(dict.fromkeys(by_key[k] for k in close))[:3]
        hint = (f" Closest names: {', '.join(names)}." if names else "")
        raise UnknownModelError(
            f"Unknown model {name!r}.{hint} Run `kerastl zoo list` for all "
            f"{len(configs)} names.")
    return configs[found]
