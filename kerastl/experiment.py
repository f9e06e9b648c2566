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
import warnings

import keras
import numpy as np
from kerastl import _keras_private as _private
from kerastl import backbone as backbone_lib
from kerastl import distribute
from kerastl import resume
from kerastl import schema
from kerastl.atomic import (atomic_folder, check_destination, read_marker,
                            written_by_kerastl)
from kerastl.errors import ConfigError, ExportError, KerastlError
from kerastl.saving import save_model
from kerastl.serving import export, missing_onnx_package
from kerastl.freezing import trainable_summary
from kerastl.heads import build_classifier
from kerastl.image_folders import (image_folder_arrays,
                                   image_folder_datasets, scan_image_folder)
from kerastl.plan import TrainingPlan
from kerastl.resume import write_json
from kerastl.saving import load_model
from kerastl.training import ended_at, fine_tune, guards_head_phase, \
    keep_better_phase, repeatable, steps_per_epoch, watch_from
from kerastl.zoo import kerashub
from kerastl.zoo.config import check_model_reference


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C (or, ``failed``, by an export that failed
    after training). ``message`` says what was kept and what ``--resume``
    will do (or that nothing was kept)."""

    def __init__(self, message, failed=False):
        super().__init__(message)
        self.message = message
        self.failed = failed


INTERRUPTED = "INTERRUPTED.json"


def was_interrupted(output):
    """The ``INTERRUPTED.json`` of a kerastl run stopped by Ctrl-C in
    ``output`` (a dict: ``stage`` is ``"training"`` or ``"export"``), or
    None: only a folder kerastl wrote, with that file as kerastl wrote it,
    counts."""
    if not written_by_kerastl(output):
        return None
    return read_marker(os.path.join(output, INTERRUPTED))


def _inside(path, folder):
    path, folder = (os.path.realpath(os.fspath(p)) for p in (path, folder))
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_experiment(experiment, inputs=()):
    """Checks the model, the data and the output of a resolved experiment
    before training; returns ``{class: [image paths]}``.

    ``inputs``: more files the run reads (its ``--config``): like
    ``--data`` and a ``--model`` file, they may not lie inside an output
    folder that ``--overwrite`` or ``--resume`` would replace.
    """
    e = experiment
    model = e["model"]
    if model.startswith(kerashub.PREFIX):
        kerashub.resolve(model)  # the install hint, or close preset names
    # (A folder passes only as a KerasHub preset.)
    check_model_reference(model, kerashub.is_preset_folder)
    if "onnx" in schema.export_formats(e):
        missing = missing_onnx_package()
        if missing:  # said before training, not after
            raise KerastlError(f"--export onnx: {missing}.")
    files = scan_image_folder(e["data"])
    output, backup = e["output"], resume.backup_folder(e["output"])
    if (e["overwrite"] or e["resume"]) and os.path.isdir(output):
        named = [("--data", e["data"]),
                 ("--model", model if model.endswith(".keras") else None)]
        named += [("--config", path) for path in inputs]
        for flag, path in named:
            if path and _inside(path, output):
                raise KerastlError(
                    f"{flag} {path!r} is inside the output folder "
                    f"{output!r}, which this run would replace: move it out "
                    "first, or choose another --output.")
    stopped = was_interrupted(output)
    if e["resume"]:
        _check_resume(e, stopped, backup)
    check_destination(output, "output folder",
                      e["overwrite"] or (e["resume"] and stopped is not None),
                      "pass --overwrite")
    if os.path.lexists(backup) and not e["resume"]:
        if resume.read_run(backup) is None:
            raise KerastlError(
                f"{backup!r} is in the way of this run's backup and was not "
                "written by kerastl: move it away, or choose another "
                "--output.")
        if not e["overwrite"] and resume.has_backup(backup):
            raise KerastlError(
                f"An interrupted run of {output!r} can be continued: pass "
                f"--resume (with the same config), or --overwrite to start "
                "over.")
        shutil.rmtree(backup)  # (without an epoch: nothing to continue)
    n = sum(len(f) for f in files.values())
    held = int(e["validation_split"] * n)  # as Keras splits the files
    if not held or held == n:
        raise KerastlError(
            f"--validation-split {e['validation_split']:g} of the {n} "
            f"images of {e['data']!r} holds out {held}: "
            + ("no validation image; raise --validation-split (or add "
               "images)." if not held else
               "no image left to train on; lower --validation-split."))
    return files


def _check_resume(e, stopped, backup):
    """Refuses a --resume that cannot do what it says."""
    run = resume.read_run(backup)
    at_export = (stopped or {}).get("stage") == "export"
    if run is None or not (resume.has_backup(backup) or at_export):
        raise KerastlError(
            f"Nothing to resume: no interrupted run of {e['output']!r} that "
            f"completed an epoch (its backup {backup!r} holds none). Run "
            "without --resume (with --overwrite if the folder holds an "
            "earlier run).")
    changed = resume.changed_keys(run["experiment"], e)
    if changed:
        raise ConfigError(
            "--resume with another config: " + "; ".join(
                f"{k} was {run['experiment'].get(k)!r}, now {e.get(k)!r}"
                for k in changed) + ". A resumed run continues the same "
            "training: pass the same values (or start over with "
            "--overwrite instead of --resume).")


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
    own_file = e["model"].endswith(".keras")
    if own_file:
        if weights != "imagenet":  # (the default: nothing asked for)
            raise ConfigError(
                f"--weights {weights if weights else 'none'}: "
                f"{e['model']!r} is a .keras file and carries its own "
                "weights; drop --weights.")
        weights = None
    backbone = backbone_lib.load_backbone(
        e["model"], weights=weights,
        input_shape=None if own_file else shape)  # (checked below)
    if own_file:
        fixed = tuple(backbone.input_shape[:2])
        if None in fixed and shape is None:
            raise ConfigError(
                f"{e['model']!r} takes images of any size: pass --image-size "
                "N, the side of the square images to train it on.")
        if None not in fixed and shape is not None and fixed != shape:
            raise ConfigError(
                f"--image-size {e['image_size']}: {e['model']!r} takes "
                f"{fixed[0]}x{fixed[1]} images; drop --image-size (the "
                "images are resized to the model's size).")
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


@_private.quiet_retracing()
def run_experiment(experiment, verbose=1, inputs=()):
    """Runs a resolved, checked experiment; returns the metrics dict.

    Everything is written into a temporary folder beside
    ``experiment["output"]``, renamed into place at the end.

    Raises:
        RunInterrupted: Ctrl-C; its ``message`` says what was kept.
    """
    e = experiment
    if e["distribute"] == "multi-worker" and e["resume"]:
        raise ConfigError(
            "--resume with --distribute multi-worker: the workers would "
            "restart from different epochs. Start the run again without "
            "--resume (with --overwrite).")
    # A multi-worker strategy must exist before TensorFlow runs any op.
    strategy = distribute.strategy(e["distribute"])
    files = check_experiment(e, inputs)
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
    try:
        with strategy.scope() if strategy is not None else \
                contextlib.nullcontext():
            backbone, model, plan = build_model(e, len(classes))
        return _train(e, classes, start, plan, backbone, model, verbose,
                      one_device=strategy is None)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _data(e, size, verbose, one_device):
    """``(train, validation, class names)``: arrays when the decoded images
    fit in memory on one device (each epoch's order then follows the seed
    and the epoch alone: resume is exact), else Keras's pipelines."""
    args = dict(validation_split=e["validation_split"], seed=e["seed"],
                verbose=verbose)
    if one_device:
        arrays = image_folder_arrays(e["data"], size, **args)
        if arrays is not None:
            return arrays.train, arrays.validation, arrays.class_names
    train, val = image_folder_datasets(e["data"], size,
                                       batch_size=e["batch_size"], **args)
    return train, val, train.class_names


def _train(e, classes, start, plan, backbone, model, verbose, one_device):
    """run_experiment's training, saving and reporting."""
    size = tuple(backbone.input_shape[:2])
    if None in size:  # a .keras file of any size: --image-size's
        size = (e["image_size"],) * 2
    train, val, names = _data(e, size, verbose, one_device)
    if list(names) != classes:
        raise KerastlError("The image folder changed while it was read.")
    output, backup = e["output"], resume.backup_folder(e["output"])
    stopped = was_interrupted(output) if e["resume"] else None
    run = resume.read_run(backup) if e["resume"] else None
    before = run["epochs"] if run else []
    if isinstance(train, tuple):  # each pass's order follows (seed, pass)
        plan = plan.replace(seed=e["seed"], batch_size=e["batch_size"],
                            trainable=plan.trainable)
    else:  # Keras's loader (shuffled by --seed): the augmentation's seed
        plan = plan.replace(seed=e["seed"], trainable=plan.trainable)
    # The budget in epochs (--epochs, or the step budget on this data, as
    # fine_tune counts it: on small data several passes each): the run's
    # messages count them; its log and metrics.json keep the experiment as
    # given.
    started = _json_ready(e)
    data = train if isinstance(train, tuple) else (train,)
    epochs, passes = plan.budget(
        steps_per_epoch(*data, batch_size=e["batch_size"]),
        repeat=repeatable(*data))
    if run and run.get("epoch_passes", 1) != passes:
        raise ConfigError(
            f"--resume: the run being resumed counted epochs of "
            f"{run.get('epoch_passes', 1)} passes over the data and this "
            f"kerastl counts {passes} (it was started by another version): "
            f"start over with --overwrite instead of --resume.")
    e = dict(e, epochs=epochs)
    replace = e["overwrite"] or stopped is not None
    with atomic_folder(output, "output folder", replace,
                       "pass --overwrite") as tmp:
        os.makedirs(os.path.join(tmp, "checkpoints"))
        # The best checkpoint lives with the backup while the run trains
        # (a resume finds it there); the output gets a copy.
        best = os.path.join(backup, resume.BEST)
        log = resume.EpochLog(
            os.path.join(backup, resume.RUN_FILE), started, before,
            epoch_passes=passes,
            kept_head_phase=(run or {}).get("kept_head_phase", False))
        history = None
        if (stopped or {}).get("stage") == "export":
            # Training had finished: the model it left is the one kept.
            model = load_model(os.path.join(output, "model.keras"))
            outcome = None
        else:
            outcome = _fit(e, model, train, val, plan, log, best, backup,
                           before, tmp, verbose)
            if not isinstance(outcome, RunInterrupted):
                history, outcome = outcome, None
        if outcome is None:
            outcome = _finish(tmp, e, model, train, val, classes, history,
                              log, start)
        if os.path.isfile(best):
            shutil.copy2(best, os.path.join(tmp, "checkpoints", "best.keras"))
        if log.kept_head_phase:  # the model is better than the main phase's
            save_model(model, os.path.join(tmp, "checkpoints", "best.keras"))
    if isinstance(outcome, RunInterrupted):
        raise outcome
    shutil.rmtree(backup, ignore_errors=True)  # the run is complete
    return outcome


def _fit(e, model, train, val, plan, log, best, backup, before, tmp,
         verbose):
    """Trains; returns the History, or a RunInterrupted after Ctrl-C (with
    ``INTERRUPTED.json`` written into ``tmp`` when anything was kept)."""
    # The checkpoint keeps the best of the epochs early stopping watches
    # (a resume restores its best weights from it).
    start = watch_from(e["epochs"], plan.schedule) \
        if e["early_stopping"] is not None else 0
    # The log last: the epochs it holds are the ones saved (a resume takes
    # the backup's copies of its last epoch).
    callbacks = [resume.RunBackup(backup, len(before) if before else None),
                 resume.AtomicCheckpoint(best, before, start), log]
    head = os.path.join(backup, resume.HEAD)
    # (plan.patience is the run's --early-stopping; fine_tune below gets
    # None: the run's own callbacks stop it)
    guard = guards_head_phase(model, plan, val)
    head_callbacks = []
    if guard and not before:
        # (after the log: the backup is a run's before it holds the file)
        head_callbacks.append(resume.HeadPhaseWeights(head))
        callbacks += head_callbacks
    if e["early_stopping"] is not None:
        callbacks.append(resume.ResumableEarlyStopping(
            e["early_stopping"], before, best, start=start))
    held = []  # fine_tune's warnings, shown once the guard has decided
    try:
        # Ctrl-C stops at the next step boundary, never inside a
        # checkpoint write or a TensorFlow call.
        with stop_between_steps() as stopper:
            # The head phase is not checkpointed (a Ctrl-C in it keeps
            # nothing); a resumed run is past it: its backup holds the
            # weights it left.
            with warnings.catch_warnings(record=True) as held:
                history = fine_tune(
                    model, train, val,
                    plan.replace(patience=None, trainable=plan.trainable,
                                 **({"head_epochs": 0} if before else {})),
                    callbacks=[stopper] + callbacks,
                    head_callbacks=[stopper] + head_callbacks,
                    verbose=verbose).fine_tune
            if guard and os.path.isfile(head):
                log.kept_head_phase = _keep_head_phase(
                    e, model, val, head, stopper)
                log.write()
            return history
    except KeyboardInterrupt:
        done = len(log.epochs)
        if not done:
            shutil.rmtree(backup, ignore_errors=True)
            raise RunInterrupted(
                "stopped before the first epoch ended: nothing was kept. "
                "Run the command again.") from None
        _write_interrupted(tmp, "training", done, e["epochs"])
        kept = os.path.join(e["output"], "checkpoints", "best.keras")
        return RunInterrupted(
            f"stopped after epoch {done} of {e['epochs']}: "
            + (f"the best checkpoint so far is in {kept};"
               if os.path.isfile(best) else "no checkpoint was written yet;")
            + f" run the same command with --resume to continue from epoch "
            f"{done + 1}.")
    finally:
        for w in held or ():
            if log.kept_head_phase and "never rose above chance" in \
                    str(w.message):
                continue  # (the main phase's; the model is the head's)
            warnings.warn_explicit(w.message, w.category, w.filename,
                                   w.lineno)


def _keep_head_phase(e, model, val, head, stopper):
    """fine_tune's guard for a run (whose own early stopping and
    checkpoints cover the main phase): the head phase's weights, kept in
    the backup so that a resumed run compares them too, replace the main
    phase's when their validation loss is lower. Returns whether they
    did."""
    kept, head_loss, main_loss = keep_better_phase(
        model, resume.read_arrays(head), val, callbacks=[stopper])
    if stopper.requested:  # a Ctrl-C after the last validation step
        raise KeyboardInterrupt
    if kept:
        rate = e["learning_rate"]
        fewer = {"full": ", or freeze some blocks (--strategy partial "
                         "--freeze-up-to BLOCK)",
                 "partial": ", or freeze more blocks (a later "
                            "--freeze-up-to)"}.get(e["strategy"], "")
        warnings.warn(
            f"kerastl: fine-tuning ended worse than the head phase "
            f"({ended_at(main_loss)} against {head_loss:.4g}): the model "
            f"keeps the head phase's weights. Lower --learning-rate (now "
            f"{rate:g}), e.g. to {rate / 10:g}{fewer}.", RuntimeWarning,
            stacklevel=2)
    return kept


def _json_ready(experiment):
    return json.loads(json.dumps(experiment, default=str))


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


def _write_interrupted(folder, stage, done, epochs):
    write_json(os.path.join(folder, INTERRUPTED), {
        "stage": stage, "epochs_completed": done, "epochs": epochs,
        "resume": "run the same kerastl finetune command with --resume"})


def _finish(tmp, e, model, train, val, classes, history, log, start):
    """Evaluates, saves, exports and writes metrics and plots into tmp.

    Returns the metrics dict, or a :class:`RunInterrupted` when Ctrl-C
    stopped the export: the trained model is saved first (a Ctrl-C waits
    for that save), so what comes after can be redone by ``--resume``.
    """
    train_time = time.time() - start
    with stop_between_steps() as stopper:
        if not os.path.exists(os.path.join(tmp, "model.keras")):
            save_model(model, os.path.join(tmp, "model.keras"))
        try:
            if stopper.requested:
                raise KeyboardInterrupt
            metrics = _report(tmp, e, model, train, val, classes, history,
                              log, train_time)
            metrics["exports"] = _export(tmp, e, model, train, val, classes,
                                         stopper)
        except KeyboardInterrupt:
            _write_interrupted(tmp, "export", len(log.epochs), e["epochs"])
            return RunInterrupted(
                f"training finished: the trained model is in "
                f"{os.path.join(e['output'], 'model.keras')}; the export "
                "was stopped: run the same command with --resume to finish "
                "it (training is not repeated).")
        except ExportError as error:  # the trained model is kept
            _write_interrupted(tmp, "export", len(log.epochs), e["epochs"])
            return RunInterrupted(
                f"training finished: the trained model is in "
                f"{os.path.join(e['output'], 'model.keras')}; the export "
                f"failed: {error} Run the same command with --resume once "
                "that is fixed, or with another --export, to finish it "
                "(training is not repeated).", failed=True)
    with open(os.path.join(tmp, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


# How many training images calibrate an int8 LiteRT file, and how many
# validation images each exported file is checked on.
REPRESENTATIVE_IMAGES, CHECK_IMAGES = 200, 512


def sample_images(data, n, seed=0):
    """Up to ``n`` images (and their labels) of arrays or a pipeline."""
    if isinstance(data, tuple):
        x, y = data
        if len(x) > n:
            pick = np.sort(np.random.default_rng(seed).choice(len(x), n,
                                                              replace=False))
            x, y = x[pick], y[pick]
        return np.asarray(x, "float32"), np.asarray(y)
    xs, ys, count = [], [], 0
    for x, y in data:
        xs.append(np.asarray(x))
        ys.append(np.asarray(y))
        count += len(xs[-1])
        if count >= n:
            break
    if not xs:  # an empty pipeline (e.g. an empty validation split)
        return np.zeros((0, 1, 1, 3), "float32"), np.zeros((0,), "int64")
    return (np.concatenate(xs)[:n].astype("float32"),
            np.concatenate(ys)[:n])


def _export(tmp, e, model, train, val, classes, stopper=None):
    """Writes each format of ``export`` into ``tmp/<format>``, each checked
    by running it on the validation images; returns the reports."""
    reports = {}
    formats = schema.export_formats(e)
    if not formats:
        return reports
    check = sample_images(val, CHECK_IMAGES)
    representative = sample_images(train, REPRESENTATIVE_IMAGES)[0] \
        if e["quantize"] == "int8" else None
    output = os.path.abspath(e["output"])
    for format in formats:
        if stopper is not None and stopper.requested:  # Ctrl-C: stop here
            raise KeyboardInterrupt
        report = export(
            model, os.path.join(tmp, format), format=format,
            input=e["export_input"],
            quantize=e["quantize"] if format == "litert" else None,
            representative_data=representative if format == "litert"
            else None, validation_data=check, labels=classes)
        report.path = os.path.join(output, format)
        report.file = report.file.replace(tmp, output, 1)
        reports[format] = report.to_dict()
    return reports


def _report(tmp, e, model, train, val, classes, history, log, train_time):
    """The metrics (and plots) of a trained model."""
    if isinstance(val, tuple):
        xv, y_true = val
        y_pred = model.predict(xv, verbose=0, batch_size=128).argmax(-1)
        loss, accuracy = model.evaluate(xv, y_true, verbose=0,
                                        batch_size=128)
        counts = len(train[1]), len(y_true)
    else:  # a pipeline: one pass for labels and predictions
        y_true, y_pred = [], []
        for x, y in val:
            y_true.append(y.numpy())
            # (Under a multi-worker strategy every worker predicts the
            # batch it was given and the results are gathered: this
            # worker's first.)
            y_pred.append(model.predict_on_batch(x)[:len(y)].argmax(-1))
        y_true, y_pred = np.concatenate(y_true), np.concatenate(y_pred)
        loss, accuracy = model.evaluate(val, verbose=0)
        counts = len(train.file_paths), len(val.file_paths)
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    np.add.at(confusion, (y_true, y_pred), 1)
    metrics = {
        # (as given: its epochs, None for the step budget, give this run)
        "experiment": dict(e, epochs=log.experiment["epochs"]),
        "classes": classes,
        "train_images": counts[0], "validation_images": counts[1],
        "validation": {"loss": float(loss), "accuracy": float(accuracy)},
        "epochs_run": len(log.epochs),
        "passes_per_epoch": log.epoch_passes,
        # "used", or why the frozen blocks ran in every epoch instead.
        "boundary_cache": getattr(history, "boundary_cache", None),
        # True: the main phase ended worse; the model is the head phase's.
        "kept_head_phase": log.kept_head_phase,
        "history": log.history(),
        "confusion_matrix": confusion.tolist(),
        "trainable_summary": list(trainable_summary(model)),
        "seconds": round(train_time, 1),
    }
    metrics["plots"] = plots(tmp, metrics)
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
