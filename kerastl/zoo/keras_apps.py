"""Building Keras Applications backbones from zoo configs."""

import os
import re
import socket

import keras

from kerastl.errors import InputShapeError, KerastlError, WeightsError
from kerastl.network import socket_timeout
from kerastl.zoo.config import KERAS_APPLICATIONS

# How long one attempt to download pretrained weights may wait on the network.
DOWNLOAD_TIMEOUT_S = 20


def constructor(config):
    """The ``keras.applications`` callable a config names (allow-listed)."""
    if config.constructor not in KERAS_APPLICATIONS:  # parse_config checks too
        raise WeightsError(f"{config.constructor!r} is not allow-listed.")
    return getattr(keras.applications, config.constructor)


def _offline_message(config, error):
    url = re.search(r"https?://\S+?\.h5", str(error))
    fname = os.path.basename(url.group(0)) if url else None
    cache = os.path.join(
        os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "models")
    where = (f"download {url.group(0)} on a machine with internet access "
             f"and copy it to {os.path.join(cache, fname)} (the Keras cache, "
             "which Keras checks before downloading), or pass"
             if url else f"put it into the Keras cache {cache}, or pass")
    return (
        f"Could not download the ImageNet weights of {config.name!r} "
        f"({type(error).__name__}: {error}). This machine seems to be offline. "
        f"What still learns offline:\n  1. the weights file: {where} the "
        f"file itself: kerastl.load_backbone({config.name!r}, weights="
        f"'/path/to/{fname or 'weights.h5'}');\n  2. a model file of your "
        f"own: kerastl.load_backbone('my_model.keras') (for example the "
        f"model.keras that `kerastl demo` writes);\n  3. random weights with "
        f"every block trained: weights=None and strategy='full' (frozen "
        f"random blocks learn nothing).")


def build_application(config, input_tensor, input_shape, weights):
    """Calls the allow-listed constructor on ``input_tensor`` without top.

    ``weights`` is ``"imagenet"``, ``None`` or a path; a path is loaded after
    construction so that errors can name the file.
    """
    ctor = constructor(config)
    kwargs = dict(config.constructor_args)
    try:
        if weights == "imagenet":
            with socket_timeout(DOWNLOAD_TIMEOUT_S):
                model = ctor(include_top=False, weights="imagenet",
                             input_tensor=input_tensor,
                             input_shape=input_shape, **kwargs)
        else:
            model = ctor(include_top=False, weights=None,
                         input_tensor=input_tensor, input_shape=input_shape,
                         **kwargs)
    except (ValueError, TypeError) as e:
        if config.constructor_args:
            raise KerastlError(
                f"keras.applications.{config.constructor} rejected the zoo "
                f"entry {config.name!r} ({config.path}): input_shape="
                f"{input_shape}, weights={weights!r}, constructor_args "
                f"{dict(config.constructor_args)}: "
                f"{' '.join(str(e).split())[:300]}. Check its "
                "constructor_args against the Keras Applications "
                "documentation.") from None
        raise InputShapeError(
            f"keras.applications.{config.constructor} rejected input_shape="
            f"{input_shape} with weights={weights!r}: {e}") from None
    except Exception as e:  # urllib, socket and Keras fetch errors
        if weights == "imagenet" and _is_network_error(e):
            raise WeightsError(_offline_message(config, e)) from None
        raise
    if weights not in (None, "imagenet"):
        load_weights_file(model, weights, config.name)
    return model


def _is_network_error(error):
    text = f"{type(error).__name__} {error}"
    return isinstance(error, (OSError, socket.timeout)) or any(
        s in text for s in ("URL fetch failure", "urlopen", "HTTP Error",
                            "Name or service not known", "timed out"))


def load_weights_file(model, path, name):
    """Loads a local weights file into ``model`` with a clear error."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(
            f"Weights file {path!r} for {name!r} does not exist. Pass "
            "weights='imagenet', weights=None, or the path of an existing "
            "'.weights.h5' / '.h5' file.")
    try:
        model.load_weights(path)
    except Exception as e:  # Keras raises ValueError / KeyError / OSError
        raise WeightsError(
            f"Could not load weights file {path!r} into {name!r}: "
            f"{type(e).__name__}: {e}. The file must hold the weights of the "
            "same architecture without its classifier (include_top=False), "
            "e.g. written by backbone.model.save_weights('x.weights.h5') or "
            "a Keras Applications '..._notop.h5' file.") from None
