"""``Backbone``: a pretrained feature extractor, its block map and its input contract."""

import os
import weakref
import zipfile

import keras
import numpy as np

from kerastl import _keras_private as _private
from kerastl import blocks as _blocks
from kerastl import peft
from kerastl.errors import (BlockError, KerastlError,
                            UnknownModelError)
from kerastl.tfhub import HubLayer
from kerastl.preprocessing import (ImagePreprocessing, check_input_shape,
                                   check_mode)
from kerastl.zoo.config import ZooConfig, list_configs, zoo_entry
from kerastl.zoo import kerashub
from kerastl.zoo.keras_apps import build_application


def _rules_of_saved_zoo_name(layer):
    """Rules for a backbone saved with only its zoo name (older files)."""
    name = getattr(layer, "zoo_name", None)
    if not name or getattr(layer, "block_rules", None):
        return None
    try:
        return zoo_entry(name).blocks
    except UnknownModelError:
        raise BlockError(
            f"The model was saved from the zoo entry {name!r}, which this "
            f"installation does not have, and without its block rules. Put "
            f"the entry's YAML file in a folder on KERASTL_ZOO_PATH, or "
            f"re-save the model with this kerastl version (the rules then "
            f"travel inside it).") from None


_blocks.register_rule_provider(_rules_of_saved_zoo_name)


class Backbone:
    """A ``keras.Model`` without its source classifier, plus its block map.

    Input contract: the model takes RGB images with values in [0, 255]
    (``float32`` or ``uint8``) and applies the source model's own
    preprocessing inside, as its first layer. Never call the Keras
    Applications ``preprocess_input`` on data for a kerastl backbone.

    Attributes:
        model: the ``keras.Model`` (images in, feature map out).
        config: the :class:`~kerastl.zoo.ZooConfig` (None for a user's model).
        preprocessing: the preprocessing mode inside the model.
        removed_top: for a classifier loaded from a ``.keras`` file, the
            names of its classification layers that were left out.
    """

    def __init__(self, model, config=None, preprocessing="builtin"):
        self.model = model
        self.config = config
        self.preprocessing = preprocessing
        self.removed_top = []

    @property
    def name(self):
        return self.config.name if self.config else self.model.name

    @property
    def block_map(self):
        """The :class:`~kerastl.blocks.BlockMap` of :attr:`model`."""
        return _blocks.block_map(self.model)

    @property
    def blocks(self):
        """Block names, input to output."""
        return self.block_map.names

    @property
    def input_shape(self):
        return tuple(self.model.input.shape[1:])

    @property
    def output_shape(self):
        return tuple(self.model.output.shape[1:])

    @property
    def endpoints(self):
        """Named feature endpoints: name to layer name.

        The config's named endpoints (``stride8`` ...) and, for every block,
        the block's name standing for its last layer.
        """
        bm = self.block_map
        out = {b: bm.output_layer(b).name for b in self.blocks
               if bm.has_output(b)}
        if self.config:
            # (an endpoint may name a block: its last layer, e.g. the
            # residual add whose auto-generated name is not stable)
            out.update({e: out.get(target, target) for e, target in
                        self.config.endpoints.items()})
        return out

    def endpoint_layer(self, endpoint):
        """The layer behind an endpoint or block name."""
        endpoints = self.endpoints
        if endpoint in self.block_map:  # explains blocks inside a SavedModel
            return self.block_map.output_layer(endpoint)
        if endpoint not in endpoints:
            raise BlockError(
                f"{self.name} has no endpoint {endpoint!r}; endpoints are "
                f"{', '.join(endpoints)}.")
        target = self.config.endpoints.get(endpoint) if self.config \
            else None
        if target in self.block_map:  # (its last operation: maybe an
            return self.block_map.output_layer(target)  # unnamed add)
        return self.model.get_layer(endpoints[endpoint])

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def block_table(self):
        """One row per block: name, layers, params, output shape."""
        bm = self.block_map
        rows = []
        for b in bm.names:
            # A block inside a Hub SavedModel has no output of its own.
            out = bm.output_layer(b) if bm.has_output(b) else None
            rows.append(dict(
                block=b, layers=len(bm.layers(b)),
                weighted_layers=len(bm.weighted_layers(b)),
                variables=len(bm.variables(b)), params=bm.params(b),
                output_layer=out.name if out else "(inside SavedModel)",
                output_shape=tuple(out.output.shape[1:]) if out else None))
        return rows

    def __repr__(self):
        return (f"<Backbone {self.name}: input {self.input_shape}, "
                f"{len(self.blocks)} blocks {self.blocks}>")


def _normalise_input_shape(config, input_shape):
    return check_input_shape(input_shape, config.name, config.default_size,
                              config.min_size)


def load_backbone(name, weights="imagenet", input_shape=None):
    """Loads a pretrained backbone without its classifier.

    Args:
        name: a zoo name (case-insensitive: ``"resnet50"``, ``"ResNet50"``),
            the path of a user's own ``.keras`` model file (a classifier's
            classification top, its block map's ``head``, is left out: see
            :attr:`Backbone.removed_top`; a Sequential model is rebuilt as
            a functional one over the same layers), or
            ``"hub:<zoo name or handle>"``: a TF Hub image feature-vector
            model (``"hub:mobilenet_v2_100_224"``, a tfhub.dev / Kaggle URL,
            a Kaggle handle or a local SavedModel folder; see
            :func:`kerastl.tfhub.resolve_handle`). Hub zoo entries bring a
            variable-path block map; a bare handle is one block, ``hub``.
            ``"kerashub:<zoo name, preset or handle>"``: a KerasHub preset's
            vision backbone (``"kerashub:dinov2_small"``, a ``kaggle://`` or
            ``hf://`` handle, or a local preset folder, which may also be
            passed without the prefix); needs ``pip install
            "kerastl[kerashub]"``. See :mod:`kerastl.zoo.kerashub`.
        weights: ``"imagenet"`` (downloaded by Keras, or read from the Keras
            cache ``~/.keras/models``; for a KerasHub preset: the preset's
            own weights), ``None`` (random initialisation) or
            the path of a local weights file (``.weights.h5`` written by
            ``save_weights``, or a Keras Applications ``..._notop.h5``).
            A Hub model carries its own weights: leave the default.
        input_shape: ``(height, width, 3)``, ``(height, width)`` or one int;
            default: the size the model was trained at. Dimensions may be
            ``None`` for variable-size inputs.

    Returns:
        A :class:`Backbone` whose model takes RGB images in [0, 255].

    Raises:
        UnknownModelError: ``name`` is not in the zoo (lists close names).
        WeightsError: the weights cannot be downloaded (offline) or loaded.
        InputShapeError: ``input_shape`` is not RGB or below the minimum.

    Example::

        backbone = kerastl.load_backbone("mobilenet_v2", weights=None,
                                         input_shape=(96, 96, 3))
        backbone.blocks[:3]
        # -> ['stem', 'stage1', 'stage2']
    """
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise KerastlError(
            f"weights={weights!r}: expected 'imagenet', None (random) or the "
            "path of a weights file.")
    if isinstance(name, (str, os.PathLike)) and str(name).endswith(".keras"):
        backbone = _load_keras_file(name, weights)
        given = check_input_shape(input_shape, name, None, 1) \
            if input_shape is not None else None
        if given is not None and None not in backbone.input_shape[:2] and \
                tuple(backbone.input_shape[:2]) != given[:2]:
            raise KerastlError(
                f"input_shape={input_shape!r}: {os.fspath(name)!r} takes "
                f"{tuple(backbone.input_shape)}; leave input_shape out (a "
                ".keras file keeps the size it was built with).")
        return backbone
    backbone = _load_source(name, weights, input_shape)
    if weights is None:  # (a Hub model refuses it: it has its own weights)
        _mark_random(backbone)
    return backbone


# Layers a zoo backbone loaded with weights=None initialised at random, with
# a fingerprint of those weights: until something loads or trains other
# weights into them, freezing them trains nothing (fine_tune refuses it).
_RANDOM_INIT = weakref.WeakKeyDictionary()


def _fingerprint(layer):
    return tuple(float(np.sum(np.abs(w))) for w in layer.get_weights())


def _mark_random(backbone):
    for layer, _ in _blocks.layer_graph(backbone.model):
        if any(len(w.shape) >= 2 for w in getattr(layer, "weights", ())):
            _RANDOM_INIT[layer] = (backbone.name, _fingerprint(layer))


def random_weights(layers):
    """The name of the backbone whose random initial weights (``load_backbone
    (..., weights=None)``) some of ``layers`` still hold, or None: those
    layers learnt nothing yet, and frozen they never will. Weights loaded
    or trained into them since clear it."""
    for layer in layers:
        entry = _RANDOM_INIT.get(layer)
        if entry is not None and _fingerprint(layer) == entry[1]:
            return entry[0]
    return None


def _load_source(name, weights, input_shape):
    if isinstance(name, str) and name.startswith("hub:"):
        return _load_hub(name[len("hub:"):], weights, input_shape)
    if isinstance(name, str) and name.startswith(kerashub.PREFIX) or \
            isinstance(name, (str, os.PathLike)) and \
            kerashub.is_preset_folder(name):
        return Backbone(*kerashub.load(name, weights, input_shape),
                        "builtin")
    config = zoo_entry(name)
    if config.is_hub:
        return _load_hub(config, weights, input_shape)
    if config.is_kerashub:
        return Backbone(*kerashub.load(config, weights, input_shape),
                        "builtin")
    shape = _normalise_input_shape(config, input_shape)
    inputs = keras.Input(shape=shape, name="image")
    x = ImagePreprocessing(check_mode(config.preprocessing),
                           zoo_name=config.name, blocks=config.blocks,
                           min_size=config.min_size,
                           name="kerastl_preprocessing")(inputs)
    # The application is built on the preprocessed tensor, so `model` is one
    # flat functional graph from raw pixels to features.
    app = build_application(config, x, shape, weights)
    # Same layers, re-wrapped so that `model.input` is one tensor rather
    # than the one-element list the application keeps.
    model = keras.Model(inputs, app.output, name=app.name)
    bm = _blocks.block_map(model)
    problems = bm.validate()
    if _blocks.HEAD in bm.names:
        problems.insert(0, "layers match no block: " + ", ".join(
            l.name for l in bm.weighted_layers(_blocks.HEAD)))
    names = {l.name for l, _ in _blocks.layer_graph(model)}
    problems += [f"endpoint {e!r} names layer {layer!r}, which the model "
                 "does not have" for e, layer in config.endpoints.items()
                 if layer not in names and layer not in bm.names]
    if problems:
        raise BlockError(
            f"The block map in {config.path} does not fit the model that "
            f"keras {keras.__version__} builds: {'; '.join(problems[:5])}. "
            "The config needs updating for this Keras version.")
    return Backbone(model, config, config.preprocessing)


def _load_hub(spec, weights, input_shape):
    """``load_backbone("hub:...")``: a HubLayer behind kerastl preprocessing.

    ``spec`` is a zoo config, a zoo name (``hub_`` may be left out) or a
    handle. A bare handle follows the TF Hub image convention (RGB in
    [0, 1], 224x224 unless ``input_shape`` says otherwise) and is one block.
    """

    if weights != "imagenet":
        raise KerastlError(
            f"weights={weights!r}: a TF Hub model carries its own weights; "
            "leave weights at its default.")
    config = spec if isinstance(spec, ZooConfig) else _hub_config(spec)
    if config is not None:
        handle, blocks, hub_args = config.handle, config.blocks, config.hub
        mode, shape = config.preprocessing, _normalise_input_shape(
            config, input_shape)
        name = config.name
    else:
        handle, blocks, hub_args, mode = spec, {"hub": ""}, {}, "unit"
        shape = check_input_shape(input_shape, spec, 224, 1)
        name = None
    inputs = keras.Input(shape=shape, name="image")
    # (min_size: images smaller than the entry takes are refused when the
    # model is called, as for Keras Applications)
    x = ImagePreprocessing(
        mode, zoo_name=name, name="kerastl_preprocessing",
        min_size=getattr(config, "min_size", None))(inputs)
    layer = HubLayer(handle, trainable=True, blocks=blocks, name="hub",
                     **hub_args)
    model = keras.Model(inputs, layer(x), name=name or "hub_backbone")
    bm = _blocks.block_map(model)
    problems = bm.validate()
    size = model.output.shape[-1]
    if config is not None and size != config.output_size:
        problems.append(f"the SavedModel outputs {size} features, the "
                        f"config says {config.output_size}")
    if problems:
        raise BlockError(
            f"The variable-path block map of {name or handle!r} does not fit "
            f"the SavedModel at {handle!r}: {'; '.join(problems[:5])}. "
            f"Its variables are: {', '.join(layer.variable_names()[:8])}...")
    return Backbone(model, config, mode)


def _hub_config(spec):
    """The Hub zoo config ``spec`` names (with or without ``hub_``), or None."""

    looks_like_name = "/" not in spec and ":" not in spec \
        and not os.path.exists(spec)
    if not looks_like_name:
        return None
    for candidate in (spec, "hub_" + spec):
        try:
            config = zoo_entry(candidate)
        except UnknownModelError:
            continue
        if config.is_hub:
            return config

    raise UnknownModelError(
        f"hub:{spec}: no TF Hub zoo entry of that name. Hub entries: "
        f"{', '.join(c.name for c in list_configs('tfhub'))}; or pass a "
        "handle (URL, Kaggle handle or SavedModel folder).")


def read_keras_file(path, **kwargs):
    """``keras.models.load_model(path, **kwargs)``, with a file that is not
    a readable ``.keras`` archive reported as such (Keras says "File not
    found" about a file that exists but is not a zip archive)."""
    shown = os.fspath(path)
    if not os.path.isfile(shown):
        raise KerastlError(f"Model file {shown!r} does not exist.")
    if not zipfile.is_zipfile(shown):
        raise KerastlError(
            f"{shown!r} is not a .keras model file (a .keras file is a zip "
            "archive written by model.save()); it may be truncated, or "
            "another format (.h5, a SavedModel folder).")
    try:
        state = peft.read_state(shown)  # what kerastl.save_model added
        done = []

        def restore(model):
            restore_trainable(model)
            if state is not None:
                peft.restore_structure(model, state, shown)
            done.append(model)

        with _private.before_compile_from_config(restore):
            model = keras.models.load_model(shown, **kwargs)
        if not done:  # compile=False, or no compile config saved
            restore(model)
        if state is not None:
            peft.restore_values(model, state)
        return model
    except KerastlError:
        raise
    except (ValueError, OSError, KeyError, TypeError,
            zipfile.BadZipFile) as e:
        raise KerastlError(
            f"Keras could not load {shown!r} ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]}). If it was saved with "
            "kerastl layers in another version, or with custom layers, load "
            "it where those classes are importable.") from None


def restore_trainable(model):
    """Gives a loaded model back the trainable flags it was saved with.

    Keras rebuilds a layer saved with ``trainable=False`` with that flag,
    but the sublayers such a layer creates in its constructor (KerasHub's
    transformer blocks, attention layers, embeddings) come back trainable,
    and so do their variables; a flag set on one variable is not saved at
    all. The loaded model would then train frozen blocks, and its optimizer
    would be built for more variables than the saved one (Keras skips the
    saved optimizer state with a warning). Setting each frozen layer's flag
    again reaches its sublayers; kerastl's own variable-level rules are
    applied again. Runs before the optimizer is built.
    """
    for layer in _private.all_sublayers(model):
        if not layer.trainable:
            # Through True: on the TensorFlow backend, assigning the value an
            # attribute already has is skipped before Keras's setter runs.
            layer.trainable = True
            layer.trainable = False
    kerashub.freeze_unused_variables(model)


def _load_keras_file(path, weights):
    if weights not in (None, "imagenet"):
        raise KerastlError(
            "weights= applies to zoo models; a .keras file carries its own "
            "weights. Pass weights=None.")
    model = read_keras_file(path)
    model, removed = _without_classifier(model)
    backbone = Backbone(model, None, "builtin")
    backbone.removed_top = removed
    return backbone


def _without_classifier(model):
    """The feature part of a saved model, as a functional model.

    The classification top of a classifier is its block map's ``head``
    (kerastl's head, or a plain model's Dense layers after its last
    feature block); the model is cut at the last spatial (4-D) output
    before it, so that weightless pooling or dropout of the old top does
    not stay behind either. A Sequential model is rebuilt as a functional
    one over the same layers. Returns the model and the names of the layers
    left out (none for a backbone).
    """
    bm = _blocks.block_map(model)
    has_top = bool(bm.head_blocks and bm.base_blocks and
                   bm.has_output(bm.base_blocks[-1]))
    if isinstance(model, keras.Sequential):
        layers = list(model.layers)
        if has_top:
            layers = layers[:layers.index(
                bm.output_layer(bm.base_blocks[-1])) + 1]
            shape = (None,) + tuple(model.inputs[0].shape[1:]) \
                if model.inputs else model.input_shape
            shapes = []
            for layer in layers:
                shape = layer.compute_output_shape(shape)
                shapes.append(shape)
            while len(layers) > 1 and not layers[-1].weights and \
                    len(shapes[-1]) != 4:
                layers, shapes = layers[:-1], shapes[:-1]
        inputs = keras.Input(model.inputs[0].shape[1:] if model.inputs else
                             model.input_shape[1:], name="image")
        x = inputs
        for layer in layers:
            # A copy with the same weights: a layer called in two graphs
            # has no single ``output`` for block maps to use.
            copy = layer.__class__.from_config(layer.get_config())
            x = copy(x)
            copy.set_weights(layer.get_weights())
        kept = keras.Model(inputs, x, name=model.name)
    else:
        if not has_top:
            return model, []
        cut = bm.output_layer(bm.base_blocks[-1])
        while not cut.weights and len(cut.output.shape) != 4 and \
                not isinstance(cut, keras.layers.InputLayer):
            cut = _private.producing_operation(cut.input)
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        kept = keras.Model(inputs, cut.output,
                           name=f"{model.name}_features")
    kept_names = {l.name for l in kept.layers}
    removed = [l.name for l in model.layers if l.name not in kept_names and
               not isinstance(l, keras.layers.InputLayer)]
    return kept, removed
