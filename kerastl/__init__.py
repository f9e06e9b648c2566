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
    distribute        strategies; exact losses and BN across replicas
    heads             the one head builder (classifier, DANN, probes),
                      pooling of feature maps and token sequences

Model sources
    preprocessing     ImagePreprocessing (carries the block rules)
    hub               HubLayer, TF Hub handles, trusted paths
    zoo/              the YAML zoo (config.py), Keras Applications
                      (keras_apps.py) and KerasHub presets (kerashub.py)
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
    cli               the ``kerastl`` command (started by kerastl_cli.py)
"""

__version__ = "0.1.0"

import importlib as _importlib
import sys as _sys

# The public API: name -> the module that defines it. ``import kerastl``
# imports all of it (so that every kerastl class is registered with Keras
# before ``keras.models.load_model`` meets one). Only the ``kerastl``
# command's launcher (kerastl_cli.py) asks for a lazy package, so that
# ``--help``, ``--version`` and ``zoo list`` answer without importing Keras
# and TensorFlow; its other commands call ``_import_api()`` first.
_API = {
    "Backbone": "kerastl.backbone",
    "load_backbone": "kerastl.backbone",
    "BlockMap": "kerastl.blocks",
    "block_map": "kerastl.blocks",
    "GradualUnfreezing": "kerastl.freezing",
    "freeze": "kerastl.freezing",
    "trainable_blocks": "kerastl.freezing",
    "trainable_summary": "kerastl.freezing",
    "unfreeze": "kerastl.freezing",
    "datasets": "kerastl.datasets",
    "hub": "kerastl.hub",
    "ADDA": "kerastl.adaptation",
    "DANN": "kerastl.adaptation",
    "GaninLambda": "kerastl.adaptation",
    "GaninLearningRate": "kerastl.adaptation",
    "GradientReversal": "kerastl.adaptation",
    "adapt_batch_norm": "kerastl.adaptation",
    "confusion_loss": "kerastl.adaptation",
    "coral_loss": "kerastl.adaptation",
    "deep_embedded_validation": "kerastl.adaptation",
    "ensemble_validation": "kerastl.adaptation",
    "mmd_loss": "kerastl.adaptation",
    "select_model": "kerastl.adaptation",
    "domain_dataset": "kerastl.adaptation",
    "hard_examples": "kerastl.adaptation",
    "information_loss": "kerastl.adaptation",
    "joint_fine_tune": "kerastl.adaptation",
    "select_source_samples": "kerastl.adaptation",
    "HubLayer": "kerastl.hub",
    "resolve_handle": "kerastl.hub",
    "trust_hub_path": "kerastl.hub",
    "FeatureCache": "kerastl.features",
    "LinearProbe": "kerastl.features",
    "extract_features": "kerastl.features",
    "feature_model": "kerastl.features",
    "CKAResult": "kerastl.analysis",
    "DepthSweep": "kerastl.analysis",
    "cka_by_block": "kerastl.analysis",
    "linear_cka": "kerastl.analysis",
    "transfer_depth_sweep": "kerastl.analysis",
    "build_classifier": "kerastl.heads",
    "replace_classifier": "kerastl.heads",
    "TokenPooling": "kerastl.heads",
    "prepare_distributed_fit": "kerastl.distribute",
    "LayerDecay": "kerastl.layerwise",
    "LayerwiseOptimizer": "kerastl.layerwise",
    "LRSpread": "kerastl.layerwise",
    "describe_learning_rates": "kerastl.layerwise",
    "layer_decay": "kerastl.layerwise",
    "lr_spread": "kerastl.layerwise",
    "STRATEGIES": "kerastl.recipes",
    "FineTuneHistory": "kerastl.recipes",
    "Strategy": "kerastl.recipes",
    "early_stopping": "kerastl.recipes",
    "fine_tune": "kerastl.recipes",
    "frozen_blocks": "kerastl.recipes",
    "recommend_strategy": "kerastl.recipes",
    "ExportError": "kerastl.export",
    "export_savedmodel": "kerastl.export",
    "inference_model": "kerastl.export",
    "BlockError": "kerastl.errors",
    "ConfigError": "kerastl.errors",
    "InputShapeError": "kerastl.errors",
    "KerastlError": "kerastl.errors",
    "UnknownModelError": "kerastl.errors",
    "WeightsError": "kerastl.errors",
    "ImagePreprocessing": "kerastl.preprocessing",
    "load_model": "kerastl.saving",
    "get_config": "kerastl.zoo",
    "list_configs": "kerastl.zoo",
    "zoo_entry": "kerastl.zoo",
}


def _import_api():
    """Import the whole public API into the package namespace."""
    namespace = globals()
    for name, module in _API.items():
        if name not in namespace:
            value = _importlib.import_module(module)
            namespace[name] = (value if module == f"kerastl.{name}"
                               else getattr(value, name))


def __getattr__(name):  # only reached in the launcher's lazy mode
    if name in _API:
        _import_api()
        return globals()[name]
    raise AttributeError(f"module 'kerastl' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))


if not getattr(_sys.modules.get("kerastl_cli"), "LAZY_PACKAGE", False):
    _import_api()

__all__ = [name for name in _API]
