"""The model zoo: where backbones come from.

Each entry is a YAML file (:mod:`kerastl.zoo.config`) that names the model
and its block rules; :mod:`kerastl.zoo.keras_apps` builds Keras Applications
models. The zoo supplies rules to :mod:`kerastl.blocks`: a backbone carries
its rules inside its :class:`~kerastl.preprocessing.ImagePreprocessing`
layer, and for models saved before that, the provider registered here maps
the recorded zoo name to its entry's rules.
"""

from kerastl import blocks as _blocks
from kerastl.errors import BlockError, UnknownModelError
from kerastl.zoo.config import (KERAS_APPLICATIONS, ZooConfig, config_dirs,
                                get_config, list_configs, load_config_file,
                                parse_config, zoo_entry)


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

__all__ = ["KERAS_APPLICATIONS", "ZooConfig", "config_dirs", "get_config",
           "list_configs", "load_config_file", "parse_config", "zoo_entry"]
