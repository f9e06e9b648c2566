"""The main job: fine-tune a zoo model on an image folder (``kerastl finetune``).

An experiment is a YAML file (or a dict) of the keys that
:mod:`kerastl.schema` declares; :func:`kerastl.schema.resolve` checks them.
:func:`check_experiment` validates everything else that can be checked
before training (the model name, the image folder: class subfolders, empty
classes, images that do not decode, the output folder);
:func:`run_experiment` builds the :class:`~kerastl.TrainingPlan`
(:meth:`~kerastl.TrainingPlan.from_experiment`), trains with
:func:`kerastl.fine_tune` and writes its outputs into a temporary folder
beside ``output``, renamed into place only at the end, so a failure never
leaves a half-written output folder.

Outputs: ``model.keras``, ``savedmodel/`` (see
:func:`kerastl.export_savedmodel`), ``metrics.json`` (the resolved config,
class names, history, validation metrics, confusion matrix, timings),
``checkpoints/best.keras`` and, with matplotlib, ``training_curves.png`` and
``confusion_matrix.png``.
"""

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

import keras
import numpy as np
from kerastl import backbone as backbone_lib
from kerastl import distribute
from kerastl.atomic import atomic_folder, check_destination
from kerastl.errors import ConfigError, KerastlError
from kerastl.export import export_savedmodel
from kerastl.freezing import trainable_summary
from kerastl.heads import build_classifier
from kerastl.image_folders import image_folder_datasets, scan_image_folder
from kerastl.plan import TrainingPlan
from kerastl.training import fine_tune
from kerastl.zoo import kerashub, zoo_entry


def check_experiment(experiment):
    """Checks the model and data of a resolved experiment before training."""

    model = experiment["model"]
    if model.endswith(".keras"):
        if not os.path.isfile(model):
            raise KerastlError(f"Model file {model!r} does not exist.")
    elif model.startswith(kerashub.PREFIX):
        kerashub.resolve(model)  # the install hint, or close preset names
    elif not model.startswith("hub:") and not kerashub.is_preset_folder(
            model):
        zoo_entry(model)  # UnknownModelError names close matches
    files = scan_image_folder(experiment["data"])
    check_destination(experiment["output"], "output folder",
                      experiment["overwrite"] or (
                          experiment["resume"] and
                          was_interrupted(experiment["output"])),
                      "pass --overwrite")
    backup = backup_folder(experiment["output"])
    if experiment["resume"] and not os.path.isdir(backup):
        raise KerastlError(
            f"Nothing to resume: no interrupted run of "
            f"{experiment['output']!r} (its backup {backup!r} does not "
            "exist). Run without --resume.")
    if os.path.isdir(backup) and not experiment["resume"]:
        if not experiment["overwrite"]:
            raise KerastlError(
                f"An interrupted run of {experiment['output']!r} can be "
                f"continued: pass --resume (with the same config), or "
                "--overwrite to start over.")
        shutil.rmtree(backup)
    return files


def backup_folder(output):
    """Where a run's BackupAndRestore state lives while it trains: beside
    the output folder, removed when training ends."""
    output = os.path.abspath(os.fspath(output))
    parent, name = os.path.split(output)
    return os.path.join(parent, f".{name}.backup")


def build_model(experiment, num_classes):
    """The backbone, the classifier and the resolved training plan an
    experiment describes.

    The classifier is built as it is (nothing frozen yet); the plan says
    what trains, resolved here once for this model, so a ``freeze_up_to``
    the backbone does not have fails before any data is read;
    :func:`kerastl.fine_tune` applies it.
    """
    e = experiment
    shape = None if e["image_size"] is None else (e["image_size"],) * 2
    weights = e["weights"]
    if e["model"].endswith(".keras"):
        weights = None
    backbone = backbone_lib.load_backbone(e["model"], weights=weights,
                                          input_shape=shape)
    model = build_classifier(backbone, num_classes, dropout=e["dropout"],
                             freeze=None)
    try:
        plan = TrainingPlan.from_experiment(e).resolve(model)
    except ConfigError:
        raise
    except KerastlError as err:
        raise ConfigError(
            f"Experiment key 'freeze_up_to' (--freeze-up-to): {err}") \
            from None
    return backbone, model, plan


def _datasets(experiment, image_size, verbose=0):
    e = experiment
    return image_folder_datasets(
        e["data"], image_size, batch_size=e["batch_size"],
        validation_split=e["validation_split"], seed=e["seed"],
        verbose=verbose)


def run_experiment(experiment, verbose=1):
    """Runs a resolved, checked experiment; returns the metrics dict.

    Everything is written into a temporary folder beside
    ``experiment["output"]``, renamed into place at the end.
    """
    e = experiment
    if e["distribute"] == "multi-worker" and e["resume"]:
        raise ConfigError(
            "--resume with --distribute multi-worker: the workers would "
            "restart from different epochs. Start the run again without "
            "--resume (with --overwrite).")
    # A multi-worker strategy must exist before TensorFlow runs any op.
    strategy = distribute.strategy(e["distribute"])
    files = check_experiment(e)
    start = time.time()
    keras.utils.set_random_seed(e["seed"])  # the run's seed (CLI: --seed)
    classes = sorted(files)
    # Several devices: the model and its optimizer are made in the
    # strategy's scope (fine_tune compiles and fits in it too).
    scratch = None
    if strategy is not None and not distribute.is_chief(strategy):
        # A multi-worker run: every worker trains, the first one writes.
        scratch = tempfile.mkdtemp(prefix="kerastl_worker_")
        e = dict(e, output=os.path.join(scratch, "run"), resume=False)
    with strategy.scope() if strategy is not None else \
            contextlib.nullcontext():
        backbone, model, plan = build_model(e, len(classes))
    try:
        return _train(e, files, classes, start, plan, backbone, model,
                      verbose)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _train(e, files, classes, start, plan, backbone, model, verbose):
    """run_experiment's training, saving and reporting."""
    size = tuple(backbone.input_shape[:2])
    train, val = _datasets(e, size, verbose)
    if list(train.class_names) != classes:
        raise KerastlError("The image folder changed while it was read.")
    interrupted = None
    replace = e["overwrite"] or (e["resume"] and was_interrupted(e["output"]))
    with atomic_folder(e["output"], "output folder", replace,
                       "pass --overwrite") as tmp:
        callbacks = [keras.callbacks.ModelCheckpoint(
            os.path.join(tmp, "checkpoints", "best.keras"),
            monitor="val_loss", save_best_only=True)]
        os.makedirs(os.path.join(tmp, "checkpoints"))
        # An interrupted run continues from its last epoch (--resume).
        callbacks.append(keras.callbacks.BackupAndRestore(
            backup_folder(e["output"])))
        epochs_done = keras.callbacks.History()
        callbacks.append(epochs_done)
        try:
            # Ctrl-C stops at the next step boundary, never inside a
            # checkpoint write or a TensorFlow call (see stop_between_steps).
            with stop_between_steps() as stopper:
                history = fine_tune(
                    model, train, val, plan,
                    callbacks=[stopper] + callbacks,
                    verbose=verbose).fine_tune
        except KeyboardInterrupt as stop:
            # Ctrl-C: keep what is complete (the best checkpoint so far)
            # and say so in the output; --resume continues the run.
            interrupted = stop
            _write_interrupted(tmp, e, epochs_done)
        if interrupted is None:
            metrics = _finish(tmp, e, model, train, val, classes, history,
                              start)
    if interrupted is not None:
        raise interrupted
    return metrics


class StopBetweenSteps(keras.callbacks.Callback):
    """Raises a pending Ctrl-C at the end of a training or validation step."""

    def __init__(self):
        super().__init__()
        self.requested = False

    def _check(self, *args, **kwargs):
        if self.requested:
            raise KeyboardInterrupt

    on_train_batch_end = on_test_batch_end = on_epoch_begin = _check
    on_train_batch_begin = on_test_batch_begin = _check


@contextlib.contextmanager
def stop_between_steps():
    """Turns the first Ctrl-C into a stop at the next step boundary.

    A ``KeyboardInterrupt`` raised wherever Python happens to be can land in
    the middle of a checkpoint being written (leaving a truncated
    ``best.keras``) or of TensorFlow's own bookkeeping, and a process torn
    down from there has been seen to abort with heap corruption instead of
    exiting 130. So the first Ctrl-C only sets a flag that the yielded
    callback turns into ``KeyboardInterrupt`` between steps; a second Ctrl-C
    stops at once, as before. Outside the main thread (where signal handlers
    cannot be set) this does nothing.
    """
    stopper = StopBetweenSteps()
    if threading.current_thread() is not threading.main_thread():
        yield stopper
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:  # e.g. started in the background
        yield stopper
        return

    def request(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stopper.requested = True
        print("kerastl: stopping after the current step (press Ctrl-C "
              "again to stop now).", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, request)
    try:
        # (A Ctrl-C after the last step lets the finished run be saved.)
        yield stopper
    finally:
        signal.signal(signal.SIGINT, previous)


INTERRUPTED = "INTERRUPTED.json"


def was_interrupted(output):
    """Whether ``output`` holds a kerastl run stopped by Ctrl-C."""
    return os.path.isfile(os.path.join(output, INTERRUPTED))


def _write_interrupted(folder, e, epochs_done):
    done = len(getattr(epochs_done, "epoch", []) or [])
    with open(os.path.join(folder, INTERRUPTED), "w") as f:
        json.dump({"interrupted": True, "epochs_completed": done,
                   "epochs": e["epochs"],
                   "resume": "run the same kerastl finetune command with "
                             "--resume"}, f, indent=2)


def _finish(tmp, e, model, train, val, classes, history, start):
    """Evaluates, saves, exports and writes metrics and plots into tmp."""
    train_time = time.time() - start
    # One pass over the validation images for labels and predictions.
    y_true, y_pred = [], []
    for x, y in val:
        y_true.append(y.numpy())
        # (Under a multi-worker strategy every worker predicts the batch
        # it was given and the results are gathered: this worker's first.)
        y_pred.append(model.predict_on_batch(x)[:len(y)].argmax(-1))
    y_true, y_pred = np.concatenate(y_true), np.concatenate(y_pred)
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    np.add.at(confusion, (y_true, y_pred), 1)
    loss, accuracy = model.evaluate(val, verbose=0)
    model.save(os.path.join(tmp, "model.keras"))
    export_savedmodel(model, os.path.join(tmp, "savedmodel"),
                      input=e["export_input"])
    metrics = {
        "experiment": e, "classes": classes,
        "train_images": len(train.file_paths),
        "validation_images": len(val.file_paths),
        "validation": {"loss": float(loss), "accuracy": float(accuracy)},
        "epochs_run": len(history.history["loss"]),
        # "used", or why the frozen blocks ran in every epoch instead.
        "boundary_cache": getattr(history, "boundary_cache", None),
        "history": {k: [float(v) for v in vs]
                    for k, vs in history.history.items()},
        "confusion_matrix": confusion.tolist(),
        "trainable_summary": list(trainable_summary(model)),
        "seconds": round(train_time, 1),
    }
    metrics["plots"] = plots(tmp, metrics)
    with open(os.path.join(tmp, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def plots(folder, metrics):
    """training_curves.png and confusion_matrix.png (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    history = metrics["history"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key in zip(axes, ("loss", "accuracy")):
        epochs = range(1, len(history[key]) + 1)  # as Keras logs them
        ax.plot(epochs, history[key], marker="o", label="train")
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], marker="o",
                    label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "training_curves.png"), dpi=100)
    plt.close(fig)
    confusion = metrics["confusion_matrix"]
    classes = metrics["classes"]
    side = min(16.0, max(4.0, 2.0 + 0.6 * len(classes)))
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    top = max(1, max(max(row) for row in confusion))
    fontsize = max(6, min(14, int(120 / max(1, len(classes)))))
    for i, row in enumerate(confusion):
        for j, n in enumerate(row):
            # White on dark cells, black on light ones.
            ax.text(j, i, str(n), ha="center", va="center",
                    fontsize=fontsize,
                    color="white" if n > top / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "confusion_matrix.png"), dpi=100)
    plt.close(fig)
    return ["training_curves.png", "confusion_matrix.png"]
