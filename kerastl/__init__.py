"""kerastl: transfer learning with Keras 3, easy, correct and fast.

Everything a user builds is a plain ``keras.Model``; this module is the
public API (:data:`__all__`: the names below, and the namespaces
``kerastl.adaptation``, ``kerastl.analysis``, ``kerastl.datasets``,
``kerastl.errors`` and ``kerastl.pretrained``).

The modules in layers, from the centre outwards; a module imports only
modules of its own layer or of layers above it in this list
(``tests/test_architecture.py`` checks it, and that this list and the
documentation's "Project layout" page, docs/layout.md, say the same):

<!-- layout:start -->
Foundation (no Keras model code; nothing of kerastl but each other)
    errors            KerastlError and its family
    spec              the vocabulary read without Keras: block rules,
                      strategies, BatchNorm modes, export inputs
    schema            the experiment's keys, each declared once
    _keras_private    the few private Keras attributes kerastl touches
    _yaml             bounded YAML reading
    atomic            folders written whole or not at all
    network           offline checks for downloads
    sampling          few_shot: examples per class
    batch_order       array batches in an order drawn from (seed, pass)
    prebuild          a compiled model built before fit: one trace of the
                      train step
    rendering         digits drawn from matplotlib's fonts
Block map (what a block is)
    blocks            BlockRule, BlockMap, block_map (every model)
What acts on blocks
    distribute        device strategies; exact losses and BN across replicas
    freezing          the one resolver and applier of what trains (BatchNorm
                      policy included), GradualUnfreezing
    peft              LoRA (Keras's enable_lora), bias-only and norm-only
                      tuning by block; merge_lora; what .keras files lose
    layerwise         LayerwiseOptimizer, LayerDecay, LRSpread
    heads             the one head builder, pooling of maps and tokens
    boundary          the frozen blocks run once (boundary cache)
Model sources
    preprocessing     ImagePreprocessing: the [0, 255] input contract
    tfhub             HubLayer: TF Hub SavedModels as Keras 3 layers
    zoo               the YAML zoo, Keras Applications, KerasHub presets
    backbone          load_backbone, Backbone
Training
    augment           named augmentation policies of Keras's own layers, on
                      the training batches only
    plan              TrainingPlan: how a model is fine-tuned, one value
    training          fine_tune: the one driver
    advice            recommend_strategy
Methods
    features          extract_features, FeatureCache, LinearProbe,
                      transferability estimators
    adaptation        GradientReversal, DANN, ADDA, AdaMatch, AdaBN, adapt
                      (the default recipe), selection, borrowing source data
    analysis          linear CKA, transfer-depth sweeps, ranking backbones
    serving           export: SavedModel, LiteRT and ONNX files, each run by
                      its runtime before it is kept; inference models
    saving            save_model, load_model: a .keras file with kerastl's
                      classes, LoRA factors and trainable flags
Application
    image_folders     image folders as checked data and tf.data pipelines
    datasets          offline digit domains
    pretrained        the small CNN pretrained offline (demos, tutorials)
    resume            what a run keeps to resume exactly: backup, epoch log,
                      best checkpoint, early stopping
    experiment        kerastl finetune: a run and its outputs
    demo              kerastl demo
    cli               the kerastl command (started by kerastl_cli.py)
<!-- layout:end -->
"""

__version__ = "0.1.0"

import importlib as _importlib
import sys as _sys

# The public API: name -> the module that defines it. ``import kerastl``
# imports all of it (so that every kerastl class is registered with Keras
# before ``keras.models.load_model`` meets one). Only the ``kerastl``
# command's launcher (kerastl_cli.py) asks for a lazy package, so that
# ``--help``, ``--version`` and ``zoo list`` answer without importing Keras
# and TensorFlow; the first public name used then imports all of it.
_API = {
    # Models and where they come from.
    "Backbone": "kerastl.backbone",
    "load_backbone": "kerastl.backbone",
    "list_configs": "kerastl.zoo",
    "zoo_entry": "kerastl.zoo",
    "load_model": "kerastl.saving",
    "save_model": "kerastl.saving",
    "HubLayer": "kerastl.tfhub",
    "trust_hub_path": "kerastl.tfhub",
    # The block map and what trains.
    "BlockMap": "kerastl.blocks",
    "block_map": "kerastl.blocks",
    "freeze": "kerastl.freezing",
    "unfreeze": "kerastl.freezing",
    "trainable_summary": "kerastl.freezing",
    "GradualUnfreezing": "kerastl.freezing",
    "lora": "kerastl.peft",
    "tune_biases": "kerastl.peft",
    "tune_norms": "kerastl.peft",
    "merge_lora": "kerastl.peft",
    "build_classifier": "kerastl.heads",
    "replace_classifier": "kerastl.heads",
    "LayerwiseOptimizer": "kerastl.layerwise",
    "LayerDecay": "kerastl.layerwise",
    "LRSpread": "kerastl.layerwise",
    "describe_learning_rates": "kerastl.layerwise",
    # Training.
    "TrainingPlan": "kerastl.plan",
    "fine_tune": "kerastl.training",
    "recommend_strategy": "kerastl.advice",
    # Off-the-shelf features.
    "extract_features": "kerastl.features",
    "feature_model": "kerastl.features",
    "FeatureCache": "kerastl.features",
    "LinearProbe": "kerastl.features",
    # Domain adaptation: its central pieces and the default recipe (the
    # rest is in kerastl.adaptation).
    "GradientReversal": "kerastl.adaptation",
    "DANN": "kerastl.adaptation",
    "adapt": "kerastl.adaptation",
    # Serving.
    "export": "kerastl.serving",
    "ExportReport": "kerastl.serving",
    "export_savedmodel": "kerastl.serving",
    "inference_model": "kerastl.serving",
    # Errors (the whole family is in kerastl.errors).
    "KerastlError": "kerastl.errors",
}
# Namespaces: modules a user reaches as ``kerastl.<name>.<function>``.
_NAMESPACES = ("adaptation", "analysis", "datasets", "errors", "pretrained")


def _import_api():
    """Import the whole public API into the package namespace."""
    namespace = globals()
    for name, module in _API.items():
        if name not in namespace:
            namespace[name] = getattr(_importlib.import_module(module), name)
    for name in _NAMESPACES:
        namespace[name] = _importlib.import_module(f"kerastl.{name}")


def __getattr__(name):  # only reached in the launcher's lazy mode
    if name in _API or name in _NAMESPACES:
        _import_api()
        return globals()[name]
    raise AttributeError(f"module 'kerastl' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API) | set(_NAMESPACES))


if not getattr(_sys.modules.get("kerastl_cli"), "LAZY_PACKAGE", False):
    _import_api()

__all__ = list(_API) + list(_NAMESPACES)
