"""AdaBN: re-estimate BatchNorm statistics on the target domain."""

import numbers

import keras
import numpy as np

from kerastl import _keras_private as _private
from kerastl import prebuild
from kerastl.adaptation.dann import DANN
from kerastl.blocks import model_output
from kerastl.errors import KerastlError
from kerastl.freezing import (keras_model_of, restored_trainability,
                              temporarily_trainable)


def adapt_batch_norm(model, target, batch_size=64):
    """AdaBN: re-estimates every BatchNorm's statistics on target data.

    Li et al. (2016): domain shift lives largely in the BN statistics; replace
    the source means and variances with the target's and nothing else
    changes. Runs the target data through the model once in training mode
    with a cumulative average weighted by batch size (a batch of ``b``
    images after ``n`` enters with weight ``b / (n + b)``), so the moving
    statistics become the mean of the target batch statistics, each batch
    counted by its images (a short last batch as much as its images, not
    as much as a full batch). No other weight moves; BN layers get back
    their ``trainable`` and ``momentum``.

    Args:
        model: a ``keras.Model`` (a :class:`DANN` adapts its label path:
            the feature extractor and the bottleneck).
        target: target images, an array (or a tensor) or a finite
            ``tf.data.Dataset`` of images, batched or not (or of ``(x,
            ...)`` tuples).
        batch_size: for arrays and unbatched datasets (at least 2: a
            variance needs two images).

    Returns:
        The number of BatchNormalization layers adapted.
    """
    if isinstance(model, DANN):
        layers = (_private.all_sublayers(model.feature_extractor)
                  + model.bottleneck_layers)

        def forward(batch):
            model.features(batch, training=True)
    else:
        net = keras_model_of(model)
        layers = _private.all_sublayers(net)

        def forward(batch):
            net(batch, training=True)
    bns = [l for l in layers
           if isinstance(l, keras.layers.BatchNormalization)]
    if not bns:
        return 0
    if isinstance(batch_size, bool) or not isinstance(
            batch_size, (int, np.integer)) or batch_size < 2:
        raise KerastlError(f"adapt_batch_norm: batch_size={batch_size!r}; "
                           "expected an int >= 2 (a variance needs two "
                           "images; 64 or more gives steady statistics).")
    momenta = [l.momentum for l in bns]
    batches = _target_batches(target, batch_size)
    seen = 0
    try:
        with temporarily_trainable(bns):
            for batch in batches:
                size = int(keras.ops.shape(batch)[0])
                for l in bns:  # (the first batch replaces the statistics)
                    l.momentum = seen / (seen + size)
                forward(batch)
                seen += size
    finally:
        for l, momentum in zip(bns, momenta):
            l.momentum = momentum
    if not seen:
        raise KerastlError("adapt_batch_norm got an empty target: no batch "
                           "to take statistics from; pass target images.")
    return len(bns)


def _target_batches(target, batch_size):
    """Batches of target images from an array (or tensor), or from a
    finite dataset of images (batched or not) or of ``(x, ...)``
    tuples."""
    if hasattr(target, "element_spec"):  # a tf.data.Dataset
        import tensorflow as tf

        spec = target.element_spec
        if isinstance(spec, dict):
            raise KerastlError(
                "adapt_batch_norm: the dataset yields dicts (a "
                "domain_dataset?); pass the target images, e.g. the array "
                "xt.")
        if int(target.cardinality()) == int(tf.data.INFINITE_CARDINALITY):
            raise KerastlError(
                "adapt_batch_norm: the dataset is infinite (.repeat()?); "
                "pass one pass over the target images.")
        first = spec[0] if isinstance(spec, tuple) else spec
        if first.shape.rank == 3:  # single images
            target = target.batch(batch_size)
        return (b[0] if isinstance(b, tuple) else b for b in target)
    x = np.asarray(target)
    if x.ndim != 4 or not len(x):
        raise KerastlError(
            f"adapt_batch_norm needs target images (n, height, width, "
            f"channels) with n >= 1; got shape {x.shape}.")
    return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


# The normalisation layers whose scale and offset TENT adapts.
_NORMS = (keras.layers.BatchNormalization, keras.layers.LayerNormalization,
          keras.layers.GroupNormalization)


def _prediction_entropy(y_true, y_pred):
    """Mean Shannon entropy (nats) of the predicted class probabilities;
    ``y_true`` is ignored: TENT has no labels."""
    p = keras.ops.clip(y_pred, 1e-12, 1.0)
    return -keras.ops.sum(y_pred * keras.ops.log(p), axis=-1)


@_private.quiet_retracing()
def mean_entropy(model, x, batch_size=256):
    """The mean entropy (nats) of ``model``'s class probabilities on ``x``
    in inference mode: what :func:`tent` lowers."""
    p = np.asarray(keras_model_of(model).predict(x, batch_size=batch_size,
                                                 verbose=0), "float64")
    if p.ndim != 2 or p.min() < -1e-6 or \
            not np.allclose(p.sum(-1), 1.0, atol=1e-3):
        raise KerastlError(
            "The model's outputs are not class probabilities (rows of "
            "non-negative numbers that sum to 1): entropy needs them. End "
            "the model with a softmax (keras.layers.Softmax() after logits; "
            "kerastl.build_classifier's heads have one).")
    return float(np.mean(-np.sum(p * np.log(np.clip(p, 1e-12, 1)), -1)))


@_private.quiet_retracing()
def tent(model, target, steps=None, learning_rate=1e-3, batch_size=64,
         seed=0, verbose=0):
    """TENT: test-time adaptation of the normalisation layers by entropy
    minimisation (Wang et al., ICLR 2021), the step after AdaBN.

    Every weight is frozen except the scale and offset of the
    BatchNormalization, LayerNormalization and GroupNormalization layers;
    those take Adam steps that lower the entropy of the model's own
    predictions on unlabelled target batches, which are normalised with
    their own statistics as in the paper (BatchNormalization in training
    mode, frozen ones included). Dropout is off while it adapts (the
    paper's networks have none). Afterwards the BatchNorm moving statistics
    are re-estimated on the target (:func:`adapt_batch_norm`), so the
    adapted model predicts in inference mode with the target's statistics.
    Every other weight, the head included, stays bit-identical; each layer
    gets back its ``trainable`` flags and dropout rate; the model's own
    compiled state is not touched.

    Args:
        model: a classifier ``keras.Model`` whose output is class
            probabilities (a softmax head, as kerastl builds).
        target: unlabelled target images, an array ``(n, h, w, c)``.
        steps: optimizer steps (one per batch); default: one pass over
            ``target`` (the paper's online setting), at least 50 (passes
            repeat a small target) and at most 1,000.
        learning_rate: Adam's rate (the paper's, for batches of 128).
        batch_size: target images per step (the statistics of each batch
            normalise it: keep it at 32 or more).
        seed: the order of the target images.
        verbose: ``fit``'s progress display.

    Returns:
        ``{"steps", "entropy_before", "entropy_adabn", "entropy_after",
        "layers"}``: the mean prediction entropy (nats) on ``target`` in
        inference mode before, after AdaBN alone (TENT's start) and
        after, and how many normalisation layers adapted.

    Example::

        report = kerastl.adaptation.tent(classifier, target_images)
        report["entropy_after"] < report["entropy_before"]
    """
    net = keras_model_of(model)
    if net is None or isinstance(model, DANN):
        raise KerastlError(
            "tent takes a classifier keras.Model whose output is class "
            "probabilities (for a DANN, adapt the classifier you export, "
            "kerastl.inference_model(dann)).")
    target = np.asarray(target)
    if target.ndim != 4 or not len(target):
        raise KerastlError(
            f"tent needs target images (n, height, width, channels) with "
            f"n >= 1; got shape {target.shape}.")
    if steps is not None and not _is_count(steps, 1):
        raise KerastlError(f"steps={steps!r}: expected an int >= 1 (or None:"
                           " one pass over the target).")
    if not _is_count(batch_size, 2):
        raise KerastlError(f"batch_size={batch_size!r}: expected an int >= 2 "
                           "(each batch is normalised with its own "
                           "statistics).")
    try:
        out_shape = tuple(model_output(net).shape)
    except (AttributeError, ValueError):  # (a subclassed model, not built)
        out_shape = ()
    if len(out_shape) != 2:
        raise KerastlError(
            f"tent needs a model with one output of class probabilities "
            f"(batch, classes); {net.name!r} outputs {out_shape}.")
    layers = _private.all_sublayers(net)
    norms = [l for l in layers if isinstance(l, _NORMS)]
    if not norms:
        raise KerastlError(
            f"{net.name!r} has no BatchNormalization, LayerNormalization or "
            "GroupNormalization layer: TENT has nothing to adapt. Use the "
            "model as it is, or a domain-adaptation method (kerastl.DANN).")
    steps, batch_size = None if steps is None else int(steps), int(batch_size)
    per_pass = -(-len(target) // batch_size)
    steps = min(max(per_pass, 50), 1000) if steps is None else steps
    order = np.random.default_rng(seed).permutation(len(target))
    # Each step takes the next batch of a seeded order (passes repeat it;
    # within a pass, a last batch of fewer than 2 images is dropped).
    batches = [order[i:i + batch_size] for i in range(0, len(order),
                                                      batch_size)]
    batches = [b for b in batches if len(b) > 1] or batches
    batches = [batches[i % len(batches)] for i in range(steps)]
    before = mean_entropy(net, target)  # (refuses logits)
    # Where TENT starts, and what it is measured against: AdaBN.
    adapt_batch_norm(net, target, batch_size=batch_size)
    adabn = mean_entropy(net, target)
    dropouts = [l for l in layers if isinstance(l, keras.layers.Dropout)]
    rates = [l.rate for l in dropouts]
    try:
        with restored_trainability(layers):
            for layer in layers:  # (frozen containers and norms too)
                layer.trainable = True
            scale_offset = {id(v) for l in norms for v in l.trainable_weights}
            for v in net.trainable_weights:  # (a container's own ones too)
                if id(v) not in scale_offset:
                    v.trainable = False
            for layer in dropouts:  # the paper's models have none: off
                layer.rate = 0.0
            inputs = keras.Input(tuple(target.shape[1:]))
            wrapper = keras.Model(inputs, net(inputs),
                                  name=f"{net.name}_tent")
            wrapper.compile(optimizer=keras.optimizers.Adam(learning_rate),
                            loss=_prediction_entropy)
            prebuild.build_before_fit(wrapper)  # (one trace, not two)
            wrapper.fit(_TargetBatches(target, batches), epochs=1,
                        shuffle=False, verbose=verbose)
    finally:
        for layer, rate in zip(dropouts, rates):
            layer.rate = rate
    adapt_batch_norm(net, target, batch_size=batch_size)
    return {"steps": len(batches), "entropy_before": before,
            "entropy_adabn": adabn, "entropy_after": mean_entropy(net, target),
            "layers": len(norms)}


def _is_count(value, least):
    """An int (not a bool) of at least ``least``."""
    return isinstance(value, numbers.Integral) and \
        not isinstance(value, bool) and value >= least


class _TargetBatches(keras.utils.PyDataset):
    """``(images, zeros)`` batches of ``target`` at the given positions
    (no copy of the target per step)."""

    def __init__(self, target, batches):
        super().__init__()
        self.target, self.batches = target, batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        x = self.target[self.batches[i]]
        return x, np.zeros(len(x), "float32")
