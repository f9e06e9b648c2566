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
of its own. Training-only parts are left out: a :class:`~kerastl.DANN`
exports its label path; in any other model, outputs computed through a
:class:`~kerastl.GradientReversal` layer (a domain head) are dropped.

The export is written to a temporary folder next to ``path``, reloaded with
``tf.saved_model.load`` and checked against the Keras model on a probe
batch, and only then renamed into place. A crash or a failed check leaves
whatever was at ``path`` before untouched.
"""

import os

import keras
import numpy as np

from kerastl import _keras_private as _private
from kerastl.adaptation.dann import DANN
from kerastl.adaptation.reversal import GradientReversal
from kerastl.atomic import atomic_folder, check_destination
from kerastl.blocks import layer_graph
from kerastl.errors import ExportError, KerastlError
from kerastl.spec import INPUT_MODES


def inference_model(model):
    """``model`` without its training-only parts (a plain ``keras.Model``).

    A :class:`~kerastl.DANN` gives its label path; a functional model loses
    every output that depends on a :class:`~kerastl.GradientReversal` layer;
    anything else is returned as is.
    """
    if isinstance(model, DANN):
        return model.classifier
    backbone_model = getattr(model, "model", None)
    if isinstance(backbone_model, keras.Model):  # a kerastl Backbone
        model = backbone_model
    if not isinstance(model, keras.Model):
        raise ExportError(
            f"Expected a keras.Model, a kerastl.Backbone or a kerastl.DANN, "
            f"got {type(model).__name__}.")
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
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        return tuple(int(s) for s in image_size)
    if shape is None or len(shape) != 4 or None in shape[1:3]:
        raise ExportError(
            f"The model's input shape {shape} has no fixed height and width; "
            "pass image_size=(height, width) for input='bytes'.")
    return shape[1], shape[2]


def _serve_fn(model, input_mode, size):
    import tensorflow as tf

    channels = model.inputs[0].shape[-1] if getattr(model, "inputs", None) \
        else 3
    if input_mode == "float":
        spec = tf.TensorSpec((None, None, None, channels), tf.float32,
                             name="images")

        def serve(images):
            return model(images, training=False)
    elif input_mode == "uint8":
        spec = tf.TensorSpec((None, None, None, channels), tf.uint8,
                             name="images")

        def serve(images):
            return model(tf.cast(images, tf.float32), training=False)
    else:
        spec = tf.TensorSpec((None,), tf.string, name="image_bytes")

        def decode(data):
            image = tf.io.decode_image(data, channels=3,
                                       expand_animations=False)
            image = tf.image.resize(tf.cast(image, tf.float32), size)
            return tf.ensure_shape(image, (size[0], size[1], 3))

        def serve(image_bytes):
            images = tf.map_fn(decode, image_bytes,
                               fn_output_signature=tf.TensorSpec(
                                   (size[0], size[1], 3), tf.float32))
            return model(images, training=False)
    return serve, spec


def _probe_images(size, n=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size[0], size[1], 3)).astype("uint8")


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
            :class:`~kerastl.Backbone` or a :class:`~kerastl.DANN` (its label
            path is exported). Outputs through a GradientReversal layer are
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
        tflite: also write ``model.tflite`` (TensorFlow Lite, float input)
            into the export folder.
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
    try:
        check_destination(path, "export folder", overwrite)
    except KerastlError as e:
        raise ExportError(str(e)) from None
    path = os.path.abspath(os.fspath(path))
    model = inference_model(model)
    size = _image_size(model, image_size) if input == "bytes" else None
    try:
        with atomic_folder(path, "export folder", overwrite) as tmp:
            serve, spec = _serve_fn(model, input, size)
            archive = keras.export.ExportArchive()
            archive.track(model)
            archive.add_endpoint("serve", serve, input_signature=[spec])
            archive.write_out(tmp, verbose=False)
            if verify:
                if probe is None:
                    probe = _probe_images(_image_size(model, image_size))
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
    data = converter.convert()
    with open(os.path.join(folder, "model.tflite"), "wb") as f:
        f.write(data)
