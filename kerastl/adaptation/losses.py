"""Alignment and target losses for domain adaptation (``keras.ops``).

* :func:`coral_loss` — Deep CORAL: the distance between the feature
  covariances of two domains.
* :func:`information_loss` — information maximisation on unlabelled
  predictions: confident and class-balanced.
"""

import numpy as np
from keras import ops

from kerastl import distribute as _distribute
from kerastl.errors import KerastlError


def _check_probabilities(x):
    """Refuses concrete values that are not rows of probabilities
    (symbolic tensors inside a traced step are not checked)."""
    try:
        a = np.asarray(ops.convert_to_numpy(x), dtype="float64")
    except Exception:  # a symbolic tensor: nothing to look at
        return
    if a.size and (a.min() < -1e-6 or a.max() > 1 + 1e-6 or not np.allclose(
            a.sum(axis=-1), 1.0, atol=1e-3)):
        raise KerastlError(
            "information_loss takes class probabilities (rows in [0, 1] "
            "summing to 1); these are not (logits?). Pass "
            "from_logits=True, or the softmax output.")


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
