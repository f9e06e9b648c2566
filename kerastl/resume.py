"""What a ``kerastl finetune`` run keeps so that it can stop at any instant
and resume exactly.

While a run trains, its *backup folder* (beside the output folder, see
:func:`backup_folder`) holds everything a resumed run needs. kerastl's
files are written whole or not at all; Keras's weights and epoch keep
their previous copy. ``run.json`` is written last at each epoch's end: a
resume continues from the epochs it holds, with the copies of that epoch
(a process killed while an epoch was saved leaves some files a step
ahead).

* ``latest.weights.h5`` and ``training_metadata.json`` (with their previous
  copies): Keras's :class:`~keras.callbacks.BackupAndRestore` state, the
  weights, the optimizer and the epoch reached (:class:`RunBackup`);
* ``random_state.N.npz``: the states of the layers' random generators
  after epoch N, for the last two epochs (dropout draws the same masks
  after a resume);
* ``run.json``: the resolved experiment it was started with (a resume with
  another config is refused, naming the keys that differ) and every
  completed epoch's logs (:class:`EpochLog`), so the history, the curves
  and early stopping's state (:class:`ResumableEarlyStopping`) continue
  across the interruption;
* ``best.keras``: the best checkpoint so far (:class:`AtomicCheckpoint`;
  once early stopping watches, the best of the epochs it watches, whose
  weights it restores), written to a temporary file and renamed: an
  interrupt never leaves a partial one. The published output gets a copy.
* ``head_phase.npz``: the weights the head phase left
  (:class:`HeadPhaseWeights`), which the end of the run, resumed or not,
  compares with the main phase's.
"""

import json
import math
import os
import shutil

import keras
import numpy as np

from kerastl.atomic import read_marker, write_marker
from kerastl import _keras_private as _private
from kerastl.errors import KerastlError
from kerastl.saving import load_model, save_model

RUN_FILE = "run.json"
# The weights the head phase left (the main phase's are compared with them).
HEAD = "head_phase.npz"
# The best checkpoint so far (copied into the output when it is published).
BEST = "best.keras"
# Experiment keys a resumed run may change: they cannot change what it
# trains (every other key can, and a resume with another value is refused).
RESUME_MAY_CHANGE = ("output", "overwrite", "resume", "export", "export_input",
                     "quantize")


def backup_folder(output):
    """Where a run's resumable state lives while it trains: beside the
    output folder, removed once the finished run is published."""
    output = os.path.abspath(os.fspath(output))
    parent, name = os.path.split(output)
    return os.path.join(parent, f".{name}.backup")


def write_arrays(path, arrays):
    """Writes numpy ``arrays`` to ``path`` (``.npz``) whole or not at all:
    a temporary file, then a rename. :func:`read_arrays` reads them back."""
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    try:
        np.savez(tmp, **{str(i): a for i, a in enumerate(arrays)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_arrays(path):
    """The arrays :func:`write_arrays` wrote, in order."""
    with np.load(path, allow_pickle=False) as saved:
        return [saved[str(i)] for i in range(len(saved.files))]


def write_json(path, content):
    """Writes ``content`` (with kerastl's signature) to ``path`` whole or
    not at all: a temporary file, then a rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write_marker(tmp, **content)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_run(backup):
    """The ``run.json`` of a backup folder (a dict), or None if there is
    none or it is not kerastl's."""
    return read_marker(os.path.join(backup, RUN_FILE)) if backup else None


def has_backup(backup):
    """Whether ``backup`` holds a resumable run: kerastl's ``run.json``
    and at least one completed epoch's weights."""
    run = read_run(backup)
    return bool(run and run.get("epochs") and os.path.isfile(
        os.path.join(backup, "latest.weights.h5")))


def changed_keys(started, now):
    """The keys whose values differ between the experiment a run was
    started with and the one resuming it (those that can change what it
    trains)."""
    return sorted(k for k in set(started) | set(now)
                  if k not in RESUME_MAY_CHANGE
                  and started.get(k) != now.get(k))


class RunBackup(keras.callbacks.BackupAndRestore):
    """Keras's BackupAndRestore for a kerastl run: the previous copy kept
    too, the backup kept when training ends (the run removes it once its
    outputs are published), the random generators' states kept with the
    weights (so dropout draws the same masks after a resume), and a
    damaged backup reported in the run's terms.

    The run's log (``run.json``, written after this callback and the best
    checkpoint at each epoch's end) says which epochs are saved: a process
    killed while an epoch is saved leaves files of two epochs, and a
    resume takes the copy (the latest or the previous one) of the last
    epoch the log holds.

    Args:
        backup_dir: the backup folder.
        logged: the epochs the run's log holds (a resume; None: use the
            latest copy, as Keras does).
    """

    def __init__(self, backup_dir, logged=None):
        super().__init__(backup_dir, double_checkpoint=True,
                         delete_checkpoint=False)
        self.folder, self.logged = backup_dir, logged

    def _random_state(self, epochs):
        return os.path.join(self.folder, f"random_state.{epochs}.npz")

    def _random_variables(self):
        """The model's variables that are not weights: the states of its
        layers' seed generators (dropout, noise, augmentation)."""
        weights = {id(v) for v in self.model.weights}
        return [v for v in self.model.variables if id(v) not in weights]

    def _settle(self):
        """Makes the latest copy the one of the logged epochs: the
        previous copy when the latest is of a later epoch, or was being
        written (its epoch equals the previous copy's)."""
        def epoch(path):
            try:
                with open(path) as f:
                    return json.load(f)["epoch"]
            except (OSError, ValueError, KeyError, TypeError):
                return None

        latest = epoch(self._training_metadata_path)
        previous = epoch(self._prev_training_metadata_path)
        if latest == self.logged and previous != latest:
            return
        if previous != self.logged:
            raise OSError(f"the backup holds epoch {latest} (previous copy: "
                          f"{previous}) and the run's log {self.logged}")
        for old, new in ((self._prev_weights_path, self._weights_path),
                         (self._prev_training_metadata_path,
                          self._training_metadata_path)):
            shutil.copyfile(old, new + ".tmp")
            os.replace(new + ".tmp", new)

    def on_train_begin(self, logs=None):
        try:
            if self.logged is None:
                super().on_train_begin(logs)
                return
            self._settle()
            # Not Keras's fallback to the previous copy (of an epoch
            # before the log's end): weights that do not load are damage.
            self._load_model()
            variables = self._random_variables()
            path = self._random_state(self.logged)
            if not os.path.isfile(path):  # (a backup of an older kerastl)
                path = os.path.join(self.folder, "random_state.npz")
            if variables and not os.path.isfile(path):
                raise OSError(f"no random_state.{self.logged}.npz")
            if variables:
                # By position, in the model's order (names of generators
                # can differ between processes).
                states = read_arrays(path)
                if len(states) == len(variables):
                    for v, state in zip(variables, states):
                        v.assign(state)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise KerastlError(
                f"The backup of the interrupted run in {self.folder!r} "
                f"cannot be read ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:200]}); it cannot be resumed. "
                "Start over with --overwrite instead of --resume.") from None

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        write_arrays(self._random_state(epoch + 1),
                     [keras.ops.convert_to_numpy(v)
                      for v in self._random_variables()])
        # This epoch's and the one before (the log may not hold this one
        # yet) are kept.
        old = self._random_state(epoch - 1)
        if os.path.exists(old):
            os.remove(old)


class EpochLog(keras.callbacks.Callback):
    """Writes ``run.json`` (the experiment, and every completed epoch's
    logs) into the backup folder at each epoch's end.

    Args:
        path: the ``run.json`` file.
        experiment: the resolved experiment (JSON-able).
        epochs: the logs of the epochs completed before a resume.
        epoch_passes: the passes over the data in each epoch (several on
            small data under the step budget): a resume must count alike.
        kept_head_phase: whether the run's end kept the head phase's
            weights (a run resumed at its export).
    """

    def __init__(self, path, experiment, epochs=(), epoch_passes=1,
                 kept_head_phase=False):
        super().__init__()
        self.path = path
        self.experiment = dict(experiment)
        self.epochs = [dict(e) for e in epochs]
        self.epoch_passes = int(epoch_passes)
        # True once the run kept the head phase's weights (its end).
        self.kept_head_phase = bool(kept_head_phase)

    def write(self, epochs=None):
        """Writes ``run.json``; with ``epochs``, those, which become the
        log's once the file is written (so the log counts only the epochs
        the file holds)."""
        epochs = self.epochs if epochs is None else epochs
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        write_json(self.path, {"experiment": self.experiment,
                               "epochs": epochs,
                               "epoch_passes": self.epoch_passes,
                               "kept_head_phase": self.kept_head_phase})
        self.epochs = epochs

    def on_train_begin(self, logs=None):
        self.write()

    def on_epoch_end(self, epoch, logs=None):
        # (epochs past this one: a backup behind its log redoes them)
        self.write(self.epochs[:epoch] + [
            {k: float(v) for k, v in (logs or {}).items()
             if isinstance(v, (int, float)) or hasattr(v, "__float__")}])

    def history(self):
        """``{metric: [value per epoch]}`` over every logged epoch."""
        keys = list(dict.fromkeys(k for e in self.epochs for k in e))
        return {k: [e.get(k, math.nan) for e in self.epochs] for k in keys}


class HeadPhaseWeights(keras.callbacks.Callback):
    """Keeps the weights the head phase leaves (after early stopping's)
    and, once the main phase has begun, writes them to ``path`` with
    :func:`write_arrays` (the arrays of ``model.get_weights()``; not the
    optimizer's). Pass it to both phases, in the main phase after
    the :class:`EpochLog` (so that the backup is a run's before it holds
    the file)."""

    def __init__(self, path):
        super().__init__()
        self.path, self.arrays = path, None

    def on_train_end(self, logs=None):
        if self.arrays is None:  # the head phase's end
            self.arrays = self.model.get_weights()

    def on_train_begin(self, logs=None):
        if self.arrays is not None and not os.path.exists(self.path):
            write_arrays(self.path, self.arrays)


class AtomicCheckpoint(keras.callbacks.Callback):
    """The best model so far (lowest ``monitor``), saved to a temporary
    file beside ``path`` and renamed into place: an interrupt leaves the
    previous best or the new one, never part of one.

    From epoch ``start`` on it is the best of the epochs from ``start``,
    the epochs :class:`ResumableEarlyStopping` watches (and whose best it
    restores on a resume from this file); before, the best so far.

    Args:
        path: the ``.keras`` file.
        epochs: the logs of the epochs completed before a resume.
        start: the first epoch early stopping watches (0 without it).
    """

    def __init__(self, path, epochs=(), start=0, monitor="val_loss"):
        super().__init__()
        self.path, self.monitor, self.start = path, monitor, start
        self.best, self.watching = math.inf, False
        for epoch, logs in enumerate(epochs):
            self._improves(epoch, logs.get(monitor))

    def _improves(self, epoch, value):
        """Whether ``value`` is the new best (and becomes it)."""
        if value is None:
            return False
        if epoch >= self.start and not self.watching:
            # The window begins: its first epoch is the best so far, as
            # for Keras's EarlyStopping (even when its value is NaN).
            self.watching = True
        elif not float(value) < self.best:
            return False
        self.best = float(value)
        return True

    def on_epoch_end(self, epoch, logs=None):
        if self._improves(epoch, (logs or {}).get(self.monitor)):
            save_model(self.model, self.path)


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras's early stopping on ``val_loss`` (best weights restored) whose
    state continues across a resume: the best value, its epoch and the
    patience count come from the logs of the epochs before, the best
    weights from the best checkpoint (the same criterion).

    Args:
        patience: epochs without improvement before stopping.
        epochs: the logs of the epochs completed before a resume.
        checkpoint: the best checkpoint's path (read only on a resume).
        start: the first epoch it watches (Keras's ``start_from_epoch``).
    """

    def __init__(self, patience, epochs=(), checkpoint=None, start=0):
        super().__init__(monitor="val_loss", patience=patience,
                         restore_best_weights=True, start_from_epoch=start)
        self.previous = [e.get("val_loss") for e in epochs]
        self.checkpoint = checkpoint

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        best, best_epoch, wait, stopped = None, 0, 0, False
        for epoch, value in enumerate(self.previous):
            if value is None or epoch < self.start_from_epoch:
                continue
            wait += 1  # as EarlyStopping.on_epoch_end counts
            if best is None or value < best:
                best, best_epoch, wait = value, epoch, 0
            elif wait >= self.patience and epoch > 0:
                stopped = True  # (where it stopped the run)
                break
        if best is None:
            return
        self.best, self.best_epoch, self.wait = best, best_epoch, wait
        if self.checkpoint and os.path.isfile(self.checkpoint):
            self.best_weights = load_model(
                self.checkpoint, compile=False).get_weights()
        self.skipped = stopped
        if stopped:
            # The run had stopped early before it was killed: no epoch
            # more (on_train_end restores the best weights, as then).
            _private.start_fit_at(self.model, self.params["epochs"])

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        if getattr(self, "skipped", False):  # (not for the next fit)
            _private.start_fit_at(self.model, None)
