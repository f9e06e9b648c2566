"""The DANN paper's per-batch schedules, as Keras callbacks.

:class:`GaninLambda` ramps the reversal strength of every
:class:`~kerastl.GradientReversal` from 0; :class:`GaninLearningRate`
anneals the learning rate. Both update before every batch of ``fit``.
"""

import math
import numbers

import keras

from kerastl import _keras_private as _private
from kerastl.adaptation.reversal import GradientReversal
from kerastl.errors import KerastlError


def ganin_lambda(p, gamma=10.0):
    """The DANN schedule: ``2 / (1 + exp(-gamma * p)) - 1`` for progress p."""
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


def _real(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and \
        math.isfinite(x)


def _positive(x, what, example, zero=False):
    """``x`` as a float, refusing NaN, infinities, booleans and x <= 0
    (x < 0 with ``zero``)."""
    if not _real(x) or x < 0 or (x == 0 and not zero):
        bound = ">= 0" if zero else "> 0"
        raise KerastlError(f"{what}={x!r}: expected a finite number {bound} "
                           f"(e.g. {example}).")
    return float(x)


class _PerBatch(keras.callbacks.Callback):
    def __init__(self, total_steps=None):
        super().__init__()
        if total_steps is not None and total_steps < 1:
            raise KerastlError(f"total_steps={total_steps}: expected >= 1.")
        self.total_steps = total_steps
        self._step = 0
        self._epoch = None
        self.history = []

    def on_train_begin(self, logs=None):
        self._step = 0
        self._epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def _progress(self):
        """Training progress p in [0, 1] from fit's epochs and steps."""
        total = self.total_steps
        if total is None:
            params = self.params or {}
            steps, epochs = params.get("steps"), params.get("epochs")
            if not steps or not epochs:
                raise KerastlError(
                    f"{type(self).__name__} needs the length of training: "
                    f"pass total_steps=, or give fit a dataset of known "
                    f"length or steps_per_epoch=.")
            total = steps * epochs
        return min(1.0, self._step / max(1, total))

    def _step_of(self, batch):
        """The training step of ``batch``: counted from fit's epoch index,
        so a run resumed by ``keras.callbacks.BackupAndRestore`` (which
        restarts at the saved epoch) continues the schedule where it
        stopped."""
        steps = (self.params or {}).get("steps")
        if steps and self._epoch is not None:
            return self._epoch * steps + batch
        return self._step

    def on_train_batch_begin(self, batch, logs=None):
        self._step = self._step_of(batch)
        value = self.value(self._progress())
        # JAX: fit keeps the variables' values in its own state between
        # steps; a callback's assign reaches the next step only after the
        # state is written back (jax_state_sync, which makes fit re-read
        # it).
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()
        self.apply(value)
        self.history.append(value)
        self._step += 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.history:
            logs[self.log_name] = self.history[-1]


class GaninLambda(_PerBatch):
    """Sets every :class:`GradientReversal` of the model to Ganin's schedule.

    (And the alignment strength of a :class:`DANN` with
    ``alignment="confusion"`` or ``"mmd"``.)

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
        scale: lambda's limit (paper: 1); the last step's lambda is
            ``scale * (2 / (1 + exp(-gamma p)) - 1)`` at ``p = (T - 1) /
            T`` over ``T`` steps (about ``scale`` at the paper's gamma 10;
            0.46 x ``scale`` at gamma 1).
        warmup: fraction of training, in [0, 1), with lambda = 0 (paper: 0).
        total_steps: the length of training, if ``fit`` cannot tell.
    """

    log_name = "grl_lambda"

    def __init__(self, gamma=10.0, scale=1.0, warmup=0.0, total_steps=None):
        super().__init__(total_steps)
        if not _real(warmup) or not 0.0 <= warmup < 1.0:
            raise KerastlError(f"warmup={warmup!r}: expected a fraction of "
                               f"training in [0, 1).")
        self.gamma = _positive(gamma, "GaninLambda gamma", "10, the paper's")
        self.scale = _positive(scale, "GaninLambda scale", "1.0")
        self.warmup = float(warmup)

    def value(self, p):
        p = max(0.0, (p - self.warmup) / (1.0 - self.warmup))
        return self.scale * ganin_lambda(p, self.gamma)

    def apply(self, value):
        variables = [l.lambda_ for l in _private.all_sublayers(self.model)
                     if isinstance(l, GradientReversal)]
        # DANN(alignment="confusion" | "mmd"): the feature-side strength.
        strength = getattr(self.model, "alignment_strength", None)
        if strength is not None:
            variables.append(strength)
        if not variables:
            raise KerastlError(
                "GaninLambda: the model has no GradientReversal layer (nor "
                "a DANN alignment strength to ramp).")
        for variable in variables:
            variable.assign(value)


class GaninLearningRate(_PerBatch):
    """The DANN learning-rate annealing ``mu0 / (1 + alpha p) ** beta``.

    Paper defaults: ``mu0=0.01, alpha=10, beta=0.75`` (with SGD, momentum
    0.9). Updated before every batch; p goes from 0 to 1 over training.
    """

    log_name = "learning_rate"

    def __init__(self, mu0=0.01, alpha=10.0, beta=0.75, total_steps=None):
        super().__init__(total_steps)
        self.mu0 = _positive(mu0, "GaninLearningRate mu0", "0.01")
        self.alpha = _positive(alpha, "GaninLearningRate alpha", "10",
                               zero=True)
        self.beta = _positive(beta, "GaninLearningRate beta", "0.75",
                              zero=True)

    def value(self, p):
        return self.mu0 / (1.0 + self.alpha * p) ** self.beta

    def apply(self, value):
        self.model.optimizer.learning_rate = value
