"""Unsupervised domain adaptation: gradient reversal, DANN, CORAL, AdaBN.

The source domain has labels, the target domain has none, and the model must
do well on the target (domain brief, section 6). DANN (Ganin & Lempitsky,
2015; Ganin et al., 2016) trains a feature extractor, a label head on source
labels and a domain head that tells source from target features; a
:class:`GradientReversal` layer between the features and the domain head
flips the sign of the domain head's gradient, so the features learn to make
the domains indistinguishable.

Everything here is Keras 3 and backend-agnostic (``keras.ops``):

* :class:`GradientReversal` — identity forward, ``-lambda x`` gradient.
* :class:`GaninLambda` and :class:`GaninLearningRate` — the paper's per-batch
  schedules, as callbacks.
* :class:`DANN` — a ``keras.Model`` trained with plain ``fit`` on batches of
  labelled source and unlabelled target images (:func:`domain_dataset`);
  ``alignment="coral"`` swaps the adversary for the CORAL loss. Two
  additions to the paper make it work on small data: per-domain batch
  statistics (``split_batchnorm``) and an information-maximisation loss on
  the target predictions (``entropy_weight``; :func:`information_loss`).
* :func:`coral_loss` and :func:`adapt_batch_norm` (AdaBN).
"""

import math

import keras
import numpy as np
from keras import ops

from kerastl.errors import KerastlError
from kerastl.freezing import _keras_model

__all__ = ["GradientReversal", "GaninLambda", "GaninLearningRate", "DANN",
           "domain_dataset", "coral_loss", "information_loss",
           "adapt_batch_norm", "ganin_lambda"]


@keras.saving.register_keras_serializable(package="kerastl")
class GradientReversal(keras.layers.Layer):
    """Identity in the forward pass; multiplies the gradient by ``-lambda_``.

    ``lambda_`` is a non-trainable variable: changing it during training
    (``layer.lambda_.assign(v)``, or the :class:`GaninLambda` callback) takes
    effect at the next step without retracing the compiled step. The
    gradient has the dtype of the input (float16 under ``mixed_float16``).
    Built on ``keras.ops.custom_gradient``; tested on the TensorFlow and JAX
    backends, eager and compiled (``jit_compile=True`` included).

    Args:
        lambda_: the initial reversal strength (``>= 0``).

    Example:

    >>> features = backbone(images)
    >>> domain = keras.layers.Dense(1, activation="sigmoid")(
    ...     kerastl.GradientReversal(1.0)(features))
    """

    def __init__(self, lambda_=1.0, **kwargs):
        super().__init__(**kwargs)
        lambda_ = float(lambda_)
        if not math.isfinite(lambda_) or lambda_ < 0:
            raise KerastlError(
                f"GradientReversal(lambda_={lambda_}): expected a finite "
                f"number >= 0.")
        self.initial_lambda = lambda_
        self.supports_masking = True
        self.lambda_ = self.add_weight(
            shape=(), dtype="float32", name="lambda", trainable=False,
            initializer=keras.initializers.Constant(lambda_))

    def call(self, inputs):
        return _reverse_gradient(inputs, ops.convert_to_tensor(self.lambda_))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["lambda_"] = self.initial_lambda
        return config


@ops.custom_gradient
def _reverse_gradient(x, lambda_):
    def grad(*args, upstream=None):
        if upstream is None:
            (upstream,) = args
        scale = ops.cast(ops.negative(lambda_), upstream.dtype)
        return ops.multiply(upstream, scale), ops.zeros_like(lambda_)

    return ops.copy(x), grad


def ganin_lambda(p, gamma=10.0):
    """The DANN schedule: ``2 / (1 + exp(-gamma * p)) - 1`` for progress p."""
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


def _progress(callback):
    """Training progress p in [0, 1] from fit's epochs and steps."""
    total = callback.total_steps
    if total is None:
        params = callback.params or {}
        steps, epochs = params.get("steps"), params.get("epochs")
        if not steps or not epochs:
            raise KerastlError(
                f"{type(callback).__name__} needs the length of training: "
                f"pass total_steps=, or give fit a dataset of known length "
                f"or steps_per_epoch=.")
        total = steps * epochs
    return min(1.0, callback._step / max(1, total))


class _PerBatch(keras.callbacks.Callback):
    def __init__(self, total_steps=None):
        super().__init__()
        if total_steps is not None and total_steps < 1:
            raise KerastlError(f"total_steps={total_steps}: expected >= 1.")
        self.total_steps = total_steps
        self._step = 0
        self.history = []

    def on_train_begin(self, logs=None):
        self._step = 0

    def on_train_batch_begin(self, batch, logs=None):
        value = self.value(_progress(self))
        self.apply(value)
        self.history.append(value)
        self._step += 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.history:
            logs[self.log_name] = self.history[-1]


class GaninLambda(_PerBatch):
    """Sets every :class:`GradientReversal` of the model to Ganin's schedule.

    ``lambda_p = scale * (2 / (1 + exp(-gamma p)) - 1)``, p going from 0 to 1
    over the planned training steps (``epochs x steps`` of ``fit``, or
    ``total_steps``), updated before every batch: the domain head's signal
    is suppressed while it is still noise.

    ``warmup`` keeps lambda at 0 for that fraction of training and runs the
    ramp over the rest (p counted from the end of the warm-up): the label
    head learns the source first. Useful where the source task itself is
    slow to learn; the paper has no warm-up.

    Args:
        gamma: the steepness (paper: 10).
        scale: the final lambda (paper: 1).
        warmup: fraction of training, in [0, 1), with lambda = 0 (paper: 0).
        total_steps: the length of training, if ``fit`` cannot tell.
    """

    log_name = "grl_lambda"

    def __init__(self, gamma=10.0, scale=1.0, warmup=0.0, total_steps=None):
        super().__init__(total_steps)
        if not 0.0 <= warmup < 1.0:
            raise KerastlError(f"warmup={warmup!r}: expected a fraction of "
                               f"training in [0, 1).")
        self.gamma, self.scale = float(gamma), float(scale)
        self.warmup = float(warmup)

    def value(self, p):
        p = max(0.0, (p - self.warmup) / (1.0 - self.warmup))
        return self.scale * ganin_lambda(p, self.gamma)

    def apply(self, value):
        layers = [l for l in self.model._flatten_layers()
                  if isinstance(l, GradientReversal)]
        if not layers:
            raise KerastlError("GaninLambda: the model has no "
                               "GradientReversal layer.")
        for layer in layers:
            layer.lambda_.assign(value)


class GaninLearningRate(_PerBatch):
    """The DANN learning-rate annealing ``mu0 / (1 + alpha p) ** beta``.

    Paper defaults: ``mu0=0.01, alpha=10, beta=0.75`` (with SGD, momentum
    0.9). Updated before every batch; p goes from 0 to 1 over training.
    """

    log_name = "learning_rate"

    def __init__(self, mu0=0.01, alpha=10.0, beta=0.75, total_steps=None):
        super().__init__(total_steps)
        self.mu0, self.alpha, self.beta = float(mu0), float(alpha), float(beta)

    def value(self, p):
        return self.mu0 / (1.0 + self.alpha * p) ** self.beta

    def apply(self, value):
        self.model.optimizer.learning_rate = value


def coral_loss(source, target):
    """Deep CORAL (Sun & Saenko, 2016): distance of feature covariances.

    ``||C_s - C_t||_F^2 / (4 d^2)`` for ``(n, d)`` source and target
    features.
    """
    def cov(f):
        f = ops.cast(f, "float32")
        n = ops.cast(ops.shape(f)[0], "float32")
        f = f - ops.mean(f, axis=0, keepdims=True)
        return ops.matmul(ops.transpose(f), f) / ops.maximum(n - 1.0, 1.0)

    d = ops.cast(ops.shape(source)[-1], "float32")
    diff = cov(source) - cov(target)
    return ops.sum(ops.square(diff)) / (4.0 * d * d)


def information_loss(probs, epsilon=1e-6):
    """Information maximisation on unlabelled predictions.

    ``mean_i H(p_i) - H(mean_i p_i)`` for a ``(batch, classes)`` array of
    class probabilities (Krause et al., 2010; Liang et al., 2020): low when
    each prediction is confident (it moves target samples away from the
    decision boundaries, cluster by cluster) and when the batch as a whole
    uses every class (so the confidence cannot come from collapsing onto
    one class). Between ``-log(classes)`` and ``log(classes)``.
    """
    p = ops.cast(probs, "float32")
    conditional = -ops.mean(ops.sum(p * ops.log(p + epsilon), axis=-1))
    mean = ops.mean(p, axis=0)
    marginal = -ops.sum(mean * ops.log(mean + epsilon))
    return conditional - marginal


ALIGNMENTS = ("adversarial", "coral")


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

    ``alignment="coral"`` aligns the domains with :func:`coral_loss` on the
    features instead of the adversary (same data, same training).

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
        alignment: ``"adversarial"`` (DANN) or ``"coral"``.
        dropout: dropout before the label head and in the domain head.
        entropy_weight: the weight of :func:`information_loss` on the
            unlabelled target predictions, times the current reversal
            strength (with ``alignment="coral"``: times 1). 0 turns it off
            (the paper's DANN).
        split_batchnorm: per-domain batch statistics during training (see
            above); ``False`` runs both halves as one batch (the paper).

    Example:

    >>> dann = kerastl.DANN(backbone, num_classes=10)
    >>> dann.compile(keras.optimizers.Adam(1e-3), metrics=["accuracy"])
    >>> dann.fit(kerastl.domain_dataset((xs, ys), xt), epochs=20,
    ...          callbacks=[kerastl.GaninLambda(warmup=0.5)])
    >>> kerastl.adapt_batch_norm(dann, xt)  # AdaBN on the target

    That is kerastl's recipe (``benchmarks/domain_adaptation.py``). The
    paper's is ``DANN(..., entropy_weight=0, split_batchnorm=False)`` with
    SGD(0.01, momentum=0.9), ``GaninLambda()`` and ``GaninLearningRate()``.
    """

    def __init__(self, feature_extractor, num_classes,
                 domain_hidden=(1024, 1024), domain_weight=1.0, lambda_=0.0,
                 alignment="adversarial", dropout=0.0, bottleneck=256,
                 batchnorm=True, entropy_weight=0.5, split_batchnorm=True,
                 **kwargs):
        super().__init__(**kwargs)
        feature_extractor = _keras_model(feature_extractor)
        if not isinstance(feature_extractor, keras.layers.Layer):
            raise KerastlError(
                f"DANN needs a Keras model (or kerastl Backbone) as feature "
                f"extractor; got {type(feature_extractor).__name__}.")
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
        self.pool = keras.layers.GlobalAveragePooling2D(name="pool")
        self.bottleneck_layers = _mlp(
            () if self.bottleneck is None else (self.bottleneck,),
            self.batchnorm, 0.0, "bottleneck")
        self.label_dropout = keras.layers.Dropout(self.dropout_rate)
        self.label_head = keras.layers.Dense(num_classes, activation="softmax",
                                             dtype="float32", name="label")
        self.domain_layers = []
        self.reversal = self.domain_head = None
        if alignment == "adversarial":
            self.reversal = GradientReversal(lambda_, name="reversal")
            self.domain_layers = _mlp(self.domain_hidden, self.batchnorm,
                                      self.dropout_rate, "domain_hidden")
            self.domain_head = keras.layers.Dense(
                1, activation="sigmoid", dtype="float32", name="domain")
        self.class_loss_tracker = keras.metrics.Mean(name="class_loss")
        self.domain_loss_tracker = self.domain_accuracy = None
        self.entropy_loss_tracker = None
        if self._aligns:
            self.domain_loss_tracker = keras.metrics.Mean(name="domain_loss")
            if alignment == "adversarial":
                self.domain_accuracy = keras.metrics.Mean(
                    name="domain_accuracy")
            if self.entropy_weight:
                self.entropy_loss_tracker = keras.metrics.Mean(
                    name="entropy_loss")
        self._build_heads()

    def _build_heads(self):
        """Builds every head now: the feature extractor's shape is known."""
        shape = tuple(self.feature_extractor.output_shape)
        if len(shape) not in (2, 4) or shape[-1] is None:
            raise KerastlError(
                f"The feature extractor returns shape {shape}; DANN needs "
                f"(batch, h, w, c) or (batch, features).")
        d = _build_mlp(self.bottleneck_layers, shape[-1])
        self.label_head.build((None, d))
        d = _build_mlp(self.domain_layers, d)
        if self.domain_head is not None:
            self.domain_head.build((None, d))
        self.built = True

    def build(self, input_shape=None):
        self.built = True

    def build_from_config(self, config):
        self.built = True

    @property
    def _aligns(self):
        """False with ``domain_weight=0``: the label loss only (a
        source-only baseline of the same network); the domain head is
        neither run nor trained."""
        return self.domain_weight > 0

    # -- forward ----------------------------------------------------------

    def features(self, x, training=False):
        f = self.feature_extractor(x, training=training)
        f = self.pool(f) if len(f.shape) == 4 else f
        for layer in self.bottleneck_layers:
            f = layer(f, training=training)
        return f

    def _labels(self, f, training=False):
        return self.label_head(self.label_dropout(f, training=training))

    def _domain(self, f, training=False):
        h = self.reversal(f)
        for layer in self.domain_layers:
            h = layer(h, training=training)
        return self.domain_head(h)

    def call(self, inputs, training=False):
        if not isinstance(inputs, dict):  # the label path
            return self._labels(self.features(inputs, training), training)
        target = inputs["target"]
        if "labeled" in inputs:  # labelled target samples: the target side
            target = ops.concatenate([target, inputs["labeled"]], axis=0)
        if self.split_batchnorm:  # each domain with its own BN statistics
            f = ops.concatenate([self.features(inputs["source"], training),
                                 self.features(target, training)], axis=0)
        else:
            f = self.features(
                ops.concatenate([inputs["source"], target], axis=0), training)
        out = {"label": self._labels(f, training), "features": f}
        if self.alignment == "adversarial" and self._aligns:
            out["domain"] = self._domain(f, training)
        return out

    # -- training -----------------------------------------------------------

    @staticmethod
    def _split(x):
        return ops.shape(x["source"])[0], ops.shape(x["target"])[0]

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        if not isinstance(y_pred, dict):  # evaluate: the label path
            if self._compile_loss is not None:
                return super().compute_loss(x, y, y_pred, sample_weight,
                                            training=training)
            return ops.mean(keras.losses.sparse_categorical_crossentropy(
                y, y_pred))
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
            domain_loss = self._alignment_loss(y_pred, n_s)
            self.domain_loss_tracker.update_state(domain_loss)
            total = total + self.domain_weight * domain_loss
            if self.entropy_weight:
                info = information_loss(labels[n_s:n_s + n_t])
                self.entropy_loss_tracker.update_state(info)
                total = total + self.entropy_weight * self._ramp() * info
        for extra in self.losses:  # regularizers of the feature extractor
            total = total + ops.cast(self._aggregate_additional_loss(extra),
                                     "float32")
        return total

    def _ramp(self):
        """The reversal strength: the target terms ramp in together."""
        if self.reversal is None:
            return 1.0
        return ops.convert_to_tensor(self.reversal.lambda_)

    def _alignment_loss(self, y_pred, n_s):
        """The domain loss (adversarial, with its accuracy) or CORAL."""
        f = y_pred["features"]
        if self.alignment == "coral":
            return coral_loss(f[:n_s], f[n_s:])
        domain_true = ops.concatenate([
            ops.zeros((n_s, 1)), ops.ones((ops.shape(f)[0] - n_s, 1))],
            axis=0)
        domain = y_pred["domain"]
        acc = ops.mean(ops.cast(
            ops.equal(ops.cast(domain > 0.5, "float32"), domain_true),
            "float32"))
        self.domain_accuracy.update_state(acc)
        return ops.mean(keras.losses.binary_crossentropy(domain_true, domain))

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
        inputs = keras.Input(self.feature_extractor.input_shape[1:],
                             name="image")
        outputs = self._labels(self.features(inputs))
        return keras.Model(inputs, outputs, name=f"{self.name}_classifier")

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
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["feature_extractor"] = keras.saving.deserialize_keras_object(
            config["feature_extractor"], custom_objects=custom_objects)
        return cls(**config)


def _mlp(widths, batchnorm, dropout, prefix):
    """Dense (+ BN) + ReLU (+ dropout) layers, one group per width."""
    layers = []
    for i, units in enumerate(widths):
        layers.append(keras.layers.Dense(units, use_bias=not batchnorm,
                                         name=f"{prefix}_{i}"))
        if batchnorm:
            layers.append(keras.layers.BatchNormalization(
                name=f"{prefix}_{i}_bn"))
        layers.append(keras.layers.ReLU(name=f"{prefix}_{i}_relu"))
        if dropout:
            layers.append(keras.layers.Dropout(dropout,
                                               name=f"{prefix}_{i}_dropout"))
    return layers


def _build_mlp(layers, d):
    """Builds the layers of :func:`_mlp` on ``d`` inputs; returns the width."""
    for layer in layers:
        if isinstance(layer, (keras.layers.Dense,
                              keras.layers.BatchNormalization)):
            layer.build((None, d))
        if isinstance(layer, keras.layers.Dense):
            d = layer.units
    return d


def _as_dataset(data, labelled):
    import tensorflow as tf
    if isinstance(data, tf.data.Dataset):
        return data.unbatch() if _is_batched(data) else data
    if labelled:
        if not (isinstance(data, tuple) and len(data) == 2):
            raise KerastlError(
                "The labelled source must be an (x, y) tuple of arrays or a "
                "tf.data.Dataset of (x, y).")
        x, y = data
        if len(x) != len(y):
            raise KerastlError(f"Source x has {len(x)} samples but y has "
                               f"{len(y)}.")
        return tf.data.Dataset.from_tensor_slices(
            (np.asarray(x, "float32"), np.asarray(y, "int64")))
    if isinstance(data, tuple):
        raise KerastlError(
            "The target is unlabelled: pass its images only, not (x, y).")
    return tf.data.Dataset.from_tensor_slices(np.asarray(data, "float32"))


def _is_batched(ds):
    spec = ds.element_spec
    first = spec[0] if isinstance(spec, tuple) else spec
    return first.shape.rank is not None and first.shape.rank == 4


def domain_dataset(source, target, batch_size=32, target_labeled=None,
                   shuffle=True, seed=0):
    """Zips labelled source and unlabelled target data for :class:`DANN`.

    Yields ``({"source": xs, "target": xt}, ys)`` batches, half source and
    half target (``batch_size`` of each). An epoch is one pass over the
    source; the target repeats as needed. With ``target_labeled=(x, y)``, a
    few labelled target samples, each batch also carries ``"labeled"``
    images and the labels come as ``{"source": ys, "labeled": yl}``.

    Args:
        source: ``(x, y)`` arrays or a ``tf.data.Dataset`` of ``(x, y)``.
        target: images (array) or a ``tf.data.Dataset`` of images.
        batch_size: samples per domain per batch.
        target_labeled: optional ``(x, y)`` labelled target samples.
    """
    import tensorflow as tf
    if batch_size < 1:
        raise KerastlError(f"batch_size={batch_size}: expected >= 1.")
    src = _as_dataset(source, labelled=True)
    tgt = _as_dataset(target, labelled=False)
    if shuffle:
        src = src.shuffle(10000, seed=seed, reshuffle_each_iteration=True)
        tgt = tgt.shuffle(10000, seed=seed + 1,
                          reshuffle_each_iteration=True)
    src = src.batch(batch_size, drop_remainder=True)
    tgt = tgt.repeat().batch(batch_size, drop_remainder=True)
    parts = [src, tgt]
    if target_labeled is not None:
        lab = _as_dataset(target_labeled, labelled=True)
        lab = lab.shuffle(10000, seed=seed + 2).repeat().batch(
            min(batch_size, max(1, _count(target_labeled))),
            drop_remainder=True)
        parts.append(lab)

    def combine(s, t, l=None):
        x = {"source": s[0], "target": t}
        if l is None:
            return x, s[1]
        x["labeled"] = l[0]
        return x, {"source": s[1], "labeled": l[1]}

    ds = tf.data.Dataset.zip(tuple(parts)).map(
        combine, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _count(data):
    return len(data[0]) if isinstance(data, tuple) else 32


def adapt_batch_norm(model, target, batch_size=64):
    """AdaBN: re-estimates every BatchNorm's statistics on target data.

    Li et al. (2016): domain shift lives largely in the BN statistics; replace
    the source means and variances with the target's and nothing else
    changes. Runs the target data through the model once in training mode
    with a cumulative average (batch k enters with weight 1/k), so the
    moving statistics become the mean of the target batch statistics. No
    other weight moves; BN layers get back their ``trainable`` and
    ``momentum``.

    Args:
        model: a ``keras.Model`` (a :class:`DANN` adapts its label path:
            the feature extractor and the bottleneck).
        target: target images, an array or a ``tf.data.Dataset`` of images
            (or of ``(x, ...)`` tuples).
        batch_size: for arrays.

    Returns:
        The number of BatchNormalization layers adapted.
    """
    if isinstance(model, DANN):
        layers = (list(model.feature_extractor._flatten_layers())
                  + model.bottleneck_layers)

        def forward(batch):
            model.features(batch, training=True)
    else:
        net = _keras_model(model)
        layers = net._flatten_layers()

        def forward(batch):
            net(batch, training=True)
    bns = [l for l in layers
           if isinstance(l, keras.layers.BatchNormalization)]
    if not bns:
        return 0
    saved = [(l, l.trainable, l.momentum) for l in bns]
    if isinstance(target, np.ndarray):
        batches = [target[i:i + batch_size]
                   for i in range(0, len(target), batch_size)]
    else:
        batches = (b[0] if isinstance(b, tuple) else b for b in target)
    try:
        for l in bns:
            l.trainable = True
        for k, batch in enumerate(batches, start=1):
            for l in bns:
                l.momentum = 0.0 if k == 1 else (k - 1) / k
            forward(batch)
    finally:
        for l, trainable, momentum in saved:
            l.trainable = trainable
            l.momentum = momentum
    return len(bns)
