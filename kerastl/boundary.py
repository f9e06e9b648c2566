"""Boundary-activation caching: train the top of a model on activations of
its frozen prefix computed once.

Partial fine-tuning freezes a model's first blocks and trains the rest. A
frozen prefix (its BatchNorm in inference mode, nothing random in it) maps
each image to the same activations in every epoch, so :func:`split_at_block`
cuts the model at the end of a block into a ``prefix`` (images in, boundary
activations out) and a ``suffix`` (boundary activations in, the model's
outputs out) that share the model's layers, and :func:`cached_fit` runs the
prefix once over the data and trains the suffix on what it produced. Since
the layers are shared, the original model holds the trained weights
afterwards: nothing is copied back, ``predict`` and export use it as it is.

:func:`kerastl.fine_tune` uses this by default whenever it is valid
(``boundary_cache="auto"``); ``boundary_cache=True`` asks for it and fails
with the reason when it is not valid, ``False`` never uses it.

What makes it invalid (each is a :class:`BoundaryCacheError` naming the fix):

* a prefix variable that is trainable (the prefix is not frozen), a
  BatchNormalization in the prefix that is trainable (it would update its
  statistics);
* a random layer in the prefix (augmentation, dropout, noise): its output
  changes every epoch, so it must come after the boundary, or in the input
  pipeline;
* the boundary inside a nested model, or no block to cut after;
* a ``GradualUnfreezing`` callback (it moves the boundary during training:
  use ``boundary_cache=False``);
* a callback that unfreezes the prefix or swaps the optimizer during
  training (checked every epoch: the run stops with the reason);
* data it cannot replay: a dataset that repeats forever, labels that are
  not one array, data that is not ``(x, y)`` arrays or a
  ``tf.data.Dataset`` of ``(x, y[, weights])`` batches, or activations
  larger than ``max_bytes`` (default 2 GiB). Under ``"auto"`` a
  ``tf.data`` training pipeline is replayed only when kerastl made it
  (:func:`kerastl.image_folders.image_folder_datasets`, what ``kerastl
  finetune`` reads with): another pipeline may augment, and replaying it
  would freeze the first epoch's draw. ``boundary_cache=True`` replays any.

Training-time augmentation (``fine_tune(augment=...)``) runs before the
model, on the batches, so it does not make the prefix random: the cache
then runs the prefix once per augmented *view* of the training data,
``ceil(passes / 4)`` views (:data:`VIEW_REUSE`; fewer when ``max_bytes``
does not hold them), and pass ``p`` over the data trains on view
``p % views`` in its seeded order (an epoch is one pass, or several under
``fine_tune``'s step budget). Training after the boundary equals
end-to-end training on those same views (the test compares losses to
1e-5); against augmenting every batch afresh, each view serves up to four
passes.

The same batches and seed give the same training as end to end up to float
summation order (the acceptance test compares predictions to 1e-5). A
replayed ``tf.data`` input becomes arrays with its examples reshuffled each
epoch (as ``image_dataset_from_directory`` does).
"""

import numpy as np

import keras

from kerastl import _keras_private as _private
from kerastl import prebuild
from kerastl.batch_order import SeededBatches, ViewBatches
from kerastl.blocks import block_map, model_input
from kerastl.errors import BoundaryCacheError
from kerastl.freezing import GradualUnfreezing

MAX_BYTES = 2 * 1024 ** 3
# The one-time pass over arrays runs in batches of at least this many: on
# CPUs, inference in larger batches is much faster (MobileNetV2 at 96x96:
# 1.7 s for 1,000 images in batches of 128, 2.6 s in batches of 32).
PREDICT_BATCH = 128


def _random_state(layer):
    """True when ``layer``, or a layer inside it (a ``Pipeline`` of
    augmentations, a custom layer holding a ``Dropout``), draws random
    numbers."""
    return any(isinstance(v, keras.random.SeedGenerator)
               for inner in _private.all_sublayers(layer)
               for v in vars(inner).values())


def _after_boundary(bm, depth):
    """The names of the random weightless layers at the end of the first
    ``depth`` blocks (and what follows them there), which the cut leaves
    to the suffix: a ``Dropout`` between a backbone's pooled features and
    a new head sits in the backbone's last block (a layer without weights
    takes the block of its input), yet nothing before the boundary reads
    it, so running it after the boundary computes the same model."""
    prefix = [l for b in bm.names[:depth] for l in bm.layers(b)]
    inside = {l.name for l in prefix}
    readers = {}
    for layer in bm.layers():
        for parent in bm.parents(layer.name):
            readers.setdefault(parent, set()).add(layer.name)
    tail = set()  # weightless, and read only after the boundary or by tail
    for layer in reversed(prefix):
        # (the set lookups first: outer_layer scans the model's layers)
        if not layer.weights and readers.get(layer.name) and \
                all(r not in inside or r in tail
                    for r in readers[layer.name]) and \
                bm.outer_layer(layer.name) is layer:
            tail.add(layer.name)
    moved = set()
    for layer in prefix:  # topological: a random layer, then its readers
        if layer.name in tail and (_random_state(layer) or any(
                p in moved for p in bm.parents(layer.name))):
            moved.add(layer.name)
    return moved


def _prefix_problem(model, depth):
    bm = block_map(model)
    if depth <= 0 or depth > len(bm.base_blocks):
        return (f"there is no frozen block to cache (frozen blocks: "
                f"{depth}); boundary caching needs strategy 'partial' or "
                "'features'")
    moved = _after_boundary(bm, depth)
    for block in bm.names[:depth]:
        for layer in bm.layers(block):
            if layer.name in moved:
                continue
            if any(v.trainable for v in layer.weights) and layer.trainable:
                if isinstance(layer, keras.layers.BatchNormalization):
                    return (f"BatchNormalization layer {layer.name!r} in "
                            f"block {block!r} before the boundary is in "
                            "training mode; freeze it (bn='frozen')")
                return (f"layer {layer.name!r} in block {block!r} before the "
                        "boundary is trainable: the prefix is not frozen")
            if _random_state(layer):
                return (f"layer {layer.name!r} in block {block!r} before the "
                        "boundary is random (augmentation, dropout or "
                        "noise); move it after the boundary or into the "
                        "input pipeline, or pass boundary_cache=False")
    return None


def split_at_block(model, depth):
    """``(prefix, suffix)``: ``model`` cut after its first ``depth`` blocks.

    Both are ``keras.Model`` objects sharing ``model``'s layers: ``prefix``
    maps the model's inputs to the tensors that cross the boundary,
    ``suffix`` maps those to the model's outputs, and ``suffix(prefix(x))``
    computes ``model(x)``.

    Raises:
        BoundaryCacheError: the prefix is not frozen or holds a random layer,
            or the boundary falls inside a nested model.
    """
    problem = _prefix_problem(model, depth)
    if problem:
        raise BoundaryCacheError(f"Boundary cache: {problem}.")
    bm = block_map(model)
    moved = _after_boundary(bm, depth)
    prefix_leaves = {id(l) for b in bm.names[:depth] for l in bm.layers(b)
                     if l.name not in moved}
    graph = _private.functional_graph(model)
    if graph is None:
        raise BoundaryCacheError(
            "Boundary cache: the model is subclassed (no layer graph to cut); "
            "pass boundary_cache=False.")
    nodes = [n for ns in _private.nodes_by_depth(graph).values() for n in ns]

    def side(op):
        if isinstance(op, keras.layers.InputLayer):
            return "prefix"
        leaves = [l for l in _private.all_sublayers(op)
                  if not isinstance(l, (keras.Model, keras.layers.InputLayer))
                  ] if isinstance(op, keras.Model) else [op]
        inside = {id(l) in prefix_leaves for l in leaves}
        if len(inside) > 1:
            raise BoundaryCacheError(
                f"Boundary cache: the boundary after block "
                f"{bm.names[depth - 1]!r} falls inside the nested model "
                f"{op.name!r}; pass boundary_cache=False.")
        return "prefix" if inside == {True} else "suffix"

    crossing, seen = [], set()
    for node in nodes:
        if node.is_input:
            continue
        if side(node.operation) == "prefix":
            # A frozen block fed by a layer after the boundary would be
            # computed once from that layer's initial weights.
            for tensor in node.input_tensors:
                op = _private.producing_operation(tensor)
                if side(op) == "suffix":
                    raise BoundaryCacheError(
                        f"Boundary cache: layer {op.name!r} after the "
                        f"boundary feeds {node.operation.name!r} before it; "
                        "pass boundary_cache=False.")
            continue
        for tensor in node.input_tensors:
            op = _private.producing_operation(tensor)
            if side(op) == "prefix" and id(tensor) not in seen:
                seen.add(id(tensor))
                crossing.append(tensor)
    if not crossing:
        raise BoundaryCacheError(
            "Boundary cache: nothing after the boundary reads the frozen "
            "blocks' output.")
    try:
        prefix = keras.Model(model_input(model), crossing if len(crossing) > 1
                             else crossing[0], name=f"{model.name}_prefix")
        suffix = keras.Model(crossing if len(crossing) > 1 else crossing[0],
                             model.outputs if len(model.outputs) > 1
                             else model.outputs[0],
                             name=f"{model.name}_suffix")
    except ValueError as e:  # e.g. an output computed before the boundary
        raise BoundaryCacheError(
            f"Boundary cache: the model cannot be cut after block "
            f"{bm.names[depth - 1]!r} ({' '.join(str(e).split())[:200]}); "
            "pass boundary_cache=False.") from None
    return prefix, suffix


def _split_or_reason(model, depth, callbacks):
    """``((prefix, suffix), None)``, or ``(None, why caching is invalid)``."""
    if any(isinstance(c, GradualUnfreezing) for c in callbacks):
        return None, ("GradualUnfreezing moves the boundary during training; "
                      "pass boundary_cache=False")
    try:
        return split_at_block(model, depth), None  # checks the prefix too
    except BoundaryCacheError as e:
        return None, str(e)[len("Boundary cache: "):].rstrip(".")


# How many examples the behaviour check runs through the prefix.
CHECK_EXAMPLES = 4


def _first_inputs(x, n=CHECK_EXAMPLES):
    """The inputs of up to ``n`` training examples, or None."""
    tf = _tf_data()
    if tf is not None and isinstance(x, tf.data.Dataset):
        for element in x.take(1):
            inputs = element[0] if isinstance(element, tuple) else element
            return keras.tree.map_structure(lambda a: a[:n], inputs)
        return None
    try:
        return keras.tree.map_structure(lambda a: np.asarray(a[:n]), x)
    except (TypeError, IndexError, KeyError):
        return None


def _varies(prefix, x):
    """Why the frozen prefix is not a function of its input alone, or None.

    Judged by behaviour, whatever the layers' types: the prefix runs on the
    same few images twice in training mode (how ``fit`` runs it end to
    end) and once in inference mode (how the one-time pass runs it); a
    layer that draws random numbers (``tf.random``, ``keras.random``
    without a seed, augmentation, dropout, noise) or computes otherwise in
    training makes the three differ.
    """
    sample = _first_inputs(x)
    if sample is None:
        return None
    runs = [prefix(sample, training=True), prefix(sample, training=True),
            prefix(sample, training=False)]
    flat = [[np.asarray(keras.ops.convert_to_numpy(t))
             for t in keras.tree.flatten(r)] for r in runs]
    same = all(np.array_equal(a, b, equal_nan=True)
               for other in flat[1:] for a, b in zip(flat[0], other))
    if same:
        return None
    return ("the frozen blocks give different outputs for the same images "
            "from one call to the next, or in training and inference (a "
            "layer that draws random numbers: tf.random, keras.random "
            "without a seed, augmentation, dropout or noise); move it after "
            "the boundary or into the input pipeline, or pass "
            "boundary_cache=False")


def why_not(model, depth, callbacks=()):
    """The reason boundary caching is invalid for this setup, or ``None``."""
    return _split_or_reason(model, depth, callbacks)[1]


class _NotReplayable(Exception):
    pass


def _activations(prefix, data, batch_size, max_bytes, replay_any,
                 transform=None):
    """``(activations, y, sample_weight, batch_size)`` of ``data`` through
    ``prefix``, or :class:`_NotReplayable` with the reason. ``transform``:
    applied to each batch of images first (an augmentation)."""
    if isinstance(data, tuple) and len(data) in (2, 3):
        x, y = data[0], data[1]
        w = data[2] if len(data) == 3 else None
        size = batch_size or 32
        if not isinstance(y, np.ndarray) and not hasattr(y, "shape"):
            raise _NotReplayable("labels that are not one array")
        n = len(y)
        shapes = [t.shape[1:] for t in prefix.outputs]
        if any(d is None for s in shapes for d in s):  # size from one image
            one = prefix.predict_on_batch(x[:1])
            per_image = sum(np.asarray(a).nbytes for a in (
                one if isinstance(one, list) else [one]))
        else:
            per_image = sum(int(np.prod(s)) * 4 for s in shapes)
        bytes_needed = n * per_image
        if bytes_needed > max_bytes:
            raise _NotReplayable(
                f"the boundary activations would take {bytes_needed / 2**30:.1f}"
                f" GiB (limit {max_bytes / 2**30:.1f} GiB)")
        chunk = max(size, PREDICT_BATCH)
        if transform is not None:
            x = augmented_images(transform, x, chunk)
        acts = prefix.predict(x, batch_size=chunk, verbose=0)
        return acts, np.asarray(y), w, size
    tf = _tf_data()
    if tf is None or not isinstance(data, tf.data.Dataset):
        raise _NotReplayable(f"data of type {type(data).__name__} (cached: "
                             "(x, y) arrays or a tf.data.Dataset)")
    if data.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise _NotReplayable("the dataset repeats forever")
    if not replay_any and not getattr(data, "kerastl_replayable", False):
        raise _NotReplayable(
            "a tf.data pipeline may augment its images, and replaying it "
            "would freeze the first epoch's draw; boundary_cache=True "
            "replays it anyway (kerastl's image_folder_datasets are "
            "replayed by default)")
    parts, ys, ws, size, total = [], [], [], None, 0
    for batch in data:
        if not isinstance(batch, tuple) or len(batch) not in (2, 3):
            raise _NotReplayable("dataset elements are not (x, y[, weights])")
        a = prefix.predict_on_batch(
            batch[0] if transform is None else transform(batch[0]))
        total += sum(np.asarray(v).nbytes for v in (
            a if isinstance(a, list) else [a]))
        if total > max_bytes:
            raise _NotReplayable(
                f"the boundary activations exceed "
                f"{max_bytes / 2**30:.1f} GiB")
        parts.append(a)
        if isinstance(batch[1], (dict, list, tuple)):
            raise _NotReplayable("labels that are not one array")
        ys.append(np.asarray(batch[1]))
        if len(batch) == 3:
            ws.append(np.asarray(batch[2]))
        size = size or len(ys[-1])
    if not parts:
        raise _NotReplayable("the dataset is empty")
    if isinstance(parts[0], list):
        acts = [np.concatenate([p[i] for p in parts])
                for i in range(len(parts[0]))]
    else:
        acts = np.concatenate(parts)
    return (acts, np.concatenate(ys), np.concatenate(ws) if ws else None,
            size)


# Augmented training (fine_tune(augment=...)): the frozen prefix runs on
# ceil(passes / VIEW_REUSE) augmented views of the training data, each
# replayed in up to VIEW_REUSE passes, instead of on every image each pass.
VIEW_REUSE = 4


def view_count(epochs, reuse=VIEW_REUSE):
    """How many augmented views ``epochs`` passes over the data replay (at
    least one)."""
    return max(1, -(-int(epochs) // int(reuse)))


def augmented_images(transform, x, batch_size=PREDICT_BATCH):
    """One augmented view of array images ``x``: ``transform`` (a function
    of a batch, e.g. :func:`kerastl.augment.augment_batch` bound to a
    layer) applied to consecutive batches of ``batch_size``. The boundary
    cache draws its views with this, in batches of ``max(batch_size,
    PREDICT_BATCH)``; end-to-end training on the same views gives the same
    result (the test compares losses)."""
    return np.concatenate([np.asarray(transform(x[i:i + batch_size]))
                           for i in range(0, len(x), batch_size)])


def _views(prefix, data, batch_size, max_bytes, replay_any, transform,
           views):
    """The activations of up to ``views`` augmented views of ``data``
    (as many as ``max_bytes`` holds, at least one): a list of
    :func:`_activations` results."""
    first = _activations(prefix, data, batch_size, max_bytes, replay_any,
                         transform)
    per_view = sum(np.asarray(a).nbytes for a in keras.tree.flatten(first[0]))
    k = max(1, min(int(views), max_bytes // max(per_view, 1)))
    return [first] + [_activations(prefix, data, batch_size, max_bytes,
                                   replay_any, transform)
                      for _ in range(k - 1)], per_view


def _tf_data():
    try:
        import tensorflow as tf
    except ImportError:
        return None
    return tf


class _OnFullModel(keras.callbacks.Callback):
    """Shows a callback the whole model while the suffix trains: a
    checkpoint saves the whole model, early stopping restores its weights,
    BackupAndRestore's resumed epoch reaches the suffix's ``fit``."""

    def __init__(self, inner, full, fitted):
        super().__init__()
        self.inner, self.full, self.fitted = inner, full, fitted

    def set_model(self, model):
        super().set_model(model)
        self.inner.set_model(self.full)

    def set_params(self, params):
        super().set_params(params)
        self.inner.set_params(params)

    def on_train_begin(self, logs=None):
        self.inner.on_train_begin(logs)
        _private.move_initial_epoch(self.full, self.fitted)


class _Guard(keras.callbacks.Callback):
    """Stops a cached run whose premises a callback changed: the frozen
    blocks unfrozen, or the whole model given another optimizer (the
    suffix would go on training without them)."""

    def __init__(self, full, depth, optimizer):
        super().__init__()
        self.full, self.depth, self.optimizer = full, depth, optimizer

    def _check(self):
        problem = _prefix_problem(self.full, self.depth)
        if problem is None and self.full.optimizer is not self.optimizer:
            problem = "the model was given another optimizer"
        if problem:
            raise BoundaryCacheError(
                f"Boundary cache: a callback changed the model during "
                f"training ({problem}); pass boundary_cache=False.")

    def on_epoch_begin(self, epoch, logs=None):
        self._check()

    def on_epoch_end(self, epoch, logs=None):
        self._check()


def _forward(name):
    def hook(self, *args, **kwargs):
        if self.full.stop_training:
            self.fitted.stop_training = True
        result = getattr(self.inner, name)(*args, **kwargs)
        if self.full.stop_training:
            self.fitted.stop_training = True
        return result
    hook.__name__ = name
    return hook


for _name in ("on_train_end", "on_epoch_begin", "on_epoch_end",
              "on_train_batch_begin", "on_train_batch_end",
              "on_test_begin", "on_test_end", "on_test_batch_begin",
              "on_test_batch_end", "on_predict_begin", "on_predict_end",
              "on_predict_batch_begin", "on_predict_batch_end"):
    setattr(_OnFullModel, _name, _forward(_name))


def cached_fit(model, depth, x, y=None, validation_data=None, *, optimizer,
               loss, metrics=(), weighted_metrics=None, sample_weight=None,
               epochs=1, batch_size=None, callbacks=(), verbose=0,
               max_bytes=MAX_BYTES, required=False, jit_compile="auto",
               seed=None, augment=None, views=None, passes=1):
    """``model.fit`` with its first ``depth`` (frozen) blocks run once.

    Compiles ``model`` and its suffix with the same optimizer, computes the
    boundary activations of the training (and validation) data, and trains
    the suffix on them. ``seed``: the batch order of each epoch is drawn
    from ``(seed, pass)`` (see :class:`kerastl.batch_order.SeededBatches`),
    as ``fine_tune`` orders array input end to end; None: Keras shuffles.

    ``augment``: a function of a batch of images (training-time
    augmentation). The prefix then runs once per augmented view: ``views``
    of them (default :func:`view_count` of ``epochs * passes``; fewer when
    ``max_bytes`` holds fewer), pass ``p`` trains on view ``p % views``
    (:class:`~kerastl.batch_order.ViewBatches`). The returned history's
    ``boundary_views`` and ``boundary_bytes`` say how many and how large.

    ``passes``: passes over the data in one epoch (see
    :class:`~kerastl.batch_order.SeededBatches`); views are counted per
    pass.

    Returns:
        ``(history, reason)``: the Keras ``History`` and ``None``; or
        ``None`` and why the cache is invalid (nothing was trained then:
        call ``model.fit``), unless ``required``.

    Raises:
        BoundaryCacheError: ``required`` and the cache is invalid.
    """
    parts, reason = _split_or_reason(model, depth, callbacks)
    result = None
    if reason is None:
        reason = _varies(parts[0], x)
    if reason is None:
        prefix, suffix = parts
        if verbose:
            names = block_map(model).names
            print(f"kerastl: boundary cache: running blocks {names[0]}.."
                  f"{names[depth - 1]} once over the data; training "
                  f"{', '.join(names[depth:])} on their output.", flush=True)
        try:
            data = x if y is None else (x, y) if sample_weight is None \
                else (x, y, sample_weight)
            if augment is None:
                train = _activations(prefix, data, batch_size, max_bytes,
                                     required)
            else:
                train_views, per_view = _views(
                    prefix, data, batch_size, max_bytes, required, augment,
                    views or view_count(epochs * passes))
                train = train_views[0]
                if verbose:
                    print(f"kerastl: boundary cache: {len(train_views)} "
                          f"augmented views of the training data "
                          f"({len(train_views) * per_view / 2**20:.1f} MiB),"
                          f" each replayed in up to "
                          f"{view_count(epochs * passes, len(train_views))}"
                          f" passes.",
                          flush=True)
            val = None
            if validation_data is not None:
                # Validation is never augmented: replaying it is exact.
                a, vy, vw, _ = _activations(prefix, validation_data,
                                            batch_size, max_bytes, True)
                val = (a, vy) if vw is None else (a, vy, vw)
        except _NotReplayable as e:
            reason = str(e)
        else:
            listed = [None if m is None or isinstance(m, dict) else list(m)
                      for m in (metrics, weighted_metrics)]
            model.compile(optimizer=optimizer, loss=loss, metrics=listed[0],
                          weighted_metrics=listed[1],
                          jit_compile=jit_compile)
            suffix.dtype_policy = model.dtype_policy  # loss scaling alike
            suffix.compile(optimizer=model.optimizer, loss=loss,
                           metrics=listed[0], weighted_metrics=listed[1],
                           jit_compile=jit_compile)
            acts, ty, tw, size = train
            # (one trace of the train step instead of two)
            prebuild.build_before_fit(suffix, acts, ty, tw)
            # History and the progress bar record the suffix's logs (the
            # same numbers); Keras adds its own only when none is given.
            own = (keras.callbacks.History, keras.callbacks.ProgbarLogger)
            wrapped = [c if isinstance(c, own) else
                       _OnFullModel(c, model, suffix) for c in callbacks]
            wrapped.append(_Guard(model, depth, model.optimizer))
            if seed is None and (augment is not None or passes > 1):
                seed = np.random.default_rng().integers(2 ** 31)
            if augment is not None:
                batches = ViewBatches(
                    [v[:2] if v[2] is None else v[:3] for v in train_views],
                    size, seed, passes)
                result = suffix.fit(
                    batches, validation_data=val, epochs=epochs,
                    shuffle=False, callbacks=wrapped + [batches.callback()],
                    verbose=verbose)
                result.boundary_views = len(train_views)
                result.boundary_bytes = len(train_views) * per_view
            elif seed is None:
                result = suffix.fit(
                    acts, ty, sample_weight=tw, validation_data=val,
                    epochs=epochs, batch_size=size, shuffle=True,
                    callbacks=wrapped, verbose=verbose)
            else:
                batches = SeededBatches(
                    (acts, ty) if tw is None else (acts, ty, tw), size, seed,
                    passes=passes)
                result = suffix.fit(
                    batches, validation_data=val, epochs=epochs,
                    shuffle=False, callbacks=wrapped + [batches.callback()],
                    verbose=verbose)
            result.set_model(model)  # history.model: the whole model
    if reason is not None and required:
        raise BoundaryCacheError(f"Boundary cache: {reason}.")
    return result, reason
