"""The private Keras attributes kerastl touches, in one place.

Keras's public API has no way to walk a functional graph in order, to hook
an optimizer's per-variable update, or to read a model's compile arguments
back. Each accessor below names the private attribute it reads, why kerastl
needs it, and the Keras version it was checked against (3.15.1; the test
suite exercises every one of them, so a Keras release that moves one fails
there first). Nothing else in kerastl reads a private Keras attribute.
"""

import contextlib
import logging

import keras

CHECKED_AGAINST = "3.15.1"


# -- functional graphs ------------------------------------------------------------

def functional_graph(model):
    """The functional graph behind ``model``, or None (subclassed).

    ``Sequential._functional`` is the functional model a built Sequential
    keeps; a functional model has ``_nodes_by_depth`` itself. Needed to walk
    layers input to output (block maps, export's label path).
    """
    functional = getattr(model, "_functional", None)
    if functional is not None:
        return functional
    return model if hasattr(model, "_nodes_by_depth") else None


def nodes_by_depth(graph):
    """``{depth: [node, ...]}`` of a functional graph (``_nodes_by_depth``;
    depth 0 is the output): the only ordered view of its nodes."""
    return graph._nodes_by_depth


def producing_operation(tensor):
    """The layer (or operation) that produced a symbolic tensor
    (``KerasTensor._keras_history.operation``)."""
    return tensor._keras_history.operation


def producing_inputs(tensor):
    """The input tensors of the call that produced a symbolic tensor
    (``_keras_history``: operation, node index; ``_inbound_nodes``)."""
    history = tensor._keras_history
    node = history.operation._inbound_nodes[history.node_index]
    return node.input_tensors


def all_sublayers(layer):
    """``layer`` and every layer nested in it, recursively
    (``Layer._flatten_layers()``): subclassed models have no graph to walk."""
    return list(layer._flatten_layers())


def lora_base_weight(layer):
    """The weight that Keras's ``enable_lora`` froze in ``layer`` (the
    kernel of Dense, EinsumDense and convolutions, ``_kernel``; the table of
    Embedding, ``_embeddings``): its public ``kernel`` of a LoRA layer is
    the merged value, not the variable. None for a layer without LoRA."""
    if not getattr(layer, "lora_enabled", False):
        return None
    kernel = getattr(layer, "_kernel", None)
    return kernel if kernel is not None else getattr(layer, "_embeddings",
                                                     None)


def lora_factors(layer):
    """``(A, B)``: the LoRA factors Keras's ``enable_lora`` added to
    ``layer`` (``lora_kernel_a``/``_b``; an Embedding's are
    ``lora_embeddings_a``/``_b``), or ``()`` for a layer without LoRA."""
    if not getattr(layer, "lora_enabled", False):
        return ()
    if hasattr(layer, "lora_kernel_a"):
        return layer.lora_kernel_a, layer.lora_kernel_b
    return layer.lora_embeddings_a, layer.lora_embeddings_b


# -- compiling ---------------------------------------------------------------------

def compile_config(model):
    """The arguments of the model's last ``compile`` call, or None
    (``Model._compile_config.config``): freezing recompiles with them."""
    config = getattr(model, "_compile_config", None)
    return None if config is None else dict(config.config)


def compiled_loss(model):
    """The loss given to ``compile`` (``Model._compile_loss``), or None:
    DANN's ``compute_loss`` falls back to its own loss without one."""
    return getattr(model, "_compile_loss", None)


def additional_loss(model, loss):
    """One ``model.losses`` entry as Keras's own train step adds it
    (``Model._aggregate_additional_loss``: the dtype and reduction rules)."""
    return model._aggregate_additional_loss(loss)


# -- optimizers --------------------------------------------------------------------

def variable_index(optimizer, variable):
    """The index of ``variable`` in the optimizer's slots
    (``Optimizer._get_variable_index``)."""
    return optimizer._get_variable_index(variable)


def hook_optimizer(optimizer, update_step, apply_weight_decay,
                   current_learning_rate):
    """Replaces, on one optimizer instance, the three methods through which
    every Keras 3 optimizer applies its learning rate:

    * ``update_step(gradient, variable, learning_rate)`` (public);
    * ``_apply_weight_decay(variables)`` (decoupled weight decay);
    * ``_get_current_learning_rate()`` (what weight decay multiplies).

    Each argument is ``wrap(original) -> replacement``. Returns nothing.
    """
    replacements = {
        "update_step": update_step(optimizer.update_step),
        "_apply_weight_decay": apply_weight_decay(
            optimizer._apply_weight_decay),
        "_get_current_learning_rate": current_learning_rate(
            optimizer._get_current_learning_rate),
    }
    for name, fn in replacements.items():
        object.__setattr__(optimizer, name, fn)


def start_fit_at(model, epoch):
    """Makes the ``fit`` call whose callbacks are beginning start at
    ``epoch`` (``Model._initial_epoch``, which Keras's BackupAndRestore
    sets the same way; ``fit`` reads it after ``on_train_begin``, and
    keeps it for the next ``fit``: None puts it back)."""
    model._initial_epoch = None if epoch is None else int(epoch)


def learning_rate_schedule(optimizer):
    """The ``LearningRateSchedule`` that ``optimizer`` (or the optimizer it
    wraps) follows, or None for a plain rate (``_learning_rate``)."""
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    rate = getattr(optimizer, "_learning_rate", None)
    return rate if isinstance(
        rate, keras.optimizers.schedules.LearningRateSchedule) else None


def copy_weight_decay_exclusions(source, target):
    """Gives ``target`` the variables and name patterns that ``source``
    excludes from weight decay (``exclude_from_weight_decay``, which
    ``get_config`` does not hold), through wrappers (``inner_optimizer``)
    on both sides. Returns nothing."""
    while source is not None and target is not None:
        for name in ("_exclude_from_weight_decay",
                     "_exclude_from_weight_decay_pattern"):
            if hasattr(source, name):
                value = getattr(source, name)
                object.__setattr__(target, name, set(value) if isinstance(
                    value, set) else value)
        object.__setattr__(target, "_exclude_from_weight_decay_cache", {})
        source = getattr(source, "inner_optimizer", None)
        target = getattr(target, "inner_optimizer", None)


# -- variables and saving ----------------------------------------------------------

def adopt_tf_variable(variable, tf_variable):
    """Points a Keras TensorFlow-backend variable at an existing
    ``tf.Variable`` (``_value``, ``_shape``, ``_ndim``, ``_dtype``), so that
    optimizers, checkpoints and exports act on a SavedModel's own variable."""
    variable._value = tf_variable
    variable._shape = tuple(tf_variable.shape)
    variable._ndim = len(variable._shape)
    variable._dtype = tf_variable.dtype.name


def optimizer_variables(optimizer):
    """The variables a built optimizer updates, in its order (None if not
    built): ``Optimizer._trainable_variables``; a LayerwiseOptimizer's are
    its inner optimizer's."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not getattr(inner, "built", False):
        return None
    return list(getattr(inner, "_trainable_variables", []) or [])


def variables_used_by(fn):
    """``(trainable, non_trainable)`` variables a restored SavedModel
    function captures: Keras' own helper for ``model.export``
    (``keras.src.export.saved_model._list_variables_used_by_fns``), for
    SavedModels that list no ``variables`` attribute. Imported here, not at
    the top: it imports TensorFlow."""
    from keras.src.export.saved_model import _list_variables_used_by_fns

    return _list_variables_used_by_fns([fn])


def in_safe_mode():
    """Whether ``keras.models.load_model`` is deserialising in safe mode
    (``keras.src.saving.serialization_lib.in_safe_mode``): True, False, or
    None outside a load (treated as safe)."""
    from keras.src.saving import serialization_lib

    return serialization_lib.in_safe_mode()


@contextlib.contextmanager
def before_compile_from_config(fn):
    """Within the block, ``fn(model)`` runs each time ``load_model``
    compiles a model from its saved compile config, before the optimizer is
    built on ``model.trainable_variables`` and its saved slots are loaded.

    ``keras.models.load_model`` deserialises a model, compiles it (building
    the optimizer on the trainable variables of that moment) and only then
    loads weights and optimizer slots; the one moment between the model
    existing and its optimizer being built is the public method
    ``Trainer.compile_from_config``, which is wrapped here for the duration
    of the block only (then restored).
    """
    from keras.src.trainers.trainer import Trainer

    original = Trainer.__dict__["compile_from_config"]

    def compile_from_config(self, config):
        fn(self)
        return original(self, config)

    Trainer.compile_from_config = compile_from_config
    try:
        yield
    finally:
        Trainer.compile_from_config = original


class _RetracingFilter:
    """Drops TensorFlow's "triggered tf.function retracing" warning about
    Keras's own step functions (``one_step_on_data_distributed``, the
    private name of the function each ``fit``/``evaluate``/``predict``
    builds per model): TensorFlow counts traces by that function's code, so
    predicting once with each of five models (a boundary prefix, a feature
    model, the trained classifier...) looks like a retracing loop."""

    def filter(self, record):
        message = record.getMessage()
        return not ("triggered tf.function retracing" in message
                    and "one_step_on_data" in message)


@contextlib.contextmanager
def quiet_retracing():
    """Within the block, TensorFlow's retracing warning about Keras's step
    functions is not logged (see :class:`_RetracingFilter`); every other
    message is."""
    logger = logging.getLogger("tensorflow")
    flt = _RetracingFilter()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


def move_initial_epoch(source, target):
    """Moves the epoch ``BackupAndRestore`` set on ``source`` (the model its
    callback sees) to ``target`` (the model whose ``fit`` runs): Keras reads
    ``model._initial_epoch`` right after ``on_train_begin``."""
    epoch = getattr(source, "_initial_epoch", None)
    if epoch:
        target._initial_epoch = epoch
        source._initial_epoch = None


__all__ = ["CHECKED_AGAINST", "functional_graph", "nodes_by_depth",
           "producing_operation", "all_sublayers", "compile_config",
           "compiled_loss", "additional_loss", "variable_index",
           "hook_optimizer", "adopt_tf_variable", "optimizer_variables",
           "variables_used_by", "in_safe_mode", "move_initial_epoch",
           "before_compile_from_config", "quiet_retracing"]



def keras_hub_builtin_presets():
    """KerasHub's table of its own presets, name -> Kaggle handle
    (``keras_hub.src.utils.preset_utils.BUILTIN_PRESETS``, checked against
    keras-hub 0.32; ``{}`` where a version moved it): KerasHub has no
    public list that maps a preset to its handle."""
    try:
        from keras_hub.src.utils import preset_utils
        return {name: meta.get("kaggle_handle", "") for name, meta in
                preset_utils.BUILTIN_PRESETS.items()}
    except Exception:
        return {}


def run_graph_with(model, inputs, operation_fn):
    """``model``'s functional graph applied to ``inputs`` (its inputs'
    structure), each operation replaced by ``operation_fn(operation)``:
    how a graph is rebuilt over fresh layers on new tensors."""
    return model._run_through_graph(inputs, operation_fn=operation_fn)


def symbolic_build(model, data_batch):
    """``Trainer._symbolic_build``: builds a compiled ``model``'s layers,
    compiled losses and metrics and its optimizer from the structure of one
    batch (``KerasTensor`` stand-ins will do), as Keras's TensorFlow trainer
    does before ``fit`` under a distribution strategy. Without one it
    defers that to the first trace of the train step, which then runs
    twice (see :mod:`kerastl.prebuild`). Returns False where this Keras has
    no such method."""
    build = getattr(model, "_symbolic_build", None)
    if build is None:
        return False
    build(data_batch=data_batch)
    return True


def has_distribution_strategy(model):
    """Whether ``model`` was created under a ``tf.distribute`` strategy
    (``_distribute_strategy``, set by Keras's TensorFlow trainer)."""
    return getattr(model, "_distribute_strategy", None) is not None


def build_before_distributed_fit(model, data_batch):
    """Builds ``model``'s layers, compiled loss, metrics and optimizer from
    one batch now, and skips the step of ``fit`` that would do it.

    Keras 3 (3.15 at least) cannot start ``fit`` under
    ``tf.distribute.MultiWorkerMirroredStrategy``: ``fit`` first averages a
    distributed input batch across workers in eager mode to build the model
    (``TensorFlowTrainer._maybe_symbolic_build``), which the collective
    strategy refuses ("Attempt to convert a value (PerReplica..."; see
    keras-team/keras#20585). With everything built, that step has nothing to
    do.
    """
    with model.distribute_strategy.scope():
        model._symbolic_build(data_batch=data_batch)

        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
    model._maybe_symbolic_build = lambda *args, **kwargs: None
    # The same version averages each step's logs across workers with
    # strategy.reduce("MEAN", value, axis=0), which fails on the scalars
    # that train_step returns: return them as (1,) vectors instead (the
    # mean over axis 0 is then the scalar mean across workers).
    for name in ("train_step", "test_step"):
        step = getattr(model, name)
        if getattr(step, "_kerastl_vector_logs", False):
            continue

        def vector_logs(data, step=step):
            return keras.tree.map_structure(
                lambda v: keras.ops.reshape(v, (1,))
                if len(getattr(v, "shape", ())) == 0 else v, step(data))

        vector_logs._kerastl_vector_logs = True
        setattr(model, name, vector_logs)


# -- caches -------------------------------------------------------------------------

def keras_home():
    """``keras.src.backend.config.keras_home()``: the folder Keras's
    ``get_file`` caches downloads under (``$KERAS_HOME``, else ``~/.keras``,
    else ``/tmp/.keras``), as Keras resolved it when it was imported. Needed
    to tell which Keras Applications weights are on disk without
    downloading them (``kerastl rank --all-cached``)."""
    from keras.src.backend import config

    return config.keras_home()
