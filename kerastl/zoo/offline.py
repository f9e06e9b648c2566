"""Which zoo entries can be loaded with pretrained weights without a
download: their weights are already in the local caches that Keras, TF Hub
and KerasHub read (``kerastl rank --all-cached``)."""

import os
import re
import tempfile

from kerastl.zoo.config import list_configs

__all__ = ["keras_cache_dirs", "cached_configs"]


def keras_cache_dirs():
    """Where Keras Applications keep downloaded weights: Keras's home
    (``$KERAS_HOME``, else ``~/.keras``) and ``/tmp/.keras`` (Keras's
    fallback when that is not writable), each with ``models/``."""
    from kerastl import _keras_private

    roots = [_keras_private.keras_home(),
             os.path.join("/tmp" if os.path.isdir("/tmp") else
                          tempfile.gettempdir(), ".keras")]
    return [os.path.join(r, "models") for r in dict.fromkeys(roots)]


def _key(name):
    """A file or zoo name reduced to lower-case letters and digits, without
    Keras's ``weights_`` prefix: ``efficientnetv2-b0_notop.h5`` and
    ``efficientnet_v2_b0`` both start with ``efficientnetv2b0``."""
    name = name.lower()
    if name.startswith("weights_"):
        name = name[len("weights_"):]
    return re.sub(r"[^a-z0-9]", "", name)


def _keras_application_files():
    """Keras Applications zoo name -> its cached no-top weights files.

    Each headless weights file (``..._notop.h5`` / ``..._no_top...h5``) goes
    to the zoo entry with the longest name it starts with (so
    ``resnet50v2_...`` is ResNet50V2's, not ResNet50's)."""
    configs = list_configs("keras.applications")
    found = {}
    for folder in keras_cache_dirs():
        if not os.path.isdir(folder):
            continue
        for file in sorted(os.listdir(folder)):
            key = _key(file)
            if "notop" not in key or not file.endswith(".h5"):
                continue
            matches = [c for c in configs if key.startswith(_key(c.name))]
            if matches:
                best = max(matches, key=lambda c: len(_key(c.name)))
                found.setdefault(best.name, []).append(
                    os.path.join(folder, file))
    return found


def _hub_cached(config):
    handle = config.handle
    if os.path.isdir(handle):
        return True
    from kerastl.tfhub import _hub_cache_path

    try:
        path = _hub_cache_path(handle)
    except ImportError:  # no tensorflow-hub: nothing of it is cached
        return False
    return os.path.isfile(os.path.join(path, "saved_model.pb"))


def _kerashub_cached(config):
    from kerastl.zoo import kerashub

    preset = config.preset
    if os.path.isdir(preset):
        return True
    try:
        handle = kerashub.builtin_presets().get(preset, preset)
    except ImportError:  # keras-hub is not installed
        return False
    if not handle.startswith("kaggle://"):
        return False
    folder = kerashub.kaggle_cache(handle)
    if len(handle[len("kaggle://"):].split("/")) == 4:  # no version: any
        return os.path.isdir(folder) and bool(os.listdir(folder))
    return os.path.isdir(folder)


def cached_configs():
    """The zoo entries whose pretrained weights are on this machine.

    Keras Applications: a headless weights file in the Keras cache (one
    input size's file is enough to list the entry; loading at a size whose
    file is missing still needs the network). TF Hub: the SavedModel in
    tensorflow_hub's cache (``TFHUB_CACHE_DIR``). KerasHub: the preset in
    kagglehub's cache (``KAGGLEHUB_CACHE``) or a local preset folder.
    """
    apps = _keras_application_files()
    out = []
    for config in list_configs():
        if config.source == "keras.applications":
            ok = config.name in apps
        elif config.source == "tfhub":
            ok = _hub_cached(config)
        elif config.source == "kerashub":
            ok = _kerashub_cached(config)
        else:
            ok = False
        if ok:
            out.append(config)
    return out
