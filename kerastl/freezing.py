"""Freezing by block, with BatchNormalization handled right.

Frozen means ``layer.trainable = False``: no gradient is computed for the
layer and its weights cannot move. Keras runs a BatchNormalization layer with
``trainable = False`` in inference mode, so its moving mean and variance do
not move either.

BatchNormalization in the blocks that are *trained* is the classic trap of
fine-tuning: with the small batches of a small target set, batch statistics
are noisy and updating the moving statistics destroys what the pretrained
network learned. kerastl's default, ``bn="frozen"``, keeps every BN layer in
inference mode (``trainable = False``: moving statistics, gamma and beta
fixed) while the convolutions around it train, as the Keras transfer-learning
guide recommends. ``bn="train"`` trains BN like any other layer (batch
statistics, moving averages updated): use it with large batches and a target
domain far from the source.

Every way of saying what trains (a strategy, a number of blocks, a block
name, True/False/None) is turned into one value, a :class:`Trainable`, by
one function, :func:`resolve_trainable`, and applied by one function,
:func:`apply_trainable`. :func:`freeze`, ``build_classifier(freeze=...)``
and :class:`kerastl.TrainingPlan` all go through them.

Changing ``trainable`` after ``compile`` does not reach a compiled model's
training step, and a built optimizer refuses variables it has not seen.
:func:`freeze` and :func:`unfreeze` therefore recompile a compiled model
themselves, with the same loss and metrics and a fresh optimizer of the same
configuration (:func:`fresh_optimizer`; optionally a new learning rate).
"""

import contextlib
import dataclasses
import math
import numbers

import keras
import numpy as np

from kerastl import _keras_private as _private
from kerastl.blocks import block_map, variable_size
from kerastl.distribute import strategy_scope
from kerastl.errors import BlockError, KerastlError
from kerastl.spec import (BN_MODES, CUT_STRATEGIES, FINE_TUNING_STRATEGIES,
                          PEFT_STRATEGIES)


def _is_batch_norm(layer):
    return isinstance(layer, keras.layers.BatchNormalization)


def _check_bn(bn):
    if bn not in BN_MODES:
        raise KerastlError(f"bn={bn!r}: expected 'frozen' or 'train'.")


def keras_model_of(backbone):
    """The ``keras.Model`` of a Backbone (or the model itself), checked."""
    model = getattr(backbone, "model", backbone)
    if not isinstance(model, keras.Model):
        raise KerastlError(
            f"Expected a kerastl.Backbone or keras.Model, got "
            f"{type(backbone).__name__}.")
    return model


@dataclasses.dataclass(frozen=True)
class Trainable:
    """What trains in a model: its blocks, and which of them train.

    The one value that every way of saying "what trains" resolves to
    (:func:`resolve_trainable`), and what :func:`apply_trainable` applies.

    Attributes:
        blocks: every block of the model, input to output.
        trainable: the blocks that train, input to output.
        mode: what trains in the trainable blocks of the pretrained
            network: ``"full"`` (every weight), ``"lora"`` (only the LoRA
            factors that :func:`kerastl.lora` added beside frozen kernels),
            ``"bias"`` (only the ``bias`` of each layer) or ``"norm"``
            (only the normalisation layers: scale, offset and, for
            BatchNormalization, batch statistics). New heads always train
            whole.
    """

    blocks: tuple
    trainable: tuple
    mode: str = "full"

    @property
    def frozen(self):
        """The frozen blocks, input to output."""
        return tuple(b for b in self.blocks if b not in self.trainable)

    @property
    def depth(self):
        """How many leading blocks are frozen: where the frozen part of
        the model ends (the boundary cache cuts there)."""
        n = 0
        while n < len(self.blocks) and self.blocks[n] not in self.trainable:
            n += 1
        return n

    def check(self, bm, model_name):
        """Raises unless this was resolved for a model with block map
        ``bm``."""
        if tuple(self.blocks) != tuple(bm.names):
            raise BlockError(
                f"This plan was resolved for blocks {list(self.blocks)}; "
                f"{model_name!r} has {bm.names}. Resolve it for this model "
                "(TrainingPlan.resolve(model)).")

    @classmethod
    def of(cls, bm, trainable, mode="full"):
        """The value for a block map and the block names (or indices) that
        train."""
        wanted = {bm.resolve(b) for b in trainable}
        return cls(tuple(bm.names), tuple(b for b in bm.names if b in wanted),
                   mode)

    def __str__(self):
        frozen = self.frozen
        tuned = "" if self.mode == "full" else f" ({self.mode} only)"
        return (f"frozen: {', '.join(frozen) or '-'}; trainable{tuned}: "
                f"{', '.join(self.trainable) or '-'}")


def _count(bm, value, name, model):
    """How many leading blocks ``value`` (a count or a block name) freezes."""
    names = bm.names
    if isinstance(value, bool):
        pass  # True/False are handled by the caller; here they are wrong
    elif isinstance(value, numbers.Integral):
        if not 0 <= value <= len(names):
            raise BlockError(
                f"{name}={value}: the model has {len(names)} blocks "
                f"({', '.join(names)}); freeze between 0 and {len(names)}.")
        return int(value)
    elif isinstance(value, str):
        if value not in bm:
            raise BlockError(
                f"{name}={value!r} is neither a strategy "
                f"({', '.join(FINE_TUNING_STRATEGIES)}) nor a block of "
                f"{model.name!r}; blocks: {', '.join(names)}.")
        return bm.index(value) + 1
    raise KerastlError(
        f"{name}={value!r}: expected a strategy "
        f"({', '.join(FINE_TUNING_STRATEGIES)}), a block name or a number of "
        f"leading blocks (0 to {len(names)}).")


def resolve_trainable(model, what="features", up_to=None, name="up_to"):
    """What trains, from any of the ways of saying it: the one resolver.

    Args:
        model: a ``keras.Model`` with a block map, or a Backbone.
        what: one of

            * a strategy: ``"features"`` (every block but the new heads
              frozen), ``"partial"`` (the first half of those blocks
              frozen, rounded up, or up to ``up_to``), ``"full"``
              (nothing frozen), or ``"lora"``, ``"bias"``, ``"norm"``
              (in every block after ``up_to``, or in all of them, only the
              LoRA factors, the biases or the normalisation layers train;
              see :attr:`Trainable.mode`);
            * ``True`` or ``None`` (``"features"``), ``False``
              (``"full"``);
            * a number of leading blocks to freeze, from 0 to the number
              of blocks (heads included: the range of every count in
              kerastl);
            * a block name: that block and every block before it frozen.
        up_to: with ``"partial"``, ``"lora"``, ``"bias"`` or ``"norm"``:
            the last frozen block (a name or a count, as above).
        name: the argument's name in error messages (``freeze_up_to``,
            ``freeze``, ...).

    Returns:
        A :class:`Trainable`.

    Raises:
        BlockError: a block name the model does not have, or a count out
            of range (the message lists the blocks).
        KerastlError: ``up_to`` with ``"features"`` or ``"full"``, or a
            value of another type.
    """
    keras_model = keras_model_of(model)
    bm = block_map(keras_model)
    base = len(bm.base_blocks)
    if what is None or what is True:
        what = "features"
    elif what is False:
        what = "full"
    mode = "full"
    if isinstance(what, str) and what in FINE_TUNING_STRATEGIES:
        if up_to is not None and what not in CUT_STRATEGIES:
            raise KerastlError(
                f"freeze_up_to applies to the strategies "
                f"{', '.join(CUT_STRATEGIES)}, not {what!r}.")
        if what in PEFT_STRATEGIES:
            mode = what
        if what == "features":
            n = base
        elif what == "full":
            n = 0
        elif up_to is not None:
            n = _count(bm, up_to, "freeze_up_to", keras_model)
        else:  # partial: the first half; lora, bias, norm: every block
            n = math.ceil(base / 2) if what == "partial" else 0
    else:
        if up_to is not None:
            raise KerastlError(
                f"freeze_up_to applies to the strategies "
                f"{', '.join(CUT_STRATEGIES)}, not {what!r}.")
        n = _count(bm, what, name, keras_model)
    return Trainable(tuple(bm.names), tuple(bm.names[n:]), mode)


def apply_trainable(model, trainable, bn="frozen", recompile=True,
                    learning_rate=None):
    """Makes exactly the ``trainable`` blocks trainable; every other block
    frozen: the one place that sets ``trainable`` by block.

    Args:
        model: a ``keras.Model`` or :class:`~kerastl.Backbone`.
        trainable: a :class:`Trainable` (from :func:`resolve_trainable`),
            or the block names (or indices) to train.
        bn: ``"frozen"`` or ``"train"``: BatchNormalization layers in the
            trainable blocks of the pretrained network (BN in frozen blocks
            is always frozen; BN in new heads always trains).
        recompile: recompile a compiled model so that the change reaches
            ``fit`` (a fresh optimizer of the same configuration).
        learning_rate: with ``recompile``, the new optimizer's learning rate.

    Returns:
        The list of trainable block names.
    """
    _check_bn(bn)
    keras_model = keras_model_of(model)
    if learning_rate is not None and recompile:
        _check_learning_rate(keras_model, learning_rate)
    bm = block_map(keras_model)
    if isinstance(trainable, Trainable):
        trainable.check(bm, keras_model.name)
        wanted = set(trainable.trainable)
    else:
        wanted = set(Trainable.of(bm, trainable).trainable)
    # Keras propagates `trainable` down to sublayers, so open the model (and
    # with it every nested model) first, then set each leaf.
    keras_model.trainable = True
    for layer in bm.weighted_layers():
        if bm.is_split(layer):
            _set_split_layer(layer, bm, wanted, bn)
            continue
        block = bm.block_of(layer)
        train = block in wanted
        # The BN policy is for pretrained blocks: BN in a new head (DANN's
        # bottleneck and domain head) has no statistics worth keeping.
        if train and _is_batch_norm(layer) and bn == "frozen" and \
                block not in bm.head_blocks:
            train = False
        if train:  # (through False: see train_only; a weight that
            layer.trainable = False  # tune_biases or lora froze trains)
        layer.trainable = train
        if hasattr(layer, "batchnorm_training"):  # a whole HubLayer
            layer.batchnorm_training = bn == "train"
    mode = trainable.mode if isinstance(trainable, Trainable) else "full"
    _select_weights(keras_model, bm, wanted - set(bm.head_blocks), mode)
    if recompile:
        _recompile(keras_model, learning_rate)
    return [b for b in bm.names if b in wanted]


_NORM_LAYERS = tuple(getattr(keras.layers, n) for n in (
    "BatchNormalization", "LayerNormalization", "GroupNormalization",
    "RMSNormalization") if hasattr(keras.layers, n))


def tuned_weights(layer, mode):
    """The weights of a leaf layer that train under ``mode`` (see
    :attr:`Trainable.mode`): ``"lora"``, its LoRA factors; ``"bias"``, its
    ``bias``; ``"norm"``, every weight of a normalisation layer."""
    if mode == "lora":
        return list(_private.lora_factors(layer))
    if mode == "bias":
        bias = getattr(layer, "bias", None)
        return [bias] if isinstance(bias, keras.Variable) else []
    if mode == "norm":
        return list(layer.weights) if isinstance(layer, _NORM_LAYERS) else []
    raise KerastlError(f"mode={mode!r}: expected 'full', "
                       f"{', '.join(PEFT_STRATEGIES)}.")


def leaf_layers(model):
    """The layers of ``model`` that own weights and hold no layer that
    does (Dense, Conv2D, LayerNormalization...), nested ones included."""
    out = []
    for layer in _private.all_sublayers(keras_model_of(model)):
        if layer.weights and not any(
                sub.weights for sub in _private.all_sublayers(layer)[1:]):
            out.append(layer)
    return out


def train_only(layer, weights):
    """Makes exactly those weights of a leaf ``layer`` whose ``id`` is in
    ``weights`` trainable (of the weights it can train: not BatchNorm's
    statistics), and freezes the layer whole if there are none."""
    # Keras's setter sets every variable the layer created trainable;
    # through False, because the TensorFlow backend skips assigning the
    # value a flag already has.
    layer.trainable = False
    layer.trainable = True
    candidates = list(layer.trainable_weights)
    if not any(id(v) in weights for v in candidates):
        layer.trainable = False
        return
    for v in candidates:
        v.trainable = id(v) in weights


def _select_weights(model, bm, blocks, mode):
    """After the block flags are set: in ``blocks`` (of the pretrained
    network), only the weights ``mode`` names train; everywhere, a kernel
    that Keras's ``enable_lora`` froze stays frozen (its LoRA factors are
    what trains beside it)."""
    tuned_ids = set()
    for layer in leaf_layers(model):
        base = _private.lora_base_weight(layer)
        if mode != "full" and bm.block_of(layer.weights[0]) in blocks:
            if bm.is_split(layer):
                raise KerastlError(
                    f"strategy {mode!r} selects weights inside Keras layers; "
                    f"{layer.name!r} is a TF Hub SavedModel whose variables "
                    "have no layers. Use strategy 'partial' or 'full' for "
                    "it, or a Keras Applications / KerasHub backbone.")
            tuned = {id(v) for v in tuned_weights(layer, mode)}
            train_only(layer, tuned)
            tuned_ids |= tuned
        elif base is not None and base.trainable:
            base.trainable = False
    if mode != "full":
        # Weights a layer owns beside its sublayers (a ViT's class token, a
        # DINOv2 mask token): not what the mode names either.
        for v in model.trainable_weights:
            if id(v) not in tuned_ids and bm.block_of(v) in blocks:
                v.trainable = False


def freeze_weights(model, variables):
    """Freezes exactly ``variables`` of ``model``; nothing else changes.

    A layer all of whose weights are listed is frozen whole (BatchNorm then
    runs in inference mode, as in :func:`freeze`); a layer whose variables
    lie in several blocks (a HubLayer under a variable-path block map) has
    the listed variables frozen one by one. What
    :class:`~kerastl.LayerwiseOptimizer` does with a multiplier of 0.

    Args:
        model: a ``keras.Model`` or :class:`~kerastl.Backbone`.
        variables: weight variables of ``model``.
    """
    keras_model = keras_model_of(model)
    bm = block_map(keras_model)
    frozen = {id(v) for v in variables}
    for layer in bm.weighted_layers():
        hit = [id(v) in frozen for v in layer.weights]
        if all(hit):
            layer.trainable = False
        elif any(hit) and bm.is_split(layer):
            set_variables_trainable(
                [v for v, h in zip(layer.weights, hit) if h], False)


def set_variables_trainable(variables, trainable):
    """Sets single variables' ``trainable`` flag (a HubLayer's variables).

    Variables that their SavedModel marks non-trainable (BatchNorm
    statistics, ``hub_trainable`` false) never become trainable.
    """
    for v in variables:
        v.trainable = bool(trainable) and getattr(v, "hub_trainable", True)


@contextlib.contextmanager
def temporarily_trainable(layers):
    """Makes ``layers`` trainable inside the block, restoring every flag
    after it. AdaBN uses it: a BatchNormalization layer updates its
    statistics only while trainable."""
    layers = list(layers)
    with restored_trainability(layers):
        for layer in layers:
            layer.trainable = True
        yield


@contextlib.contextmanager
def restored_trainability(layers):
    """Restores the ``trainable`` flag of ``layers`` (and of their
    variables) when the block ends, however it ends."""
    layers = list(layers)
    saved = [(layer, layer.trainable,
              [(v, v.trainable) for v in getattr(layer, "weights", [])])
             for layer in layers]
    try:
        yield
    finally:
        for layer, trainable, variables in saved:
            layer.trainable = trainable
            for v, t in variables:
                v.trainable = t


def _set_split_layer(layer, bm, wanted, bn):
    """Freezes a HubLayer variable by variable, by the blocks they are in.

    The SavedModel has one ``training`` switch for all of its BatchNorm
    layers: ``bn="frozen"`` calls it in inference mode (no statistics move
    anywhere); ``bn="train"`` calls it with ``training=True``, which also
    moves the statistics of BatchNorm inside frozen blocks.
    """
    # Variables the SavedModel marks non-trainable never train.
    train = {id(v): bm.block_of(v) in wanted
             and getattr(v, "hub_trainable", True) for v in layer.weights}
    # Keras's `trainable` setter sets every variable of the layer, so set
    # the layer first and the single variables after it.
    layer.trainable = any(train.values())
    if layer.trainable:
        for v in layer.weights:
            set_variables_trainable([v], train[id(v)])
    layer.batchnorm_training = bn == "train"


# Backends whose train step applies the optimizer statelessly.
_STATELESS = keras.backend.backend() == "jax"


def fresh_optimizer(model, optimizer=None, variables=None,
                    learning_rate=None):
    """A new optimizer of the same class and configuration as ``optimizer``
    (default: the model's), made in the model's distribution scope (so its
    variables are mirrored like the model's), optionally with another
    learning rate and built over ``variables``.

    What every recompile after a change of ``trainable`` needs: a built
    optimizer refuses variables it has not seen.
    """
    optimizer = model.optimizer if optimizer is None else optimizer
    with strategy_scope(model):
        fresh = optimizer.__class__.from_config(optimizer.get_config())
        # (not in the config: AdamW's exclude_from_weight_decay)
        _private.copy_weight_decay_exclusions(optimizer, fresh)
        if learning_rate is not None:
            fresh.learning_rate = learning_rate
        if variables is not None:
            fresh.build(list(variables))
    return fresh


def _check_learning_rate(model, learning_rate):
    """Refuses, before anything changes, a ``learning_rate=`` that the
    recompile could not set."""
    if isinstance(learning_rate, bool) or not isinstance(
            learning_rate, (int, float, np.floating, np.integer)) or \
            not 0 < learning_rate < float("inf"):
        raise KerastlError(
            f"learning_rate={learning_rate!r}: expected a number > 0.")
    if not getattr(model, "compiled", False):
        return  # (_recompile names the fix)
    schedule = _private.learning_rate_schedule(model.optimizer)
    if schedule is not None:
        raise KerastlError(
            f"learning_rate={learning_rate!r}: the model's optimizer follows "
            f"a schedule ({type(schedule).__name__}), whose rate cannot be "
            "set; compile with a new optimizer instead of passing "
            "learning_rate=.")


def _recompile(model, learning_rate=None):
    """Recompiles a compiled model with a fresh optimizer of the same config."""
    if not getattr(model, "compiled", False):
        if learning_rate is not None:
            raise KerastlError(
                "learning_rate= needs a compiled model: compile it first, or "
                "pass the rate to model.compile().")
        return False
    kwargs = _private.compile_config(model)
    if kwargs is None or model.optimizer is None:
        raise KerastlError(
            "The model is compiled but kerastl cannot recompile it; call "
            "model.compile(...) again after changing what is trainable.")
    kwargs["optimizer"] = fresh_optimizer(model, learning_rate=learning_rate)
    with strategy_scope(model):
        model.compile(**kwargs)
    return True


def trainable_blocks(model):
    """Names of the blocks whose non-BN weighted layers are trainable."""
    keras_model = keras_model_of(model)
    bm = block_map(keras_model)
    trainable_ids = {id(v) for v in keras_model.trainable_variables}
    out = []
    for b in bm.names:
        bn_ids = {id(v) for l in bm.weighted_layers(b) if _is_batch_norm(l)
                  for v in l.weights}
        variables = bm.variables(b)
        variables = [v for v in variables if id(v) not in bn_ids] or variables
        if any(id(v) in trainable_ids for v in variables):
            out.append(b)
    return out


def freeze(model, up_to=None, bn="frozen", recompile=True,
           learning_rate=None):
    """Freezes the first blocks and trains the rest.

    Args:
        model: a ``keras.Model`` or :class:`~kerastl.Backbone`.
        up_to: the last block to freeze (a name: ``"stage3"``), how many
            leading blocks to freeze (an int, 0 to the number of blocks), or
            a strategy (``"features"``, ``"partial"``, ``"full"``; see
            :func:`resolve_trainable`). ``None`` freezes every block but the
            new heads (a classifier's ``head``; a DANN's ``bottleneck``,
            ``label_head`` and ``domain_head``).
        bn: BatchNormalization in the blocks left trainable: ``"frozen"``
            (default: inference mode, nothing in BN moves) or ``"train"``.
        recompile: recompile a compiled model so the change reaches ``fit``.
        learning_rate: the learning rate of the recompiled optimizer.

    Returns:
        The list of frozen block names.

    Example::

        kerastl.freeze(model, up_to="stage3")
        # -> ['stem', 'stage1', 'stage2', 'stage3']
    """
    trainable = resolve_trainable(model, up_to)
    apply_trainable(model, trainable, bn=bn, recompile=recompile,
                    learning_rate=learning_rate)
    return list(trainable.frozen)


def unfreeze(model, from_block=0, bn="frozen", recompile=True,
             learning_rate=None):
    """Makes ``from_block`` and every block after it trainable.

    Blocks before ``from_block`` keep their current state.

    Args:
        from_block: a block name or index (negative counts from the top:
            ``-2`` unfreezes the last two blocks).
        bn, recompile, learning_rate: as for :func:`freeze`.

    Returns:
        The list of trainable block names.
    """
    bm = block_map(keras_model_of(model))
    start = bm.index(from_block)
    wanted = set(trainable_blocks(model)) | set(bm.names[start:])
    return apply_trainable(model, [b for b in bm.names if b in wanted],
                           bn=bn, recompile=recompile,
                           learning_rate=learning_rate)


class TrainableSummary(list):
    """Rows of :func:`trainable_summary`; ``print()`` shows a table."""

    def __str__(self):
        head = f"{'block':<14}{'state':<10}{'trainable':>14}{'frozen':>14}"
        lines = [head, "-" * len(head)]
        for r in self:
            lines.append(f"{r['block']:<14}{r['state']:<10}"
                         f"{r['trainable_params']:>14,}{r['frozen_params']:>14,}")
        t = sum(r["trainable_params"] for r in self)
        f = sum(r["frozen_params"] for r in self)
        lines.append(f"{'total':<24}{t:>14,}{f:>14,}")
        return "\n".join(lines)


def trainable_summary(model):
    """Per block: trainable and frozen parameter counts.

    Returns:
        A :class:`TrainableSummary` (a list of dicts with ``block``,
        ``state`` — ``trainable``, ``frozen`` or ``partial`` —,
        ``trainable_params`` and ``frozen_params``); print it for a table.
        BN moving statistics always count as frozen.
    """
    keras_model = keras_model_of(model)
    bm = block_map(keras_model)
    trainable_ids = {id(v) for v in keras_model.trainable_variables}
    rows = TrainableSummary()
    trainable = set(trainable_blocks(keras_model))
    for b in bm.names:
        t = f = 0
        for v in bm.variables(b):
            if id(v) in trainable_ids:
                t += variable_size(v)
            else:
                f += variable_size(v)
        state = "trainable" if b in trainable else "frozen"
        if state == "trainable" and any(
                _is_batch_norm(l) and not l.trainable
                for l in bm.weighted_layers(b)):
            state = "partial"
        rows.append(dict(block=b, state=state, trainable_params=t,
                         frozen_params=f))
    return rows


class GradualUnfreezing(keras.callbacks.Callback):
    """Unfreezes one more block every ``every`` epochs, top first (ULMFiT).

    Works inside a single ``model.fit`` call. At the start of training the
    callback freezes everything below the top ``start_blocks`` blocks and
    re-creates the optimizer (same configuration) over every variable it will
    ever unfreeze, so that later blocks can join the optimizer mid-training.

    Args:
        every: epochs between two unfreezing steps.
        start_blocks: how many blocks (from the top, the head included) are
            trainable at epoch 0. The new heads count as one block (a
            DANN's ``bottleneck``, ``label_head`` and ``domain_head``
            train from the start).
        bn: BatchNormalization mode of unfrozen blocks (see :func:`freeze`).
        max_blocks: stop after this many blocks are trainable (default: all).
        verbose: print each unfreezing step.

    Example::

        model.fit(data, epochs=6, callbacks=[kerastl.GradualUnfreezing(2)])
    """

    def __init__(self, every=1, start_blocks=1, bn="frozen", max_blocks=None,
                 verbose=0):
        super().__init__()
        _check_bn(bn)
        for name, value, none in (("every", every, False),
                                  ("start_blocks", start_blocks, False),
                                  ("max_blocks", max_blocks, True)):
            if (value is None and none) or (
                    isinstance(value, numbers.Integral) and
                    not isinstance(value, bool) and value >= 1):
                continue
            raise KerastlError(
                f"GradualUnfreezing({name}={value!r}): expected a whole "
                f"number of {'epochs' if name == 'every' else 'blocks'}, at "
                "least 1" + (" (or None: every block)." if none else "."))
        self.every = every
        self.start_blocks = start_blocks
        self.bn = bn
        self.max_blocks = max_blocks
        self.verbose = verbose
        self.history = {}  # epoch -> trainable blocks

    def _n_trainable(self, epoch):
        """Trainable units at ``epoch``: the new heads count as one."""
        n = self.start_blocks + epoch // self.every
        units = self._units()
        limit = units if self.max_blocks is None else self.max_blocks
        return min(n, limit, units)

    def _units(self):
        bm = block_map(self.model)
        return len(bm.base_blocks) + (1 if bm.head_blocks else 0)

    def _set(self, n):
        bm = block_map(self.model)
        base = bm.base_blocks
        if bm.head_blocks:
            n -= 1
        blocks = base[len(base) - n:] if n > 0 else []
        return apply_trainable(self.model, blocks + bm.head_blocks,
                               bn=self.bn, recompile=False)

    def set_model(self, model):
        # fit() calls set_model on every callback before any
        # on_train_begin: the optimizer is ready before BackupAndRestore
        # (wherever it is in the list) restores its state into it.
        super().set_model(model)
        self._prepare_optimizer()

    def _prepare_optimizer(self):
        """Builds the optimizer over every variable that will ever train.

        One already built over exactly those variables is kept with its
        state (a resumed run, a second fit); otherwise a fresh one of the
        same configuration replaces it.
        """
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            return
        units = self._units()
        limit = units if self.max_blocks is None else self.max_blocks
        with restored_trainability(_private.all_sublayers(self.model)):
            self._set(min(limit, units))
            every_variable = list(self.model.trainable_variables)
        built = _private.optimizer_variables(optimizer)
        if built is None or [id(v) for v in built] != \
                [id(v) for v in every_variable]:
            self.model.optimizer = fresh_optimizer(self.model,
                                                   variables=every_variable)

    def _rebuild_optimizer(self):
        """JAX: the optimizer over exactly the trainable variables.

        JAX's train step is stateless (``optimizer.stateless_apply``), which
        takes the optimizer's variables 1:1 with the trainable ones, so the
        optimizer built over every variable that will ever train cannot
        serve. A fresh one over the trainable variables takes over the
        state (step count, moments) of the variables already training, by
        name; the newly unfrozen start from zero state, as they do on
        TensorFlow (where they sat untouched in the bigger optimizer).
        """
        old = self.model.optimizer
        fresh = fresh_optimizer(self.model,
                                variables=self.model.trainable_variables)
        state = {v.path: v for v in old.variables} if old.built else {}
        for v in fresh.variables:
            if v.path in state and tuple(state[v.path].shape) == \
                    tuple(v.shape):
                v.assign(state[v.path])
        self.model.optimizer = fresh

    def on_train_begin(self, logs=None):
        self._prepare_optimizer()
        self._current = None

    def on_epoch_begin(self, epoch, logs=None):
        # Set from the epoch index alone: a run resumed at epoch k trains
        # the blocks of epoch k, as the uninterrupted run did.
        n = self._n_trainable(epoch)
        if n != self._current:
            blocks = self._set(n)
            if _STATELESS:
                self._rebuild_optimizer()
            self.model.make_train_function(force=True)
            if self.verbose and self._current is not None:
                print(f"\nGradualUnfreezing: epoch {epoch + 1}: training "
                      f"{', '.join(blocks)}")
            self._current = n
        self.history[epoch] = trainable_blocks(self.model)
