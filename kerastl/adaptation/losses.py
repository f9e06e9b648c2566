"""Alignment and target losses for domain adaptation (``keras.ops``).

* :func:`coral_loss` — Deep CORAL: the distance between the feature
  covariances of two domains.
* :func:`mmd_loss` — multi-kernel maximum mean discrepancy (DAN): the
  distance between the feature distributions in a Gaussian-kernel space.
* :func:`confusion_loss` — the domain-confusion loss (Tzeng et al., 2015):
  cross-entropy of the domain predictions against the uniform one.
* :func:`mcc_loss` — minimum class confusion on unlabelled predictions;
  :func:`entropy_weights`, its sample weights (and CDAN+E's).
* :func:`information_loss` — information maximisation on unlabelled
  predictions: confident and class-balanced.
"""

import numpy as np
from keras import ops

from kerastl import distribute as _distribute
from kerastl.errors import KerastlError


def _check_probabilities(x, what="information_loss"):
    """Refuses concrete values that are not rows of probabilities
    (symbolic tensors inside a traced step are not checked)."""
    try:
        a = np.asarray(ops.convert_to_numpy(x), dtype="float64")
    except Exception:  # a symbolic tensor: nothing to look at
        return
    if a.size and (a.min() < -1e-6 or a.max() > 1 + 1e-6 or not np.allclose(
            a.sum(axis=-1), 1.0, atol=1e-3)):
        raise KerastlError(
            f"{what} takes class probabilities (rows in [0, 1] "
            "summing to 1); these are not (logits?). Pass "
            "from_logits=True, or the softmax output.")


def _features(source, target, what):
    """Refuses features that are not two ``(n, d)`` batches of the same
    ``d`` (static shapes; traced shapes pass)."""
    shapes = [tuple(getattr(f, "shape", np.shape(f))) for f in (source,
                                                                  target)]
    if any(len(s) != 2 for s in shapes) or (
            None not in (shapes[0][1], shapes[1][1])
            and shapes[0][1] != shapes[1][1]):
        raise KerastlError(
            f"{what}: expected source and target features of shapes (n, d) "
            f"and (m, d) with the same d; got {shapes[0]} and {shapes[1]}.")


def coral_loss(source, target):
    """Deep CORAL (Sun & Saenko, 2016): distance of feature covariances.

    ``||C_s - C_t||_F^2 / (4 d^2)`` for ``(n, d)`` source and target
    features.
    """
    _features(source, target, "coral_loss")
    def cov(f):
        f = ops.cast(f, "float32")
        n = ops.cast(ops.shape(f)[0], "float32")
        f = f - ops.mean(f, axis=0, keepdims=True)
        return ops.matmul(ops.transpose(f), f) / ops.maximum(n - 1.0, 1.0)

    d = ops.cast(ops.shape(source)[-1], "float32")
    diff = cov(source) - cov(target)
    return ops.sum(ops.square(diff)) / (4.0 * d * d)


# DAN's kernel family: Gaussian kernels at bandwidths 2**k times the mean
# squared distance of the batch (Long et al., 2015; Gretton et al., 2012).
MMD_BANDWIDTHS = (0.25, 0.5, 1.0, 2.0, 4.0)


def mmd_loss(source, target, bandwidths=MMD_BANDWIDTHS):
    """Multi-kernel maximum mean discrepancy (Long et al., 2015, DAN).

    The squared MMD between ``(n, d)`` source and ``(m, d)`` target
    features under the sum of Gaussian kernels
    ``exp(-||x - y||^2 / (b * s))``, one per ``b`` in ``bandwidths``, where
    ``s`` is the mean squared distance between all pairs of the batch (so
    the kernels follow the features' scale; no gradient flows through
    ``s``). The biased estimate
    ``mean K(s, s') + mean K(t, t') - 2 mean K(s, t)``: exactly 0 for
    identical samples, larger the further the distributions are apart.
    """
    if not bandwidths or min(float(b) for b in bandwidths) <= 0:
        raise KerastlError(
            f"mmd_loss: bandwidths={bandwidths!r}; expected positive "
            f"multipliers of the mean squared distance, e.g. "
            f"{MMD_BANDWIDTHS}.")
    _features(source, target, "mmd_loss")
    s = ops.cast(source, "float32")
    t = ops.cast(target, "float32")
    n = ops.shape(s)[0]
    x = ops.concatenate([s, t], axis=0)
    sq = ops.sum(ops.square(x), axis=-1)
    d2 = ops.maximum(sq[:, None] + sq[None, :]
                     - 2.0 * ops.matmul(x, ops.transpose(x)), 0.0)
    scale = ops.stop_gradient(ops.maximum(ops.mean(d2), 1e-12))
    k = sum(ops.exp(-d2 / (float(b) * scale)) for b in bandwidths)
    k_ss, k_tt, k_st = k[:n, :n], k[n:, n:], k[:n, n:]
    return ops.mean(k_ss) + ops.mean(k_tt) - 2.0 * ops.mean(k_st)


def confusion_loss(domain_probabilities):
    """The domain-confusion loss (Tzeng et al., 2015).

    Binary cross-entropy of sigmoid domain predictions (``(n, 1)`` or
    ``(n,)``, the probability of "target") against the uniform prediction
    0.5: ``-mean(0.5 log p + 0.5 log(1 - p))``. Minimal, ``log 2``, when
    every prediction is 0.5, i.e. when the domain classifier cannot tell
    the domains apart. The feature extractor minimises it while the domain
    classifier minimises the ordinary domain loss.
    """
    p = ops.clip(ops.cast(domain_probabilities, "float32"), 1e-7, 1 - 1e-7)
    return -ops.mean(0.5 * ops.log(p) + 0.5 * ops.log(1.0 - p))


def information_loss(probs, epsilon=1e-6, from_logits=False):
    """Information maximisation on unlabelled predictions.

    ``mean_i H(p_i) - H(mean_i p_i)`` for a ``(batch, classes)`` array of
    class probabilities (Krause et al., 2010; Liang et al., 2020): low when
    each prediction is confident (it moves target samples away from the
    decision boundaries, cluster by cluster) and when the batch as a whole
    uses every class (so the confidence cannot come from collapsing onto
    one class). Between ``-log(classes)`` and ``log(classes)``.

    ``from_logits=True`` takes logits (a softmax is applied). Concrete
    inputs (arrays, eager tensors) that are not probabilities are refused:
    logits in place of probabilities give a meaningless loss.
    """
    if from_logits:
        probs = ops.softmax(ops.cast(probs, "float32"), axis=-1)
    else:
        _check_probabilities(probs)
    p = ops.cast(probs, "float32")
    conditional = -ops.mean(ops.sum(p * ops.log(p + epsilon), axis=-1))
    # The class balance is a property of the whole batch: under
    # tf.distribute, of the global batch, not of this replica's share.
    mean = _distribute.global_mean(ops.mean(p, axis=0), ops.shape(p)[0])
    marginal = -ops.sum(mean * ops.log(mean + epsilon))
    return conditional - marginal


def entropy_weights(probs):
    """Each sample's weight ``1 + exp(-H(p))`` (``H`` with ``log(p +
    1e-5)``, as the authors' code), normalised to a mean of 1 over the
    batch and held fixed: confident predictions count more. CDAN+E's
    conditioning of the domain loss and :func:`mcc_loss`'s sample
    weights."""
    p = ops.stop_gradient(ops.cast(probs, "float32"))
    entropy = -ops.sum(p * ops.log(p + 1e-5), axis=-1)
    weight = 1.0 + ops.exp(-entropy)
    return weight * ops.cast(ops.shape(p)[0], "float32") / ops.sum(weight)


def mcc_loss(probs, temperature=2.5, from_logits=False):
    """Minimum class confusion (Jin et al., ECCV 2020) on unlabelled
    predictions, usable beside any alignment (or none).

    With ``q`` the predictions rescaled by ``temperature`` (the softmax of
    ``logits / T``; from probabilities, ``p ** (1 / T)`` renormalised, the
    same thing), each sample weighted by ``1 + exp(-H(q_i))`` (confident
    samples count more; weights normalised to sum to the batch size), the
    class confusion ``C = q' W q`` is normalised by its column sums and the
    loss is the sum of its off-diagonal entries divided by the number of
    classes: 0 when no sample splits its probability between two classes.
    As the authors' implementation (Transfer-Learning-Library's
    ``MinimumClassConfusionLoss``, entropy with ``log(q + 1e-5)``).

    ``from_logits=True`` takes logits. Concrete probabilities are checked
    as :func:`information_loss` checks them.
    """
    if from_logits:
        logits = ops.cast(probs, "float32")
    else:
        _check_probabilities(probs, "mcc_loss")
        logits = ops.log(ops.clip(ops.cast(probs, "float32"), 1e-12, 1.0))
    q = ops.softmax(logits / float(temperature), axis=-1)
    weight = entropy_weights(q)
    confusion = ops.matmul(ops.transpose(q * weight[:, None]), q)
    confusion = confusion / ops.sum(confusion, axis=1)
    classes = ops.cast(ops.shape(q)[1], "float32")
    return (ops.sum(confusion) - ops.trace(confusion)) / classes
