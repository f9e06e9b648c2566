"""The main job: fine-tune a zoo model on an image folder (``kerastl finetune``).

An experiment is a YAML file (or a dict) of the keys in :data:`DEFAULTS`.
:func:`check_experiment` validates everything that can be checked before
training (config keys and types, the model name, the image folder: class
subfolders, empty classes, images that do not decode); :func:`run_experiment`
trains and writes its outputs into a temporary folder beside ``output`` and
renames it into place only at the end, so a failure never leaves a
half-written output folder.

Outputs: ``model.keras``, ``savedmodel/`` (see
:func:`kerastl.export_savedmodel`), ``metrics.json`` (the resolved config,
class names, history, validation metrics, confusion matrix, timings),
``checkpoints/best.keras`` and, with matplotlib, ``training_curves.png`` and
``confusion_matrix.png``.
"""

import contextlib
import difflib
import json
import numbers
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

import keras
import numpy as np
from kerastl import _yaml
from kerastl import backbone as backbone_lib
from kerastl import distribute
from kerastl.atomic import atomic_folder, check_destination
from kerastl.errors import ConfigError, KerastlError
from kerastl.export import INPUT_MODES, export_savedmodel
from kerastl.freezing import BN_MODES, trainable_summary
from kerastl.heads import build_classifier
from kerastl.layerwise import LayerDecay
from kerastl.recipes import STRATEGIES, fine_tune, frozen_blocks
from kerastl.spec import EXPERIMENT_DEFAULTS
from kerastl.zoo import kerashub, zoo_entry
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

# Every key of an experiment, with its default (None: required).
DEFAULTS = EXPERIMENT_DEFAULTS
# The boundary_cache and jit keys' values (YAML's true/false too) as
# fine_tune's.
BOUNDARY_CACHE = {"auto": "auto", "on": True, "off": False, True: True,
                  False: False}
PRECISION = {None: None, "float16": "mixed_float16",
             "bfloat16": "mixed_bfloat16"}

_TYPES = {
    "model": str, "data": str, "output": str, "weights": (str, type(None)),
    "image_size": (int, type(None)), "validation_split": numbers.Real,
    "seed": int, "batch_size": int, "strategy": str,
    "freeze_up_to": (str, int, type(None)), "bn": str,
    "dropout": numbers.Real, "optimizer": str, "learning_rate": numbers.Real,
    "layer_decay": (numbers.Real, type(None)), "epochs": int,
    "early_stopping": (int, type(None)), "export_input": str,
    "boundary_cache": (str, bool), "mixed_precision": (str, type(None)),
    "jit": (str, bool), "distribute": str,
    "overwrite": bool, "resume": bool,
}


def load_experiment(path):
    """Reads an experiment YAML file into a dict (not yet checked)."""
    if not os.path.isfile(path):
        raise ConfigError(f"Experiment config {path!r} does not exist.")
    with open(path, encoding="utf-8") as f:
        data = _yaml.load(f, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of experiment keys, "
                          f"got {type(data).__name__}.")
    return data


def resolve_experiment(config, **overrides):
    """Defaults, then ``config``, then the non-None ``overrides``; checked.

    Returns the complete experiment dict. Raises :class:`ConfigError` for
    unknown keys, wrong types or values.
    """
    merged = dict(DEFAULTS)
    for key, value in list(config.items()) + [
            (k, v) for k, v in overrides.items() if v is not None]:
        if key not in DEFAULTS:
            close = difflib.get_close_matches(str(key), list(DEFAULTS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"Unknown experiment key {key!r}{hint}; keys: "
                              f"{', '.join(DEFAULTS)}.")
        merged[key] = value
    for key, value in merged.items():
        if value is None and DEFAULTS[key] is None and key in ("model",
                                                              "data"):
            raise ConfigError(f"The experiment needs {key!r} (in the config "
                              f"or as --{key}).")
        types = _TYPES[key]
        bad_bool = isinstance(value, bool) and key not in ("overwrite",
                                                           "resume")
        if bad_bool or not isinstance(value, types):
            raise ConfigError(
                f"Experiment key {key!r} is {_yaml.short(value)}: expected "
                f"{_describe(types)}.")
    _check_values(merged)
    return merged


def _describe(types):
    types = types if isinstance(types, tuple) else (types,)
    names = {str: "a string", int: "an integer", numbers.Real: "a number",
             bool: "true or false", type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _check_values(e):
    checks = [
        ("strategy", e["strategy"] in STRATEGIES, ", ".join(STRATEGIES)),
        ("bn", e["bn"] in BN_MODES, ", ".join(BN_MODES)),
        ("export_input", e["export_input"] in INPUT_MODES,
         ", ".join(INPUT_MODES)),
        ("boundary_cache", e["boundary_cache"] in BOUNDARY_CACHE,
         "auto, on or off"),
        ("jit", e["jit"] in BOUNDARY_CACHE, "auto, on or off"),
        ("distribute", e["distribute"] in distribute.STRATEGIES,
         ", ".join(distribute.STRATEGIES)),
        ("mixed_precision", e["mixed_precision"] in PRECISION,
         "null, float16 or bfloat16"),
        ("validation_split", 0 < e["validation_split"] < 1,
         "a fraction between 0 and 1 (exclusive)"),
        ("batch_size", e["batch_size"] >= 1, "a positive integer"),
        ("epochs", e["epochs"] >= 1, "a positive integer"),
        ("learning_rate", e["learning_rate"] > 0, "a positive number"),
        ("dropout", 0 <= e["dropout"] < 1, "a rate in [0, 1)"),
        ("image_size", e["image_size"] is None or e["image_size"] >= 8,
         "at least 8 pixels"),
        ("layer_decay", e["layer_decay"] is None or 0 < e["layer_decay"] <= 1,
         "a number in (0, 1]"),
        ("early_stopping", e["early_stopping"] is None
         or e["early_stopping"] >= 1, "a patience of at least 1 epoch"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"Experiment key {key!r} is "
                              f"{_yaml.short(e[key])}: "
                              f"expected {expected}.")
    if e["strategy"] != "partial" and e["freeze_up_to"] is not None:
        raise ConfigError(
            f"freeze_up_to applies to strategy 'partial', not "
            f"{e['strategy']!r}.")


def scan_image_folder(folder):
    """Checks an image folder; returns ``{class name: [file paths]}``.

    Raises :class:`KerastlError` naming the problem: a missing folder, fewer
    than two class subfolders, an empty class folder, or a file that does
    not decode as an image.
    """
    import tensorflow as tf  # lazy: only when images are checked

    if not os.path.isdir(folder):
        raise KerastlError(f"Image folder {folder!r} does not exist.")
    classes = sorted(d for d in os.listdir(folder)
                     if os.path.isdir(os.path.join(folder, d))
                     and not d.startswith("."))
    if len(classes) < 2:
        raise KerastlError(
            f"Image folder {folder!r} has {len(classes)} class subfolder(s); "
            "expected one subfolder of images per class, at least two.")
    files = {}
    for c in classes:
        d = os.path.join(folder, c)
        files[c] = sorted(os.path.join(d, f) for f in os.listdir(d)
                          if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files[c]:
            raise KerastlError(
                f"Class folder {d!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    for c in classes:
        for path in files[c]:
            try:
                tf.io.decode_image(tf.io.read_file(path), channels=3,
                                   expand_animations=False)
            except (tf.errors.InvalidArgumentError, ValueError):
                raise KerastlError(
                    f"{path!r} is not a readable image; remove or replace "
                    "it.") from None
    return files


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
    """The backbone and the classifier an experiment describes.

    The classifier comes with the experiment's strategy applied (what is
    frozen); :func:`run_experiment` trains it with
    :func:`kerastl.fine_tune`, which compiles it.
    """
    e = experiment
    shape = None if e["image_size"] is None else (e["image_size"],) * 2
    weights = e["weights"]
    if e["model"].endswith(".keras"):
        weights = None
    backbone = backbone_lib.load_backbone(e["model"], weights=weights,
                                          input_shape=shape)
    try:
        depth = frozen_blocks(backbone, e["strategy"], e["freeze_up_to"])
    except KerastlError as err:
        raise ConfigError(f"Experiment key 'freeze_up_to': {err}") from None
    model = build_classifier(backbone, num_classes, dropout=e["dropout"],
                             freeze=depth, bn=e["bn"])
    return backbone, model


def _optimizer(experiment):
    e = experiment
    try:
        return keras.optimizers.get(
            {"class_name": e["optimizer"],
             "config": {"learning_rate": e["learning_rate"]}})
    except (ValueError, TypeError):
        raise ConfigError(f"Unknown optimizer {e['optimizer']!r}; use a Keras "
                          "optimizer name such as adam, adamw, sgd.") from None


# Decoded images are kept in memory when all of them take at most this.
CACHE_IMAGES_BYTES = 2 * 1024 ** 3


def image_folder_datasets(folder, image_size, batch_size=32,
                          validation_split=0.2, seed=0,
                          cache_bytes=CACHE_IMAGES_BYTES, verbose=0):
    """Training and validation ``tf.data`` pipelines for an image folder.

    The split, decoding and resizing are Keras's
    (``keras.utils.image_dataset_from_directory``: the same files in the
    same split for a seed, decoded in parallel, shuffled in a buffer before
    batching). When the decoded images fit in ``cache_bytes`` (float32,
    default 2 GiB) the first epoch's batches are kept in memory and later
    epochs replay them in a new order each epoch (the order of the batches
    is reshuffled, not their contents: replaying costs nothing per image);
    otherwise images are decoded every epoch, as Keras does. Both pipelines
    prefetch.

    Returns:
        ``(train, validation)`` datasets of ``(images, int labels)``
        batches, each with Keras's ``file_paths`` and ``class_names``.
    """
    import tensorflow as tf  # lazy, as scan_image_folder

    common = dict(validation_split=validation_split, subset="both",
                  seed=seed, image_size=image_size, label_mode="int",
                  shuffle=True, verbose=False)
    train, val = keras.utils.image_dataset_from_directory(
        folder, batch_size=batch_size, **common)
    paths = (train.file_paths, val.file_paths)
    names = train.class_names
    n = len(paths[0]) + len(paths[1])
    size = n * image_size[0] * image_size[1] * 3 * 4
    if size <= cache_bytes:
        if verbose:
            print(f"kerastl: keeping the {n} decoded images in memory "
                  f"({size / 2 ** 20:.1f} MiB).", flush=True)
        batches = -(-len(paths[0]) // batch_size)
        train = train.cache().shuffle(batches, seed=seed,
                                      reshuffle_each_iteration=True)
        val = val.cache()
        train, val = (d.prefetch(tf.data.AUTOTUNE) for d in (train, val))
    elif verbose:
        print(f"kerastl: {n} decoded images would take "
              f"{size / 2 ** 30:.1f} GiB; decoding them every epoch.",
              flush=True)
    for d, p in zip((train, val), paths):
        d.file_paths, d.class_names = p, names
        # Nothing random after decoding: fine_tune's boundary cache may
        # replay these (it does not replay other pipelines by default).
        d.kerastl_replayable = True
    return train, val


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
        optimizer = _optimizer(e)
        backbone, model = build_model(e, len(classes))
    try:
        return _train(e, files, classes, start, optimizer, backbone, model,
                      verbose)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _train(e, files, classes, start, optimizer, backbone, model, verbose):
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
            # checkpoint write or a TensorFlow call (see _stop_between_steps).
            with _stop_between_steps() as stopper:
                history = fine_tune(
                    model, train, val, strategy=e["strategy"],
                    freeze_up_to=e["freeze_up_to"], epochs=e["epochs"],
                    head_epochs=0, optimizer=optimizer,
                    multipliers=None if e["layer_decay"] is None
                    else LayerDecay(e["layer_decay"]),
                    bn=e["bn"], patience=e["early_stopping"],
                    boundary_cache=BOUNDARY_CACHE[e["boundary_cache"]],
                    mixed_precision=PRECISION[e["mixed_precision"]],
                    jit_compile=BOUNDARY_CACHE[e["jit"]],
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


class _StopBetweenSteps(keras.callbacks.Callback):
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
def _stop_between_steps():
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
    stopper = _StopBetweenSteps()
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
    metrics["plots"] = _plots(tmp, metrics)
    with open(os.path.join(tmp, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def _plots(folder, metrics):
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
