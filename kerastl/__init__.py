"""kerastl: transfer learning with Keras 3, easy, correct and fast.

Everything a user builds is a plain ``keras.Model``; this module is the
public API. The layout, from the centre outwards; imports point inwards
(``tests/test_architecture.py`` fails on an import cycle):

Core (what a block map is and what acts on it)
    errors            the KerastlError family
    _keras_private    the few private Keras attributes kerastl touches
    _yaml, atomic     bounded YAML reading; folders written whole or not
                      at all, never over a user's files
    blocks            BlockRule, BlockMap, block_map (every model)
    freezing          freeze / unfreeze / GradualUnfreezing: the one place
                      that sets ``trainable`` (BatchNorm policy included)
    layerwise         LayerwiseOptimizer, LayerDecay, LRSpread
    heads             the one head builder (classifier, DANN, probes)

Model sources
    preprocessing     ImagePreprocessing (carries the block rules)
    hub               HubLayer, TF Hub handles, trusted paths
    zoo/              the YAML zoo (config.py) and Keras Applications
    backbone          load_backbone, Backbone

Methods
    features/         extract.py (feature_model, extract_features),
                      cache.py (FeatureCache), probes.py (LinearProbe)
    adaptation/       reversal.py (GradientReversal), schedules.py,
                      losses.py (CORAL, information), dann.py (DANN),
                      data.py (domain_dataset), adabn.py, borrowing.py
    analysis          linear CKA, transfer-depth sweeps
    export            SavedModel export and inference models
    saving            load_model: a .keras file with kerastl's classes

Application
    recipes           recommend_strategy and fine_tune, the one driver
    pretrained        the small offline-pretrained CNN of the demos
    datasets          offline digit domains and few-shot sampling
    experiment, demo  ``kerastl finetune`` / ``kerastl demo``
    cli               the ``kerastl`` command
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
from kerastl.layerwise import (LayerDecay, LayerwiseOptimizer, LRSpread,
                               describe_learning_rates, layer_decay,
                               lr_spread)
from kerastl.recipes import (STRATEGIES, FineTuneHistory, Strategy,
                             early_stopping, fine_tune, frozen_blocks,
                             recommend_strategy)
from kerastl.export import ExportError, export_savedmodel, inference_model
from kerastl.errors import (BlockError, ConfigError, InputShapeError,
                            KerastlError, UnknownModelError, WeightsError)
from kerastl.preprocessing import ImagePreprocessing
from kerastl.saving import load_model
from kerastl.zoo import get_config, list_configs, zoo_entry

__all__ = [
    "Backbone", "BlockError", "BlockMap", "ConfigError", "ImagePreprocessing",
    "InputShapeError", "KerastlError", "UnknownModelError", "WeightsError",
    "block_map", "get_config", "list_configs", "load_backbone", "zoo_entry",
    "GradualUnfreezing", "freeze", "unfreeze", "trainable_blocks",
    "trainable_summary", "build_classifier", "replace_classifier", "Strategy",
    "early_stopping", "fine_tune", "recommend_strategy", "STRATEGIES",
    "FineTuneHistory", "frozen_blocks",
    "LayerwiseOptimizer", "describe_learning_rates", "LayerDecay", "LRSpread",
    "layer_decay", "lr_spread", "datasets", "DANN", "GaninLambda", "GaninLearningRate",
    "GradientReversal", "adapt_batch_norm", "coral_loss", "domain_dataset",
    "information_loss",
    "hub", "HubLayer", "resolve_handle", "trust_hub_path",
    "FeatureCache", "LinearProbe", "extract_features", "feature_model",
    "hard_examples", "joint_fine_tune", "select_source_samples",
    "CKAResult", "DepthSweep", "cka_by_block", "linear_cka",
    "transfer_depth_sweep", "ExportError", "export_savedmodel",
    "inference_model", "load_model",
]
