"""Alignment and target losses for domain adaptation (``keras.ops``).

* :func:`coral_loss` — Deep CORAL: the distance between the feature
  covariances of two domains.
* :func:`information_loss` — information maximisation on unlabelled
  predictions: confident and class-balanced.
"""

from keras import ops


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
