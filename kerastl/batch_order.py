"""Array data in batches whose order depends on a seed and the pass alone.

``model.fit(x, y, shuffle=True)`` draws each epoch's order from the global
random state: two runs agree only if every seed in the process was set, and
a run resumed by ``BackupAndRestore`` in a new process draws other orders
than the run it continues. :class:`SeededBatches` draws the order of pass
``p`` over the data from ``(seed, p)`` (an epoch is one pass, or several
on small data under ``fine_tune``'s step budget): the same in every
process, whatever else drew random numbers, and the same after a
resume. What
``TrainingPlan(seed=...)`` gives array input, with or without the boundary
cache.
"""

import math

import keras
import numpy as np


class SeededBatches(keras.utils.PyDataset):
    """``(x, y[, sample_weight])`` arrays (or dicts/lists of them) served in
    batches, in an order drawn from ``(seed, pass)``.

    Pass :meth:`callback` to ``fit`` with it (it tells the batches which
    epoch is starting: ``fit``'s own index, so a resumed run continues with
    the right order), and ``shuffle=False`` (Keras would otherwise shuffle
    the batches again, with Python's global random state).

    ``transform``: a function applied to each batch's inputs (the first
    array), such as training-time augmentation.

    ``passes``: passes over the data in one epoch (``fit``'s epoch ``e``
    serves passes ``e * passes`` to ``e * passes + passes - 1``, each in
    the order drawn from ``(seed, pass)``): what ``fine_tune``'s step
    budget gives small data (see :data:`kerastl.plan.EPOCH_STEPS`).
    """

    def __init__(self, arrays, batch_size, seed, transform=None, passes=1):
        super().__init__()
        self.arrays = tuple(arrays)
        self.transform = transform
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.passes = int(passes)
        self.size = len(keras.tree.flatten(self.arrays[0])[0])
        self.set_epoch(0)

    def set_epoch(self, epoch):
        """Draws the order of each pass of ``epoch``."""
        self.epoch = int(epoch)
        first = self.epoch * self.passes
        self.orders = [np.random.default_rng([self.seed, p]).permutation(
            self.size) for p in range(first, first + self.passes)]
        reseed = getattr(self.transform, "reseed", None)
        if reseed is not None:  # (an augmentation: its draws per epoch)
            reseed(self.epoch)

    def pass_arrays(self, data_pass):
        """The arrays that pass ``data_pass`` (counted over all epochs)
        serves."""
        return self.arrays

    def _per_pass(self):
        return math.ceil(self.size / self.batch_size)

    def __len__(self):
        return self._per_pass() * self.passes

    def __getitem__(self, index):
        k, index = divmod(index, self._per_pass())
        rows = self.orders[k][index * self.batch_size:
                              (index + 1) * self.batch_size]
        arrays = self.pass_arrays(self.epoch * self.passes + k)
        batch = tuple(keras.tree.map_structure(lambda a: a[rows], part)
                      for part in arrays)
        if self.transform is not None:
            batch = (self.transform(batch[0]),) + batch[1:]
        return batch

    def callback(self):
        """The callback that keeps the order in step with ``fit``'s epochs."""
        return _EpochOrder(self)


class ViewBatches(SeededBatches):
    """:class:`SeededBatches` over several versions of the data, one per
    pass: pass ``p`` serves ``views[p % len(views)]`` (each a tuple of
    arrays like ``SeededBatches``' ``arrays``, all of one length) in the
    order drawn from ``(seed, p)``. The boundary cache replays augmented
    views this way (:func:`kerastl.boundary.cached_fit`)."""

    def __init__(self, views, batch_size, seed, passes=1):
        self.views = [tuple(v) for v in views]
        super().__init__(self.views[0], batch_size, seed, passes=passes)

    def pass_arrays(self, data_pass):
        return self.views[data_pass % len(self.views)]


class _EpochOrder(keras.callbacks.Callback):
    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.set_epoch(epoch)
