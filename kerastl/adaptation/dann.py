"""``DANN``: domain-adversarial training inside ``model.fit``.

DANN (Ganin & Lempitsky, 2015; Ganin et al., 2016) trains a feature
extractor, a label head on source labels and a domain head that tells source
from target features; a :class:`~kerastl.GradientReversal` layer between the
features and the domain head flips the sign of the domain head's gradient, so
the features learn to make the domains indistinguishable. The source domain
has labels, the target domain has none, and the model must do well on the
target.
"""

import inspect
import math
import warnings

import keras
import numpy as np
from keras import ops

from kerastl import distribute as _distribute
from kerastl import _keras_private as _private
from kerastl import prebuild
from kerastl import heads
from kerastl.adaptation.losses import (confusion_loss, coral_loss,
                                       entropy_weights, information_loss,
                                       mcc_loss, mmd_loss)
from kerastl.adaptation.reversal import GradientReversal
from kerastl.adaptation.schedules import GaninLambda
from kerastl.errors import KerastlError


ALIGNMENTS = ("adversarial", "confusion", "mmd", "coral", "cdan")
# CDAN: the outer product of features and predictions feeds the domain
# classifier up to this many dimensions; beyond, a randomized multilinear
# map of _CDAN_RANDOM_DIM (Long et al. 2018, as Transfer-Learning-Library).
_CDAN_OUTER_MAX, _CDAN_RANDOM_DIM = 4096, 1024
# The alignments whose feature-side loss is scaled by a ramped strength
# (GaninLambda sets it): the reversal's lambda, or ``alignment_strength``.
_RAMPED = ("confusion", "mmd")


# -- the label path, shared with AdaMatch (and ADDA's shape check) -----------

def feature_layer(obj, who, what="feature extractor"):
    """``obj`` as a Keras layer (a kerastl Backbone's ``model``), or a
    clear error naming ``who`` needs it as ``what``."""
    obj = getattr(obj, "model", obj)
    if not isinstance(obj, keras.layers.Layer):
        raise KerastlError(
            f"{who} needs a Keras model (or kerastl Backbone) as {what}; "
            f"got {type(obj).__name__}.")
    return obj


def feature_width(extractor, who, what="feature extractor"):
    """The number of features ``extractor`` gives (its output's last
    dimension); refuses outputs other than ``(batch, h, w, c)`` or
    ``(batch, features)``."""
    shape = tuple(extractor.output_shape)
    if len(shape) not in (2, 4) or shape[-1] is None:
        raise KerastlError(
            f"The {what} returns shape {shape}; {who} needs "
            f"(batch, h, w, c) or (batch, features).")
    return shape[-1]


def label_features(model, x, training=False):
    """``model.feature_extractor`` on ``x``, average-pooled when spatial,
    then ``model.bottleneck_layers``: what the label head reads."""
    f = model.feature_extractor(x, training=training)
    f = model.pool(f) if len(f.shape) == 4 else f
    for layer in model.bottleneck_layers:
        f = layer(f, training=training)
    return f


def label_model(model, label_path):
    """The label path ``images -> label_path(images)`` as a functional
    ``keras.Model`` sharing ``model``'s weights (what to export)."""
    inputs = keras.Input(model.feature_extractor.input_shape[1:],
                         name="image")
    return keras.Model(inputs, label_path(inputs),
                       name=f"{model.name}_classifier")


def fit_arguments(args, kwargs):
    """``keras.Model.fit``'s arguments by name; a ``tf.data`` input (what
    :func:`~kerastl.adaptation.domain_dataset` gives) is not reshuffled by
    Keras anyway, so ``shuffle`` defaults to False for it (instead of
    Keras's warning that ``shuffle=True`` is ignored)."""
    bound = inspect.signature(keras.Model.fit).bind(None, *args, **kwargs)
    kw = {k: v for k, v in bound.arguments.items() if k != "self"}
    x = kw.get("x")
    if "shuffle" not in kw and type(x).__module__.startswith(
            "tensorflow") and hasattr(x, "element_spec"):
        kw["shuffle"] = False
    return kw


def label_path_loss(model, x, y, y_pred, sample_weight, training):
    """The loss of ``evaluate`` on plain images (the label path): the
    compiled loss, or sparse categorical cross-entropy."""
    if _private.compiled_loss(model) is not None:
        return keras.Model.compute_loss(model, x, y, y_pred, sample_weight,
                                        training=training)
    # Divided by the replicas like every loss Keras computes (its test step
    # multiplies the logged value back).
    return _distribute.scale_loss(ops.mean(
        keras.losses.sparse_categorical_crossentropy(y, y_pred)))


def label_path_logs(logs, data, training_only):
    """``evaluate``'s logs on plain images without the training terms
    (named in ``training_only``), which are not computed there and would
    read 0; on domain batches, all of them."""
    x = data[0] if isinstance(data, (tuple, list)) else data
    if isinstance(x, dict):
        return logs
    return {k: v for k, v in logs.items() if k not in training_only}


@keras.saving.register_keras_serializable(package="kerastl")
class DANN(keras.Model):
    """Domain-adversarial training inside ``model.fit``.

    Holds a feature extractor (any Keras model or a kerastl
    :class:`~kerastl.Backbone`; spatial outputs are average-pooled), a label
    head and a domain head behind a :class:`GradientReversal`. Train it on
    batches ``({"source": xs, "target": xt}, ys)`` (see
    :func:`domain_dataset`); each step minimises the class loss on the
    source labels, plus ``domain_weight x`` the domain loss on both halves,
    plus ``entropy_weight x lambda x`` the :func:`information_loss` of the
    target predictions (lambda: the current reversal strength, so the
    target term ramps in with :class:`GaninLambda`). Logs ``class_loss``,
    ``domain_loss``, ``domain_accuracy`` (0.5 means the domain head cannot
    tell the domains apart) and ``entropy_loss``. ``evaluate`` and
    ``predict`` take plain images and use the label path only; so does
    :attr:`classifier`, the model to export.

    Two departures from the paper, both measured on the offline digit
    pairs (``benchmarks/domain_adaptation.py``), make the defaults work on
    small data where the paper's DANN does worse than source-only:

    * ``split_batchnorm=True``: the source and target halves of a batch go
      through the network separately, so every BatchNorm normalises each
      domain with its own batch statistics (the training-time side of
      AdaBN; low-level shifts such as colour and contrast vanish before the
      adversary sees them). The moving statistics mix both domains: call
      :func:`adapt_batch_norm` on the target after training.
    * ``entropy_weight``: the information-maximisation loss on the target
      predictions pulls target samples into confident, class-balanced
      clusters; matching marginal feature distributions alone does not put
      target samples on the right side of the label head's boundaries.

    Semi-supervised: give :func:`domain_dataset` a few labelled target
    samples (``target_labeled=``); they join the class loss.

    Compile it without a loss (``dann.compile(optimizer, metrics=[...])``):
    the class loss is sparse categorical cross-entropy, the domain loss
    binary cross-entropy.

    Other alignments on the same data and ``fit`` (``alignment=``):

    * ``"adversarial"`` (default): the domain head behind the reversal
      (Ganin et al.).
    * ``"confusion"``: the domain-confusion loss of Tzeng et al. (2015).
      The domain head learns to tell the domains apart on features it
      cannot change (no gradient to the feature extractor), and the
      feature extractor is trained towards a uniform domain prediction
      (:func:`confusion_loss`) through a copy of the domain head that
      does not learn from it; both updates happen in every step.
    * ``"mmd"``: multi-kernel MMD between the source and target features
      (:func:`mmd_loss`, Long et al., 2015, DAN); no domain head.
    * ``"coral"``: :func:`coral_loss` on the features; no domain head.
    * ``"cdan"``: CDAN+E (Long et al., 2018): the domain head, behind the
      reversal, sees the features conditioned on the predictions
      (:class:`MultilinearMap`: their outer product, or a randomized
      multilinear map above 4,096 values), and each sample's domain loss
      is weighted by ``1 + exp(-entropy)`` of its prediction
      (:func:`entropy_weights`): class-aware alignment, confident samples
      first.

    For ``"confusion"`` and ``"mmd"`` the feature-side loss is scaled by a
    strength that :class:`GaninLambda` ramps like the reversal's lambda
    (the non-trainable ``alignment_strength``); CORAL is not ramped.

    Args:
        feature_extractor: a ``keras.Model`` (or Backbone) from images to
            features.
        num_classes: the number of classes.
        domain_hidden: widths of the domain head's hidden layers.
        bottleneck: width of the shared Dense + BN + ReLU layer between the
            pooled features and both heads (``None``: no bottleneck).
        batchnorm: BatchNormalization in the bottleneck and the domain
            head's hidden layers.
        domain_weight: the weight of the domain (or CORAL) loss; 0 trains
            the label path only (a source-only baseline; the domain head is
            not run and ``domain_*`` metrics are not logged).
        lambda_: the initial gradient-reversal strength; :class:`GaninLambda`
            ramps it from 0.
        alignment: ``"adversarial"`` (DANN), ``"confusion"``, ``"mmd"``,
            ``"coral"`` or ``"cdan"`` (see above).
        dropout: dropout before the label head and in the domain head.
        entropy_weight: the weight of :func:`information_loss` on the
            unlabelled target predictions, times the current reversal
            (or alignment) strength (with ``alignment="coral"``: times 1). 0 turns it off
            (the paper's DANN).
        split_batchnorm: per-domain batch statistics during training (see
            above); ``False`` runs both halves as one batch (the paper).
        mcc_weight: the weight of :func:`mcc_loss` (minimum class
            confusion, Jin et al. 2020, whose weight is 1) on the unlabelled
            target predictions, with any alignment or none
            (``domain_weight=0``: source training plus MCC). 0 (default):
            off.

    Example::

        dann = kerastl.DANN(backbone, num_classes=10)
        dann.compile(keras.optimizers.Adam(1e-3), metrics=["accuracy"])
        dann.fit(kerastl.adaptation.domain_dataset((xs, ys), xt), epochs=20,
                 callbacks=[kerastl.adaptation.GaninLambda(warmup=0.5)])
        kerastl.adaptation.adapt_batch_norm(dann, xt)  # AdaBN on the target

    That is the DANN recipe (``benchmarks/domain_adaptation.py``; chosen
    without target labels, by the mean :func:`ensemble_validation`
    agreement over both digit pairs, where it ties with
    ``alignment="mmd"``), with one data step before it: where the target's
    images show a contrast the source never does (digits_m draws 40% of
    its digits darker than their background), train on the source plus
    inverted copies of it (``255 - x``, same labels). So prepared it adds
    about 20 points over the best source-only baseline on syn_digits ->
    digits and 12 on digits -> digits_m (no seed below +9), where without
    the copies it does not beat source-only at all. kerastl's default
    recipe is :func:`kerastl.adapt` (AdaMatch + AdaBN, no copies needed),
    ahead of this on most of the benchmark's twelve pairs; DANN is ahead
    on digits -> digits_m with the copies and on syn_digits ->
    photo_digits. Always compare with
    the source-only model + AdaBN on the same data. The paper's recipe is
    ``DANN(..., entropy_weight=0, split_batchnorm=False)`` with
    SGD(0.01, momentum=0.9), ``GaninLambda()`` and ``GaninLearningRate()``.
    """

    def __init__(self, feature_extractor, num_classes,
                 domain_hidden=(1024, 1024), domain_weight=1.0, lambda_=0.0,
                 alignment="adversarial", dropout=0.0, bottleneck=256,
                 batchnorm=True, entropy_weight=0.5, split_batchnorm=True,
                 mcc_weight=0.0, **kwargs):
        super().__init__(**kwargs)
        feature_extractor = feature_layer(feature_extractor, "DANN")
        if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
            raise KerastlError(
                f"num_classes={num_classes!r}: expected an int >= 2.")
        if alignment not in ALIGNMENTS:
            raise KerastlError(
                f"alignment={alignment!r}: expected one of "
                f"{', '.join(ALIGNMENTS)}.")
        if not math.isfinite(float(domain_weight)) or domain_weight < 0:
            raise KerastlError(
                f"domain_weight={domain_weight!r}: expected a finite number "
                f">= 0 (0 trains the label path only).")
        if not math.isfinite(float(entropy_weight)) or entropy_weight < 0:
            raise KerastlError(
                f"entropy_weight={entropy_weight!r}: expected a finite "
                f"number >= 0 (0 turns the target entropy loss off).")
        if not math.isfinite(float(mcc_weight)) or mcc_weight < 0:
            raise KerastlError(
                f"mcc_weight={mcc_weight!r}: expected a finite number >= 0 "
                f"(0 turns the class-confusion loss off; the paper's is 1).")
        self.mcc_weight = float(mcc_weight)
        self.feature_extractor = feature_extractor
        self.num_classes = int(num_classes)
        self.domain_hidden = tuple(int(u) for u in domain_hidden)
        self.domain_weight = float(domain_weight)
        self.alignment = alignment
        self.dropout_rate = float(dropout)
        self.initial_lambda = float(lambda_)
        self.bottleneck = None if bottleneck is None else int(bottleneck)
        self.batchnorm = bool(batchnorm)
        self.entropy_weight = float(entropy_weight)
        self.split_batchnorm = bool(split_batchnorm)
        self.pool = heads.pooling_layer("avg", "pool")
        self.bottleneck_layers = heads.mlp(
            () if self.bottleneck is None else (self.bottleneck,),
            "bottleneck", self.batchnorm)
        self.label_dropout = keras.layers.Dropout(self.dropout_rate,
                                                  name="label_dropout")
        self.label_head = heads.output_layer(num_classes, "softmax", "label")
        self.domain_layers = []
        self.reversal = self.domain_head = self.alignment_strength = None
        self.multilinear = None
        if alignment in ("adversarial", "cdan"):
            self.reversal = GradientReversal(lambda_, name="reversal")
        elif alignment in _RAMPED:
            self.alignment_strength = self.add_weight(
                shape=(), name="alignment_strength", trainable=False,
                initializer=keras.initializers.Constant(float(lambda_)))
        # (No domain head where nothing trains it: with domain_weight=0 it
        # would get no gradient, and Keras warns at every step.)
        if alignment == "cdan" and self.domain_weight:
            self.multilinear = MultilinearMap(name="multilinear")
        if alignment in ("adversarial", "confusion", "cdan") and \
                self.domain_weight:
            self.domain_layers = heads.mlp(self.domain_hidden,
                                           "domain_hidden", self.batchnorm,
                                           self.dropout_rate)
            self.domain_head = heads.output_layer(1, "sigmoid", "domain")
        self.class_loss_tracker = keras.metrics.Mean(name="class_loss")
        self.domain_loss_tracker = self.domain_accuracy = None
        self.entropy_loss_tracker = None
        if self._aligns:
            self.domain_loss_tracker = keras.metrics.Mean(name="domain_loss")
            if self.domain_head is not None:
                self.domain_accuracy = keras.metrics.Mean(
                    name="domain_accuracy")
            if self.entropy_weight:
                self.entropy_loss_tracker = keras.metrics.Mean(
                    name="entropy_loss")
        self.mcc_loss_tracker = keras.metrics.Mean(name="mcc_loss") \
            if self.mcc_weight else None
        self._build_heads()

    def _build_heads(self):
        """Builds every head now: the feature extractor's shape is known."""
        d = heads.build_mlp(self.bottleneck_layers,
                            feature_width(self.feature_extractor, "DANN"))
        self.label_head.build((None, d))
        if self.multilinear is not None:
            self.multilinear.build([(None, d), (None, self.num_classes)])
            d = self.multilinear.output_dim
        d = heads.build_mlp(self.domain_layers, d)
        if self.domain_head is not None:
            self.domain_head.build((None, d))
        self.built = True

    def fit(self, *args, **kwargs):
        """``keras.Model.fit``; a ``tf.data`` input (what
        :func:`~kerastl.adaptation.domain_dataset` gives) is not reshuffled
        by Keras anyway, so ``shuffle`` defaults to False for it (instead of
        Keras's warning that ``shuffle=True`` is ignored)."""
        kw = fit_arguments(args, kwargs)
        x = kw.get("x")
        if isinstance(x, np.ndarray) or (hasattr(x, "shape") and not
                                         hasattr(x, "element_spec")):
            raise KerastlError(
                "DANN.fit trains on domain batches ({'source', 'target'} "
                "images): pass kerastl.adaptation.domain_dataset((xs, ys), "
                "xt). On plain images it would train nothing (evaluate and "
                "predict take them).")
        self._warn_if_nothing_aligns(kw.get("callbacks") or ())
        prebuild.build_before_fit(self, x, kw.get("y"),
                                  kw.get("sample_weight"))  # (one trace)
        return super().fit(**kw)

    def _warn_if_nothing_aligns(self, callbacks):
        """A strength of 0 with no callback to ramp it trains a
        source-only model: said once, at fit."""
        strength = self.reversal.lambda_ if self.reversal is not None \
            else self.alignment_strength
        if not self.domain_weight or strength is None or any(
                isinstance(c, GaninLambda) for c in callbacks):
            return
        if float(keras.ops.convert_to_numpy(strength)) == 0.0:
            warnings.warn(
                "kerastl: DANN's alignment strength (lambda_) is 0 and no "
                "GaninLambda callback ramps it: the domain loss does not "
                "reach the features, so this trains a source-only model. "
                "Pass callbacks=[kerastl.adaptation.GaninLambda()], or "
                "lambda_= > 0.", RuntimeWarning, stacklevel=3)

    def test_step(self, data):
        """Evaluation on labelled images (what ``evaluate(x, y)`` does)
        reports the label path's loss and metrics only: the training
        terms (``class_loss``, ``domain_*``, ``entropy_loss``) are not
        computed there, and would read 0."""
        return label_path_logs(super().test_step(data), data, {
            t.name for t in (
                self.class_loss_tracker, self.domain_loss_tracker,
                self.domain_accuracy, self.entropy_loss_tracker,
                self.mcc_loss_tracker) if t is not None})

    def make_train_function(self, force=False):
        # Per-domain batch statistics over the global batch under
        # tf.distribute (each replica sees half of each domain); set when
        # fit builds its step, whatever scope compile ran in.
        _distribute.synchronize_batch_norm(self)
        return super().make_train_function(force)

    def build(self, input_shape=None):
        self.built = True

    def build_from_config(self, config):
        self.built = True

    def kerastl_block_parts(self):
        """The parts of DANN's block map, input to output.

        The feature extractor's own blocks (a kerastl backbone's names, or
        structural ``block1``... otherwise), then three new-head blocks:
        ``bottleneck`` (pooling and the shared bottleneck; absent with
        ``bottleneck=None``), ``label_head`` and, for the adversarial
        alignment, ``domain_head`` (the reversal and the domain classifier).
        ``kerastl.freeze``, ``LayerwiseOptimizer`` and the other block tools
        read it through :func:`kerastl.block_map`.
        """
        parts = [self.feature_extractor,
                 ("bottleneck", [self.pool] + self.bottleneck_layers, True),
                 ("label_head", [self.label_dropout, self.label_head], True)]
        if self.domain_head is not None:
            reversal = [self.reversal] if self.reversal is not None else []
            mapped = [self.multilinear] if self.multilinear is not None \
                else []
            parts.append(("domain_head", mapped + reversal +
                          self.domain_layers + [self.domain_head], True))
        return parts

    @property
    def _aligns(self):
        """False with ``domain_weight=0``: the label loss only (a
        source-only baseline of the same network); the domain head is
        neither run nor trained."""
        return self.domain_weight > 0

    # -- forward ----------------------------------------------------------

    def features(self, x, training=False):
        return label_features(self, x, training)

    def labels(self, f, training=False):
        """The label head on features ``f`` (what :meth:`features` gives)."""
        return self.label_head(self.label_dropout(f, training=training))

    def _domain(self, f, training=False):
        h = self.reversal(f) if self.reversal is not None else f
        for layer in self.domain_layers:
            h = layer(h, training=training)
        return self.domain_head(h)

    def _confused(self, f, training=False):
        """The domain head on ``f`` with its variables held fixed: the
        gradient reaches ``f`` only (the feature side of the confusion
        loss)."""
        return heads.apply_frozen(self.domain_layers + [self.domain_head], f,
                            training)

    def call(self, inputs, training=False):
        if not isinstance(inputs, dict):  # the label path
            return self.labels(self.features(inputs, training), training)
        target = inputs["target"]
        if "labeled" in inputs:  # labelled target samples: the target side
            target = ops.concatenate([target, inputs["labeled"]], axis=0)
        if self.split_batchnorm:  # each domain with its own BN statistics
            f = ops.concatenate([self.features(inputs["source"], training),
                                 self.features(target, training)], axis=0)
        else:
            f = self.features(
                ops.concatenate([inputs["source"], target], axis=0), training)
        out = {"label": self.labels(f, training), "features": f}
        if self._aligns and self.alignment == "adversarial":
            out["domain"] = self._domain(f, training)
        elif self._aligns and self.alignment == "cdan":
            # Features conditioned on the predictions (held fixed, as the
            # authors' code): the reversed gradient reaches the features.
            out["domain"] = self._domain(self.multilinear(
                [f, ops.stop_gradient(out["label"])]), training)
        elif self._aligns and self.alignment == "confusion":
            out["domain"] = self._domain(ops.stop_gradient(f), training)
            out["confusion"] = self._confused(f, training)
        return out

    # -- training -----------------------------------------------------------

    @staticmethod
    def _split(x):
        return ops.shape(x["source"])[0], ops.shape(x["target"])[0]

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        if not isinstance(y_pred, dict):  # evaluate: the label path
            return label_path_loss(self, x, y, y_pred, sample_weight,
                                   training)
        n_s, n_t = self._split(x)
        labels = y_pred["label"]
        y_source = y["source"] if isinstance(y, dict) else y
        class_loss = keras.losses.sparse_categorical_crossentropy(
            y_source, labels[:n_s])
        class_loss = ops.mean(class_loss)
        if isinstance(y, dict) and "labeled" in y:
            extra = keras.losses.sparse_categorical_crossentropy(
                y["labeled"], labels[n_s + n_t:])
            class_loss = (class_loss * ops.cast(n_s, "float32")
                          + ops.sum(extra)) / ops.cast(
                n_s + ops.shape(extra)[0], "float32")
        self.class_loss_tracker.update_state(class_loss)
        total = class_loss
        if self._aligns:
            domain_loss = self.alignment_loss(y_pred, n_s)
            self.domain_loss_tracker.update_state(domain_loss)
            total = total + self.domain_weight * domain_loss
            if self.entropy_weight:
                info = information_loss(labels[n_s:n_s + n_t])
                self.entropy_loss_tracker.update_state(info)
                total = total + self.entropy_weight * self._ramp() * info
        if self.mcc_weight:
            mcc = mcc_loss(labels[n_s:n_s + n_t])
            self.mcc_loss_tracker.update_state(mcc)
            total = total + self.mcc_weight * mcc
        # Keras divides the losses it computes by the number of replicas
        # (their gradients are summed); this one is computed here.
        total = _distribute.scale_loss(total)
        for extra in self.losses:  # regularizers of the feature extractor
            total = total + ops.cast(
                _private.additional_loss(self, extra), "float32")
        return total

    def _ramp(self):
        """The reversal (or alignment) strength: the target terms ramp in
        together."""
        if self.reversal is not None:
            return ops.convert_to_tensor(self.reversal.lambda_)
        if self.alignment_strength is not None:
            return ops.convert_to_tensor(self.alignment_strength)
        return 1.0

    def alignment_loss(self, y_pred, n_s):
        """The alignment term of the loss on a batch whose first ``n_s``
        rows are source: the domain loss (adversarial, with its accuracy;
        plus the confusion term), MMD or CORAL."""
        f = y_pred["features"]
        if self.alignment == "coral":
            return coral_loss(f[:n_s], f[n_s:])
        if self.alignment == "mmd":
            return self._ramp() * mmd_loss(f[:n_s], f[n_s:])
        domain_true = ops.concatenate([
            ops.zeros((n_s, 1)), ops.ones((ops.shape(f)[0] - n_s, 1))],
            axis=0)
        domain = y_pred["domain"]
        acc = ops.mean(ops.cast(
            ops.equal(ops.cast(domain > 0.5, "float32"), domain_true),
            "float32"))
        self.domain_accuracy.update_state(acc)
        bce = keras.losses.binary_crossentropy(domain_true, domain)
        if self.alignment == "cdan":
            return ops.mean(entropy_weights(y_pred["label"]) * bce)
        loss = ops.mean(bce)
        if self.alignment == "confusion":
            loss = loss + self._ramp() * confusion_loss(y_pred["confusion"])
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if isinstance(y_pred, dict):
            n_s, _ = self._split(x)
            y_source = y["source"] if isinstance(y, dict) else y
            y, y_pred = y_source, y_pred["label"][:n_s]
        return super().compute_metrics(x, y, y_pred, sample_weight)

    # -- inference and export -------------------------------------------------

    @property
    def classifier(self):
        """The label path as a functional ``keras.Model`` (shares weights).

        What to evaluate and export: no gradient reversal, no domain head.
        """
        return label_model(self, lambda x: self.labels(self.features(x)))

    def get_config(self):
        return {
            "name": self.name,
            "feature_extractor": keras.saving.serialize_keras_object(
                self.feature_extractor),
            "num_classes": self.num_classes,
            "domain_hidden": list(self.domain_hidden),
            "domain_weight": self.domain_weight,
            "lambda_": self.initial_lambda,
            "alignment": self.alignment,
            "dropout": self.dropout_rate,
            "bottleneck": self.bottleneck,
            "batchnorm": self.batchnorm,
            "entropy_weight": self.entropy_weight,
            "split_batchnorm": self.split_batchnorm,
            "mcc_weight": self.mcc_weight,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["feature_extractor"] = keras.saving.deserialize_keras_object(
            config["feature_extractor"], custom_objects=custom_objects)
        return cls(**config)


class MultilinearMap(keras.layers.Layer):
    """CDAN's conditioning of features ``f`` on predictions ``g``: the
    outer product ``f g'`` flattened (``d x classes`` values), or, above
    4,096 of them, the randomized multilinear map
    ``(f R_f) * (g R_g) / sqrt(1024)`` with fixed Gaussian ``R_f``,
    ``R_g`` (Long et al., NeurIPS 2018)."""

    def build(self, input_shape):
        (_, d), (_, c) = input_shape
        self.random = d * c > _CDAN_OUTER_MAX
        self.output_dim = _CDAN_RANDOM_DIM if self.random else d * c
        if self.random:
            init = keras.initializers.RandomNormal(seed=0)
            self.r_f = self.add_weight(shape=(d, _CDAN_RANDOM_DIM),
                                       initializer=init, trainable=False,
                                       name="r_f")
            self.r_g = self.add_weight(shape=(c, _CDAN_RANDOM_DIM),
                                       initializer=init, trainable=False,
                                       name="r_g")
        self.built = True

    def call(self, inputs):
        f, g = inputs
        if self.random:
            return (ops.matmul(f, self.r_f) * ops.matmul(g, self.r_g)
                    / float(np.sqrt(_CDAN_RANDOM_DIM)))
        outer = ops.expand_dims(g, 2) * ops.expand_dims(f, 1)
        return ops.reshape(outer, (-1, self.output_dim))

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.output_dim)
