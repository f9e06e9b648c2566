"""The uniform input contract: RGB images with values in [0, 255].

Keras Applications models disagree on what they expect (``caffe``: BGR with
the ImageNet mean subtracted; ``tf``: [-1, 1]; ``torch``: [0, 1] normalised
by the ImageNet mean and std; EfficientNet, EfficientNetV2, ConvNeXt and
MobileNetV3 normalise inside the model). kerastl puts the right conversion
*inside* every backbone as an :class:`ImagePreprocessing` layer, so that
``fit``, ``predict`` and exported SavedModels all take the same raw pixels.
"""

import numbers

import keras
from keras import ops

from kerastl.errors import ConfigError, InputShapeError
from kerastl.spec import PREPROCESSING_MODES as MODES
from kerastl.spec import rules_from_config, rules_to_config


_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


def check_mode(mode):
    """Returns ``mode`` if it is a known preprocessing mode, else raises."""
    if mode not in MODES:
        raise ConfigError(
            f"Unknown preprocessing mode {mode!r}; expected one of "
            f"{', '.join(MODES)}.")
    return mode


def _per_channel(value):
    """``scale``/``offset``: None, a float, or a list of 3 floats."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    values = [float(v) for v in value]
    if len(values) == 1:
        return values[0]
    if len(values) != 3:
        raise ConfigError(f"A per-channel scale or offset needs 1 or 3 "
                          f"values; got {value!r}.")
    return values


@keras.saving.register_keras_serializable(package="kerastl")
class ImagePreprocessing(keras.layers.Layer):
    """Maps RGB images in [0, 255] to what a pretrained model expects.

    Args:
        mode: ``"caffe"`` (RGB to BGR, minus the ImageNet mean),
            ``"tf"`` (scale to [-1, 1]), ``"torch"`` (scale to [0, 1], then
            ImageNet mean/std), ``"unit"`` (scale to [0, 1]: the TF Hub
            image convention) or ``"builtin"`` (identity: the model
            normalises inside).
        zoo_name: the zoo entry this backbone came from (for messages and
            summaries).
        blocks: the backbone's block rules (:class:`~kerastl.blocks.
            BlockRule` objects or their configs). Stored in the layer's
            config, so a saved and re-loaded model has the same block map
            without the zoo entry that made it.
        min_size: the smallest height and width the model takes. Images
            with known smaller sides, other than 3 channels, or of a
            non-numeric dtype are refused with an
            :class:`~kerastl.errors.InputShapeError` that says how to fix them
            (Keras itself checks fixed input shapes first).
        scale, offset: ``x * scale + offset`` after ``mode`` (a number or
            one per channel): a KerasHub preset's image converter
            (``builtin`` mode, so that its own rescaling and mean/std apply).
        prefix_tokens: for a transformer backbone, how many tokens (class
            and register tokens) come before the patch tokens in its output;
            token pooling reads it (see :class:`kerastl.heads.TokenPooling`).

    Example::

        layer = ImagePreprocessing("tf")
        float(layer(keras.ops.full((1, 2, 2, 3), 255.0))[0, 0, 0, 0])
        # -> 1.0
    """

    def __init__(self, mode, zoo_name=None, blocks=None, min_size=None,
                 scale=None, offset=None, prefix_tokens=None, **kwargs):
        # Preprocessing is cheap and numerically touchy (caffe means in
        # float16 lose a unit): it always runs in float32.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.mode = check_mode(mode)
        self.zoo_name = zoo_name
        self.block_rules = rules_from_config(blocks)
        self.min_size = None if min_size is None else int(min_size)
        self.scale = _per_channel(scale)
        self.offset = _per_channel(offset)
        self.prefix_tokens = None if prefix_tokens is None else int(
            prefix_tokens)

    def _check(self, inputs):
        """Refuses images the model cannot take, when their shape and dtype
        are known (eager calls, or traced with a concrete shape)."""
        what = self.zoo_name or "this model"
        shape = tuple(inputs.shape)
        dtype = str(getattr(inputs, "dtype", "float32"))
        if not any(k in dtype for k in ("float", "int", "bfloat")):
            raise InputShapeError(
                f"{what} takes RGB images as numbers in [0, 255] (float32 "
                f"or uint8); got dtype {dtype}. Decode files first (e.g. "
                "keras.utils.load_img, tf.io.decode_image).")
        if len(shape) != 4 or shape[-1] not in (None, 3):
            raise InputShapeError(
                f"{what} takes RGB images of shape (batch, height, width, 3);"
                f" got {shape}. Convert greyscale or RGBA images to RGB "
                "(e.g. np.repeat for greyscale, drop the alpha channel).")
        small = [d for d in shape[1:3] if d is not None and self.min_size
                 and d < self.min_size]
        if small:
            raise InputShapeError(
                f"{what} takes images of at least {self.min_size}x"
                f"{self.min_size} pixels; got {shape[1]}x{shape[2]}. Resize "
                f"them up (keras.layers.Resizing({self.min_size}, "
                f"{self.min_size}) or tf.image.resize).")

    def call(self, inputs):
        self._check(inputs)
        x = ops.cast(inputs, "float32")
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_MEAN_BGR)
        elif self.mode == "tf":
            x = x / 127.5 - 1.0
        elif self.mode == "unit":
            x = x / 255.0
        elif self.mode == "torch":
            x = (x / 255.0 - ops.convert_to_tensor(_TORCH_MEAN)) / (
                ops.convert_to_tensor(_TORCH_STD))
        if self.scale is not None:
            x = x * ops.convert_to_tensor(self.scale, "float32")
        if self.offset is not None:
            x = x + ops.convert_to_tensor(self.offset, "float32")
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(mode=self.mode, zoo_name=self.zoo_name,
                      blocks=rules_to_config(self.block_rules),
                      min_size=self.min_size)
        for key in ("scale", "offset", "prefix_tokens"):
            if getattr(self, key) is not None:
                config[key] = getattr(self, key)
        return config


def check_input_shape(input_shape, name, default_size, min_size):
    """``input_shape`` as ``(height, width, 3)``, checked; default square."""
    if input_shape is None:
        return (default_size, default_size, 3)
    if isinstance(input_shape, numbers.Integral) and \
            not isinstance(input_shape, bool):
        input_shape = (int(input_shape), int(input_shape))
    if isinstance(input_shape, (str, bytes)) or not hasattr(
            input_shape, "__iter__"):
        raise InputShapeError(
            f"input_shape={input_shape!r} for {name!r}: expected (height, "
            "width, 3), (height, width) or one int.")
    input_shape = tuple(input_shape)
    for dim in input_shape:
        if dim is not None and (isinstance(dim, bool) or not isinstance(
                dim, numbers.Integral)):
            raise InputShapeError(
                f"input_shape={input_shape!r} for {name!r}: every dimension "
                f"must be an integer (or None); {dim!r} is not.")
    input_shape = tuple(None if d is None else int(d) for d in input_shape)
    if len(input_shape) == 2:
        input_shape += (3,)
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise InputShapeError(
            f"input_shape={input_shape} for {name!r}: expected "
            "(height, width, 3): kerastl backbones take RGB images, channels "
            "last.")
    for dim in input_shape[:2]:
        if dim is not None and dim < min_size:
            raise InputShapeError(
                f"input_shape={input_shape} is too small for "
                f"{name!r}: height and width must be at least "
                f"{min_size} (its default is {default_size}). "
                "Resize the images up, or pick another model.")
    return input_shape
