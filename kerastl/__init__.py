"""kerastl: transfer learning with Keras 3, easy, correct and fast.

The public API. Everything a user builds is a plain ``keras.Model``.
"""

__version__ = "0.1.0"

from kerastl.backbone import Backbone, load_backbone
from kerastl.blocks import BlockMap, block_map
from kerastl.freezing import (GradualUnfreezing, freeze, trainable_blocks,
                              trainable_summary, unfreeze)
from kerastl import datasets, hub
from kerastl.adaptation import (DANN, GaninLambda, GaninLearningRate,
                                GradientReversal, adapt_batch_norm,
                                coral_loss, domain_dataset, hard_examples,
                                information_loss, joint_fine_tune,
                                select_source_samples)
from kerastl.hub import HubLayer, resolve_handle, trust_hub_path
from kerastl.features import (FeatureCache, LinearProbe, extract_features,
                              feature_model)
from kerastl.analysis import (CKAResult, DepthSweep, cka_by_block,
                              linear_cka, transfer_depth_sweep)
from kerastl.heads import build_classifier, replace_classifier
from kerastl.layerwise import (LayerwiseOptimizer, describe_learning_rates,
                               layer_decay, lr_spread)
from kerastl.recipes import Strategy, early_stopping, fine_tune, recommend_strategy
from kerastl.export import ExportError, export_savedmodel, inference_model
from kerastl.errors import (BlockError, ConfigError, InputShapeError,
                            KerastlError, UnknownModelError, WeightsError)
from kerastl.preprocessing import ImagePreprocessing
from kerastl.zoo import get_config, list_configs, zoo_entry

__all__ = [
    "Backbone", "BlockError", "BlockMap", "ConfigError", "ImagePreprocessing",
    "InputShapeError", "KerastlError", "UnknownModelError", "WeightsError",
    "block_map", "get_config", "list_configs", "load_backbone", "zoo_entry",
    "GradualUnfreezing", "freeze", "unfreeze", "trainable_blocks",
    "trainable_summary", "build_classifier", "replace_classifier", "Strategy",
    "early_stopping", "fine_tune", "recommend_strategy",
    "LayerwiseOptimizer", "describe_learning_rates", "layer_decay",
    "lr_spread", "datasets", "DANN", "GaninLambda", "GaninLearningRate",
    "GradientReversal", "adapt_batch_norm", "coral_loss", "domain_dataset",
    "information_loss",
    "hub", "HubLayer", "resolve_handle", "trust_hub_path",
    "FeatureCache", "LinearProbe", "extract_features", "feature_model",
    "hard_examples", "joint_fine_tune", "select_source_samples",
    "CKAResult", "DepthSweep", "cka_by_block", "linear_cka",
    "transfer_depth_sweep", "ExportError", "export_savedmodel",
    "inference_model",
]
