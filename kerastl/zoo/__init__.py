"""The model zoo: where backbones come from."""

from kerastl.zoo.config import (KERAS_APPLICATIONS, ZooConfig, config_dirs,
                                get_config, list_configs, load_config_file,
                                parse_config)

__all__ = ["KERAS_APPLICATIONS", "ZooConfig", "config_dirs", "get_config",
           "list_configs", "load_config_file", "parse_config"]
