"""New classifier heads in place of the source classifier."""

import numbers

import keras
from keras import ops

from kerastl import freezing
from kerastl.blocks import layer_graph, model_input, model_output
from kerastl.errors import KerastlError

POOLINGS = ("avg", "max", "flatten", "cls", "cls_avg")
# Poolings that only a transformer's token sequence has.
TOKEN_POOLINGS = ("cls", "cls_avg")


def _check_num_classes(num_classes, activation="softmax"):
    """``num_classes`` as an int (NumPy integers welcome)."""
    if not isinstance(num_classes, numbers.Integral) or \
            isinstance(num_classes, bool) or num_classes < 1:
        raise KerastlError(
            f"num_classes={num_classes!r}: expected a positive integer (1 "
            "for one sigmoid output, the number of classes otherwise).")
    if num_classes == 1 and activation == "softmax":
        raise KerastlError(
            "num_classes=1 with activation='softmax': a softmax over one "
            "output is always 1.0. For a binary task pass num_classes=1, "
            "activation='sigmoid' (or num_classes=2 with softmax).")
    return int(num_classes)


def pooling_layer(pooling, name):
    """The global pooling layer for ``pooling`` over a feature map
    ``(batch, height, width, channels)``: ``"avg"``, ``"max"`` or
    ``"flatten"`` (see :func:`pool` for token sequences)."""
    if pooling not in POOLINGS:
        raise KerastlError(f"pooling={pooling!r}: expected one of "
                           f"{', '.join(POOLINGS)}.")
    if pooling in TOKEN_POOLINGS:
        raise KerastlError(
            f"pooling={pooling!r} reads a transformer's class token; this "
            "output is a feature map (batch, height, width, channels). Use "
            "'avg', 'max' or 'flatten'.")
    return {"avg": keras.layers.GlobalAveragePooling2D,
            "max": keras.layers.GlobalMaxPooling2D,
            "flatten": keras.layers.Flatten}[pooling](name=name)


@keras.saving.register_keras_serializable(package="kerastl")
class TokenPooling(keras.layers.Layer):
    """Pools a transformer's token sequence ``(batch, tokens, dim)``.

    Args:
        mode: ``"avg"`` (mean of the patch tokens), ``"max"`` (their
            maximum), ``"cls"`` (the class token, the first token) or
            ``"cls_avg"`` (class token and patch-token mean, concatenated:
            the DINOv2 linear-probe features, ``2 * dim`` wide).
        prefix_tokens: how many tokens (class, registers) come before the
            patch tokens; ``avg`` and ``max`` leave them out.
    """

    def __init__(self, mode="avg", prefix_tokens=0, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("avg", "max", "cls", "cls_avg"):
            raise KerastlError(f"TokenPooling mode={mode!r}: expected avg, "
                               "max, cls or cls_avg.")
        if mode in TOKEN_POOLINGS and not prefix_tokens:
            raise KerastlError(
                f"pooling={mode!r}: this transformer has no class token "
                "(SigLIP, for one, has none). Use pooling='avg'.")
        self.mode = mode
        self.prefix_tokens = int(prefix_tokens or 0)

    def call(self, tokens):
        patches = tokens[:, self.prefix_tokens:, :]
        if self.mode == "max":
            return keras.ops.max(patches, axis=1)
        mean = keras.ops.mean(patches, axis=1)
        if self.mode == "avg":
            return mean
        if self.mode == "cls":
            return tokens[:, 0, :]
        return keras.ops.concatenate([tokens[:, 0, :], mean], axis=-1)

    def compute_output_shape(self, input_shape):
        dim = input_shape[-1]
        if self.mode == "cls_avg" and dim is not None:
            dim *= 2
        return (input_shape[0], dim)

    def get_config(self):
        config = super().get_config()
        config.update(mode=self.mode, prefix_tokens=self.prefix_tokens)
        return config


def prefix_tokens(model):
    """The number of tokens before the patch tokens in ``model``'s
    transformer backbone (from its preprocessing layer), or None."""
    for layer, _ in layer_graph(freezing.keras_model_of(model)):
        count = getattr(layer, "prefix_tokens", None)
        if count is not None and not isinstance(layer, TokenPooling):
            return count
    return None


def pool(tensor, pooling, name, model=None):
    """``tensor`` pooled to ``(batch, features)``.

    A feature map ``(batch, h, w, c)`` by :func:`pooling_layer`; a token
    sequence ``(batch, tokens, dim)`` by :class:`TokenPooling` (the number
    of class/register tokens is read from ``model``); a vector as it is.
    """
    if pooling not in POOLINGS:
        raise KerastlError(f"pooling={pooling!r}: expected one of "
                           f"{', '.join(POOLINGS)}.")
    if len(tensor.shape) == 2:
        return tensor
    if len(tensor.shape) == 3 and pooling != "flatten":
        count = prefix_tokens(model) if model is not None else None
        return TokenPooling(pooling, count or 0, name=name)(tensor)
    if len(tensor.shape) == 4:
        return pooling_layer(pooling, name)(tensor)
    return keras.layers.Flatten(name=name)(tensor)


def _seeded(seed, i):
    """Initializer/dropout seed ``i`` of a head built with ``seed``."""
    return None if seed is None else int(seed) * 1000 + i


def mlp(widths, prefix, batchnorm=False, dropout=0.0, seed=None):
    """Hidden head layers: Dense (+ BN) + ReLU (+ Dropout) per width.

    The one builder of hidden layers for every kerastl head (classifier,
    DANN bottleneck and domain discriminator). Layers are named
    ``{prefix}_{i}`` (``_bn``, ``_relu``, ``_dropout`` suffixes). With a
    ``seed`` the initial weights and the dropout masks follow it.
    """
    layers = []
    for i, units in enumerate(widths):
        layers.append(keras.layers.Dense(
            int(units), use_bias=not batchnorm, name=f"{prefix}_{i}",
            kernel_initializer=keras.initializers.GlorotUniform(
                _seeded(seed, i))))
        if batchnorm:
            layers.append(keras.layers.BatchNormalization(
                name=f"{prefix}_{i}_bn"))
        layers.append(keras.layers.ReLU(name=f"{prefix}_{i}_relu"))
        if dropout:
            layers.append(keras.layers.Dropout(
                dropout, name=f"{prefix}_{i}_dropout",
                seed=_seeded(seed, 100 + i)))
    return layers


def output_layer(units, activation="softmax", name="head_predictions",
                 seed=None, **kwargs):
    """The output Dense of every kerastl head.

    float32 keeps softmax/sigmoid stable under mixed precision.
    """
    return keras.layers.Dense(
        units, activation=activation, dtype="float32", name=name,
        kernel_initializer=keras.initializers.GlorotUniform(
            _seeded(seed, 999)), **kwargs)


def build_mlp(layers, d):
    """Builds the layers of :func:`mlp` on ``d`` inputs; returns the width
    of their output."""
    for layer in layers:
        if isinstance(layer, (keras.layers.Dense,
                              keras.layers.BatchNormalization)):
            layer.build((None, d))
        if isinstance(layer, keras.layers.Dense):
            d = layer.units
    return d


def apply(layers, x):
    """``x`` through ``layers`` in order."""
    for layer in layers:
        x = layer(x)
    return x


def apply_frozen(layers, x, training=False):
    """``x`` through ``layers`` with their variables as constants: the
    gradient flows to ``x`` but not to the layers, and BatchNorm moving
    statistics are left as they are (a discriminator's fixed copy, as DANN's
    confusion loss and ADDA's encoder step need)."""
    for layer in layers:
        if not layer.weights:
            x = layer(x, training=training)
            continue
        trainable = [ops.stop_gradient(ops.convert_to_tensor(v))
                     for v in layer.trainable_variables]
        fixed = [ops.convert_to_tensor(v)
                 for v in layer.non_trainable_variables]
        x, _ = layer.stateless_call(trainable, fixed, x, training=training)
    return x


def _check_head(dropout, hidden_units, activation):
    """Refuses head arguments Keras would reject deep inside (or, for a
    string of hidden units, take one character at a time)."""
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) \
            or not 0 <= dropout < 1:
        raise KerastlError(f"dropout={dropout!r}: expected a rate in [0, 1) "
                           "(0: no dropout).")
    if isinstance(hidden_units, numbers.Integral) and \
            not isinstance(hidden_units, bool):
        raise KerastlError(
            f"hidden_units={hidden_units!r}: expected a sequence of layer "
            f"widths; for one layer, ({hidden_units},).")
    if isinstance(hidden_units, (str, bytes)) or not all(
            isinstance(u, numbers.Integral) and not isinstance(u, bool)
            and u >= 1 for u in (hidden_units or ())):
        raise KerastlError(
            f"hidden_units={hidden_units!r}: expected a sequence of layer "
            "widths, e.g. (256,) or (512, 128); () for none.")
    if activation is not None:
        try:
            keras.activations.get(activation)
        except (ValueError, TypeError):
            raise KerastlError(
                f"activation={activation!r}: expected 'softmax' (single "
                "label), 'sigmoid' (multi-label), None (logits) or another "
                "Keras activation name.") from None


def _head(x, num_classes, dropout, hidden_units, activation, seed=None):
    _check_head(dropout, hidden_units, activation)
    # One dropout before each Dense layer of the head: the first here, the
    # others after each hidden layer (mlp's); with hidden layers, not a
    # second one in a row before the output.
    if dropout:
        x = keras.layers.Dropout(dropout, name="head_dropout",
                                 seed=_seeded(seed, 200))(x)
    x = apply(mlp(hidden_units, "head_dense", dropout=dropout, seed=seed), x)
    return output_layer(num_classes, activation, "head_predictions",
                        seed=seed)(x)


def build_classifier(backbone, num_classes, pooling="avg", dropout=0.2,
                     hidden_units=(), activation="softmax", freeze=True,
                     bn="frozen", name=None, seed=None):
    """A new classifier on a backbone: a plain ``keras.Model``.

    Args:
        backbone: a :class:`~kerastl.Backbone` or a ``keras.Model`` whose
            output is a feature map ``(batch, height, width, channels)`` or
            a feature vector ``(batch, features)`` (TF Hub models).
        num_classes: number of outputs.
        pooling: ``"avg"`` (global average), ``"max"`` or ``"flatten"``
            (unused for a feature vector). For a transformer's token
            sequence: ``"avg"`` (mean of the patch tokens), ``"max"``,
            ``"cls"`` (the class token) or ``"cls_avg"`` (both,
            concatenated). See :class:`TokenPooling`.
        dropout: dropout rate before each dense layer of the head (0: none).
        hidden_units: sizes of hidden ReLU layers in the head.
        activation: ``"softmax"`` (single label), ``"sigmoid"`` (multi-label)
            or ``None`` (logits).
        freeze: what is frozen, in any form
            :func:`kerastl.freezing.resolve_trainable` takes: ``True``
            (default: the whole backbone, feature extraction), ``False``
            (nothing), a strategy, a block name or a number of leading
            blocks; ``None`` leaves every layer's ``trainable`` as it is
            (for a :class:`kerastl.TrainingPlan` that :func:`kerastl.fine_tune`
            applies).
        bn: BatchNormalization mode of trainable backbone blocks
            (see :func:`kerastl.freeze`).
        name: the model's name.
        seed: seeds the head's initial weights and dropout (default: drawn
            from Keras' global seed).

    Returns:
        A ``keras.Model`` (images in [0, 255] in, class scores out) whose
        block map is the backbone's plus a ``head`` block.

    Example::

        model = kerastl.build_classifier(backbone, num_classes=5)
        model.compile("adam", "sparse_categorical_crossentropy",
                      metrics=["accuracy"])
    """
    num_classes = _check_num_classes(num_classes, activation)
    model = freezing.keras_model_of(backbone)
    features = model_output(model)
    if len(features.shape) not in (2, 3, 4):
        raise KerastlError(
            f"build_classifier needs a backbone with a spatial output "
            f"(batch, height, width, channels), a token sequence (batch, "
            f"tokens, dim) or a feature vector; {model.name!r} outputs "
            f"{tuple(features.shape)}. Pass the backbone without its "
            "classifier, or replace a classifier with replace_classifier().")
    pooled = pool(features, pooling, "head_pool", model)
    outputs = _head(pooled, num_classes, dropout, hidden_units, activation,
                    seed)
    classifier = keras.Model(model_input(model), outputs,
                             name=name or f"{model.name}_classifier")
    if freeze is not None:
        freezing.apply_trainable(
            classifier, freezing.resolve_trainable(classifier, freeze,
                                                   name="freeze"), bn)
    return classifier


def replace_classifier(model, num_classes, dropout=0.0, hidden_units=(),
                       activation="softmax", name=None):
    """Replaces the source classifier of a full model (``include_top=True``).

    The last ``Dense`` layer is taken as the source classifier: the new head
    reads what it read (for VGG, the pretrained ``fc2`` features). Every
    layer before it keeps its weights and stays trainable; freeze with
    :func:`kerastl.freeze`.

    Returns:
        A new ``keras.Model`` sharing the pretrained layers.
    """
    num_classes = _check_num_classes(num_classes, activation)
    dense = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
    if not dense:
        raise KerastlError(
            f"{model.name!r} has no Dense classifier to replace. For a "
            "backbone without classifier use build_classifier().")
    features = dense[-1].input
    outputs = _head(features, num_classes, dropout, hidden_units, activation)
    return keras.Model(model_input(model), outputs,
                       name=name or f"{model.name}_retargeted")
