"""Choosing between adapted models without target labels.

:func:`deep_embedded_validation` (DEV; You et al., ICML 2019) estimates a
model's loss on the *target* domain from labelled *source* validation data:
each source validation sample's loss is weighted by how target-like its
features are (the density ratio ``p_target(f) / p_source(f)``, from a domain
classifier on the model's own features), and a control variate cancels most
of the variance the weights add. :func:`select_model` ranks candidates (a
``DANN`` at several lambdas, DANN against MMD or ADDA, adapted against not
adapted) by it.

What it estimates: the expected target loss under *covariate shift*, i.e.
when ``p(y | features)`` is the same in both domains and only the feature
distribution moves.

When it fails (read the effective sample size it reports):

* Where source and target features are far apart, almost no source sample
  looks like the target; the weights pile onto a few samples and the
  estimate rests on them (``ess`` small, a warning is logged). Not-adapted
  models are in this regime by construction, so DEV tends to rank them
  pessimistically, which is usually the right direction.
* Target regions with no source counterpart at all (a class drawn in a way
  the source never shows) are invisible to it: every estimate from source
  data is.
* Label shift (class frequencies that differ between domains) breaks the
  covariate-shift assumption.
"""

import dataclasses
import logging

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


@dataclasses.dataclass
class ModelSelection:
    """A :func:`select_model` result: ``best`` is the chosen name;
    ``estimates`` maps every candidate to its :class:`DEVEstimate`."""
    best: str
    estimates: dict

    def table(self):
        """The candidates, best first, as text."""
        lines = [f"{'candidate':<28}{'DEV risk':>10}{'source loss':>13}"
                 f"{'ESS':>10}"]
        for name, e in sorted(self.estimates.items(),
                              key=lambda kv: kv[1].risk):
            mark = " <- chosen" if name == self.best else ""
            lines.append(f"{name:<28}{e.risk:>10.4f}{e.source_loss:>13.4f}"
                         f"{e.ess:>6.0f}/{e.n:<4}{mark}")
        return "\n".join(lines)


def _images(data, what):
    if isinstance(data, (tuple, list)) and len(data) == 2:
        data = data[0]
    x = np.asarray(data)
    if x.ndim < 2 or len(x) < 4:
        raise KerastlError(
            f"{what}: expected an array of at least 4 samples; got shape "
            f"{x.shape}.")
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
    xs, ys = _labelled(source_val, "source_val")
    xt = _images(target, "target")
    rng = np.random.default_rng(seed)
    if len(xs) > max_samples:
        keep = rng.choice(len(xs), max_samples, replace=False)
        xs, ys = xs[keep], ys[keep]
    if len(xt) > max_samples:
        xt = xt[rng.choice(len(xt), max_samples, replace=False)]
    embed = features or feature_function(model)
    probs = np.asarray(model.predict(xs, verbose=0, batch_size=128),
                       "float64")
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise KerastlError(
            f"deep_embedded_validation: the model's outputs have shape "
            f"{probs.shape}; expected (batch, classes) probabilities.")
    labels = ys.astype(int).reshape(-1)
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


def select_model(candidates, source_val, target, features=None, **kwargs):
    """Picks the candidate with the lowest :func:`deep_embedded_validation`
    risk; no target labels are used.

    Args:
        candidates: ``{name: model}`` (at least one).
        source_val: ``(images, labels)`` held-out labelled source data.
        target: unlabelled target images.
        features: optional ``{name: x -> features}`` for candidates whose
            features :func:`feature_function` cannot find.
        **kwargs: passed to :func:`deep_embedded_validation`.

    Returns:
        a :class:`ModelSelection`; ``.table()`` prints the ranking.
    """
    if not isinstance(candidates, dict) or not candidates:
        raise KerastlError(
            "select_model: expected a dict {name: model} of at least one "
            "candidate.")
    features = features or {}
    estimates = {}
    for name, model in candidates.items():
        e = deep_embedded_validation(model, source_val, target,
                                     features=features.get(name), **kwargs)
        if e.ess < MIN_ESS_FRACTION * e.n:
            logger.warning(
                "select_model: %r's importance weights rest on %.0f of %d "
                "source samples; its DEV risk is unreliable (the domains "
                "are far apart in its features).", name, e.ess, e.n)
        estimates[name] = e
    best = min(estimates, key=lambda k: estimates[k].risk)
    return ModelSelection(best=best, estimates=estimates)
