"""Loading what kerastl saved.

A kerastl model saved to ``.keras`` holds kerastl layers
(``ImagePreprocessing``, ``HubLayer``, ``GradientReversal``, ``DANN``,
``LayerwiseOptimizer``). Keras finds them by their registered names, which
exist once ``kerastl`` is imported: ``keras.models.load_model`` works in any
process that ran ``import kerastl``, and :func:`load_model` is that in one
call.

Use :func:`load_model` for a model with frozen KerasHub blocks: Keras
alone brings the sublayers of a frozen KerasHub layer back trainable (see
:func:`kerastl.backbone.restore_trainable`), and the optimizer state with them is skipped.

Use :func:`save_model` and :func:`load_model` for a model with LoRA (or
bias-only, norm-only tuning) that training will continue from: Keras
saves LoRA merged into the kernels and loads its factors as zeros, and
keeps no trainable flag of single weights; :func:`save_model` adds them to
the file (see :mod:`kerastl.peft`), and :func:`load_model` restores them.
"""

import os

import keras

from kerastl import peft

# The modules that register kerastl's serialisable classes with Keras.
from kerastl import layerwise, preprocessing, tfhub  # noqa: F401
from kerastl.adaptation import dann, reversal  # noqa: F401
from kerastl.backbone import read_keras_file
from kerastl.errors import KerastlError


def save_model(model, path):
    """``model.save(path)``, written whole or not at all, with what a
    ``.keras`` file otherwise loses: LoRA layers' unmerged kernels and
    factors, their alpha, and every weight's trainable flag
    (:func:`kerastl.peft.write_state`). ``keras.models.load_model`` reads
    the file as any other (LoRA merged); :func:`load_model` restores all
    of it, so that training resumes exactly.

    Args:
        model: a ``keras.Model`` (or Backbone).
        path: a file name ending in ``.keras``.
    """
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise KerastlError(f"save_model({path!r}): the file name must end in "
                           ".keras (Keras's model format).")
    model = getattr(model, "model", model)
    if not isinstance(model, keras.Model):
        raise KerastlError(f"save_model: expected a keras.Model or a "
                           f"kerastl.Backbone, got {type(model).__name__}.")
    folder, name = os.path.split(path)
    if folder and not os.path.isdir(folder):
        raise KerastlError(f"save_model({path!r}): the folder {folder!r} "
                           "does not exist; create it first.")
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}.keras")
    try:
        model.save(tmp)
        peft.write_state(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_model(path, compile=True, safe_mode=True):
    """``keras.models.load_model(path)`` with every kerastl class known,
    and what :func:`save_model` stored restored (LoRA factors, trainable
    flags) before the optimizer is built.

    Args:
        path: a ``.keras`` file.
        compile: restore the training configuration (optimizer included,
            a LayerwiseOptimizer with its multipliers).
        safe_mode: Keras's safe mode; a ``HubLayer`` then loads only a
            handle trusted with :func:`kerastl.trust_hub_path`.
    """
    return read_keras_file(path, compile=compile, safe_mode=safe_mode)
