"""Few-shot sampling: a fixed number of labelled examples per class.

The one sampler behind the demo, the transfer-depth sweep, the benchmarks
and the tests (``kerastl.datasets.few_shot`` is this function).
"""

import numpy as np

from kerastl.errors import KerastlError


def few_shot(y, per_class, seed=0, exclude=None):
    """Indices of ``per_class`` random samples of every class, sorted.

    Args:
        y: the labels.
        per_class: samples to draw from each class.
        seed: the draw's seed (``numpy.random.default_rng``).
        exclude: indices that may not be drawn (e.g. a training subset when
            drawing validation samples).

    Raises:
        KerastlError: a class has fewer than ``per_class`` samples to draw.
    """
    y = np.asarray(y)
    if isinstance(per_class, bool) or not isinstance(
            per_class, (int, np.integer)) or per_class < 1:
        raise KerastlError(f"per_class={per_class!r}: expected an int >= 1.")
    rng = np.random.default_rng(seed)
    allowed = np.ones(len(y), bool)
    if exclude is not None:
        allowed[np.asarray(exclude, dtype=int)] = False
    idx = []
    for c in np.unique(y):
        members = np.flatnonzero((y == c) & allowed)
        if len(members) < per_class:
            raise KerastlError(
                f"Class {c!r} has {len(members)} samples to draw from; "
                f"{per_class} per class were asked for. Ask for fewer per "
                f"class.")
        idx.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(idx))
