"""KerasHub presets as a zoo source.

``kerastl.load_backbone("kerashub:dinov2_small")`` loads a KerasHub
(``keras_hub``) preset's vision backbone and gives it what every kerastl
backbone has:

* **the input contract**: RGB in [0, 255]. The preset's own image converter
  (resize to its image size, rescaling, mean/std) is applied inside the model
  (an :class:`~kerastl.preprocessing.ImagePreprocessing` layer with the
  converter's scale and offset, then a ``Resizing`` layer), so ``fit``,
  ``predict`` and exported SavedModels take raw pixels;
* **a block map** from a zoo entry (``zoo_configs/kerashub_*.yaml``). For a
  transformer: ``embed``, one block per encoder layer (``layer0`` ...) and
  ``top``; for a CNN: stem, stages, top.

The KerasHub model is rebuilt as one flat functional graph over copies of
its layers, with the same weights. ViT and DINOv2 keep their encoder layers
inside one container layer; kerastl calls them one by one instead, so each
encoder layer has its own output (a feature endpoint, an LLRD block). A
SigLIP or CLIP preset brings a vision and a text tower: kerastl takes the
vision tower.

Needs the optional extra: ``pip install "kerastl[kerashub]"``.
"""

import difflib
import importlib
import inspect
import os
import socket
import warnings

import keras

from kerastl import _keras_private as _private
from kerastl import blocks as _blocks
from kerastl.errors import KerastlError, UnknownModelError, WeightsError
from kerastl.network import reachable, socket_timeout
from kerastl.preprocessing import ImagePreprocessing, check_input_shape
from kerastl.spec import rules_from_config
from kerastl.zoo.config import KERASHUB_PREFIX, list_configs, zoo_entry
from kerastl.zoo.keras_apps import load_weights_file

INSTALL_HINT = 'pip install "kerastl[kerashub]"  (or: pip install keras-hub)'
# How long kerastl waits for kaggle.com / huggingface.co before saying that
# a remote preset cannot be fetched.
PRESET_TIMEOUT_S = 10
PREFIX = KERASHUB_PREFIX
# The hosts a remote preset comes from (checked before KerasHub downloads).
KAGGLE_URL = "https://www.kaggle.com"
HF_URL = "https://huggingface.co"


def import_keras_hub():
    """``keras_hub``, or a :class:`~kerastl.KerastlError` with the install
    hint."""
    try:
        import keras_hub
    except ImportError as e:
        raise KerastlError(
            f"KerasHub presets need the keras-hub package, which is not "
            f"installed ({e}). Install kerastl's extra: {INSTALL_HINT}.") \
            from None
    return keras_hub


# -- which preset ----------------------------------------------------------


def is_preset_folder(path):
    """Whether ``path`` is a local KerasHub preset folder (``save_to_preset``
    writes ``config.json`` and ``metadata.json``)."""
    path = os.fspath(path)
    return os.path.isdir(path) and os.path.isfile(
        os.path.join(path, "config.json")) and os.path.isfile(
        os.path.join(path, "metadata.json"))


def _entries():
    return list_configs("kerashub")


def _entry_for(spec):
    """The kerashub zoo entry ``spec`` names (with or without the
    ``kerashub_`` prefix, or by its preset name), or None."""
    for candidate in (spec, "kerashub_" + spec):
        try:
            config = zoo_entry(candidate)
        except UnknownModelError:
            continue
        if config.is_kerashub:
            return config
    for config in _entries():
        if config.preset == spec:
            return config
    return None


def builtin_presets():
    """KerasHub's own preset table: name -> kaggle handle ({} where this
    keras-hub version does not have it where kerastl looks)."""
    return _private.keras_hub_builtin_presets()


def resolve(spec):
    """``(preset, zoo entry or None)`` for what the user passed.

    ``spec``: a kerashub zoo entry (or its name), a KerasHub preset name
    (``"dinov2_small"``), a ``kaggle://`` or ``hf://`` handle, or a local
    preset folder.
    """
    if not isinstance(spec, str) and hasattr(spec, "preset"):
        return spec.preset, spec
    spec = os.fspath(spec)
    if spec.startswith(PREFIX):
        spec = spec[len(PREFIX):]
    if spec.startswith("file://"):
        spec = spec[len("file://"):]
    if os.path.isdir(spec):
        if not is_preset_folder(spec):
            raise KerastlError(
                f"{spec!r} is a folder without config.json and metadata.json:"
                " not a KerasHub preset. Pass the folder that "
                "backbone.save_to_preset() wrote (or that kagglehub "
                "downloaded).")
        return spec, None
    if spec.startswith(("kaggle://", "hf://", "modelscope://", "gs://")):
        return spec, None
    config = _entry_for(spec)
    if config is not None:
        return config.preset, config
    import_keras_hub()  # the install hint before "unknown preset"
    presets = builtin_presets()
    if spec in presets:
        return spec, None
    names = [c.name for c in _entries()] + sorted(presets)
    close = difflib.get_close_matches(spec, names, n=3, cutoff=0.5)
    hint = f" Closest: {', '.join(close)}." if close else ""
    raise UnknownModelError(
        f"kerashub:{spec}: no KerasHub zoo entry or preset of that name.{hint}"
        f" Pass a preset name as KerasHub spells it (kerastl zoo list shows "
        f"the entries with block maps), a kaggle:// or hf:// handle, or a "
        f"local preset folder.")


def kaggle_cache(handle):
    """Where kagglehub keeps ``kaggle://owner/model/framework/variation/v``."""
    root = os.environ.get("KAGGLEHUB_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "kagglehub")
    parts = handle[len("kaggle://"):].split("/")
    return os.path.join(root, "models", *parts)


def _check_reachable(preset, timeout):
    """Fails fast, with what to do, when a remote preset cannot be fetched."""
    if os.path.isdir(preset):
        return
    handle = builtin_presets().get(preset, preset)
    if handle.startswith("kaggle://"):
        parts = handle[len("kaggle://"):].split("/")
        if len(parts) == 5 and os.path.isdir(kaggle_cache(handle)):
            return  # cached with its version: no download
        url = KAGGLE_URL
    elif handle.startswith("hf://"):
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true",
                                                            "yes"):
            return  # huggingface_hub reads its cache (or says it is not)
        url = HF_URL
    else:
        return  # gs:// and others: KerasHub's own errors
    try:
        reachable(url, timeout)
    except KerastlError as e:
        raise WeightsError(_offline_message(preset, handle, e)) from None


def _offline_message(preset, handle, error):
    return (
        f"Cannot fetch the KerasHub preset {preset!r} ({handle}): "
        f"{str(error).strip()} To use it offline, save it on a machine with "
        f"internet: `keras_hub.models.Backbone.from_preset({preset!r})"
        f".save_to_preset('my_preset')` and `keras_hub.layers.ImageConverter"
        f".from_preset({preset!r}).save_to_preset('my_preset')`; copy the "
        f"folder my_preset here and pass it: kerastl.load_backbone("
        f"'kerashub:/path/to/my_preset') (kerastl finetune --model "
        f"kerashub:/path/to/my_preset). A kagglehub download folder works "
        f"too. For the architecture with random weights, pass such a "
        f"folder with weights=None and train every block (strategy='full'; "
        f"frozen random blocks learn nothing).")


# -- the families -----------------------------------------------------------


def _one(model, class_name):
    found = [l for l in model.layers if type(l).__name__ == class_name]
    if len(found) != 1:
        raise KerastlError(f"Expected one {class_name} layer in "
                           f"{model.name!r}; found {len(found)}.")
    return found[0]


def _vit_sequence(backbone):
    encoder = _one(backbone, "ViTEncoder")
    return [_one(backbone, "ViTPatchingAndEmbedding"), encoder.dropout,
            *encoder.encoder_layers, encoder.layer_norm]


def _dinov2_sequence(backbone):
    return [backbone.embeddings, *backbone.encoder.layers, backbone.layernorm]


# Transformers whose encoder layers sit inside one container layer: the
# layers to call one after the other instead (same computation).
_SEQUENCES = {"ViTBackbone": _vit_sequence, "DINOV2Backbone": _dinov2_sequence}

# Tokens before the patch tokens in each transformer's output.
_PREFIX_TOKENS = {
    "ViTBackbone": lambda b: int(bool(b.use_class_token)),
    "DINOV2Backbone": lambda b: 1 + int(b.num_register_tokens),
    "CLIPVisionEncoder": lambda b: 1,
    "SigLIPVisionEncoder": lambda b: 0,
}


def _vision_tower(backbone):
    """A vision-language backbone's image tower (SigLIP, CLIP), else itself."""
    return getattr(backbone, "vision_encoder", None) or backbone


def _accepted(cls, config):
    """The part of ``config`` that ``cls.__init__`` accepts."""
    params = inspect.signature(cls.__init__).parameters
    named = {n for n, p in params.items() if p.kind in (
        p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
    return {k: v for k, v in config.items()
            if k in named or k in _BASE_LAYER_KWARGS}


_BASE_LAYER_KWARGS = {"name", "trainable", "dtype", "autocast"}


@keras.saving.register_keras_serializable(package="kerastl")
class KerasHubLayer(keras.layers.Layer):
    """A KerasHub layer whose own config does not rebuild it.

    Some KerasHub layers (ViT's patch embedding and encoder blocks in
    keras-hub 0.32) write constructor arguments into ``get_config`` that
    their constructor refuses, so a model holding them cannot be loaded from
    ``.keras``. This layer holds one, by its registered name (only
    ``keras_hub>`` classes) and the config keys its constructor takes.

    Args:
        class_path: ``"keras_hub.src.models.vit.vit_layers.ViTEncoderBlock"``
            (a class in a ``keras_hub`` module; nothing else is imported).
        layer_config: the wrapped layer's config.
    """

    def __init__(self, class_path, layer_config, **kwargs):
        super().__init__(**kwargs)
        import_keras_hub()
        module, _, class_name = str(class_path).rpartition(".")
        cls = None
        if module.split(".")[0] == "keras_hub":
            cls = getattr(importlib.import_module(module), class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, keras.layers.Layer)):
            raise KerastlError(
                f"KerasHubLayer wraps KerasHub layers only; {class_path!r} "
                "is not one.")
        self.class_path = class_path
        self.layer_config = _accepted(cls, dict(layer_config))
        self.inner = cls(**self.layer_config)

    def build(self, input_shape):
        if not self.inner.built:
            self.inner.build(input_shape)
        self.built = True

    def call(self, inputs):
        return self.inner(inputs)

    def get_config(self):
        config = super().get_config()
        config.update(class_path=self.class_path,
                      layer_config=self.layer_config)
        return config


def _fresh(layer):
    """A new layer with ``layer``'s config (weights are copied after it is
    built), so that it has one node in the new graph."""
    config = layer.get_config()
    try:
        return type(layer).from_config(config)
    except (TypeError, ValueError):
        pass
    cls = type(layer)
    return KerasHubLayer(f"{cls.__module__}.{cls.__qualname__}", config,
                         name=layer.name)


def _rebuild(vision, x):
    """``vision``'s computation on tensor ``x`` over fresh layers, and the
    ``(new, old)`` layer pairs whose weights to copy."""
    sequence = _SEQUENCES.get(type(vision).__name__)
    pairs = []
    if sequence is not None:
        for layer in sequence(vision):
            new = _fresh(layer)
            x = new(x)
            pairs.append((new, layer))
        return x, pairs
    if len(vision.inputs) != 1:
        raise KerastlError(f"{type(vision).__name__} takes "
                           f"{len(vision.inputs)} inputs; kerastl backbones "
                           "take one image input.")
    fresh = {}

    def operation_fn(op):
        if not isinstance(op, keras.layers.Layer):
            return op  # a keras.ops operation: no weights, no name to keep
        if id(op) not in fresh:
            fresh[id(op)] = _fresh(op)
            pairs.append((fresh[id(op)], op))
        return fresh[id(op)]

    outputs = _private.run_graph_with(
        vision, keras.tree.map_structure(lambda _: x, vision.input),
        operation_fn)
    return outputs, pairs


def freeze_unused_variables(model):
    """Marks the variables no fine-tuning gradient reaches as not trainable:
    DINOv2's mask token serves masked-image pretraining only (Keras would
    warn on every fit). A variable's own flag is not saved in ``.keras``,
    so :func:`kerastl.load_model` calls this again."""
    for v in model.weights:
        if v.path.endswith("/mask_token"):
            v.trainable = False


def _converter(keras_hub, preset):
    """The preset's ImageConverter; a preset without one is refused (the
    model would get raw [0, 255] pixels instead of its normalisation)."""
    try:
        return keras_hub.layers.ImageConverter.from_preset(preset)
    except (OSError, socket.timeout) as e:
        if not isinstance(e, FileNotFoundError) and not os.path.isdir(
                preset):
            raise  # offline: load() says what to do
        missing = e
    except Exception as e:  # KerasHub: ValueError for a missing file
        missing = e
    raise KerastlError(
        f"The KerasHub preset {preset!r} has no image converter ({missing}),"
        f" so kerastl cannot apply its input normalisation inside the "
        f"model. Save the converter into the preset folder too: "
        f"`keras_hub.layers.ImageConverter.from_preset(<the original preset "
        f"name>).save_to_preset({preset!r})`.")


def _candidates(config, architecture):
    """The zoo entries whose block rules may describe the model: the named
    entry, else every entry of the same architecture (a local preset
    folder or a bare preset name), in name order."""
    if config is not None:
        return [config]
    return [e for e in _entries() if e.architecture == architecture]


def _fitting_map(model, candidates):
    """``(entry, problems)``: the first candidate whose block map fits
    ``model`` (problems empty), else the first one's problems."""
    first = None
    for entry in candidates:
        _set_rules(model, entry)
        bm = _blocks.block_map(model)
        problems = bm.validate()
        if _blocks.HEAD in bm.names:
            problems.insert(0, "layers match no block: " + ", ".join(
                l.name for l in bm.weighted_layers(_blocks.HEAD)))
        if not problems:
            return entry, []
        first = first or (entry, problems)
    _set_rules(model, None)
    return first or (None, [])


def _set_rules(model, entry):
    """Puts ``entry``'s block rules and name on the model's preprocessing
    layer (where the block map reads them, and where they travel in
    ``.keras``)."""
    layer = model.get_layer("kerastl_preprocessing")
    # (block_map() is keyed on the rules too: the map follows the new ones.)
    layer.block_rules = rules_from_config(entry.blocks) if entry else ()


def load(spec, weights="imagenet", input_shape=None):
    """``load_backbone("kerashub:...")``: see :func:`kerastl.load_backbone`.

    Returns ``(model, zoo entry or None)``; the model takes RGB in
    [0, 255] and carries its block rules.

    ``weights``: ``"imagenet"`` (the default: the preset's own pretrained
    weights, whatever data they come from), ``None`` (the preset's
    architecture, randomly initialised) or a weights file.
    """
    keras_hub = import_keras_hub()
    preset, config = resolve(spec)
    if weights not in ("imagenet", "preset", None) and not isinstance(
            weights, (str, os.PathLike)):
        raise KerastlError(f"weights={weights!r}: expected 'imagenet' (the "
                           "preset's weights), None or a weights file.")
    _check_reachable(preset, PRESET_TIMEOUT_S)
    try:
        with socket_timeout(PRESET_TIMEOUT_S * 3):
            source = keras_hub.models.Backbone.from_preset(
                preset, load_weights=weights in ("imagenet", "preset"))
            converter = _converter(keras_hub, preset)
    except (OSError, socket.timeout) as e:
        raise WeightsError(_offline_message(preset, preset, e)) from None
    except ValueError as e:
        raise KerastlError(
            f"KerasHub could not load the preset {preset!r}: {e}") from None
    vision = _vision_tower(source)
    architecture = type(vision).__name__
    name = config.name if config is not None else os.path.basename(
        os.path.normpath(str(preset))) or vision.name
    size = tuple(converter.image_size) if converter is not None and \
        converter.image_size else None
    fixed = tuple(vision.inputs[0].shape[1:3])
    default = (size or fixed)[0] if (size or fixed)[0] else 224
    shape = check_input_shape(input_shape, name, default,
                               config.min_size if config else 1)
    inputs = keras.Input(shape=shape, name="image")
    prefix = _PREFIX_TOKENS.get(architecture)
    x = ImagePreprocessing(
        "builtin",
        min_size=config.min_size if config else None,
        scale=getattr(converter, "scale", None),
        offset=getattr(converter, "offset", None),
        prefix_tokens=prefix(vision) if prefix else None,
        name="kerastl_preprocessing")(inputs)
    target = size or (fixed if all(fixed) else None)
    if target and tuple(shape[:2]) != tuple(target):
        x = keras.layers.Resizing(
            *target, interpolation=getattr(converter, "interpolation",
                                           "bilinear"),
            crop_to_aspect_ratio=bool(getattr(
                converter, "crop_to_aspect_ratio", False)),
            antialias=bool(getattr(converter, "antialias", False)),
            name="kerastl_resize")(x)
    outputs, pairs = _rebuild(vision, x)
    for new, old in pairs:
        new.set_weights(old.get_weights())
    model = keras.Model(inputs, outputs, name=vision.name)
    freeze_unused_variables(model)
    if isinstance(weights, (str, os.PathLike)) and weights not in (
            "imagenet", "preset"):
        load_weights_file(model, weights, name)
    candidates = _candidates(config, architecture)
    entry, problems = _fitting_map(model, candidates)
    if problems:
        raise KerastlError(
            f"The block map of {entry.name!r} ({entry.path}) does not fit "
            f"the {architecture} that keras-hub {keras_hub.__version__} "
            f"builds from {preset!r}: {'; '.join(problems[:5])}.")
    if config is not None:
        model.get_layer("kerastl_preprocessing").zoo_name = config.name
    if entry is None:
        warnings.warn(
            f"kerastl has no zoo entry for KerasHub's {architecture}: "
            f"{preset!r} gets a structural block map (split where the "
            f"resolution drops). Add a zoo entry (zoo_configs/kerashub_*.yaml"
            f", on KERASTL_ZOO_PATH) to name its blocks.", stacklevel=3)
    return model, config
