"""Which zoo entries can be loaded with pretrained weights without a
download: their weights are already in the local caches that Keras, TF Hub
and KerasHub read (``kerastl rank --all-cached``)."""

import glob
import os
import re
import tempfile

from kerastl import _keras_private
from kerastl.tfhub import hub_cache_path
from kerastl.zoo import kerashub
from kerastl.zoo.config import list_configs

__all__ = ["keras_cache_dirs", "cached_configs"]


def keras_cache_dirs():
    """Where Keras Applications keep downloaded weights: ``models/`` in
    Keras's home (``$KERAS_HOME``, else ``~/.keras``), or in ``/tmp/.keras``
    when that is not writable (Keras's own fallback in ``get_file``)."""
    home = os.path.expanduser(_keras_private.keras_home())
    if not os.access(home, os.W_OK):
        home = os.path.join("/tmp" if os.path.isdir("/tmp") else
                            tempfile.gettempdir(), ".keras")
    return [os.path.join(home, "models")]


def _key(name):
    """A file or model name reduced to lower-case letters and digits,
    without Keras's ``weights_`` prefix: ``efficientnetv2-b0_notop.h5`` and
    ``EfficientNetV2B0`` both start with ``efficientnetv2b0``."""
    name = name.lower()
    if name.startswith("weights_"):
        name = name[len("weights_"):]
    return re.sub(r"[^a-z0-9]", "", name)


def _variant_matches(config, file):
    """Whether a weights file is the variant ``config`` builds: the
    MobileNets' files name their width (``alpha``) and MobileNetV3's its
    minimalistic form; a file of another variant is not this entry's."""
    if "mobilenet" not in config.constructor.lower():
        return True
    args = config.constructor_args
    alpha = float(args.get("alpha", 1.0))
    name = file.lower()
    # MobileNetV2/V3 spell the width "1.0", "0.35"; MobileNet (v1) "1_0".
    spelled = {f"{alpha:.1f}", f"{alpha:g}"} & set(name.split("_"))
    v1 = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}.get(alpha)
    if not spelled and not (v1 and f"mobilenet_{v1}_" in name):
        return False
    return ("minimalistic" in name) == bool(args.get("minimalistic", False))


def _keras_application_files():
    """Keras Applications zoo name -> its cached no-top weights files.

    Each headless weights file (``..._notop.h5`` / ``..._no_top...h5``)
    belongs to the entries whose Keras constructor is the longest name it
    starts with (``resnet50v2_...`` is ResNet50V2's, not ResNet50's), and
    of the variant they build (a MobileNetV2 file at alpha 0.35 is not the
    zoo's alpha-1.0 entry's)."""
    configs = list_configs("keras.applications")
    found = {}
    for folder in keras_cache_dirs():
        if not os.path.isdir(folder):
            continue
        for file in sorted(os.listdir(folder)):
            key = _key(file)
            if "notop" not in key or not file.endswith(".h5"):
                continue
            matches = [c for c in configs
                       if key.startswith(_key(c.constructor))]
            if not matches:
                continue
            longest = max(len(_key(c.constructor)) for c in matches)
            for c in matches:
                if len(_key(c.constructor)) == longest and \
                        _variant_matches(c, file):
                    found.setdefault(c.name, []).append(
                        os.path.join(folder, file))
    return found


def _hub_cached(config):
    handle = config.handle
    if os.path.isdir(handle):
        return True
    try:
        path = hub_cache_path(handle)
    except ImportError:  # no tensorflow-hub: nothing of it is cached
        return False
    return os.path.isfile(os.path.join(path, "saved_model.pb"))


def _kerashub_cached(config):
    """A local preset folder, or a builtin preset whose versioned kagglehub
    download holds its weights (a handle without a version needs the
    network to find the latest one)."""
    preset = config.preset
    if os.path.isdir(preset):
        return True
    try:
        handle = kerashub.builtin_presets().get(preset, preset)
    except ImportError:  # keras-hub is not installed
        return False
    if not handle.startswith("kaggle://") or \
            len(handle[len("kaggle://"):].split("/")) != 5:
        return False
    folder = kerashub.kaggle_cache(handle)
    return bool(glob.glob(os.path.join(glob.escape(folder), "*.weights.h5")))


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
