"""Choosing between adapted models without target labels.

Four estimators; :func:`select_model` ranks candidates (a ``DANN`` at
several lambdas or epochs, DANN against MMD or ADDA, adapted against not
adapted) by any of them. Its default, ``method="auto"``, is ATC when it is
given labelled source validation data and EnsV when not: ATC came nearer
the pool's best on ``benchmarks/domain_adaptation.py``'s digit pairs (33
of 59 runs within 2 points of it, 5.1 points below on average; EnsV on
the same runs 20, 7.7 below). Neither beat taking that benchmark's
recipe, ``kerastl.adapt`` (as it was before its strong view zoomed),
without choosing (44 of the 59, 1.7 below). With the current recipe in
the pool (seed 5 of the twelve pairs) they did worse: ATC 4 of 12, EnsV 5,
the recipe itself 9 (docs/domain-adaptation.md). Choose among candidates
you cannot rank otherwise, not against the recipe.

:func:`ensemble_validation` (EnsV; Hu et al., 2024, the default without
source data): average
the candidates' class probabilities on the unlabelled target images, take
the ensemble's argmax as pseudo-labels and pick the candidate that agrees
with them most. What it estimates: each candidate's accuracy against a
proxy that is, as a rule, at least as accurate as the typical candidate
(averaging cancels errors the candidates do not share). When it fails:

* When most candidates share the same mistakes (many copies of one bad
  model, or every candidate unadapted), the ensemble inherits them and
  rewards the majority. Give it a varied pool: several methods,
  strengths or epochs, and the source-only model. On digits -> digits_m
  (``benchmarks/domain_adaptation.py``), among 16 models that all misread
  the inverted digits it came within 2 points of the best on none of six
  seeds; with the models trained on inverted copies added to the pool, on
  all six.
* With fewer than three candidates the more confident one would win every
  disagreement: :func:`select_model` refuses it. Exact ties are reported
  (a warning names the tied candidates) and broken by name.
* It says which candidate is best *in the pool*; if all are poor it
  cannot tell.

:func:`average_thresholded_confidence` (ATC; Garg et al., ICLR 2022,
``method="atc"``) predicts each candidate's target accuracy: the threshold
on its confidence (negative prediction entropy) above which the share of
labelled *source* validation samples equals its source accuracy, applied
to the target images. What it estimates: the target accuracy, if the model
is sure of the target images it gets right as it is of the source images
it gets right. When it fails:

* Confident mistakes count as right: a model that gives a whole target
  cluster the wrong class with high confidence (self-training can lock
  that in) is overrated.
* It needs labelled source validation data, and with near-perfect source
  accuracy the threshold rests on the few least confident source images.

:func:`mix_validation` (MixVal; Hu et al., NeurIPS 2023) scores each
candidate alone: mix pairs of target images 55:45 and count how often the
candidate's prediction on a mix of two images it labels differently is the
majority image's label. What it estimates: how cleanly the candidate's
decision boundaries fall between the target's clusters, in the candidate's
own eyes. When it fails:

* A model that gives whole clusters the wrong class has clean clusters
  too. Self-training locks in such mistakes, and MixVal rewards it: on
  ``benchmarks/domain_adaptation.py``'s six digit pairs (seeds 1 and 2)
  it picked within 2 points of the pool's best in 6 of 12 runs and 10.8
  points below it on average (EnsV: 6 of 12, 4.7), twice a model under
  0.19 accuracy.
* A model predicting one class has no boundary to probe: it scores 0.

:func:`deep_embedded_validation` (DEV; You et al., ICML 2019) estimates a
model's loss on the *target* domain from labelled *source* validation data:
each source validation sample's loss is weighted by how target-like its
features are (the density ratio ``p_target(f) / p_source(f)``, from a domain
classifier on the model's own features), and a control variate cancels most
of the variance the weights add. What it estimates: the expected target
loss under *covariate shift*, i.e. when ``p(y | features)`` is the same in
both domains and only the feature distribution moves. When it fails (read
the effective sample size it reports):

* Where source and target features are separable, almost no source sample
  looks like the target; the weights pile onto a few samples (``ess``
  small, a warning is logged) and the control variate turns the estimate
  back into the plain source validation loss, which favours the
  source-only model. On kerastl's digit pairs every candidate, adapted or
  not, is in this regime (ESS 1 to 5 of 1,600): DEV picked a source-only
  model on syn_digits -> digits where adapting adds 20 points
  (``benchmarks/domain_adaptation.py``).
* Target regions with no source counterpart at all (a class drawn in a way
  the source never shows) are invisible to it: every estimate from source
  data is.
* Label shift (class frequencies that differ between domains) breaks the
  covariate-shift assumption.
"""

import dataclasses
import logging
import warnings

import keras
import numpy as np

from kerastl import _keras_private as _private
from kerastl.errors import KerastlError

logger = logging.getLogger("kerastl")

# Effective sample sizes under this fraction of the source validation set
# are reported as unreliable.
MIN_ESS_FRACTION = 0.05


@dataclasses.dataclass
class DEVEstimate:
    """A :func:`deep_embedded_validation` result.

    Attributes:
        risk: the DEV estimate of the target loss (lower is better).
        source_loss: the plain mean loss on the source validation data.
        weighted_loss: the importance-weighted mean loss, before the control
            variate.
        eta: the control-variate coefficient.
        ess: the effective sample size of the weights,
            ``sum(w)^2 / sum(w^2)``, out of ``n``.
        n: the number of source validation samples.
    """
    risk: float
    source_loss: float
    weighted_loss: float
    eta: float
    ess: float
    n: int

    @property
    def score(self):
        """Higher is better: ``-risk``."""
        return -self.risk


@dataclasses.dataclass
class EnsembleEstimate:
    """An :func:`ensemble_validation` result for one candidate.

    Attributes:
        agreement: the fraction of target samples where the candidate
            predicts the ensemble's class (higher is better).
        confidence: the mean probability it gives the ensemble's class
            (breaks ties in ``agreement``).
        n: the number of target samples.
    """
    agreement: float
    confidence: float
    n: int

    @property
    def score(self):
        """Higher is better: ``agreement``, ties broken by ``confidence``."""
        return self.agreement + 1e-6 * self.confidence


@dataclasses.dataclass
class MixValEstimate:
    """A :func:`mix_validation` result for one candidate.

    Attributes:
        inter: the fraction of mixed pairs of target images with different
            pseudo-labels where the candidate predicts the majority
            image's pseudo-label (higher is better; the score).
        intra: the same over pairs with the same pseudo-label (reported,
            not scored).
        pairs: the number of pairs with different pseudo-labels.
        n: the number of target samples.
    """
    inter: float
    intra: float
    pairs: int
    n: int

    @property
    def score(self):
        """Higher is better: ``inter``."""
        return self.inter


@dataclasses.dataclass
class ATCEstimate:
    """An :func:`average_thresholded_confidence` result for one candidate.

    Attributes:
        accuracy: the predicted target accuracy: the fraction of target
            samples scored above the threshold (higher is better; the
            score).
        threshold: the score above which the fraction of *source*
            validation samples equals the source validation accuracy.
        source_accuracy: the candidate's accuracy on the source
            validation data.
        n: the number of target samples.
    """
    accuracy: float
    threshold: float
    source_accuracy: float
    n: int

    @property
    def score(self):
        """Higher is better: the predicted target ``accuracy``."""
        return self.accuracy


@dataclasses.dataclass
class ModelSelection:
    """A :func:`select_model` result: ``best`` is the chosen name;
    ``estimates`` maps every candidate to its :class:`EnsembleEstimate`
    (``method="ensemble"``), :class:`ATCEstimate` (``"atc"``),
    :class:`MixValEstimate` (``"mixval"``) or :class:`DEVEstimate`
    (``"dev"``); ``method`` is the method used (what ``"auto"``
    chose)."""
    best: str
    estimates: dict
    method: str = "ensemble"

    def ranking(self):
        """The candidate names, best first."""
        # (ties by name, as select_model's ``best``)
        return sorted(self.estimates,
                      key=lambda k: (-self.estimates[k].score, k))

    def table(self):
        """The candidates, best first, as text."""
        width = max(28, 2 + max(len(k) for k in self.estimates))
        if self.method == "dev":
            lines = [f"{'candidate':<{width}}{'DEV risk':>10}"
                     f"{'source loss':>13}{'ESS':>10}"]
        elif self.method == "mixval":
            lines = [f"{'candidate':<{width}}{'inter':>10}{'intra':>10}"]
        elif self.method == "atc":
            lines = [f"{'candidate':<{width}}{'predicted':>10}"
                     f"{'source acc':>12}"]
        else:
            lines = [f"{'candidate':<{width}}{'agreement':>10}"
                     f"{'confidence':>12}"]
        for name in self.ranking():
            e = self.estimates[name]
            mark = " <- chosen" if name == self.best else ""
            if self.method == "dev":
                lines.append(f"{name:<{width}}{e.risk:>10.4f}"
                             f"{e.source_loss:>13.4f}{e.ess:>6.0f}/{e.n:<4}"
                             f"{mark}")
            elif self.method == "mixval":
                lines.append(f"{name:<{width}}{e.inter:>10.3f}"
                             f"{e.intra:>10.3f}{mark}")
            elif self.method == "atc":
                lines.append(f"{name:<{width}}{e.accuracy:>10.3f}"
                             f"{e.source_accuracy:>12.3f}{mark}")
            else:
                lines.append(f"{name:<{width}}{e.agreement:>10.3f}"
                             f"{e.confidence:>12.3f}{mark}")
        return "\n".join(lines)


def _images(data, what):
    if isinstance(data, (tuple, list)) and len(data) == 2:
        data = data[0]
    x = np.asarray(data)
    if x.ndim < 2 or len(x) < 4:
        raise KerastlError(
            f"{what}: expected an array of at least 4 samples; got shape "
            f"{x.shape}.")
    if x.dtype.kind in "fc" and not np.isfinite(x).all():
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        raise KerastlError(
            f"{what}: {int(bad.sum())} images hold NaN or infinite values "
            f"(the first is image {int(np.flatnonzero(bad)[0])}); every "
            "candidate's prediction on them would be NaN. Fix or drop "
            "them.")
    return x


def _labelled(data, what):
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise KerastlError(
            f"{what}: expected (images, labels) of the labelled source "
            f"validation data.")
    x, y = _images(data[0], what), np.asarray(data[1])
    if len(x) != len(y):
        raise KerastlError(f"{what}: {len(x)} images but {len(y)} labels.")
    return x, y


def _sampled(target, max_samples, seed, source_val=None):
    """``(xs, ys, xt)``: at most ``max_samples`` labelled source validation
    samples (None, None without ``source_val``) and target images, drawn
    with one seeded generator, the source first."""
    if isinstance(max_samples, bool) or not isinstance(
            max_samples, (int, np.integer)) or max_samples < 4:
        raise KerastlError(f"max_samples={max_samples!r}: expected an int "
                           ">= 4 (a few hundred or more for a steady "
                           "estimate).")
    xs = ys = None
    rng = np.random.default_rng(seed)
    if source_val is not None:
        xs, ys = _labelled(source_val, "source_val")
        if len(xs) > max_samples:
            keep = rng.choice(len(xs), max_samples, replace=False)
            xs, ys = xs[keep], ys[keep]
    xt = _images(target, "target")
    if len(xt) > max_samples:
        xt = xt[rng.choice(len(xt), max_samples, replace=False)]
    return xs, ys, xt


def feature_function(model):
    """``x -> features`` for a candidate model, as DEV embeds it.

    A ``DANN``: its shared features (after the bottleneck); an ``ADDA``:
    its target encoder's; any other model: the input of its last layer
    (the classifier head's features).
    """
    if hasattr(model, "target_encoder"):  # ADDA
        encoder = model.target_encoder
        return lambda x: _pooled(encoder.predict(x, verbose=0, batch_size=128))
    if hasattr(model, "bottleneck_layers"):  # DANN
        inputs = keras.Input(model.feature_extractor.input_shape[1:])
        net = keras.Model(inputs, model.features(inputs))
        return lambda x: net.predict(x, verbose=0, batch_size=128)
    net = None
    if isinstance(model, keras.Sequential) and len(model.layers) > 1:
        net = keras.Sequential(model.layers[:-1])
    elif isinstance(model, keras.Model) and model.inputs:
        inputs = _private.producing_inputs(model.outputs[0])
        if len(inputs) == 1:
            net = keras.Model(model.inputs, inputs[0])
    if net is None:
        raise KerastlError(
            f"select_model: cannot find the features of "
            f"{type(model).__name__} {getattr(model, 'name', '')!r} (the "
            f"input of its last layer); pass features={{name: x -> "
            f"features}} for it.")
    return lambda x: _pooled(net.predict(x, verbose=0, batch_size=128))


def _pooled(f):
    f = np.asarray(f)
    return f.mean(axis=tuple(range(1, f.ndim - 1))) if f.ndim > 2 else f


def _logistic_regression(x, y, l2=1.0, iterations=50):
    """L2-regularised logistic regression by Newton's method; returns
    ``(w, b)``. ``x`` is standardised by the caller."""
    n, d = x.shape
    xb = np.concatenate([x, np.ones((n, 1))], axis=1)
    theta = np.zeros(d + 1)
    reg = np.full(d + 1, l2)
    reg[-1] = 0.0
    for _ in range(iterations):
        z = np.clip(xb @ theta, -30, 30)
        p = 1.0 / (1.0 + np.exp(-z))
        grad = xb.T @ (p - y) + reg * theta
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.max(np.abs(step)) < 1e-6:
            break
    return theta[:-1], theta[-1]


def density_ratio(source_features, target_features, l2=1.0, folds=2,
                  seed=0):
    """``p_target(f) / p_source(f)`` at each source feature row.

    A logistic-regression domain classifier on standardised features
    (cross-fitted: the ratio of a source sample comes from a classifier
    that did not see it), corrected for the sizes of the two sets.
    """
    fs = np.asarray(source_features, "float64")
    ft = np.asarray(target_features, "float64")
    rng = np.random.default_rng(seed)
    fold_s = rng.permutation(len(fs)) % folds
    fold_t = rng.permutation(len(ft)) % folds
    ratio = np.empty(len(fs))
    for k in range(folds):
        train_s, train_t = fs[fold_s != k], ft[fold_t != k]
        x = np.concatenate([train_s, train_t])
        mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
        y = np.concatenate([np.zeros(len(train_s)), np.ones(len(train_t))])
        w, b = _logistic_regression((x - mean) / std, y, l2=l2)
        z = np.clip(((fs[fold_s == k] - mean) / std) @ w + b, -30, 30)
        ratio[fold_s == k] = np.exp(z) * len(train_s) / len(train_t)
    return ratio


@_private.quiet_retracing()
def deep_embedded_validation(model, source_val, target, features=None,
                             l2=1.0, max_samples=2000, seed=0):
    """DEV (You et al., 2019): the model's target loss, from source labels.

    Args:
        model: a trained classifier with softmax outputs (a ``DANN``,
            ``ADDA`` or any Keras model; see :func:`feature_function`).
        source_val: ``(images, labels)`` held-out labelled source data (not
            the data the model was trained on).
        target: unlabelled target images (or ``(images, labels)``; the
            labels are ignored).
        features: ``x -> features`` (default: :func:`feature_function`).
        l2: the domain classifier's L2 strength.
        max_samples: at most this many samples of each domain are used.
        seed: the subsampling and cross-fitting seed.

    Returns:
        a :class:`DEVEstimate`; ``risk`` is the estimate.
    """
    xs, ys, xt = _sampled(target, max_samples, seed, source_val)
    embed = features or feature_function(model)
    probs = class_probabilities(
        model.predict(xs, verbose=0, batch_size=128),
        "deep_embedded_validation: the model", "source")
    labels = _class_labels(ys, probs, "deep_embedded_validation")
    loss = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7,
                           1.0))
    w = density_ratio(embed(xs), embed(xt), l2=l2, seed=seed)
    weighted = w * loss
    var_w = np.var(w, ddof=1)
    eta = (-np.cov(weighted, w)[0, 1] / var_w) if var_w > 0 else 0.0
    risk = weighted.mean() + eta * w.mean() - eta
    ess = w.sum() ** 2 / max(np.sum(w ** 2), 1e-300)
    return DEVEstimate(risk=float(risk), source_loss=float(loss.mean()),
                       weighted_loss=float(weighted.mean()), eta=float(eta),
                       ess=float(ess), n=len(xs))


def _class_labels(labels, probs, who):
    """``labels`` (integers, ``(n, 1)`` or one-hot rows) as ``n`` class
    indices of ``probs``'s classes, or a KerastlError starting with
    ``who``."""
    y = np.asarray(labels)
    classes = probs.shape[1]
    if y.ndim == 2 and y.shape[1] == classes and classes > 1:
        y = y.argmax(axis=1)  # one-hot
    elif y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise KerastlError(
            f"{who}: source labels of shape {y.shape}; expected one "
            f"integer label per image or one-hot rows of {classes} "
            "classes.")
    if len(y) != len(probs):
        raise KerastlError(
            f"{who}: {len(probs)} source predictions but {len(y)} labels.")
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise KerastlError(
            f"{who}: the source labels go from {y.min():g} to "
            f"{y.max():g}, but the predictions have {classes} classes (0 "
            f"to {classes - 1}): map the labels to the model's class "
            "indices.")
    return y.astype(int)


def class_probabilities(p, who, what):
    """``p`` as a float64 ``(samples, classes)`` array of class
    probabilities, or a KerastlError that starts with ``who`` and names
    the ``what`` images."""
    p = np.asarray(p, "float64")
    if p.ndim == 2 and not len(p):
        raise KerastlError(f"{who} gave no predictions: pass at least one "
                           f"{what} image.")
    if p.ndim != 2 or p.shape[1] < 2:
        raise KerastlError(
            f"{who} gave outputs of shape {p.shape}; expected (samples, "
            f"classes) probabilities.")
    if not np.isfinite(p).all():
        raise KerastlError(
            f"{who} gave NaN or infinite outputs on "
            f"{int((~np.isfinite(p)).any(1).sum())} {what} images: check "
            "the images and the model.")
    if p.min() < -1e-6 or p.max() > 1 + 1e-6 or \
            np.abs(p.sum(axis=1) - 1).max() > 1e-3:
        raise KerastlError(
            f"{who} gives outputs that are not class probabilities (each "
            f"row in [0, 1], summing to 1; its rows sum to "
            f"{p.sum(1).min():.3g} .. {p.sum(1).max():.3g}): logits? End "
            "the model with a softmax, or pass keras.ops.softmax of its "
            "outputs.")
    return p


def ensemble_validation(predictions):
    """EnsV (Hu et al., 2024): each candidate's agreement with the ensemble.

    The ensemble averages every candidate's class probabilities on the
    unlabelled target images; its argmax serves as pseudo-labels, and a
    candidate is scored by how often it predicts them. No source data and
    no density ratio are involved.

    Args:
        predictions: ``{name: probabilities}``, each ``(n, classes)`` on
            the same target images, in the same order.

    Returns:
        ``{name: EnsembleEstimate}``.
    """
    if not isinstance(predictions, dict) or not predictions:
        raise KerastlError(
            "ensemble_validation: expected a dict {name: probabilities} of "
            "at least one candidate.")
    probs = {name: class_probabilities(
                 p, f"ensemble_validation: candidate {name!r}", "target")
             for name, p in predictions.items()}
    shapes = {p.shape for p in probs.values()}
    if len(shapes) > 1:
        raise KerastlError(
            f"ensemble_validation: the candidates' predictions have "
            f"different shapes {sorted(shapes)}; predict the same target "
            f"images with every candidate.")
    ensemble = np.argmax(np.mean(list(probs.values()), axis=0), axis=1)
    rows = np.arange(len(ensemble))
    return {name: EnsembleEstimate(
        agreement=float(np.mean(np.argmax(p, axis=1) == ensemble)),
        confidence=float(np.mean(p[rows, ensemble])), n=len(ensemble))
        for name, p in probs.items()}


@_private.quiet_retracing()
def mix_validation(model, target, lam=0.55, seed=0, batch_size=128):
    """MixVal (Hu et al., NeurIPS 2023): does the model's decision follow
    the majority of a mixed image?

    The model labels the target images (pseudo-labels); each image is mixed
    ``lam : 1 - lam`` with a partner drawn at random (a seeded
    permutation), and the score is how often the model's prediction on the
    mix is the pseudo-label of its majority image, over the pairs whose
    pseudo-labels differ (the paper's inter-cluster probe). A model whose
    classes are well-separated clusters of the target, with the boundary
    between them, scores high; one that mislabels whole regions can still
    be consistent, so the score says how clean the target's clusters are
    in the model's eyes, not that their names are right. Unlike
    :func:`ensemble_validation` it scores each model alone: a candidate
    better than the rest of the pool is not penalised for disagreeing with
    it.

    Args:
        model: a model with softmax (or logit) outputs.
        target: unlabelled target images (an array).
        lam: the majority image's share of each mix (the paper's 0.55).
        seed: the pairing's seed.

    Returns:
        a :class:`MixValEstimate`.
    """
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or \
            not 0.5 < lam < 1:
        raise KerastlError(f"mix_validation: lam={lam!r}; expected a float "
                           "between 0.5 and 1 (the majority image's share).")
    x = _images(target, "target").astype("float32")
    labels = np.argmax(model.predict(x, verbose=0, batch_size=batch_size),
                       axis=-1)
    partner = np.random.default_rng(seed).permutation(len(x))
    mixed = lam * x + (1 - lam) * x[partner]
    hit = np.argmax(model.predict(mixed, verbose=0, batch_size=batch_size),
                    axis=-1) == labels
    other = labels != labels[partner]
    return MixValEstimate(
        inter=float(hit[other].mean()) if other.any() else 0.0,
        intra=float(hit[~other].mean()) if (~other).any() else 0.0,
        pairs=int(other.sum()), n=len(x))


ATC_SCORES = ("entropy", "confidence")


def average_thresholded_confidence(source_predictions, source_labels,
                                   target_predictions, score="entropy"):
    """ATC (Garg et al., ICLR 2022): the target accuracy a model's own
    confidence predicts, calibrated on labelled source validation data.

    Each sample gets a confidence score: its negative prediction entropy
    (``score="entropy"``, the paper's ATC-NE) or its highest class
    probability (``"confidence"``, ATC-MC). On the source validation data
    the threshold is set so that the fraction of samples scored above it
    equals the model's accuracy there (samples exactly at the threshold
    count in the share that makes this exact); the predicted target
    accuracy is the fraction of target samples above the same threshold.
    What it estimates: the target accuracy, if the model is as well
    calibrated on the target as on the source, in the sense that the
    samples it is sure of are the ones it gets right. When it fails:

    * A model confidently wrong on the target (self-training that locked
      in a wrong pseudo-label for a whole cluster, a shortcut feature the
      target does not share) is scored as if right: ATC, like any score of
      a model's own outputs, cannot see confident mistakes.
    * Near-perfect source accuracy puts the threshold at the least
      confident source samples, a handful of them: hold out enough source
      validation data (hundreds of images).

    Unlike :func:`ensemble_validation` it scores each model alone; unlike
    :func:`deep_embedded_validation` it needs no domain classifier and
    does not collapse when the domains' features are far apart.

    Args:
        source_predictions: ``(n, classes)`` class probabilities on the
            source validation images.
        source_labels: their labels (``n`` integers, or one-hot rows).
        target_predictions: ``(m, classes)`` class probabilities on the
            unlabelled target images.
        score: ``"entropy"`` (default) or ``"confidence"``.

    Returns:
        an :class:`ATCEstimate`.
    """
    if score not in ATC_SCORES:
        raise KerastlError(
            f"average_thresholded_confidence: score={score!r}; expected "
            f"one of {', '.join(map(repr, ATC_SCORES))}.")
    ps = class_probabilities(
        source_predictions,
        "average_thresholded_confidence: source_predictions", "source")
    pt = class_probabilities(
        target_predictions,
        "average_thresholded_confidence: target_predictions", "target")
    if ps.shape[1] != pt.shape[1]:
        raise KerastlError(
            f"average_thresholded_confidence: the source predictions have "
            f"{ps.shape[1]} classes and the target predictions "
            f"{pt.shape[1]}: predict both with the same model.")
    y = _class_labels(source_labels, ps, "average_thresholded_confidence")

    def scores(p):
        if score == "confidence":
            return p.max(axis=1)
        return (p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=1)

    s_source, s_target = scores(ps), scores(pt)
    accuracy = float(np.mean(ps.argmax(axis=1) == y))
    threshold = float(np.quantile(s_source, 1.0 - accuracy))
    above = float(np.mean(s_source > threshold))
    at = float(np.mean(s_source == threshold))
    # The share of the samples at the threshold that counts as above it,
    # so that the source's fraction is exactly its accuracy.
    share = min(1.0, max(0.0, (accuracy - above) / at)) if at else 0.0
    predicted = float(np.mean(s_target > threshold)
                      + share * np.mean(s_target == threshold))
    return ATCEstimate(accuracy=predicted, threshold=threshold,
                       source_accuracy=accuracy, n=len(pt))


METHODS = ("auto", "ensemble", "atc", "mixval", "dev")


@_private.quiet_retracing()
def select_model(candidates, source_val=None, target=None,
                 method="auto", features=None, max_samples=2000,
                 seed=0, **kwargs):
    """Picks a candidate without target labels.

    Args:
        candidates: ``{name: model}``, models with softmax outputs.
        source_val: ``(images, labels)`` held-out labelled source data;
            needed by ``method="atc"`` and ``"dev"``; given it, the
            default ``"auto"`` ranks by ATC.
        target: unlabelled target images.
        method: ``"auto"`` (default): ``"atc"`` when ``source_val`` is
            given, else ``"ensemble"``; ``"ensemble"``
            (:func:`ensemble_validation`: the candidate that agrees most
            with the average of all of them; give it at least three
            candidates), ``"atc"``
            (:func:`average_thresholded_confidence`: the highest target
            accuracy predicted from each candidate's confidence,
            calibrated on ``source_val``), ``"mixval"``
            (:func:`mix_validation`: each candidate alone, by how cleanly
            its decisions follow the majority of mixed target images) or
            ``"dev"``
            (:func:`deep_embedded_validation`: the lowest importance-
            weighted source validation loss).
        features: ``"dev"`` only: optional ``{name: x -> features}`` for
            candidates whose features :func:`feature_function` cannot find.
        max_samples: at most this many target (and source) samples.
        seed: the subsampling seed.
        **kwargs: ``score=`` for :func:`average_thresholded_confidence`
            (``"atc"``), ``l2=`` for :func:`deep_embedded_validation`
            (``"dev"``); any other is an error.

    Returns:
        a :class:`ModelSelection`; ``.table()`` prints the ranking.
    """
    if not isinstance(candidates, dict) or not candidates:
        raise KerastlError(
            "select_model: expected a dict {name: model} of at least one "
            "candidate.")
    if method not in METHODS:
        raise KerastlError(
            f"select_model: method={method!r}; expected one of "
            f"{', '.join(map(repr, METHODS))}.")
    for name, model in candidates.items():
        if not callable(getattr(model, "predict", None)):
            raise KerastlError(
                f"select_model: candidate {name!r} is a "
                f"{type(model).__name__}, not a model (it has no predict "
                "method); pass {name: model}.")
    if target is None:
        raise KerastlError(
            "select_model: pass the unlabelled target images (target=).")
    if method == "auto":
        method = "ensemble" if source_val is None else "atc"
    # (the arguments of average_thresholded_confidence and
    # deep_embedded_validation that select_model does not set itself)
    takes = {"atc": ("score",), "dev": ("l2",)}
    unknown = sorted(set(kwargs) - set(takes.get(method, ())))
    if unknown:
        raise KerastlError(
            f"select_model: method={method!r} takes no "
            f"{', '.join(map(repr, unknown))} argument; it takes "
            + (", ".join(map(repr, takes[method])) if takes.get(method)
               else "none beyond select_model's own")
            + ".")
    if method == "ensemble":
        if len(candidates) < 3:
            raise KerastlError(
                f"select_model: {len(candidates)} candidate(s): the ensemble "
                "of fewer than 3 is the more confident one, which then "
                "wins every disagreement (a tie, not a choice). Add "
                "candidates (other lambdas, epochs, methods, the "
                "source-only model), or rank each candidate alone: "
                "method='atc' with source_val=(x, y), held-out labelled "
                "source data.")
        _, _, xt = _sampled(target, max_samples, seed)
        estimates = ensemble_validation({
            name: model.predict(xt, verbose=0, batch_size=128)
            for name, model in candidates.items()})
    elif method == "mixval":
        _, _, xt = _sampled(target, max_samples, seed)
        estimates = {name: mix_validation(model, xt, seed=seed)
                     for name, model in candidates.items()}
    elif method == "atc":
        if source_val is None:
            raise KerastlError(
                "select_model: method='atc' calibrates each candidate's "
                "confidence on labelled source data: pass source_val=(x, y) "
                "(held-out source images and labels), or use "
                "method='ensemble'.")
        xs, ys, xt = _sampled(target, max_samples, seed, source_val)
        estimates = {name: average_thresholded_confidence(
            class_probabilities(
                model.predict(xs, verbose=0, batch_size=128),
                f"select_model: candidate {name!r}", "source"),
            ys,
            class_probabilities(
                model.predict(xt, verbose=0, batch_size=128),
                f"select_model: candidate {name!r}", "target"),
            **kwargs)
            for name, model in candidates.items()}
    else:
        features = features or {}
        estimates = {}
        for name, model in candidates.items():
            e = deep_embedded_validation(
                model, source_val, target, features=features.get(name),
                max_samples=max_samples, seed=seed, **kwargs)
            if e.ess < MIN_ESS_FRACTION * e.n:
                logger.warning(
                    "select_model: candidate %r: the importance weights "
                    "rest on %.0f of %d source samples, so its DEV risk is "
                    "unreliable (the domains are far apart in its "
                    "features).", name, e.ess, e.n)
            estimates[name] = e
    top = max(e.score for e in estimates.values())
    tied = sorted(k for k, e in estimates.items() if e.score == top)
    if len(tied) > 1:
        warnings.warn(
            f"kerastl: select_model: {', '.join(map(repr, tied))} score "
            f"exactly the same ({method}); returning the first by name, "
            f"{tied[0]!r}. Nothing in the target images tells them apart.",
            RuntimeWarning, stacklevel=3)  # (past quiet_retracing's frame)
    return ModelSelection(best=tied[0], estimates=estimates, method=method)
