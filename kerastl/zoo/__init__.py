"""The model zoo: where backbones come from.

Each entry is a YAML file (:mod:`kerastl.zoo.config`) that names the model
and its block rules; :mod:`kerastl.zoo.keras_apps` builds Keras Applications
models. The zoo supplies rules to :mod:`kerastl.blocks`: a backbone carries
its rules inside its :class:`~kerastl.preprocessing.ImagePreprocessing`
layer, and for models saved before that, the provider registered here maps
the recorded zoo name to its entry's rules (registered by
:mod:`kerastl.backbone`). Reading the zoo needs no Keras: ``kerastl zoo
list`` stays instant.
"""

from kerastl.zoo.config import (KERAS_APPLICATIONS, ZooConfig, config_dirs,
                                list_configs, load_config_file, parse_config,
                                zoo_entry)

__all__ = ["KERAS_APPLICATIONS", "ZooConfig", "config_dirs", "list_configs",
           "load_config_file", "parse_config", "zoo_entry"]
