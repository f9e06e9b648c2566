"""``AdaMatch``: self-training for domain adaptation inside ``model.fit``.

AdaMatch (Berthelot et al., ICLR 2022) trains one classifier on labelled
source images and unlabelled target images. Each image is seen twice, weakly
and strongly augmented (Keras's own augmentation layers); the target's weak
predictions, aligned to the source's class distribution, become hard
pseudo-labels for its strong views where they are confident enough relative
to the source's own confidence; random logit interpolation between a pass
with both domains' batch statistics and one with the source's alone keeps
the source loss consistent across the two.
"""

import math
import warnings

import keras
import numpy as np
from keras import ops

from kerastl import _keras_private as _private
from kerastl import prebuild
from kerastl import distribute as _distribute
from kerastl import heads
from kerastl.augment import RandAugment
from kerastl.adaptation.dann import (feature_layer, feature_width,
                                     fit_arguments, label_features,
                                     label_model, label_path_logs,
                                     label_path_loss)
from kerastl.errors import KerastlError


def weak_augmentation(seed=None):
    """AdaMatch's weak augmentation: a random shift of up to 1/8 of the
    image each way (the paper's, without its horizontal flip, which would
    turn digits and text into other classes)."""
    return keras.Sequential([keras.layers.RandomTranslation(
        0.125, 0.125, fill_mode="reflect", seed=seed)],
        name="weak_augmentation")


def strong_augmentation(value_range=(0, 255), seed=None, zoom=(-0.2, 0.5)):
    """AdaMatch's strong augmentation from Keras's own layers: the weak
    shift, :class:`keras.layers.RandomZoom` (``zoom``, its factor: by
    default from 20% in to 50% out; the aspect kept, reflected at the
    edges: the same class at other scales;
    :func:`~kerastl.adaptation.scale_shift` says when a target needs more
    zooming in),
    :class:`keras.layers.RandAugment` (as
    :class:`kerastl.augment.RandAugment`, which computes only the drawn
    operations: the same images, faster; two of its operations, drawn
    per batch, at up to ``factor=0.1``: Keras reads it as the range 0 to
    0.1, so rotations of 0 to 36 degrees one way and shifts of up to a
    tenth, where its default 0.5 turns images by up to 180 degrees, a 6
    into a 9), then :class:`keras.layers.RandomErasing` (the
    paper's Cutout: a patch of 2 to 25% of the image)."""
    def seeded(i):
        return None if seed is None else seed + i
    value_range = tuple(value_range)
    return keras.Sequential([
        keras.layers.RandomTranslation(0.125, 0.125, fill_mode="reflect",
                                       seed=seeded(0)),
        keras.layers.RandomZoom(tuple(zoom), fill_mode="reflect",
                                seed=seeded(4)),
        RandAugment(value_range=value_range, factor=0.1, seed=seeded(1)),
        keras.layers.RandomErasing(scale=(0.02, 0.25),
                                   value_range=value_range, seed=seeded(2))],
        name="strong_augmentation")


def _check_zoom(zoom):
    """``zoom`` as a ``(low, high)`` tuple of RandomZoom factors."""
    try:
        low, high = (float(v) for v in zoom)
    except (TypeError, ValueError):
        raise KerastlError(
            f"zoom={zoom!r}: expected a (low, high) pair of "
            "keras.layers.RandomZoom factors, e.g. (-0.2, 0.5) (20% in to "
            "50% out), or scale_shift(...).zoom.") from None
    if not -1 < low <= high <= 1:
        raise KerastlError(
            f"zoom={zoom!r}: expected -1 < low <= high <= 1 (a negative "
            "factor zooms in, a positive one out; 1 shows the image at half "
            "its size).")
    return low, high


def adamatch_loss(source_labels, source_logits, source_only_logits,
                  target_logits, tau=0.9, interpolation=None):
    """AdaMatch's two losses on one batch (the paper's Algorithm 1).

    Args:
        source_labels: ``(n,)`` integer labels of the source images.
        source_logits: ``(2n, C)`` logits of the source's weak then strong
            views from the pass over both domains.
        source_only_logits: the same from the pass over the source alone.
        target_logits: ``(2m, C)`` logits of the target's weak then strong
            views (from the pass over both domains).
        tau: the relative confidence threshold.
        interpolation: ``(2n, C)`` weights in [0, 1] of the random logit
            interpolation (drawn uniformly by :class:`AdaMatch`); None: 1.

    Returns:
        ``(source_loss, target_loss, mask)``: the cross-entropy of the
        interpolated source logits (weak and strong views averaged), the
        masked cross-entropy of the target's strong views against the
        pseudo-labels of its weak views, and which target images passed
        the threshold.
    """
    source_logits = ops.cast(source_logits, "float32")
    target_logits = ops.cast(target_logits, "float32")
    if interpolation is not None:
        lam = ops.cast(interpolation, "float32")
        source_logits = lam * source_logits + (1.0 - lam) * ops.cast(
            source_only_logits, "float32")
    n = ops.shape(source_labels)[0]
    m = ops.shape(target_logits)[0] // 2
    labels = ops.concatenate([source_labels, source_labels], axis=0)
    source_loss = ops.mean(keras.losses.sparse_categorical_crossentropy(
        labels, source_logits, from_logits=True))
    p_source = ops.stop_gradient(ops.softmax(source_logits[:n], axis=-1))
    p_target = ops.stop_gradient(ops.softmax(target_logits[:m], axis=-1))
    # Distribution alignment: the target's predictions reweighted by the
    # ratio of the two domains' mean predictions, renormalised.
    aligned = p_target * (ops.mean(p_source, axis=0)
                          / ops.maximum(ops.mean(p_target, axis=0), 1e-12))
    aligned = aligned / ops.sum(aligned, axis=-1, keepdims=True)
    # Relative confidence threshold: tau times the source's mean confidence.
    threshold = tau * ops.mean(ops.max(p_source, axis=-1))
    mask = ops.cast(ops.max(aligned, axis=-1) >= threshold, "float32")
    pseudo = ops.argmax(aligned, axis=-1)
    target_loss = ops.mean(mask * keras.losses.sparse_categorical_crossentropy(
        pseudo, target_logits[m:], from_logits=True))
    return source_loss, target_loss, mask


def adamatch_weight(step, ramp_steps):
    """The weight of the target loss at ``step``: ``1/2 - cos(min(pi, pi
    step / ramp_steps)) / 2``, from 0 to 1 over ``ramp_steps`` (the paper's
    first half of training), then 1."""
    step = ops.cast(step, "float32")
    ramp = ops.maximum(ops.cast(ramp_steps, "float32"), 1.0)
    return 0.5 - ops.cos(ops.minimum(math.pi, math.pi * step / ramp)) / 2.0


@keras.saving.register_keras_serializable(package="kerastl")
class AdaMatch(keras.Model):
    """AdaMatch self-training for an unlabelled target, inside ``model.fit``.

    Holds a feature extractor (any Keras model or a kerastl
    :class:`~kerastl.Backbone`; spatial outputs are average-pooled), a
    label head, and two augmentations that run only in training steps.
    Train it on the batches :func:`domain_dataset` gives,
    ``({"source": xs, "target": xt}, ys)``. Each step (Berthelot et al.,
    2022, Algorithm 1):

    1. both domains' weak and strong views go through the network together,
       and the source's views once more alone (its own batch statistics;
       the BatchNorm moving statistics are left as the first pass set
       them, as in the authors' code); the source logits are a random
       interpolation of the two passes;
    2. the target's weak predictions are aligned to the source's class
       distribution (times the ratio of the batch's mean predictions,
       renormalised; the authors' code smooths those means over batches);
    3. those above ``tau`` times the source's mean confidence become hard
       pseudo-labels for the target's strong views;
    4. the loss is the source cross-entropy plus ``target_weight`` times the
       masked target cross-entropy, ramped in by a half cosine over the
       first ``warmup`` of the ``fit`` call's steps (a run resumed with
       ``initial_epoch`` continues it).

    Logs ``source_loss``, ``target_loss`` and ``mask_rate`` (the share of
    target images above the threshold). ``evaluate`` and ``predict`` take
    plain images and run the label path only, without augmentation; so does
    :attr:`classifier`, the model to export.

    Compile it without a loss (``model.compile(optimizer,
    metrics=["accuracy"])``).

    Args:
        feature_extractor: a ``keras.Model`` (or Backbone) from images to
            features.
        num_classes: the number of classes.
        tau: the relative confidence threshold (the paper's 0.9).
        target_weight: the weight of the target loss once ramped in.
        warmup: the share of each ``fit`` call's steps over which the
            target loss ramps in (the paper: half).
        weak, strong: the augmentations, Keras layers on image batches;
            default :func:`weak_augmentation` and
            :func:`strong_augmentation` (``value_range``).
        value_range: the pixel range of the images (for RandAugment).
        bottleneck: width of a Dense + BN + ReLU layer before the label
            head (None: none).
        dropout: dropout before the label head.
        seed: seeds the augmentations and the interpolation weights.
        zoom: the default strong view's ``keras.layers.RandomZoom``
            factor (None: :func:`strong_augmentation`'s, 20% in to 50%
            out); :func:`~kerastl.adaptation.scale_shift`'s ``.zoom`` is
            the label-free choice. Not with ``strong=``. The saved config
            keeps the strong view it built, zoom included.

    Example::

        model = kerastl.adaptation.AdaMatch(backbone, num_classes=10)
        model.compile(keras.optimizers.Adam(1e-3), metrics=["accuracy"])
        model.fit(kerastl.adaptation.domain_dataset((xs, ys), xt),
                  epochs=20)
        model.classifier.export("served")  # no augmentation in it
    """

    def __init__(self, feature_extractor, num_classes, tau=0.9,
                 target_weight=1.0, warmup=0.5, weak=None, strong=None,
                 value_range=(0, 255), bottleneck=None, dropout=0.0,
                 seed=None, zoom=None, **kwargs):
        super().__init__(**kwargs)
        feature_extractor = feature_layer(feature_extractor, "AdaMatch")
        if isinstance(num_classes, bool) or not isinstance(
                num_classes, (int, np.integer)) or num_classes < 2:
            raise KerastlError(
                f"num_classes={num_classes!r}: expected an int >= 2.")
        for name, value, low, high in (("tau", tau, 0.0, 1.0),
                                       ("warmup", warmup, 0.0, 1.0)):
            if isinstance(value, bool) or not isinstance(
                    value, (int, float)) or not low <= value <= high:
                raise KerastlError(f"{name}={value!r}: expected a number in "
                                   f"[{low:g}, {high:g}].")
        if isinstance(target_weight, bool) or not isinstance(
                target_weight, (int, float)) or not math.isfinite(
                target_weight) or target_weight < 0:
            raise KerastlError(
                f"target_weight={target_weight!r}: expected a finite number "
                f">= 0 (0 trains on the source only).")
        try:
            low, high = (float(v) for v in value_range)
        except (TypeError, ValueError):
            low = high = None
        if low is None or not low < high:
            raise KerastlError(
                f"value_range={value_range!r}: expected the images' pixel "
                "range as a (low, high) pair, e.g. (0, 255) or (0, 1).")
        if seed is not None and (isinstance(seed, bool) or not isinstance(
                seed, (int, np.integer))):
            raise KerastlError(f"seed={seed!r}: expected an int or None.")
        if isinstance(dropout, bool) or not isinstance(
                dropout, (int, float)) or not 0 <= dropout < 1:
            raise KerastlError(f"dropout={dropout!r}: expected a number in "
                               "[0, 1).")
        if bottleneck is not None and (isinstance(bottleneck, bool) or
                                       not isinstance(bottleneck, (
                                           int, np.integer))
                                       or bottleneck < 1):
            raise KerastlError(
                f"bottleneck={bottleneck!r}: expected an int >= 1 (its "
                "width) or None (no bottleneck layer).")
        for name, layer in (("weak", weak), ("strong", strong)):
            if layer is not None and not isinstance(layer,
                                                    keras.layers.Layer):
                raise KerastlError(
                    f"{name}={layer!r}: expected a Keras layer (or model) "
                    "that augments a batch of images (so that the model "
                    "saves), or None for AdaMatch's default.")
        if zoom is not None:
            if strong is not None:
                raise KerastlError(
                    "AdaMatch takes zoom= or strong=, not both: zoom= sets "
                    "the default strong view's RandomZoom; put the zoom in "
                    "your strong= layers instead.")
            zoom = _check_zoom(zoom)
        self.feature_extractor = feature_extractor
        self.num_classes = int(num_classes)
        self.tau = float(tau)
        self.target_weight = float(target_weight)
        self.warmup = float(warmup)
        self.value_range = tuple(float(v) for v in value_range)
        self.bottleneck = None if bottleneck is None else int(bottleneck)
        self.dropout_rate = float(dropout)
        self.seed = None if seed is None else int(seed)
        self.weak = weak if weak is not None else weak_augmentation(seed)
        self.strong = strong if strong is not None else strong_augmentation(
            self.value_range, None if seed is None else seed + 1,
            *(() if zoom is None else (zoom,)))
        # (the strong layers are seeded seed + 1 to seed + 3 and seed + 5;
        # the interpolation seed + 4)
        self.pool = heads.pooling_layer("avg", "pool")
        self.bottleneck_layers = heads.mlp(
            () if self.bottleneck is None else (self.bottleneck,),
            "bottleneck", True)
        self.label_dropout = keras.layers.Dropout(self.dropout_rate,
                                                  name="label_dropout")
        self.label_head = heads.output_layer(num_classes, None, "label")
        self.softmax = keras.layers.Softmax(dtype="float32", name="softmax")
        self.interpolation_seed = keras.random.SeedGenerator(
            None if seed is None else seed + 4)
        self.step = self.add_weight(shape=(), name="step", trainable=False,
                                    initializer="zeros")
        self.ramp_steps = self.add_weight(
            shape=(), name="ramp_steps", trainable=False,
            initializer=keras.initializers.Constant(1.0))
        self.source_loss_tracker = keras.metrics.Mean(name="source_loss")
        self.target_loss_tracker = keras.metrics.Mean(name="target_loss")
        self.mask_rate_tracker = keras.metrics.Mean(name="mask_rate")
        d = heads.build_mlp(self.bottleneck_layers,
                            feature_width(feature_extractor, "AdaMatch"))
        self.label_head.build((None, d))
        # The BatchNorm moving statistics of the label path: the pass over
        # the source alone leaves them as the pass over both domains set
        # them (as the authors' code).
        self._moving = [v for layer in [feature_extractor]
                        + self.bottleneck_layers
                        for sub in _private.all_sublayers(layer)
                        if isinstance(sub, keras.layers.BatchNormalization)
                        for v in sub.non_trainable_variables]
        self.built = True

    def build(self, input_shape=None):
        self.built = True

    def build_from_config(self, config):
        self.built = True

    def fit(self, *args, **kwargs):
        """``keras.Model.fit``: the target loss ramps in over the first
        ``warmup`` of this call's epochs (a run resumed with
        ``initial_epoch`` continues the ramp where it was); a ``tf.data``
        input is not reshuffled by Keras (``shuffle`` defaults to False for
        it)."""
        kw = fit_arguments(args, kwargs)
        kw["callbacks"] = list(kw.get("callbacks") or []) + [
            _RampOverFit(kw.get("initial_epoch", 0))]
        prebuild.build_before_fit(self, kw.get("x"), kw.get("y"),
                                  kw.get("sample_weight"))  # (one trace)
        return super().fit(**kw)

    def test_step(self, data):
        """Evaluation on labelled images reports the label path's loss and
        metrics only (the training terms would read 0)."""
        return label_path_logs(super().test_step(data), data,
                               {"source_loss", "target_loss", "mask_rate"})

    def kerastl_block_parts(self):
        """The parts of AdaMatch's block map, input to output: the feature
        extractor's own blocks, then ``label_head`` (pooling, the optional
        bottleneck, dropout and the label layer). The augmentations run in
        training steps only and hold no weights to freeze."""
        return [self.feature_extractor,
                ("label_head", [self.pool] + self.bottleneck_layers
                 + [self.label_dropout, self.label_head, self.softmax],
                 True)]

    # -- forward ----------------------------------------------------------

    def features(self, x, training=False):
        """The features the label head reads (pooled, after the optional
        bottleneck): what label-free model selection embeds."""
        return label_features(self, x, training)

    def logits(self, x, training=False):
        """The label path's logits on images ``x`` (no augmentation)."""
        return self.label_head(self.label_dropout(
            self.features(x, training), training=training))

    def call(self, inputs, training=False):
        if not isinstance(inputs, dict):  # the label path
            return self.softmax(self.logits(inputs, training))
        if "labeled" in inputs:
            raise KerastlError(
                "AdaMatch takes domain_dataset batches of labelled source "
                "and unlabelled target: build them without target_labeled= "
                "(or add the labelled target images to the source).")
        xs, xt = inputs["source"], inputs["target"]
        # (outside training, evaluate on domain batches: no augmentation)
        source = ops.concatenate([self.weak(xs, training=training),
                                  self.strong(xs, training=training)],
                                 axis=0)
        target = ops.concatenate([self.weak(xt, training=training),
                                  self.strong(xt, training=training)],
                                 axis=0)
        both = self.logits(ops.concatenate([source, target], axis=0),
                           training)
        n = ops.shape(source)[0]
        # (copies: a converted variable can still be the variable)
        saved = [ops.copy(ops.convert_to_tensor(v)) for v in self._moving] \
            if training else []
        source_only = self.logits(source, training)
        for v, value in zip(self._moving, saved):
            v.assign(value)
        return {"source": both[:n], "target": both[n:],
                "source_only": source_only}

    # -- training -----------------------------------------------------------

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        if not isinstance(y_pred, dict):  # evaluate: the label path
            return label_path_loss(self, x, y, y_pred, sample_weight,
                                   training)
        lam = keras.random.uniform(ops.shape(y_pred["source"]),
                                   seed=self.interpolation_seed)
        source_loss, target_loss, mask = adamatch_loss(
            y, y_pred["source"], y_pred["source_only"], y_pred["target"],
            self.tau, lam)
        weight = self.target_weight * adamatch_weight(self.step,
                                                      self.ramp_steps)
        if training:  # (validation on domain batches does not ramp)
            self.step.assign_add(1.0)
        self.source_loss_tracker.update_state(source_loss)
        self.target_loss_tracker.update_state(target_loss)
        self.mask_rate_tracker.update_state(ops.mean(mask))
        total = _distribute.scale_loss(source_loss + weight * target_loss)
        for extra in self.losses:  # regularizers of the feature extractor
            total = total + ops.cast(
                _private.additional_loss(self, extra), "float32")
        return total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if isinstance(y_pred, dict):  # the source's weak views
            n = ops.shape(y)[0]
            y_pred = ops.softmax(y_pred["source"][:n], axis=-1)
        return super().compute_metrics(x, y, y_pred, sample_weight)

    # -- inference and export -------------------------------------------------

    @property
    def classifier(self):
        """The label path as a functional ``keras.Model`` (shares weights):
        images to class probabilities, without either augmentation."""
        return label_model(self, lambda x: self.softmax(self.logits(x)))

    def get_config(self):
        return {
            "name": self.name,
            "feature_extractor": keras.saving.serialize_keras_object(
                self.feature_extractor),
            "num_classes": self.num_classes, "tau": self.tau,
            "target_weight": self.target_weight, "warmup": self.warmup,
            "weak": keras.saving.serialize_keras_object(self.weak),
            "strong": keras.saving.serialize_keras_object(self.strong),
            "value_range": list(self.value_range),
            "bottleneck": self.bottleneck, "dropout": self.dropout_rate,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("feature_extractor", "weak", "strong"):
            config[key] = keras.saving.deserialize_keras_object(
                config[key], custom_objects=custom_objects)
        return cls(**config)


class _RampOverFit(keras.callbacks.Callback):
    """Sets :class:`AdaMatch`'s ramp to ``warmup`` of this ``fit`` call's
    steps and restarts its step count (the steps are known once Keras has
    read the data)."""

    def __init__(self, initial_epoch=0):
        super().__init__()
        self.initial_epoch = int(initial_epoch or 0)

    def on_train_begin(self, logs=None):
        steps, epochs = self.params.get("steps"), self.params.get("epochs")
        if not steps:
            warnings.warn(
                "AdaMatch: the number of steps per epoch is unknown (a "
                "dataset of unknown or infinite length), so the target loss "
                "is not ramped in: pass steps_per_epoch to fit.",
                stacklevel=2)
            self.model.ramp_steps.assign(1.0)
            self.model.step.assign(0.0)
            return
        self.model.ramp_steps.assign(
            max(1.0, self.model.warmup * steps * (epochs or 1)))
        # A run resumed at initial_epoch continues the ramp where it was.
        self.model.step.assign(float(steps * self.initial_epoch))
