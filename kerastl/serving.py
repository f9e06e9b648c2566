"""SavedModel export of what users train, for TF Serving, TFLite and friends.

:func:`export_savedmodel` writes a TensorFlow SavedModel whose ``serve``
signature (also ``serving_default``) takes what a server receives:

* ``"float"`` (default): RGB images, ``float32`` in [0, 255];
* ``"uint8"``: RGB images as ``uint8``;
* ``"bytes"``: encoded JPEG / PNG / BMP / GIF files (a string tensor, one
  file per element), decoded to RGB and resized to the model's input size
  inside the graph.

The model's preprocessing is already inside every kerastl model (see
:class:`~kerastl.preprocessing.ImagePreprocessing`), so the export needs none
of its own. Training-only parts are left out: a :class:`~kerastl.DANN`,
an :class:`~kerastl.adaptation.AdaMatch` (what :func:`kerastl.adapt`
returns) or an :class:`~kerastl.adaptation.ADDA` model exports its label
path; in any other model, outputs computed through a
:class:`~kerastl.GradientReversal` layer (a domain head) are dropped.

The export is written to a temporary folder next to ``path``, reloaded with
``tf.saved_model.load`` and checked against the Keras model on a probe
batch, and only then renamed into place. A crash or a failed check leaves
whatever was at ``path`` before untouched.
"""

import contextlib
import ctypes
import dataclasses
import importlib.util
import json
import logging
import os
import re
import sys
import warnings

import keras
import numpy as np

from kerastl import _keras_private as _private
from kerastl.adaptation.adamatch import AdaMatch
from kerastl.adaptation.adda import ADDA
from kerastl.adaptation.dann import DANN
from kerastl.adaptation.reversal import GradientReversal
from kerastl.atomic import atomic_folder, check_destination
from kerastl.blocks import layer_graph
from kerastl.errors import ExportError, KerastlError
from kerastl.spec import EXPORT_FORMATS, INPUT_MODES, QUANTIZATIONS
from kerastl.peft import merge_lora


def inference_model(model):
    """``model`` without its training-only parts (a plain ``keras.Model``).

    A :class:`~kerastl.DANN`, an :class:`~kerastl.adaptation.AdaMatch`
    (what :func:`kerastl.adapt` returns) or an
    :class:`~kerastl.adaptation.ADDA` model gives its label path
    (``model.classifier``: no augmentation, no domain head); a functional
    model loses
    every output that depends on a :class:`~kerastl.GradientReversal` layer;
    LoRA updates are merged into their kernels (:func:`kerastl.merge_lora`:
    no LoRA variable or operation is served); anything else is returned
    as is.
    """
    model = _without_training_parts(model)
    try:
        return merge_lora(model)
    except KerastlError:
        raise
    except Exception as e:  # merge_lora saves and reloads the model
        raise ExportError(
            f"Could not merge the LoRA factors of {model.name!r} into its "
            f"kernels ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
            ": merging saves and reloads the model, so every custom layer "
            "in it must be registered (@keras.saving."
            "register_keras_serializable()) and have a get_config.") from e


def _without_training_parts(model):
    if isinstance(model, (DANN, AdaMatch, ADDA)):
        return model.classifier
    backbone_model = getattr(model, "model", None)
    if isinstance(backbone_model, keras.Model):  # a kerastl Backbone
        model = backbone_model
    if not isinstance(model, keras.Model):
        raise ExportError(
            f"Expected a keras.Model, a kerastl.Backbone or a kerastl.DANN, "
            f"AdaMatch or ADDA, got {type(model).__name__}.")
    try:
        graph = layer_graph(model)
    except Exception:  # a subclassed model: opaque, exported as is
        return model
    reversal = {id(l) for l, _ in graph if isinstance(l, GradientReversal)}
    if not reversal or not hasattr(model, "outputs"):
        return model
    parents = {id(l): [id(p) for p in ps] for l, ps in graph}

    def reversed_upstream(layer_id, seen=None):
        seen = seen if seen is not None else set()
        if layer_id in reversal:
            return True
        seen.add(layer_id)
        return any(reversed_upstream(p, seen) for p in parents.get(layer_id, [])
                   if p not in seen)

    outputs = model.outputs
    keep = [t for t in outputs
            if not reversed_upstream(id(_private.producing_operation(t)))]
    if not keep:
        raise ExportError(
            f"Every output of {model.name!r} goes through a GradientReversal "
            "layer: there is no inference path to export.")
    if len(keep) == len(outputs):
        return model
    return keras.Model(model.inputs, keep[0] if len(keep) == 1 else keep,
                       name=f"{model.name}_inference")


def _image_size(model, image_size):
    shape = tuple(model.inputs[0].shape) if getattr(model, "inputs", None) \
        else None
    if image_size is not None:
        if isinstance(image_size, (int, np.integer)) and \
                not isinstance(image_size, bool):
            image_size = (image_size, image_size)
        try:
            size = tuple(int(v) for v in image_size)
            ok = len(size) == 2 and min(size) > 0 and all(
                not isinstance(v, bool) and float(v) == int(v)
                for v in image_size)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ExportError(
                f"image_size={image_size!r}: expected (height, width), two "
                "whole numbers of pixels.")
        if shape is not None and len(shape) == 4 and \
                None not in shape[1:3] and size != tuple(shape[1:3]):
            raise ExportError(
                f"image_size={image_size!r}: the model takes "
                f"{shape[1]}x{shape[2]} images; leave image_size out.")
        return size
    if shape is None or len(shape) != 4 or None in shape[1:3]:
        raise ExportError(
            f"The model's input shape {shape} has no fixed height and width; "
            "pass image_size=(height, width).")
    return shape[1], shape[2]


def _serve_fn(model, input_mode, size):
    import tensorflow as tf

    channels = _channels(model)
    # (a model of one image size takes only that size: another would give
    # outputs the Keras model refuses to give)
    height, width = _fixed_hw(model)
    if input_mode == "float":
        spec = tf.TensorSpec((None, height, width, channels), tf.float32,
                             name="images")

        def serve(images):
            return model(images, training=False)
    elif input_mode == "uint8":
        spec = tf.TensorSpec((None, height, width, channels), tf.uint8,
                             name="images")

        def serve(images):
            return model(tf.cast(images, tf.float32), training=False)
    else:
        spec = tf.TensorSpec((None,), tf.string, name="image_bytes")

        def decode(data):
            image = tf.io.decode_image(data, channels=channels,
                                       expand_animations=False)
            image = tf.image.resize(tf.cast(image, tf.float32), size)
            return tf.ensure_shape(image, (size[0], size[1], channels))

        def serve(image_bytes):
            images = tf.map_fn(decode, image_bytes,
                               fn_output_signature=tf.TensorSpec(
                                   (size[0], size[1], channels),
                                   tf.float32))
            return model(images, training=False)
    return serve, spec


def _channels(model):
    """The model's image channels (1 or 3; 3 when it does not say)."""
    shape = tuple(model.inputs[0].shape) if getattr(model, "inputs", None) \
        else ()
    return shape[-1] if len(shape) == 4 and shape[-1] in (1, 3) else 3


def _fixed_hw(model):
    """``(height, width)`` of a model of one input size, else (None,
    None)."""
    shape = tuple(model.inputs[0].shape) if getattr(model, "inputs", None) \
        else ()
    if len(shape) == 4 and None not in shape[1:3]:
        return int(shape[1]), int(shape[2])
    return None, None


def _destination(path, overwrite):
    """``path`` as an absolute path, once :func:`check_destination` allows
    an export there (its refusal as an :class:`ExportError`)."""
    try:
        check_destination(path, "export folder", overwrite)
    except KerastlError as e:
        raise ExportError(str(e)) from None
    return os.path.abspath(os.fspath(path))


def _write_savedmodel(model, folder, input_mode, size):
    """The SavedModel with its ``serve`` signature, written into
    ``folder``."""
    serve, spec = _serve_fn(model, input_mode, size)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", serve, input_signature=[spec])
    with _quiet_converter():  # ("INFO:tensorflow:Assets written")
        archive.write_out(folder, verbose=False)


def _probe_images(size, n=4, seed=0, channels=3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size[0], size[1], channels)).astype(
        "uint8")


def _encode_png(images):
    import tensorflow as tf

    return np.array([tf.io.encode_png(im).numpy() for im in images],
                    dtype=object)


def _flatten(outputs):
    import tensorflow as tf

    return [np.asarray(t) for t in tf.nest.flatten(outputs)]


def _verify(folder, model, input_mode, probe, rtol, atol):
    import tensorflow as tf

    probe = np.asarray(probe)
    if probe.ndim != 4:
        raise ExportError(f"probe: expected a batch of images (N, H, W, 3), "
                          f"got shape {probe.shape}.")
    expected = _flatten(model(probe.astype("float32"), training=False))
    loaded = tf.saved_model.load(folder)
    if input_mode == "float":
        fed = tf.constant(probe, tf.float32)
    elif input_mode == "uint8":
        fed = tf.constant(np.clip(probe, 0, 255).astype("uint8"))
    else:  # PNG is lossless: decoding gives back the probe's pixels
        fed = tf.constant(_encode_png(np.clip(probe, 0, 255).astype("uint8")))
    got = _flatten(loaded.serve(fed))
    for e, g in zip(expected, got):
        if e.shape != g.shape or not np.allclose(e, g, rtol=rtol, atol=atol):
            worst = float(np.max(np.abs(e - g))) if e.shape == g.shape \
                else "shape"
            raise ExportError(
                f"The reloaded export does not reproduce the Keras model "
                f"(largest difference {worst}, tolerance rtol={rtol}, "
                f"atol={atol}); nothing was written.")


def export_savedmodel(model, path, input="float", image_size=None,
                      verify=True, probe=None, rtol=1e-5, atol=1e-5,
                      tflite=False, overwrite=False):
    """Writes ``model`` as a TF SavedModel with a ``serve`` signature.

    Args:
        model: a ``keras.Model`` (any kerastl classifier), a
            :class:`~kerastl.Backbone`, or a :class:`~kerastl.DANN`,
            :class:`~kerastl.adaptation.AdaMatch` (what
            :func:`kerastl.adapt` returns) or
            :class:`~kerastl.adaptation.ADDA` (its label path is
            exported). Outputs through a GradientReversal layer are
            left out.
        path: the SavedModel folder: new, or empty. kerastl never writes
            over the working directory, its parents, the home folder or a
            folder it did not write.
        input: what the ``serve`` signature takes: ``"float"`` (RGB
            ``float32`` in [0, 255], any batch size), ``"uint8"`` or
            ``"bytes"`` (encoded JPEG/PNG/BMP/GIF strings, decoded and resized
            to ``image_size`` inside the graph; resizing is bilinear).
        image_size: ``(height, width)`` for ``input="bytes"`` (default: the
            model's input size) and for the probe batch.
        verify: reload the export and compare its outputs with the Keras
            model on ``probe`` (default: 4 random images) before renaming it
            into place.
        probe: images in [0, 255], shape ``(N, H, W, 3)``.
        rtol, atol: the tolerance of the check.
        tflite: also write ``model.tflite`` (TensorFlow Lite, converted
            from the ``serve`` signature: it takes what ``input`` says,
            ``"float"`` or ``"uint8"``) into the export folder.
        overwrite: replace an earlier kerastl export at ``path``; it is
            replaced only once the new one is complete and verified.

    Returns:
        ``path``.

    Raises:
        ExportError: a bad argument, a failed write or a failed check; the
            previous content of ``path`` is left as it was.

    Example::

        kerastl.export_savedmodel(model, "export/flowers", input="bytes")
        served = tf.saved_model.load("export/flowers")
        served.serve(tf.constant([open("rose.jpg", "rb").read()]))
    """
    if keras.backend.backend() != "tensorflow":
        raise ExportError(
            "export_savedmodel writes a TensorFlow SavedModel and needs the "
            "TensorFlow backend (KERAS_BACKEND=tensorflow).")
    if input not in INPUT_MODES:
        raise ExportError(f"input={input!r}: expected one of "
                          f"{', '.join(INPUT_MODES)}.")
    if tflite and input == "bytes":
        raise ExportError(
            "tflite=True with input='bytes': LiteRT has no image decoder, so "
            "its file takes pixels; use input='float' or 'uint8' (or "
            "kerastl.export(model, path, format='litert')).")
    _check_tolerances(rtol, atol)
    path = _destination(path, overwrite)
    model = inference_model(model)
    # (checked whatever the input; the serve signature reads it for bytes)
    size = _image_size(model, image_size) \
        if input == "bytes" or image_size is not None else None
    try:
        with atomic_folder(path, "export folder", overwrite) as tmp:
            _write_savedmodel(model, tmp, input, size)
            if verify:
                if probe is None:
                    probe = _probe_images(_image_size(model, image_size),
                                          channels=_channels(model))
                _verify(tmp, model, input, probe, rtol, atol)
            if tflite:
                _write_tflite(tmp)
    except KerastlError:
        raise
    except Exception as e:
        raise ExportError(f"Export of {model.name!r} to {path!r} failed: "
                          f"{type(e).__name__}: {e}") from e
    return path


def _write_tflite(folder):
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(
        folder, signature_keys=["serve"])
    with _quiet_converter():
        data = converter.convert()
    with open(os.path.join(folder, "model.tflite"), "wb") as f:
        f.write(data)


# --- kerastl.export: one entry point for every format -----------------------

# The file each format writes inside the export folder (a SavedModel is the
# folder itself).
_FILES = {"savedmodel": None, "litert": "model.tflite", "onnx": "model.onnx"}
LABELS_FILE = "labels.txt"
REPORT_FILE = "export.json"


@dataclasses.dataclass
class ExportReport:
    """What :func:`export` wrote and how the written file was checked.

    Attributes:
        path: the export folder.
        format: ``"savedmodel"``, ``"litert"`` or ``"onnx"``.
        file: the model file (the SavedModel folder for ``"savedmodel"``).
        bytes: its size on disk.
        input: what it takes (``"float"``, ``"uint8"`` or ``"bytes"``).
        quantize: the LiteRT quantization, or None.
        checked_on: how many images the written file was run on.
        max_difference: the largest absolute difference between the file's
            outputs and the Keras model's on those images (for a quantized
            file: after dequantizing its output).
        agreement: the share of those images on which the file and the
            Keras model predict the same class.
        accuracy, keras_accuracy: the file's and the Keras model's accuracy
            on them, when labels were given.
        labels: the class names written to ``labels.txt`` (or None).
    """

    path: str
    format: str
    file: str
    bytes: int
    input: str
    quantize: object = None
    checked_on: int = 0
    max_difference: object = None
    agreement: object = None
    accuracy: object = None
    keras_accuracy: object = None
    labels: object = None

    def to_dict(self):
        return dataclasses.asdict(self)

    def summary(self):
        """One line: the format, size and what the check found."""
        kind = self.format + (f" ({self.quantize})" if self.quantize else "")
        line = f"{kind}: {self.file} ({self.bytes / 1e6:.2f} MB)"
        if self.checked_on:
            line += (f", run on {self.checked_on} images: top-1 agreement "
                     f"with Keras {self.agreement:.1%}, largest difference "
                     f"{self.max_difference:.2g}")
        if self.accuracy is not None:
            line += (f", accuracy {self.accuracy:.3f} (Keras "
                     f"{self.keras_accuracy:.3f})")
        return line


def _install_hint(package):
    extra = {"onnxruntime": "onnx", "tf2onnx": "onnx", "onnx": "onnx"}
    return (f"the ONNX export needs {package}: pip install "
            f"'kerastl[{extra[package]}]'")


def _check_export_args(format, input, quantize, labels):
    if format not in EXPORT_FORMATS:
        raise ExportError(f"format={format!r}: expected one of "
                          f"{', '.join(EXPORT_FORMATS)}.")
    if input not in INPUT_MODES:
        raise ExportError(f"input={input!r}: expected one of "
                          f"{', '.join(INPUT_MODES)}.")
    if input == "bytes" and format != "savedmodel":
        raise ExportError(
            f"input='bytes' (encoded images decoded inside the graph) is for "
            f"format='savedmodel'; a {format} file takes pixels: use "
            "input='float' or input='uint8'.")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ExportError(f"quantize={quantize!r}: expected None or one of "
                          f"{', '.join(QUANTIZATIONS)}.")
    if quantize is not None and format != "litert":
        raise ExportError(
            f"quantize={quantize!r} is for format='litert' (TensorFlow's "
            f"LiteRT converter quantizes); a {format} export is float32.")
    if labels is not None and (isinstance(labels, str) or not all(
            isinstance(l, str) and l and "\n" not in l for l in labels)):
        raise ExportError(
            "labels: expected a list of class names (non-empty strings "
            "without line breaks), one per output class.")
    if format == "onnx" and missing_onnx_package():
        raise ExportError(f"format='onnx': {missing_onnx_package()}.")


def _check_tolerances(rtol, atol):
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(
                value, (int, float)) or not 0 <= value < float("inf"):
            raise ExportError(f"{name}={value!r}: expected a number >= 0.")


def missing_onnx_package():
    """What the ONNX export lacks (with its install command), or None."""
    for package in ("tf2onnx", "onnxruntime"):
        if importlib.util.find_spec(package) is None:
            return _install_hint(package)
    return None


def _images_and_labels(data, what):
    """``data`` (images, or ``(images, labels)``) as float32 images in
    [0, 255] and int labels (or None)."""
    labels = None
    if isinstance(data, (tuple, list)) and len(data) == 2 and \
            np.ndim(data[0]) == 4:
        data, labels = data
    try:
        images = np.asarray(data)
    except ValueError:
        images = np.zeros((0,))
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or not len(images):
        raise ExportError(
            f"{what}: expected images of shape (N, height, width, 3) in "
            f"[0, 255], got shape {images.shape}.")
    if not np.issubdtype(images.dtype, np.number) or \
            not np.all(np.isfinite(images)):
        raise ExportError(f"{what}: the images hold non-numbers.")
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(images) or \
                not np.issubdtype(labels.dtype, np.integer):
            raise ExportError(
                f"{what}: expected one integer label per image, got "
                f"{labels.shape} labels ({labels.dtype}) for "
                f"{len(images)} images.")
    return images.astype("float32"), labels


def _fixed_size(model, image_size):
    """The one image size a LiteRT or ONNX file (or ``input="bytes"``)
    takes: ``image_size`` (:func:`_image_size` refuses one that is not the
    model's fixed size), else the model's."""
    if image_size is not None:
        return _image_size(model, image_size)
    fixed = _fixed_hw(model)
    if None not in fixed:
        return fixed
    shape = tuple(model.inputs[0].shape) if getattr(model, "inputs", None) \
        else None
    raise ExportError(
        f"The model's input shape {shape} has no fixed height and width; "
        "pass image_size=(height, width): LiteRT and ONNX files (and "
        "input='bytes') take one image size.")


def _pixel_model(model, input_mode, size):
    """A Keras model that takes what the file takes: float32 or uint8
    pixels of ``size`` (a uint8 input is cast inside)."""
    channels = model.inputs[0].shape[-1] if getattr(model, "inputs", None) \
        else 3
    dtype = "uint8" if input_mode == "uint8" else "float32"
    inputs = keras.Input((size[0], size[1], channels), dtype=dtype,
                         name="images")
    x = keras.ops.cast(inputs, "float32") if dtype == "uint8" else inputs
    outputs = model(x, training=False)
    return keras.Model(inputs, outputs, name=f"{model.name}_serving")


def _litert_kwargs(quantize, input_mode, representative, pixel_dtype):
    import tensorflow as tf

    # Builtin ops only: a file that needs TensorFlow's own kernels (the Flex
    # delegate) does not run on a phone's LiteRT runtime.
    ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8 if quantize == "int8"
           else tf.lite.OpsSet.TFLITE_BUILTINS]
    kwargs = {"target_spec": {"supported_ops": ops}}
    if quantize is not None:
        kwargs["optimizations"] = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        kwargs["target_spec"]["supported_types"] = [tf.float16]
    if quantize == "int8":
        # The input's quantization comes from the calibration range: one
        # pixel at 0 and one at 255 make it scale 1, zero point 0 (a uint8
        # input then takes raw pixels as they are).
        representative = np.array(representative, dtype="float32")
        representative[0, 0, 0, :] = 0.0
        representative[0, 0, -1, :] = 255.0

        def dataset():
            for image in representative:
                yield [image[None].astype(pixel_dtype)]

        kwargs["representative_dataset"] = dataset
        if input_mode == "uint8":
            kwargs["inference_input_type"] = tf.uint8
            kwargs["inference_output_type"] = tf.uint8
    return kwargs


def _unsupported(error, model):
    """The ops (and the layers they come from) a converter refused."""
    text = str(error)
    ops = sorted(set(re.findall(r"'(tf\.\w+)' op is neither", text)) |
                 set(re.findall(r'In Node, \("[^"]*", (\w+),', text)))
    # Only where the failing node is (onnxruntime's node path, the LiteRT
    # converter's fused["Op:", "scope/path@function"] locations): the rest
    # of the converter's text prints constants as dense<...>, which would
    # name every layer called "dense".
    scope = " ".join(re.findall(r'In Node, \("([^"]*)"', text)
                     + re.findall(r'fused\["[^"]*", "([^"@]*)', text)) or text
    layers = [l.name for l in _all_layers(model) if re.search(
        r"(?<!\w)%s(?:_\d+)?(?!\w)" % re.escape(l.name), scope)]
    where = f" in layer {', '.join(repr(l) for l in layers[:3])}" \
        if layers else ""
    return ops, where


def _all_layers(model):
    for layer in getattr(model, "layers", ()):
        yield layer
        yield from _all_layers(layer)


def _write_litert(model, file, input_mode, size, quantize, representative):
    if quantize == "int8":
        # The converter quantizes a float input itself (uint8 in and out
        # when input='uint8').
        pixel = _pixel_model(model, "float", size)
        pixel_dtype = "float32"
    else:
        pixel = _pixel_model(model, input_mode, size)
        pixel_dtype = "uint8" if input_mode == "uint8" else "float32"
    kwargs = _litert_kwargs(quantize, input_mode, representative,
                            pixel_dtype)
    try:
        with _quiet_converter():
            pixel.export(file, format="litert", verbose=False, **kwargs)
    except Exception as e:  # the converter's error names the ops
        ops, where = _unsupported(e, model)
        if ops:
            raise ExportError(
                f"The LiteRT format cannot take {model.name!r}: "
                f"{', '.join(ops)}{where} has no LiteRT builtin kernel (the "
                "file would need TensorFlow's Flex delegate, which phone "
                "runtimes do not have). Export it as format='savedmodel' or "
                "'onnx', or replace that layer.") from None
        raise
    if quantize == "int8" and input_mode == "uint8":
        scale, zero = litert_interpreter(file).get_input_details()[0][
            "quantization"]
        if abs(scale - 1.0) > 1e-3 or zero != 0:
            raise ExportError(
                f"The int8 file's uint8 input is quantized with scale "
                f"{scale:.4g} and zero point {zero}, not raw pixels (1, 0); "
                "nothing was kept. Pass representative_data in [0, 255].")


def _write_onnx(model, file, input_mode, size):
    import tensorflow as tf

    pixel = _pixel_model(model, input_mode, size)
    channels = pixel.inputs[0].shape[-1]
    spec = tf.TensorSpec((None, size[0], size[1], channels),
                         tf.uint8 if input_mode == "uint8" else tf.float32,
                         name="images")
    with _quiet_converter(), _normalization_in_the_graph(model):
        pixel.export(file, format="onnx", verbose=False,
                     input_signature=[spec])


@contextlib.contextmanager
def _normalization_in_the_graph(model):
    """Keras's ``Normalization`` layer (EfficientNet's first step) keeps
    its adapted mean and variance as eager tensors made from its variables;
    a traced function captures them as external inputs, which tf2onnx turns
    into inputs of the ONNX graph (onnxruntime then asks for them). For the
    conversion, the layer reads its variables instead (same values; where
    they broadcast as they are: the last axis), so they become constants."""
    swapped = []
    for layer in _all_layers(model):
        if not isinstance(layer, keras.layers.Normalization) or \
                getattr(layer, "input_mean", None) is not None or \
                getattr(layer, "adapt_mean", None) is None or \
                layer.mean is None:
            continue
        shape = tuple(layer.mean.shape)
        if any(d != 1 for d in shape[:-1]) or \
                tuple(layer.adapt_mean.shape) != shape[-1:]:
            continue
        swapped.append((layer, layer.mean, layer.variance))
        # (object.__setattr__: not tracked as new weights of the layer.)
        object.__setattr__(layer, "mean", layer.adapt_mean)
        object.__setattr__(layer, "variance", layer.adapt_variance)
    try:
        yield
    finally:
        for layer, mean, variance in swapped:
            object.__setattr__(layer, "mean", mean)
            object.__setattr__(layer, "variance", variance)


@contextlib.contextmanager
def _quiet_native_output():
    """What C++ code prints straight to the process's stdout and stderr
    (the LiteRT converter's "fully_quantize: ..." line, the interpreter's
    "Created TensorFlow Lite XNNPACK delegate") kept off the user's
    screen; Python's own output and exceptions are untouched."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
    except (OSError, ValueError, AttributeError):  # no real descriptors
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        _flush_c_streams()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [null]:
            os.close(fd)


def _flush_c_streams():
    """fflush(NULL): C-level buffered output goes where it was meant to
    before the file descriptors are put back."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):
        pass


@contextlib.contextmanager
def _quiet_converter():
    """The converters' own chatter (tf2onnx's logging, NumPy's
    FutureWarning from Keras's tf2onnx patch, the LiteRT converter's C++
    lines) kept off the user's screen."""
    loggers = [logging.getLogger(n) for n in ("tf2onnx", "absl",
                                              "tensorflow")]
    levels = [l.level for l in loggers]
    for l in loggers:
        l.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), _quiet_native_output():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for l, level in zip(loggers, levels):
            l.setLevel(level)


class FileRunner:
    """Runs an exported file with its own runtime on a batch of images."""

    def __init__(self, format, path, file, model):
        self.format = format
        if format == "savedmodel":
            import tensorflow as tf

            self.served = tf.saved_model.load(path)
        elif format == "onnx":
            import onnxruntime

            try:
                self.session = onnxruntime.InferenceSession(
                    file, providers=["CPUExecutionProvider"])
            except Exception as e:
                ops, where = _unsupported(e, model)
                what = f"op {', '.join(ops)}{where}" if ops else \
                    "one of its operations"
                raise ExportError(
                    f"The ONNX format cannot take {model.name!r}: {what} has "
                    "no ONNX equivalent (onnxruntime cannot load the "
                    "converted file). Export it as format='savedmodel' or "
                    "'litert', or replace that layer.") from None
            self.name = self.session.get_inputs()[0].name
        else:
            self.interpreter = litert_interpreter(file)

    def __call__(self, images):
        if self.format == "savedmodel":
            import tensorflow as tf

            return np.asarray(self.served.serve(tf.constant(images)))
        if self.format == "onnx":
            return self.session.run(None, {self.name: images})[0]
        it = self.interpreter
        inp = it.get_input_details()[0]
        it.resize_tensor_input(inp["index"], images.shape)
        it.allocate_tensors()
        inp = it.get_input_details()[0]
        if inp["dtype"] != images.dtype:  # a quantized input
            scale, zero = inp["quantization"]
            images = np.clip(np.round(images / scale + zero),
                             np.iinfo(inp["dtype"]).min,
                             np.iinfo(inp["dtype"]).max)
        it.set_tensor(inp["index"], images.astype(inp["dtype"]))
        it.invoke()
        out = it.get_output_details()[0]
        result = it.get_tensor(out["index"])
        if out["dtype"] != np.float32:  # dequantize
            scale, zero = out["quantization"]
            result = (result.astype("float32") - zero) * scale
        return result


def litert_interpreter(file):
    """A LiteRT interpreter for ``file``: the ``ai-edge-litert`` package's
    when it is installed (what TensorFlow now points to), else TensorFlow's
    own ``tf.lite.Interpreter``."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings(), _quiet_native_output():
        warnings.simplefilter("ignore")
        interpreter = Interpreter(model_path=file)
        interpreter.allocate_tensors()  # (where the delegate line is printed)
    return interpreter


RUNTIMES = {"savedmodel": "TensorFlow", "litert": "the LiteRT interpreter",
            "onnx": "onnxruntime"}


def _run_file(runner, images, batch=32):
    try:
        return np.concatenate([runner(images[i:i + batch])
                               for i in range(0, len(images), batch)])
    except Exception as e:
        raise ExportError(
            f"The written {runner.format} file fails to run in "
            f"{RUNTIMES[runner.format]} ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]}); nothing was kept. The "
            f"converter accepted a layer that the runtime cannot run: "
            "export another format, or replace that layer.") from None


def _check_file(runner, model, input_mode, images, labels, quantize,
                rtol, atol, min_agreement):
    """Runs the written file on ``images`` and compares with Keras."""
    if input_mode != "float":  # the file takes whole pixels: so does Keras
        images = np.clip(np.round(images), 0, 255)
    expected = np.concatenate([
        np.asarray(model(images[i:i + 32], training=False))
        for i in range(0, len(images), 32)])
    fed = images
    if input_mode == "uint8":
        fed = images.astype("uint8")
    elif input_mode == "bytes":  # PNG is lossless
        fed = _encode_png(images.astype("uint8"))
    got = _run_file(runner, fed)
    if got.shape != expected.shape:
        raise ExportError(
            f"The written file gives outputs of shape {got.shape} where the "
            f"Keras model gives {expected.shape}; nothing was kept.")
    if not np.all(np.isfinite(got)):
        raise ExportError("The written file gives non-finite outputs; "
                          "nothing was kept.")
    report = {"checked_on": len(images),
              "max_difference": float(np.max(np.abs(got - expected))),
              "agreement": float(np.mean(got.argmax(-1) ==
                                         expected.argmax(-1)))}
    if labels is not None:
        report["accuracy"] = float(np.mean(got.argmax(-1) == labels))
        report["keras_accuracy"] = float(np.mean(expected.argmax(-1) ==
                                                 labels))
    if quantize is None and not np.allclose(got, expected, rtol=rtol,
                                            atol=atol):
        raise ExportError(
            f"The written file does not reproduce the Keras model (largest "
            f"difference {report['max_difference']:.3g}, tolerance "
            f"rtol={rtol}, atol={atol}); nothing was kept.")
    if quantize is not None and min_agreement is None and \
            report["agreement"] < 0.9:
        warnings.warn(
            f"kerastl: the {quantize}-quantized file predicts the Keras "
            f"model's class on only {report['agreement']:.1%} of "
            f"{len(images)} images; check it on more images, or use "
            "quantize='dynamic' or 'float16'.", stacklevel=3)
    if quantize is not None and min_agreement is not None and \
            report["agreement"] < min_agreement:
        raise ExportError(
            f"The {quantize}-quantized file predicts the Keras model's class "
            f"on only {report['agreement']:.1%} of {len(images)} images "
            f"(min_agreement={min_agreement}); nothing was kept. Try "
            "quantize='dynamic' or 'float16', or more representative_data "
            "from your training images.")
    return report


def export(model, path, format="savedmodel", input="float", quantize=None,
           representative_data=None, validation_data=None, labels=None,
           image_size=None, verify=True, max_representative=200,
           rtol=1e-4, atol=1e-4, min_agreement=None, overwrite=False):
    """Exports ``model`` for serving and checks the file by running it.

    One entry point for the formats a fine-tuned model ends in, on top of
    Keras's ``model.export`` (``"tf_saved_model"``, ``"litert"``,
    ``"onnx"``) and TensorFlow's LiteRT converter (kerastl writes no
    converter of its own). The model's preprocessing stays inside the file,
    so every format takes raw pixels; training-only parts (a DANN's domain
    head, AdaMatch's augmentations, GradientReversal outputs) are left out.

    The export folder ``path`` holds the model file (``model.tflite``,
    ``model.onnx``, or the SavedModel itself), ``labels.txt`` (the class
    names, one per line, when ``labels`` is given) and ``export.json`` (this
    report). It is written to a temporary folder, the written file is run
    by its own runtime (the LiteRT interpreter, onnxruntime, a SavedModel
    reload) on ``validation_data`` (default: 8 random images) and compared
    with the Keras model, and only then renamed into place. A failed
    conversion or check leaves whatever was at ``path`` untouched, with the
    same destination rules as :func:`export_savedmodel`.

    Args:
        model: a ``keras.Model`` (any kerastl classifier), a
            :class:`~kerastl.Backbone`, or a :class:`~kerastl.DANN`,
            :class:`~kerastl.adaptation.AdaMatch` or
            :class:`~kerastl.adaptation.ADDA` (their label path).
        path: the export folder: new, empty, or an earlier kerastl export
            with ``overwrite=True``.
        format: ``"savedmodel"`` (TF Serving, TensorFlow), ``"litert"``
            (``.tflite``: Android, iOS, microcontrollers, edge boxes) or
            ``"onnx"`` (onnxruntime and other ONNX runtimes; needs
            ``pip install 'kerastl[onnx]'``).
        input: ``"float"`` (float32 pixels in [0, 255]), ``"uint8"`` (raw
            pixels; with ``quantize="int8"`` the LiteRT file takes and gives
            uint8) or ``"bytes"`` (encoded images; SavedModel only).
        quantize: LiteRT only: None (float32), ``"dynamic"`` (int8 weights),
            ``"float16"`` (half-size weights) or ``"int8"`` (integer
            weights and activations; needs ``representative_data``).
        representative_data: ``"int8"``: training images, (N, H, W, 3) in
            [0, 255], that calibrate the activation ranges; at most
            ``max_representative`` of them are used.
        validation_data: images, or ``(images, labels)``, that the written
            file is checked on; with labels the report has both accuracies.
        labels: class names, one per output class (written to
            ``labels.txt``).
        image_size: ``(height, width)`` for a model whose input size is not
            fixed (LiteRT and ONNX files take one size), and for
            ``input="bytes"``.
        verify: run the written file and compare (strongly recommended).
        rtol, atol: the tolerance of the float formats' check.
        min_agreement: a quantized file must predict the Keras model's class
            on at least this share of the check images, or it is not kept
            (default None: kept, with a warning below 90%).
        overwrite: replace an earlier kerastl export at ``path``.

    Returns:
        An :class:`ExportReport`.

    Raises:
        ExportError: a bad argument, a missing optional package (with its
            install command), a layer or op the format cannot take (named),
            or a file that does not reproduce the model; nothing is left at
            ``path``.

    Example::

        report = kerastl.export(model, "export/digits", format="litert",
                                quantize="int8", representative_data=x_train,
                                validation_data=(x_val, y_val),
                                labels=class_names)
        print(report.summary())
    """
    if keras.backend.backend() != "tensorflow":
        raise ExportError(
            "kerastl.export uses TensorFlow's converters and needs the "
            "TensorFlow backend (KERAS_BACKEND=tensorflow).")
    if labels is not None and not isinstance(labels, str):
        labels = list(labels)  # (a generator is read once, here)
    _check_export_args(format, input, quantize, labels)
    _check_tolerances(rtol, atol)
    if isinstance(max_representative, bool) or not isinstance(
            max_representative, (int, np.integer)) or max_representative < 1:
        raise ExportError(f"max_representative={max_representative!r}: "
                          "expected an int >= 1.")
    if min_agreement is not None:
        if quantize is None:
            raise ExportError(
                "min_agreement is for a quantized file (quantize=...); a "
                "float file is checked against rtol and atol.")
        if isinstance(min_agreement, bool) or not isinstance(
                min_agreement, (int, float)) or not 0 < min_agreement <= 1:
            raise ExportError(
                f"min_agreement={min_agreement!r}: expected a share in (0, "
                "1], e.g. 0.95 for 95%.")
    path = _destination(path, overwrite)
    model = inference_model(model)
    if len(getattr(model, "outputs", None) or ()) > 1:
        raise ExportError(
            f"{model.name!r} has {len(model.outputs)} outputs; "
            "kerastl.export checks one output of class scores. Export "
            "keras.Model(model.inputs, model.outputs[0]) (the classifier), "
            "or use kerastl.export_savedmodel, which serves every output.")
    size = _fixed_size(model, image_size) if format != "savedmodel" or \
        input == "bytes" else None
    classes = model.outputs[0].shape[-1] if getattr(model, "outputs", None) \
        else None
    if labels is not None:
        labels = list(labels)
        if classes is not None and len(labels) != classes:
            raise ExportError(
                f"labels: {len(labels)} names for a model with {classes} "
                "output classes.")
    check_images = check_labels = None
    if validation_data is not None:
        check_images, check_labels = _images_and_labels(validation_data,
                                                        "validation_data")
    representative = None
    if quantize == "int8":
        if representative_data is None:
            raise ExportError(
                "quantize='int8' needs representative_data: a few hundred of "
                "your training images, (N, H, W, 3) in [0, 255], to "
                "calibrate the activation ranges.")
        representative, _ = _images_and_labels(representative_data,
                                               "representative_data")
        if len(representative) > max_representative:
            pick = np.random.default_rng(0).choice(
                len(representative), max_representative, replace=False)
            representative = representative[np.sort(pick)]
    elif representative_data is not None:
        raise ExportError("representative_data is for quantize='int8'.")
    want = size or _fixed_hw(model)
    for what, images in (("validation_data", check_images),
                         ("representative_data", representative)):
        if images is None:
            continue
        if None not in want and tuple(images.shape[1:3]) != tuple(want):
            raise ExportError(
                f"{what}: images of {images.shape[1]}x{images.shape[2]}, "
                f"but the model takes {want[0]}x{want[1]}: resize them "
                "(the exported file takes that size too).")
        if images.shape[-1] != _channels(model):
            raise ExportError(
                f"{what}: images with {images.shape[-1]} channel(s), but the "
                f"model takes {_channels(model)}.")
    if check_images is None:
        check_images = _probe_images(
            size or _image_size(model, image_size), n=8,
            channels=_channels(model)).astype("float32")
    try:
        with atomic_folder(path, "export folder", overwrite) as tmp:
            name = _FILES[format]
            file = tmp if name is None else os.path.join(tmp, name)
            if format == "savedmodel":
                _write_savedmodel(model, tmp, input, size)
            elif format == "litert":
                _write_litert(model, file, input, size, quantize,
                              representative)
            else:
                _write_onnx(model, file, input, size)
            checked = {}
            if verify:
                runner = FileRunner(format, tmp, file, model)
                checked = _check_file(runner, model, input, check_images,
                                      check_labels, quantize, rtol, atol,
                                      min_agreement)
            if labels is not None:
                with open(os.path.join(tmp, LABELS_FILE), "w",
                          encoding="utf-8") as f:
                    f.write("\n".join(labels) + "\n")
            final = path if name is None else os.path.join(path, name)
            report = ExportReport(
                path=path, format=format, file=final,
                bytes=_size_on_disk(file), input=input, quantize=quantize,
                labels=labels, **checked)
            with open(os.path.join(tmp, REPORT_FILE), "w",
                      encoding="utf-8") as f:
                # (Paths inside the folder: it may be moved.)
                saved = report.to_dict()
                del saved["path"]
                saved["file"] = os.path.relpath(final, path)
                json.dump(saved, f, indent=2)
    except KerastlError:
        raise
    except Exception as e:
        raise ExportError(f"The {format} export of {model.name!r} to "
                          f"{path!r} failed: {type(e).__name__}: "
                          f"{' '.join(str(e).split())[:500]}") from e
    return report


def _size_on_disk(file):
    if os.path.isfile(file):
        return os.path.getsize(file)
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(file) for f in files)
