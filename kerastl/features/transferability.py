"""Transferability estimators: how well a pretrained model's features suit a
target task, scored from the features alone, without fine-tuning.

Each function takes features ``(n, d)`` of the target's images (or, for
LEEP and NCE, the source classifier's predictions on them) and the target
labels, and returns one number: higher means a better expected transfer.
NumPy only, in float64.

* :func:`logme` — LogME (You et al., ICML 2021; JMLR 2022): the log marginal
  evidence of a Bayesian linear model of each one-hot label column on the
  features, its prior and noise precisions chosen by a fixed-point
  iteration, averaged over classes and divided by ``n``. One
  eigendecomposition of ``F'F`` (or of ``F F'`` when ``n < d``):
  ``O(n d min(n, d))`` time, no ``n x n x d`` array.
* :func:`leep` — LEEP (Nguyen et al., ICML 2020): the log expected empirical
  prediction of the source classifier's soft labels through the empirical
  conditional ``P(target | source)``.
* :func:`nce` — NCE (Tran et al., ICCV 2019): the negative conditional
  entropy of the target labels given the source classifier's hard labels.
* :func:`h_score` — the H-score (Bao et al., ICIP 2019),
  ``tr(cov(f)^-1 cov(E[f | y]))``; with ``shrinkage="ledoit_wolf"`` (the
  default) the regularised H-score of Ibrahim et al. (ICLR 2023), whose
  Ledoit-Wolf shrinkage keeps it stable when ``d`` is near or above ``n``.

Scores are comparable between models on the same target data, not between
targets.
"""

import numpy as np

from kerastl.errors import KerastlError

__all__ = ["ESTIMATORS", "logme", "leep", "nce", "h_score",
           "ledoit_wolf_shrinkage"]


def class_codes(y, n, what):
    """``(codes 0..C-1, C)`` for labels of any values; checks them."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:  # one-hot
        y = y.argmax(-1)
    y = y.reshape(-1)
    if len(y) != n:
        raise KerastlError(f"{what}: {n} feature rows but {len(y)} labels.")
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise KerastlError(
            f"{what} needs at least two classes in the labels; got "
            f"{len(classes)}. Rank backbones on data with every class.")
    if n <= len(classes):
        raise KerastlError(
            f"{what} needs more samples than classes: {n} samples, "
            f"{len(classes)} classes.")
    return codes, len(classes)


def _features(f, what):
    f = np.asarray(f, dtype="float64")
    if f.ndim != 2:
        f = f.reshape(len(f), -1)
    if not np.all(np.isfinite(f)):
        raise KerastlError(f"{what}: the features contain NaN or infinite "
                           "values.")
    return f


# -- LogME ---------------------------------------------------------------------

def logme(features, labels, max_iterations=100, tolerance=1e-8,
          return_details=False):
    """LogME: the mean over classes of the maximum log evidence per sample.

    For each class ``k``, with ``t`` the 0/1 indicator of that class, the
    model ``t = F w + e``, ``w ~ N(0, I / alpha)``, ``e ~ N(0, I / beta)``
    has the log evidence (``A = alpha I + beta F'F``, ``m = beta A^-1 F't``)::

        d/2 log alpha + n/2 log beta - n/2 log 2 pi - 1/2 log|A|
            - beta/2 |t - F m|^2 - alpha/2 |m|^2

    maximised over ``alpha, beta`` by MacKay's fixed point
    (``gamma = sum beta s_i / (alpha + beta s_i)``, ``alpha = gamma / |m|^2``,
    ``beta = (n - gamma) / |t - F m|^2``, ``s_i`` the eigenvalues of
    ``F'F``). Everything is computed in the basis of one eigendecomposition
    (of ``F'F``, or of ``F F'`` when ``n < d``: the basis of the thin SVD of
    ``F``, faster), for every class at once.

    Args:
        features: ``(n, d)`` features.
        labels: ``n`` labels (any values) or one-hot rows.
        max_iterations, tolerance: the fixed point stops when the relative
            change of ``alpha / beta`` is below ``tolerance``.
        return_details: also return ``{"alpha": [...], "beta": [...]}``
            per class (the precisions found).

    Returns:
        The score (higher is better), or ``(score, details)``.
    """
    f = _features(features, "logme")
    n, d = f.shape
    codes, num_classes = class_codes(labels, n, "logme")
    if n < d:
        # f f' = u diag(s^2) u': its eigendecomposition gives the same basis
        # and eigenvalues as the thin SVD at a fraction of the cost (n x n,
        # not n x d: MobileNetV2's 1,280 features of 300 images, 0.012 s
        # against 0.1 s).
        sigma, u = np.linalg.eigh(f @ f.T)
        sigma = np.clip(sigma, 0.0, None)  # (rounding below 0)
    else:
        # f'f = v diag(s^2) v' (d x d; 4 to 5 times faster than the thin
        # SVD of f for 300 images of 32 to 256 features), u = f v / s.
        # Directions of f'f with eigenvalues below 1e-10 of the largest
        # (dead units, duplicated features) are left to ``rest``: outside
        # the column space, exactly as an eigenvalue of 0 (as the LogME
        # authors' truncated SVD).
        sigma, v = np.linalg.eigh(f.T @ f)
        keep = sigma > 1e-10 * max(float(sigma.max()), 1e-300)
        sigma, v = sigma[keep], v[:, keep]
        u = (f @ v) / np.sqrt(sigma)
    r = len(sigma)
    # Every class's fixed point at once: row k of each (classes, r) array
    # is class k's, and a class stops moving when its own test says so.
    t = (codes[:, None] == np.arange(num_classes)).astype("float64")
    z_sq = (u.T @ t).T ** 2  # t's coordinates in the column space of f
    t_sq = t.sum(0)
    rest = np.maximum(t_sq - z_sq.sum(1), 0.0)  # |t|^2 outside it
    alpha, beta = np.ones(num_classes), np.ones(num_classes)
    moving = np.ones(num_classes, bool)

    def terms(alpha, beta):
        denom = alpha[:, None] + beta[:, None] * sigma
        m_sq = np.sum(beta[:, None] ** 2 * sigma * z_sq / denom ** 2, 1)
        res_sq = rest + np.sum(z_sq * (alpha[:, None] / denom) ** 2, 1)
        return denom, m_sq, res_sq

    for _ in range(max_iterations):
        denom, m_sq, res_sq = terms(alpha, beta)
        gamma = np.sum(beta[:, None] * sigma / denom, 1)
        # t interpolated exactly (n <= d): beta has no maximum
        moving &= ~((n - gamma <= 1e-9 * n) | (res_sq <= 0))
        if not moving.any():
            break
        with np.errstate(divide="ignore", invalid="ignore"):
            new_alpha = gamma / np.maximum(m_sq, 1e-300)
            new_beta = (n - gamma) / res_sq
        ratio, new_ratio = alpha / beta, new_alpha / new_beta
        alpha = np.where(moving, new_alpha, alpha)
        beta = np.where(moving, new_beta, beta)
        moving &= ~(np.abs(new_ratio - ratio) <= tolerance * ratio)
        if not moving.any():
            break
    denom, m_sq, res_sq = terms(alpha, beta)
    log_det = np.sum(np.log(denom), 1) + (d - r) * np.log(alpha)
    evidences = (d / 2 * np.log(alpha) + n / 2 * np.log(beta)
                 - n / 2 * np.log(2 * np.pi) - log_det / 2
                 - beta / 2 * res_sq - alpha / 2 * m_sq) / n
    score = float(np.mean(evidences))
    if return_details:
        return score, {"alpha": [float(a) for a in alpha],
                       "beta": [float(b) for b in beta],
                       "evidence": [float(e) for e in evidences]}
    return score


# -- LEEP and NCE (need the source classifier) ---------------------------------

def _source_probabilities(probabilities, n, what):
    p = np.asarray(probabilities, dtype="float64")
    if p.ndim != 2 or len(p) != n:
        raise KerastlError(
            f"{what} takes the source classifier's predictions, shape "
            f"(samples, source classes); got {p.shape} for {n} labels.")
    if np.any(p < 0) or not np.allclose(p.sum(-1), 1.0, atol=1e-3):
        raise KerastlError(
            f"{what} takes the source classifier's probabilities (rows of "
            "a softmax, each summing to 1); these rows do not. Give the "
            "classifier's softmax output, not logits or features.")
    return p / p.sum(-1, keepdims=True)


def leep(source_probabilities, labels):
    """LEEP: ``1/n sum_i log sum_z P(y_i | z) theta(x_i)_z``.

    ``theta(x_i)`` are the source classifier's probabilities over its own
    classes ``z``; ``P(y, z) = 1/n sum_i theta(x_i)_z [y_i = y]`` is their
    empirical joint with the target labels and ``P(y | z) = P(y, z) /
    P(z)``. At most 0; higher is better.
    """
    codes, num_classes = class_codes(labels, len(source_probabilities),
                                     "leep")
    theta = _source_probabilities(source_probabilities, len(codes), "leep")
    n = len(codes)
    joint = np.zeros((num_classes, theta.shape[1]))
    np.add.at(joint, codes, theta)
    joint /= n
    conditional = joint / np.maximum(joint.sum(0, keepdims=True), 1e-300)
    expected = np.einsum("nz,nz->n", theta, conditional[codes])
    return float(np.mean(np.log(np.maximum(expected, 1e-300))))


def nce(source_probabilities, labels):
    """NCE: ``-H(Y | Z) = sum_{y,z} P(y, z) log P(y | z)``, with ``Z`` the
    source classifier's predicted class (argmax) of each image. At most 0;
    higher is better."""
    codes, num_classes = class_codes(labels, len(source_probabilities),
                                     "nce")
    z = _source_probabilities(source_probabilities, len(codes),
                              "nce").argmax(-1)
    n = len(codes)
    joint = np.zeros((num_classes, int(z.max()) + 1))
    np.add.at(joint, (codes, z), 1.0)
    joint /= n
    pz = joint.sum(0, keepdims=True)
    nz = joint > 0
    return float(np.sum(joint[nz] * np.log(
        (joint / np.maximum(pz, 1e-300))[nz])))


# -- H-score ---------------------------------------------------------------------

def ledoit_wolf_shrinkage(features):
    """The Ledoit-Wolf shrinkage coefficient of the features' covariance
    and the shrunk covariance ``(1 - a) S + a tr(S)/d I`` (``S`` the
    maximum-likelihood covariance), as scikit-learn's ``ledoit_wolf``."""
    x = _features(features, "ledoit_wolf_shrinkage")
    x = x - x.mean(0)
    n, d = x.shape
    emp = x.T @ x / n
    mu = float(np.trace(emp)) / d
    x2 = x ** 2
    beta_ = float(np.sum(x2.T @ x2)) / n  # sum_ij mean_k x_ki^2 x_kj^2
    delta_ = float(np.sum(emp ** 2))
    beta = (beta_ - delta_) / n
    delta = (delta_ - 2 * mu * float(np.trace(emp)) + d * mu ** 2) / d
    beta = min(beta / d, delta)
    a = 0.0 if beta == 0 else beta / delta
    return a, (1 - a) * emp + a * mu * np.eye(d)


def h_score(features, labels, shrinkage="ledoit_wolf"):
    """The H-score ``tr(cov(f)^+ cov(E[f | y]))``; higher is better.

    Args:
        features: ``(n, d)`` features.
        labels: ``n`` labels.
        shrinkage: ``"ledoit_wolf"`` (the regularised H-score: ``cov(f)``
            shrunk by Ledoit-Wolf with coefficient ``a``, the between-class
            covariance scaled by ``1 - a``) or ``None`` (the original, with a
            pseudo-inverse).
    """
    if shrinkage not in ("ledoit_wolf", None):
        raise KerastlError(f"shrinkage={shrinkage!r}: expected "
                           "'ledoit_wolf' or None.")
    f = _features(features, "h_score")
    codes, num_classes = class_codes(labels, len(f), "h_score")
    f = f - f.mean(0)
    n = len(f)
    means = np.zeros((num_classes, f.shape[1]))
    np.add.at(means, codes, f)
    counts = np.bincount(codes, minlength=num_classes)
    means /= counts[:, None]
    # cov(E[f | y]) over the samples: each sample carries its class mean.
    between = (means.T * counts) @ means / n
    if shrinkage is None:
        cov = f.T @ f / n
        return float(np.trace(np.linalg.pinv(cov, rcond=1e-15) @ between))
    a, cov = ledoit_wolf_shrinkage(f)
    return float(np.trace(np.linalg.solve(cov, (1 - a) * between)))


ESTIMATORS = {
    "logme": (logme, "features"),
    "h_score": (h_score, "features"),
    "leep": (leep, "source"),
    "nce": (nce, "source"),
}
"""``{name: (function, what it takes)}``: ``"features"`` (features of the
target images) or ``"source"`` (the source classifier's probabilities)."""
