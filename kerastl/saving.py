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
"""

# The modules that register kerastl's serialisable classes with Keras.
from kerastl import layerwise, preprocessing, tfhub  # noqa: F401
from kerastl.adaptation import dann, reversal  # noqa: F401
from kerastl.backbone import read_keras_file


def load_model(path, compile=True, safe_mode=True):
    """``keras.models.load_model(path)`` with every kerastl class known.

    Args:
        path: a ``.keras`` file.
        compile: restore the training configuration (optimizer included,
            a LayerwiseOptimizer with its multipliers).
        safe_mode: Keras's safe mode; a ``HubLayer`` then loads only a
            handle trusted with :func:`kerastl.trust_hub_path`.
    """
    return read_keras_file(path, compile=compile, safe_mode=safe_mode)
