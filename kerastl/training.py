"""kerastl's one fine-tuning driver: :func:`fine_tune` runs a
:class:`~kerastl.TrainingPlan` on a model.

The command line (``kerastl finetune``, ``kerastl demo``), the experiment
YAML, :func:`kerastl.analysis.transfer_depth_sweep` and
:func:`kerastl.adaptation.joint_fine_tune` all train through it, so the
boundary cache, precision, early stopping and the checks before and after
training are the same everywhere.
"""

import collections
import math
import warnings

import keras
import numpy as np

from kerastl import augment as augment_lib
from kerastl import backbone as backbone_lib
from kerastl import boundary, distribute, freezing, peft, prebuild
from kerastl import _keras_private as _private
from kerastl.batch_order import SeededBatches
from kerastl.blocks import block_map, layer_graph, model_input, model_output
from kerastl.distribute import strategy_scope
from kerastl.errors import KerastlError
from kerastl.layerwise import LayerwiseOptimizer
from kerastl.plan import TrainingPlan

FineTuneHistory = collections.namedtuple("FineTuneHistory",
                                         ["head", "fine_tune"])
FineTuneHistory.__doc__ = """What :func:`fine_tune` returns: the head
phase's ``History`` (None when ``head_epochs=0``) and the main phase's.
The main phase's has ``kept_head_phase``: True when it ended worse on
validation than the head phase and the model kept the head phase's
weights."""


def early_stopping(patience=3, monitor="val_loss", start=0):
    """Stop when the validation loss starts to increase; keep the best
    weights. ``start``: the epochs before it watches (see
    :func:`watch_from`)."""
    return keras.callbacks.EarlyStopping(monitor=monitor, patience=patience,
                                         restore_best_weights=True,
                                         start_from_epoch=start)


def watch_from(epochs, schedule):
    """The first epoch early stopping watches in a phase of ``epochs``:
    under the cosine schedule the second half (before it the rate is high
    and the validation loss noisy, and a step budget of many short epochs
    would stop on that noise), else the first."""
    return epochs // 2 if schedule == "cosine" else 0


def _split(train):
    """``(x, y, sample_weight)`` of ``fit`` input: an ``(x, y[, w])`` tuple
    of arrays, or a dataset (``y`` and ``w`` None)."""
    if isinstance(train, list):
        raise KerastlError(
            "train is a list: pass the arrays as an (x, y) tuple (a list is "
            "what Keras takes for a model with several inputs).")
    if isinstance(train, tuple):
        if len(train) not in (2, 3):
            raise KerastlError(
                f"train is a tuple of {len(train)} items: expected (x, y) "
                "or (x, y, sample_weight), or a tf.data.Dataset.")
        return train[0], train[1], train[2] if len(train) == 3 else None
    return train, None, None


@_private.quiet_retracing()
def fine_tune(model, train, validation=None, plan=None, *,
              loss="sparse_categorical_crossentropy", metrics=("accuracy",),
              weighted_metrics=None, callbacks=(), head_callbacks=None,
              verbose=0, **settings):
    """Fine-tunes a classifier built on a backbone: kerastl's one driver.

    1. Head phase (``head_epochs > 0``): every backbone block frozen, the
       new head trains with the plan's ``head_optimizer``.
    2. Main phase: what the plan's ``strategy`` (and ``freeze_up_to``)
       says trains, with its ``optimizer`` (and layer-wise
       ``multipliers``), for ``epochs``.

    With ``validation``, each phase stops early when the validation loss
    starts to increase and keeps the best weights (``patience=None``: no
    early stopping). With early stopping and a head phase, both phases'
    weights are then evaluated on ``validation`` (two more passes): when
    the head phase's have the lower loss (a learning rate too high for
    this backbone diverged the main phase), the model gets them back, with
    a ``RuntimeWarning`` saying what to lower (not under
    ``strategy="lora"``, whose main phase adds weights, nor multi-worker).
    Where the frozen blocks can be run once (see :mod:`kerastl.boundary`),
    they are: each returned ``History`` has ``boundary_cache``, ``"used"``
    or the reason it was not.

    Args:
        model: a ``keras.Model`` with a block map whose last block is the
            head (e.g. from :func:`kerastl.build_classifier`).
        train: a ``tf.data.Dataset`` (or other ``fit`` input) of ``(x, y)``
            batches, or an ``(x, y)`` or ``(x, y, sample_weight)`` tuple of
            arrays.
        validation: anything ``fit`` takes as ``validation_data``.
        plan: a :class:`~kerastl.TrainingPlan`; default: one made of
            ``settings``. (``fine_tune(model, train, plan)`` works too:
            a plan in the ``validation`` place is taken as the plan.)
        loss, metrics, weighted_metrics: for ``model.compile``.
        callbacks: more Keras callbacks, for both phases.
        head_callbacks: the head phase's instead, when given (``kerastl
            finetune`` checkpoints and logs the main phase only).
        verbose: ``fit``'s progress output.
        **settings: :class:`~kerastl.TrainingPlan` fields (``strategy``,
            ``freeze_up_to``, ``epochs``, ``optimizer``, ...): the plan
            with these changed.

    Returns:
        A :class:`FineTuneHistory` ``(head, fine_tune)`` of Keras
        ``History`` objects; it unpacks as a pair.

    Example::

        kerastl.fine_tune(model, train, val, strategy="partial",
                          freeze_up_to="stage3", head_epochs=5, epochs=10,
                          multipliers=kerastl.LayerDecay(0.7))
    """
    if isinstance(validation, TrainingPlan) and plan is None:
        validation, plan = None, validation
    unknown = sorted(set(settings) - set(TrainingPlan.fields()))
    if unknown:
        raise TypeError(
            f"fine_tune() got unexpected keyword argument(s) "
            f"{', '.join(unknown)}; it takes the data, plan=, loss=, "
            f"metrics=, weighted_metrics=, callbacks=, head_callbacks=, "
            f"verbose= and the "
            f"TrainingPlan fields {', '.join(TrainingPlan.fields())}.")
    if plan is None:
        plan = TrainingPlan(**settings)
    elif not isinstance(plan, TrainingPlan):
        raise KerastlError(f"plan={plan!r}: expected a kerastl.TrainingPlan.")
    elif settings:
        plan = plan.replace(**settings)
    if plan.trainable is None:  # nobody resolved it for this model yet
        plan = plan.resolve(model)
    bm = block_map(model)
    plan.trainable.check(bm, model.name)
    if not plan.trainable.trainable:
        raise KerastlError(
            f"Nothing would train: the plan freezes every block of "
            f"{model.name!r} ({', '.join(bm.names)}). Freeze fewer blocks.")
    depth = plan.trainable.depth
    # Arguments first, then the data: a typo fails before any computation.
    head_optimizer, optimizer = plan.optimizers(model)
    set_precision(model, plan.mixed_precision)
    x, y, w = _split(train)
    _check_arrays(model, x, y, loss, "train")
    if isinstance(validation, tuple) and len(validation) in (2, 3):
        _check_arrays(model, validation[0], validation[1], loss, "validation")
    base = len(bm.base_blocks)
    batches = steps_per_epoch(x, y, plan.batch_size)
    # Under the step budget an epoch of small data is several passes.
    repeat = repeatable(x, y)
    head_epochs, head_passes = plan.budget(batches, True, repeat)
    epochs, passes = plan.budget(batches, False, repeat)
    bn = plan.bn
    if backbone_lib.random_weights(layer for b in bm.base_blocks
                                   for layer in bm.weighted_layers(b)):
        # A random backbone: nothing to protect from a new head's first
        # gradients, and BatchNorm statistics as random as the weights.
        head_epochs = 0
        if plan.trainable.mode == "full" and not plan.trainable.frozen:
            bn = "train"
            _track_batch_statistics(model)
    if plan.check_features:
        check_random_frozen(model, plan)
        check_frozen_features(model, depth, x)
        if head_epochs and base > depth and frozen_features_problem(
                model, base, x):
            # The head phase would learn nothing from the frozen backbone;
            # the main phase trains the blocks that make it so.
            head_epochs = 0

    if batches:  # the schedules span each phase's steps
        head_optimizer, optimizer = plan.optimizers(
            model, head_epochs * head_passes * batches,
            epochs * passes * batches)

    seed = plan.seed if plan.seed is not None else \
        int(np.random.default_rng().integers(2 ** 31))
    aug = augment_lib.augmentation(plan.augment, seed=seed)
    augment_fn = None  # a batch of images -> the batch augmented
    if aug is not None:
        _check_augmentable(x, y)
        augment_fn = augment_lib.EpochAugment(aug, seed)

    def phase(optimizer, n_epochs, frozen, callbacks, passes):
        # Early stopping watches the validation loss: none without one.
        stop = plan.patience is not None and validation is not None
        cbs = ([early_stopping(plan.patience, start=watch_from(
            n_epochs, plan.schedule))] if stop else []) + list(callbacks)
        reason = "boundary_cache=False"
        if distribute.is_distributed(model):
            reason = "distributed training (the frozen part runs each step)"
        elif plan.boundary_cache is not False:
            history, reason = boundary.cached_fit(
                model, frozen, x, y, validation, sample_weight=w,
                optimizer=optimizer, loss=loss, metrics=metrics,
                weighted_metrics=weighted_metrics, epochs=n_epochs,
                batch_size=plan.batch_size, callbacks=cbs, verbose=verbose,
                required=plan.boundary_cache is True,
                jit_compile=plan.jit_compile,
                seed=seed if aug is not None else plan.seed,
                augment=augment_fn, passes=passes)
            if history is not None:
                history.boundary_cache = "used"
                return history
        with strategy_scope(model):  # several devices: mirrored state
            model.compile(optimizer=optimizer, loss=loss,
                          metrics=_listed(metrics),
                          weighted_metrics=_listed(weighted_metrics),
                          jit_compile=plan.jit_compile)
        if distribute.is_multi_worker(model):
            distribute.prepare_distributed_fit(
                model, (x, y) if y is not None else x)
        # (one trace of the train step instead of two; kerastl.prebuild)
        prebuild.build_before_fit(model, x, y, w)
        if y is not None and (plan.seed is not None or aug is not None
                              or passes > 1):
            batches = SeededBatches(
                (x, y) if w is None else (x, y, w), plan.batch_size or 32,
                seed, transform=augment_fn, passes=passes)
            # (shuffle=False: the batches come in their seeded order; Keras
            # would shuffle them again with Python's global random state.)
            history = model.fit(batches, validation_data=validation,
                                epochs=n_epochs, shuffle=False,
                                callbacks=cbs + [batches.callback()],
                                verbose=verbose)
        else:
            # A dataset (no separate y) is shuffled by its own pipeline;
            # Keras warns when asked to shuffle one.
            data = x if aug is None else augment_lib.augment_dataset(x, aug)
            if passes > 1:  # (each pass reshuffles as the dataset does)
                data = data.repeat(passes)
            history = model.fit(data, y, sample_weight=w,
                                validation_data=validation, epochs=n_epochs,
                                batch_size=plan.batch_size, callbacks=cbs,
                                shuffle=y is not None, verbose=verbose)
        history.boundary_cache = reason
        return history

    h1 = head_weights = None
    if head_epochs:
        freezing.apply_trainable(
            model, freezing.Trainable.of(bm, bm.names[base:]), bn=plan.bn,
            recompile=False)
        _announce(verbose, "Head phase: the new head, the backbone frozen,",
                  head_epochs, head_passes, batches)
        h1 = phase(head_optimizer, head_epochs, base,
                   callbacks if head_callbacks is None else head_callbacks,
                   head_passes)
        if guards_head_phase(model, plan, validation):
            # Kept in case the main phase ends worse on validation (a rate
            # too high for this backbone diverges it; early stopping only
            # keeps the best of the main phase's own epochs).
            head_weights = model.get_weights()
    if plan.trainable.mode == "lora":
        peft.enable_lora(model, plan.lora_rank, plan.lora_alpha,
                         [b for b in plan.trainable.trainable
                          if b not in bm.head_blocks] or "all",
                         plan.lora_targets)
    freezing.apply_trainable(model, plan.trainable, bn=bn,
                             recompile=False)
    if plan.multipliers is not None:
        with strategy_scope(model):
            optimizer = LayerwiseOptimizer(optimizer, plan.multipliers, model)
    _announce(verbose, f"Main phase: strategy {plan.strategy!r}", epochs,
              passes, batches)
    h2 = phase(optimizer, epochs, depth, callbacks, passes)
    h2.kept_head_phase = head_weights is not None and _keep_head_phase(
        model, head_weights, validation, plan)
    if plan.check_features and not h2.kept_head_phase:
        # (after a revert, its warning already says what to change)
        warn_at_chance(model, h2, frozen=depth)
    return FineTuneHistory(h1, h2)


def guards_head_phase(model, plan, validation):
    """Whether training by ``plan`` ends by comparing the head phase's
    weights with the main phase's (:func:`keep_better_phase`): with
    validation data and early stopping, and neither under LoRA (its main
    phase adds weights) nor a multi-worker strategy."""
    return validation is not None and plan.patience is not None and \
        plan.trainable.mode != "lora" and \
        not distribute.is_multi_worker(model)


def validation_loss(model, validation, callbacks=()):
    """``model.evaluate``'s loss on ``fit``-style validation data (NaN
    when not finite)."""
    args = dict(verbose=0, return_dict=True, callbacks=list(callbacks))
    if isinstance(validation, tuple):
        logs = model.evaluate(*validation, **args)
    else:
        logs = model.evaluate(validation, **args)
    loss = float(logs["loss"])
    return loss if math.isfinite(loss) else math.nan


def keep_better_phase(model, head_weights, validation, callbacks=()):
    """Leaves ``model`` with its own weights or ``head_weights``, whichever
    has the lower validation loss; returns ``(kept_head, head_loss,
    main_loss)``.

    Both are evaluated now, in the main phase's trainable state: Keras
    counts the weight penalties of trainable layers only, so the phases'
    own logs are not comparable (nor are they when callbacks restored
    other weights). A NaN loss loses. ``callbacks``: ``evaluate``'s."""
    main_weights = model.get_weights()
    main = validation_loss(model, validation, callbacks)
    kept = False
    try:
        model.set_weights(head_weights)
        head = validation_loss(model, validation, callbacks)
        kept = not math.isnan(head) and head < main
    finally:  # (an interrupt too leaves the main phase's)
        if not kept:
            model.set_weights(main_weights)
    return kept, head, main


def _keep_head_phase(model, head_weights, validation, plan):
    """:func:`keep_better_phase`, warning what to change when the head
    phase's weights win; returns whether they did."""
    kept, head, main = keep_better_phase(model, head_weights, validation)
    if not kept:
        return False
    rate = (f"learning_rate (now {plan.learning_rate:g}), e.g. to "
            f"{plan.learning_rate / 10:g}" if plan.optimizer is None else
            "the optimizer's learning rate")
    fewer = {"full": ", or freeze some blocks (strategy='partial', "
                     "freeze_up_to=BLOCK)",
             "partial": ", or freeze more blocks (a later freeze_up_to)"
             }.get(plan.strategy, "")
    warnings.warn(
        f"kerastl: fine-tuning ended worse than the head phase "
        f"({ended_at(main)} against {head:.4g}): the model keeps the head "
        f"phase's weights (and the main phase's trainable blocks and "
        f"optimizer). Lower {rate}{fewer}, and fine-tune again.",
        RuntimeWarning, stacklevel=4)  # fine_tune's caller
    return True


def ended_at(loss):
    """How a main phase's validation loss reads in a message."""
    return ("no finite validation loss" if math.isnan(loss) else
            f"validation loss {loss:.4g}")


def repeatable(x, y=None):
    """Whether ``fit`` input can be served several passes per epoch under
    the step budget: arrays, or a ``tf.data.Dataset`` (not a
    ``PyDataset`` or a generator)."""
    if y is not None:
        return True
    import tensorflow as tf

    return isinstance(x, tf.data.Dataset)


def _announce(verbose, what, epochs, passes, batches):
    """With progress output on: which phase the epochs that follow are."""
    if verbose:
        s = "s" if epochs != 1 else ""
        if not batches:
            steps = ""
        elif passes > 1:
            steps = (f" of {passes} passes over the data "
                     f"({epochs * passes * batches} steps)")
        else:
            steps = f" ({epochs * batches} steps)"
        print(f"{what} for {epochs} epoch{s}{steps}.", flush=True)


def steps_per_epoch(x, y=None, batch_size=None):
    """Optimizer steps per epoch of ``fit`` input: ``ceil(n / batch)`` for
    arrays, a dataset's cardinality, or None when unknown (a generator, a
    repeated dataset)."""
    if y is not None or isinstance(x, np.ndarray):
        try:  # (a dict or list of arrays: the length of the first)
            return max(1, math.ceil(len(keras.tree.flatten(x)[0]) /
                                    (batch_size or 32)))
        except (TypeError, IndexError):
            return None
    import tensorflow as tf

    if isinstance(x, tf.data.Dataset):
        n = int(x.cardinality())
        return n if n > 0 else None
    try:
        return len(x) or None  # a keras.utils.PyDataset
    except TypeError:
        return None


def _check_augmentable(x, y):
    """``augment`` takes image arrays with labels or a ``tf.data.Dataset``
    of ``(images, labels[, weights])`` batches."""
    import tensorflow as tf

    if y is not None and isinstance(x, np.ndarray) and x.ndim == 4 or \
            y is None and isinstance(x, tf.data.Dataset):
        return
    raise KerastlError(
        f"augment= takes image arrays (with their labels) or a "
        f"tf.data.Dataset of (images, labels) batches, not "
        f"{type(x).__name__}: augment the images in your own pipeline "
        f"(keras.layers.RandAugment and others in Dataset.map), or pass "
        f"arrays.")


def _check_arrays(model, x, y, loss, what):
    """Refuses array data that ``fit`` would only fail on deep inside
    TensorFlow: images of another shape than the model takes, as many
    labels as images, sparse labels outside the model's classes."""
    if not isinstance(x, np.ndarray) or y is None or isinstance(
            y, (dict, list, tuple)):
        return
    try:
        expected = tuple(model_input(model).shape[1:])
    except (AttributeError, TypeError, KerastlError):
        return
    got = x.shape[1:]
    if len(got) != len(expected) or any(
            e is not None and e != g for e, g in zip(expected, got)):
        shown = tuple("any" if e is None else e for e in expected)
        raise KerastlError(
            f"The {what} images have shape {got} each; {model.name!r} takes "
            f"{shown}. Resize them (keras.layers.Resizing, or load_backbone("
            f"..., input_shape=...)) to what the model takes.")
    y = np.asarray(y)
    if len(y) != len(x):
        raise KerastlError(f"The {what} data has {len(x)} images but "
                           f"{len(y)} labels: pass one label per image.")
    sparse = loss in ("sparse_categorical_crossentropy",
                      keras.losses.sparse_categorical_crossentropy)
    if sparse and y.size and y.dtype.kind in "iu":
        out = model_output(model)
        classes = out.shape[-1] if hasattr(out, "shape") else None
        if classes and (y.min() < 0 or y.max() >= classes):
            raise KerastlError(
                f"The {what} labels go from {y.min()} to {y.max()}, but "
                f"{model.name!r} has {classes} outputs (classes 0 to "
                f"{classes - 1}): build the classifier with num_classes="
                f"{int(y.max()) + 1}, or map the labels to 0..{classes - 1}.")


def _listed(metrics):
    """``compile``'s metrics: None, a dict as it is, anything else a list."""
    if metrics is None or isinstance(metrics, dict):
        return metrics
    return list(metrics)


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


# BatchNorm momentum when a random backbone trains from scratch: Keras
# Applications use 0.99 to 0.999, whose moving statistics would take
# thousands of steps to reach the data's (until then the model in inference
# mode, as validated and served, is at chance).
RANDOM_BN_MOMENTUM = 0.9


def _track_batch_statistics(model):
    for layer, _ in layer_graph(model):
        if isinstance(layer, keras.layers.BatchNormalization) and \
                layer.momentum > RANDOM_BN_MOMENTUM:
            layer.momentum = RANDOM_BN_MOMENTUM


def check_random_frozen(model, plan):
    """Refuses a plan that freezes weights still at the random initial
    values of ``load_backbone(..., weights=None)``: frozen, they give
    features no head can learn from, and the run would end near chance
    (the measured spread of such features is not small enough for
    :func:`check_frozen_features` to catch on every architecture).

    Raises:
        KerastlError: naming the backbone, what the plan freezes and the
            ways out (the full strategy, or learnt weights).
    """
    bm = block_map(model)
    t = plan.trainable
    base = list(bm.base_blocks)
    if t.mode == "full":
        frozen = [b for b in base if b not in t.trainable]
        count = (f"all {len(base)} of its blocks" if frozen == base else
                 f"{len(frozen)} of its {len(base)} blocks")
        more = ", ..." if len(frozen) > 3 else ""
        what = f"{count} ({', '.join(frozen[:3])}{more})"
    else:
        frozen = base
        what = f"the kernels of every block ({t.mode} trains beside them)"
    name = backbone_lib.random_weights(
        layer for b in frozen for layer in bm.weighted_layers(b))
    if name is None:
        return
    raise KerastlError(
        f"{name!r} has random weights (weights=None) and strategy="
        f"{plan.strategy!r} freezes {what}: frozen random weights give "
        f"features nothing can learn from, so the run would end near "
        f"chance. Train every block from its random start: strategy='full'. "
        f"Or start from learnt weights: weights='imagenet' (downloaded), "
        f"weights='/path/to/weights.h5' (a local file), or a model file of "
        f"your own: kerastl.load_backbone('my_model.keras') (for example "
        f"the model.keras that `kerastl demo` writes).")


def frozen_features_problem(model, depth, x):
    """Why the ``depth`` frozen leading blocks give features nothing can
    learn from (NaN/infinite, or (near-)constant across the training
    images: a frozen backbone with random weights gives ~1e-12), as
    ``(last frozen block, "nan" | spread)``; None when they do not (or
    cannot be probed)."""
    bm = block_map(model)
    if depth < 1 or not bm.has_output(bm.base_blocks[depth - 1]):
        return None
    images = _sample_images(x)
    if images is None or len(images) < 2:
        return None
    last = bm.base_blocks[depth - 1]
    try:
        probe = keras.Model(model.inputs, bm.output_layer(last).output)
    except (AttributeError, ValueError):  # no symbolic graph to cut
        return None
    features = np.asarray(probe.predict(images, verbose=0), "float64")
    features = features.reshape(len(features), -1)
    if not np.isfinite(features).all():
        return last, "nan"
    spread = float(features.std(axis=0).max())
    return (last, spread) if spread < 1e-7 else None


def check_frozen_features(model, depth, x):
    """Stops a run whose ``depth`` frozen leading blocks give features
    nothing can learn from (see :func:`frozen_features_problem`).

    Raises:
        KerastlError: naming the last frozen block, the measured spread and
            the fix.
    """
    problem = frozen_features_problem(model, depth, x)
    if problem is None:
        return
    last, spread = problem
    fix = ("Load pretrained weights (weights='imagenet'; CLI: --weights "
           "imagenet) or train the blocks (strategy='full'; CLI: --strategy "
           "full).")
    if spread == "nan":
        raise KerastlError(
            f"The frozen blocks up to {last!r} give NaN or infinite features "
            f"on the training images: nothing can be learnt from them. "
            f"Check the images and the weights. {fix}")
    raise KerastlError(
        f"The frozen blocks up to {last!r} give the same features for "
        f"every training image (largest spread across images "
        f"{spread:.1e}): a frozen backbone with random weights, or "
        f"constant images. The new head cannot learn from them. {fix}")


def set_precision(model, policy):
    """Makes ``model`` compute in ``policy`` (see
    :attr:`TrainingPlan.mixed_precision`), except the layers that produce
    its outputs, which stay float32 (softmax and loss are unstable in half
    precision). ``None`` or ``"float32"`` leaves the model as it is."""
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
            RuntimeWarning, stacklevel=4)
