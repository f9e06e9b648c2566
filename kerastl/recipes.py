"""Transfer-learning recipes as code: strategy advice and the fine-tuning
driver that the CLI (``kerastl finetune``, ``kerastl demo``) also runs.

The strategy vocabulary, used everywhere (``fine_tune``, experiment YAML,
``recommend_strategy``):

* ``"features"``: the whole backbone frozen, only the head trains
  (feature extraction).
* ``"partial"``: the first half of the backbone's blocks frozen (rounded
  up), or up to ``freeze_up_to``; the later blocks and the head train.
* ``"full"``: everything trains.
"""

import collections
import dataclasses
import math
import numbers
import warnings

import keras
import numpy as np

from kerastl import boundary, distribute, freezing
from kerastl import _keras_private as _private
from kerastl.blocks import block_map, layer_graph
from kerastl.errors import KerastlError
from kerastl.freezing import strategy_scope
from kerastl.layerwise import LayerwiseOptimizer

# Labelled target samples per class: below FEW is "few", at or above MANY
# is "many" (the data-size axis of the transfer-learning table).
FEW, MANY = 100, 1000

STRATEGIES = ("features", "partial", "full")


def frozen_blocks(model, strategy, freeze_up_to=None):
    """How many leading backbone blocks ``strategy`` freezes on ``model``.

    Args:
        model: a Backbone, or a ``keras.Model`` with a block map.
        strategy: one of :data:`STRATEGIES`.
        freeze_up_to: ``"partial"`` only: the last frozen block (a name or
            a count); default: the first half of the blocks, rounded up.
    """
    if strategy not in STRATEGIES:
        raise KerastlError(f"strategy={strategy!r}: expected one of "
                           f"{', '.join(STRATEGIES)}.")
    names = block_map(model).base_blocks
    if strategy != "partial" and freeze_up_to is not None:
        raise KerastlError(f"freeze_up_to applies to strategy 'partial', not "
                           f"{strategy!r}.")
    if strategy == "features":
        return len(names)
    if strategy == "full":
        return 0
    if freeze_up_to is None:
        return math.ceil(len(names) / 2)
    if isinstance(freeze_up_to, str):
        if freeze_up_to not in names:
            raise KerastlError(
                f"freeze_up_to={freeze_up_to!r} is not a backbone block; "
                f"blocks: {', '.join(names)}.")
        return names.index(freeze_up_to) + 1
    if isinstance(freeze_up_to, bool) or not isinstance(freeze_up_to, int) \
            or not 0 <= freeze_up_to <= len(names):
        raise KerastlError(f"freeze_up_to={freeze_up_to!r}: expected a block "
                           f"name or a count from 0 to {len(names)}.")
    return freeze_up_to


@dataclasses.dataclass
class Strategy:
    """What :func:`recommend_strategy` advises.

    Attributes:
        name: the strategy: ``"features"``, ``"partial"`` or ``"full"``
            (pass it and ``freeze_up_to`` to :func:`fine_tune`).
        freeze_fraction: share of the backbone's blocks to freeze (from the
            input).
        head_learning_rate: learning rate of the new head.
        backbone_learning_rate: learning rate of the fine-tuned blocks
            (0 where nothing is fine-tuned).
        freeze_up_to: with a model, the last frozen block (None: none).
        reasoning: why, as text.
    """

    name: str
    freeze_fraction: float
    head_learning_rate: float
    backbone_learning_rate: float
    reasoning: str
    freeze_up_to: object = None

    def __str__(self):
        return (f"{self.name}: freeze {self.freeze_fraction:.0%} of the "
                f"blocks (up to {self.freeze_up_to}), head lr "
                f"{self.head_learning_rate:g}, backbone lr "
                f"{self.backbone_learning_rate:g}.\n{self.reasoning}")


def recommend_strategy(n_labelled_per_class, similarity, model=None):
    """Advice from the data-size / similarity table of transfer learning.

    Args:
        n_labelled_per_class: labelled target samples per class.
        similarity: how close the target is to the source domain:
            ``"high"``/``"low"`` or a number in [0, 1] (>= 0.5 is similar).
        model: optional model or backbone: the advice then names the last
            block to freeze.

    Returns:
        A :class:`Strategy`.
    """
    if isinstance(n_labelled_per_class, bool) or not isinstance(
            n_labelled_per_class, numbers.Real) or not math.isfinite(
            n_labelled_per_class) or n_labelled_per_class < 1:
        raise KerastlError(
            f"n_labelled_per_class={n_labelled_per_class!r}: expected a "
            "positive number.")
    if isinstance(similarity, str):
        if similarity not in ("high", "low"):
            raise KerastlError(f"similarity={similarity!r}: expected 'high', "
                               "'low' or a number in [0, 1].")
        similar = similarity == "high"
    elif isinstance(similarity, numbers.Real) and \
            not isinstance(similarity, bool) and 0 <= similarity <= 1:
        similar = similarity >= 0.5
    else:
        raise KerastlError(f"similarity={similarity!r}: expected 'high', "
                           "'low' or a number in [0, 1].")
    n = n_labelled_per_class
    size = "few" if n < FEW else "many" if n >= MANY else "a medium number of"
    if similar and n < FEW:
        s = Strategy(
            "features", 1.0, 1e-3, 0.0,
            f"With {size} labels per class ({n}) on a domain similar to the "
            "source, fine-tuning would overfit: freeze the whole backbone, "
            "drop its classifier and train only a new softmax head. The "
            "frozen features can be computed once and cached.")
    elif similar and n < MANY:
        s = Strategy(
            "partial", 0.5, 1e-3, 1e-4,
            f"With {size} labels per class ({n}) on a similar domain, keep "
            "the general early blocks frozen and fine-tune the later, more "
            "task-specific ones from their pretrained weights at a lower "
            "learning rate than the new head.")
    elif similar:
        s = Strategy(
            "full", 0.0, 1e-3, 1e-4,
            f"With {size} labels per class ({n}) on a similar domain, use "
            "the pretrained weights as initialisation and train everything, "
            "the backbone at a lower learning rate.")
    elif n >= MANY:
        s = Strategy(
            "full", 0.0, 1e-3, 1e-3,
            f"With {size} labels per class ({n}) on a dissimilar domain, "
            "transfer may not help much: train everything at the full rate "
            "from the pretrained initialisation, and compare with training "
            "from scratch as a baseline.")
    else:
        s = Strategy(
            "partial", 0.25, 1e-3, 1e-4,
            f"With {size} labels per class ({n}) on a dissimilar domain, only "
            "the earliest blocks (edges, colours, textures) are general "
            "enough to keep frozen; fine-tune the rest at a low learning "
            "rate and stop early: the late blocks are specific to the "
            "source task.")
    if model is not None:
        bm = block_map(model)  # a Backbone or a keras.Model
        names = bm.base_blocks
        k = math.ceil(s.freeze_fraction * len(names))
        s.freeze_up_to = names[k - 1] if k else None
    return s


def early_stopping(patience=3, monitor="val_loss"):
    """Stop when the validation loss starts to increase; keep the best weights."""
    return keras.callbacks.EarlyStopping(monitor=monitor, patience=patience,
                                         restore_best_weights=True)


FineTuneHistory = collections.namedtuple("FineTuneHistory",
                                         ["head", "fine_tune"])
FineTuneHistory.__doc__ = """What :func:`fine_tune` returns: the head
phase's ``History`` (None when ``head_epochs=0``) and the main phase's."""


def fine_tune(model, train, validation=None, strategy="partial",
              freeze_up_to=None, epochs=10, head_epochs=10, optimizer=None,
              head_optimizer=None, multipliers=None, bn="frozen",
              loss="sparse_categorical_crossentropy", metrics=("accuracy",),
              patience=3, callbacks=(), batch_size=None, verbose=0,
              check_features=True, boundary_cache="auto",
              mixed_precision=None, jit_compile="auto", **deprecated):
    """Fine-tunes a classifier built on a backbone: kerastl's one driver.

    1. Head phase (``head_epochs > 0``): every backbone block frozen, the
       new head trains with ``head_optimizer``; a fresh head's gradients
       would otherwise disturb the pretrained blocks.
    2. Main phase: the ``strategy`` sets what trains (see
       :data:`STRATEGIES`), ``optimizer`` (with layer-wise ``multipliers``
       if given) trains it for ``epochs``.

    With ``validation``, each phase stops early when the validation loss
    starts to increase and keeps the best weights (``patience=None``: no
    early stopping).

    Args:
        model: a ``keras.Model`` with a block map whose last block is the
            head (e.g. from :func:`kerastl.build_classifier`).
        train: a ``tf.data.Dataset`` (or other ``fit`` input) of ``(x, y)``
            batches, or an ``(x, y)`` tuple of arrays.
        validation: anything ``fit`` takes as ``validation_data``.
        strategy: ``"features"``, ``"partial"`` (default) or ``"full"``.
        freeze_up_to: ``"partial"``: the last frozen block (name or count).
        optimizer: the main phase's optimizer (a Keras optimizer or its
            name; default ``Adam(1e-5)``).
        head_optimizer: the head phase's (default ``Adam(1e-3)``).
        multipliers: layer-wise learning-rate multipliers for the main
            phase (see :class:`~kerastl.LayerwiseOptimizer`), e.g.
            ``kerastl.LayerDecay(0.7)``; ``None``: one rate for all.
        bn: BatchNormalization mode of trainable blocks (see
            :func:`kerastl.freeze`).
        callbacks: more Keras callbacks for both phases.
        batch_size: for array input (default: Keras' 32).
        boundary_cache: ``"auto"`` (default): when the frozen blocks can be
            run once (see :mod:`kerastl.boundary`: frozen, nothing random
            before the boundary, replayable data), compute their output
            once and train only the rest on it: the same training, several
            times faster when the frozen part is most of the compute.
            ``True``: require it (a :class:`~kerastl.boundary.BoundaryCacheError`
            says why it cannot be used); ``False``: never. Each returned
            ``History`` has ``boundary_cache``: ``"used"`` or the reason it
            was not.
        mixed_precision: ``None`` (float32), ``"mixed_float16"`` (GPUs) or
            ``"mixed_bfloat16"`` (TPUs, recent CPUs): every layer but those
            producing the outputs computes in half precision with float32
            variables (``layer.dtype_policy``; the model keeps it after
            training); float16 gets Keras's dynamic loss scaling. On CPUs
            without bfloat16 units it is slower than float32.
        jit_compile: passed to ``model.compile``: ``"auto"`` (Keras's
            default), ``True`` (XLA) or ``False``.
        check_features: before training, run a few training batches
            through the frozen blocks and stop with an error when they give
            constant or non-finite features (a frozen, randomly
            initialised backbone: nothing can learn from it); after
            training, warn when validation accuracy is at chance.

    Deprecated arguments (one release): ``unfreeze_from`` (the first
    trainable block; use ``freeze_up_to``), ``fine_tune_epochs`` (use
    ``epochs``), ``head_learning_rate`` and ``fine_tune_learning_rate``
    (pass optimizers).

    Returns:
        A :class:`FineTuneHistory` ``(head, fine_tune)`` of Keras
        ``History`` objects; it unpacks as a pair.
    """
    epochs, freeze_up_to, optimizer, head_optimizer = _deprecated(
        deprecated, model, epochs, freeze_up_to, optimizer, head_optimizer)
    depth = frozen_blocks(model, strategy, freeze_up_to)
    # Arguments first, then the data: a typo fails before any computation.
    with strategy_scope(model):  # optimizers made here: mirrored state
        optimizer = _optimizer(optimizer, 1e-5)
        head_optimizer = _optimizer(head_optimizer, 1e-3) if head_epochs \
            else None
    if boundary_cache not in ("auto", True, False):
        raise KerastlError(f"boundary_cache={boundary_cache!r}: expected "
                           "'auto', True or False.")
    if jit_compile not in ("auto", True, False):
        raise KerastlError(f"jit_compile={jit_compile!r}: expected 'auto', "
                           "True or False.")
    set_precision(model, mixed_precision)
    x, y = train if isinstance(train, tuple) else (train, None)
    if check_features:
        check_frozen_features(model, max(depth, len(block_map(
            model).base_blocks) if head_epochs else depth), x)

    def phase(optimizer, n_epochs, frozen):
        # Early stopping watches the validation loss: none without one.
        stop = patience is not None and validation is not None
        cbs = ([early_stopping(patience)] if stop else []) + list(callbacks)
        reason = "boundary_cache=False"
        if distribute.is_distributed(model):
            reason = "distributed training (the frozen part runs each step)"
        elif boundary_cache is not False:
            history, reason = boundary.cached_fit(
                model, frozen, x, y, validation, optimizer=optimizer,
                loss=loss, metrics=metrics, epochs=n_epochs,
                batch_size=batch_size, callbacks=cbs, verbose=verbose,
                required=boundary_cache is True, jit_compile=jit_compile)
            if history is not None:
                history.boundary_cache = "used"
                return history
        with strategy_scope(model):  # several devices: mirrored state
            model.compile(optimizer=optimizer, loss=loss,
                          metrics=list(metrics), jit_compile=jit_compile)
        if distribute.is_multi_worker(model):
            distribute.prepare_distributed_fit(
                model, (x, y) if y is not None else x)
        # A dataset (no separate y) is shuffled by its own pipeline; Keras
        # warns when asked to shuffle one.
        history = model.fit(x, y, validation_data=validation,
                            epochs=n_epochs, batch_size=batch_size,
                            callbacks=cbs, shuffle=y is not None,
                            verbose=verbose)
        history.boundary_cache = reason
        return history

    h1 = None
    if head_epochs:
        freezing.freeze(model, bn=bn, recompile=False)
        h1 = phase(head_optimizer, head_epochs,
                   len(block_map(model).base_blocks))
    freezing.freeze(model, up_to=depth, bn=bn, recompile=False)
    if multipliers is not None:
        with strategy_scope(model):
            optimizer = LayerwiseOptimizer(optimizer, multipliers, model)
    h2 = phase(optimizer, epochs, depth)
    if check_features:
        warn_at_chance(model, h2, frozen=depth)
    return FineTuneHistory(h1, h2)


def _sample_images(x, n=64):
    """Up to ``n`` training images from arrays or a dataset, or None."""
    import tensorflow as tf  # lazy: only for datasets

    if isinstance(x, tf.data.Dataset):
        batches = []
        for element in x.take(4):
            batches.append(np.asarray(element[0] if isinstance(
                element, (tuple, list)) else element))
            if sum(len(b) for b in batches) >= n:
                break
        return np.concatenate(batches)[:n] if batches else None
    try:
        a = np.asarray(x[:n])
    except (TypeError, IndexError, KeyError):
        return None
    return a if a.dtype.kind in "fiu" and a.ndim >= 2 else None


def check_frozen_features(model, depth, x):
    """Stops a run whose ``depth`` frozen leading blocks give features
    nothing can learn from: NaN/infinite, or (near-)constant across the
    training images (a frozen backbone with random weights gives ~1e-12).

    Raises:
        KerastlError: naming the last frozen block, the measured spread and
            the fix.
    """
    bm = block_map(model)
    if depth < 1 or not bm.has_output(bm.base_blocks[depth - 1]):
        return
    images = _sample_images(x)
    if images is None or len(images) < 2:
        return
    last = bm.base_blocks[depth - 1]
    try:
        probe = keras.Model(model.inputs, bm.output_layer(last).output)
    except (AttributeError, ValueError):  # no symbolic graph to cut
        return
    features = np.asarray(probe.predict(images, verbose=0), "float64")
    features = features.reshape(len(features), -1)
    fix = ("Load pretrained weights (weights='imagenet'; CLI: --weights "
           "imagenet) or train the blocks (strategy='full'; CLI: --strategy "
           "full).")
    if not np.isfinite(features).all():
        raise KerastlError(
            f"The frozen blocks up to {last!r} give NaN or infinite features "
            f"on the training images: nothing can be learnt from them. "
            f"Check the images and the weights. {fix}")
    spread = float(features.std(axis=0).max())
    if spread < 1e-7:
        raise KerastlError(
            f"The frozen blocks up to {last!r} give the same features for "
            f"every training image (largest spread across images "
            f"{spread:.1e}): a frozen backbone with random weights, or "
            f"constant images. The new head cannot learn from them. {fix}")


PRECISIONS = (None, "float32", "mixed_float16", "mixed_bfloat16")


def set_precision(model, policy):
    """Makes ``model`` compute in ``policy`` (see :func:`fine_tune`'s
    ``mixed_precision``), except the layers that produce its outputs,
    which stay float32 (softmax and loss are unstable in half precision).
    ``None`` or ``"float32"`` leaves the model as it is."""
    if policy not in PRECISIONS:
        raise KerastlError(
            f"mixed_precision={policy!r}: expected None, 'mixed_float16' "
            "(GPUs) or 'mixed_bfloat16' (TPUs, recent CPUs).")
    if policy in (None, "float32"):
        return
    outputs = {id(_private.producing_operation(t)) for t in model.outputs}
    for layer, _ in layer_graph(model):
        if id(layer) not in outputs and not isinstance(
                layer, keras.layers.InputLayer):
            layer.dtype_policy = policy
    model.dtype_policy = policy  # compile adds loss scaling for float16


def warn_at_chance(model, history, frozen=None):
    """Warns when the best validation accuracy is at or below chance.

    ``frozen``: how many blocks were frozen (the advice differs when
    everything already trained)."""
    acc = history.history.get("val_accuracy")
    try:
        output = model.output
    except (AttributeError, ValueError):  # a model without a symbolic graph
        return
    classes = output.shape[-1] if not isinstance(
        output, (dict, list, tuple)) else None
    if not acc or not classes or classes < 2:
        return
    chance = 1.0 / classes
    if max(acc) <= chance + 1e-9:
        warnings.warn(
            f"kerastl: validation accuracy never rose above chance "
            f"({max(acc):.3f} with {classes} classes): the model did not "
            "learn. Check the labels, use pretrained weights, or "
            + ("train more epochs or another learning rate."
               if frozen == 0 else "train more blocks (strategy='full')."),
            RuntimeWarning, stacklevel=3)


def _optimizer(optimizer, default_rate):
    if optimizer is None:
        return keras.optimizers.Adam(default_rate)
    if isinstance(optimizer, (str, dict)):
        try:
            return keras.optimizers.get(optimizer)
        except (ValueError, TypeError):
            raise KerastlError(
                f"Unknown optimizer {optimizer!r}; use a Keras optimizer "
                "(keras.optimizers.AdamW(1e-4)) or a name such as 'adam', "
                "'adamw', 'sgd'.") from None
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise KerastlError(f"optimizer={optimizer!r}: expected a Keras "
                           "optimizer or its name.")
    return optimizer


def _deprecated(kwargs, model, epochs, freeze_up_to, optimizer,
                head_optimizer):
    """Maps the arguments of kerastl <= 0.2's fine_tune onto the new ones."""
    unknown = sorted(set(kwargs) - {"unfreeze_from", "fine_tune_epochs",
                                    "head_learning_rate",
                                    "fine_tune_learning_rate"})
    if unknown:
        raise TypeError(f"fine_tune() got unexpected keyword argument(s) "
                        f"{', '.join(unknown)}")
    for old in kwargs:
        warnings.warn(f"fine_tune({old}=...) is deprecated; see "
                      "help(kerastl.fine_tune) for its replacement.",
                      DeprecationWarning, stacklevel=3)
    if "fine_tune_epochs" in kwargs:
        epochs = kwargs["fine_tune_epochs"]
    if "unfreeze_from" in kwargs:
        names = block_map(model).names
        start = kwargs["unfreeze_from"]
        if isinstance(start, str):
            if start not in names:
                raise KerastlError(f"unfreeze_from={start!r} is not a block; "
                                   f"blocks: {', '.join(names)}.")
            start = names.index(start)
        elif start < 0:
            start += len(names)
        freeze_up_to = max(0, start)
    if "fine_tune_learning_rate" in kwargs:
        optimizer = keras.optimizers.Adam(kwargs["fine_tune_learning_rate"])
    if "head_learning_rate" in kwargs:
        head_optimizer = keras.optimizers.Adam(kwargs["head_learning_rate"])
    return epochs, freeze_up_to, optimizer, head_optimizer
