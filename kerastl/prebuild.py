"""A compiled model's state built before ``fit`` traces its first step.

On the TensorFlow backend without a distribution strategy, Keras creates
the optimizer's variables (Adam's moments, ...) and the compiled metrics'
inside the first trace of the train step (its trainer defers building
there "for backwards compatibility"). A ``tf.function`` whose first trace
creates variables is traced a second time, so the whole step, forward and
backward, is traced twice: on a small model on CPU that is most of what a
short ``fit`` costs. Under a distribution strategy Keras builds them
before the trace (``Trainer._symbolic_build``, from the structure of one
batch: :func:`kerastl._keras_private.symbolic_build`); :func:`build_before_fit` calls the same before kerastl's own
``fit`` calls, so the step is traced once. The variables and their values
are the same (zeros, created eagerly instead of lifted out of the trace),
and so is the training: ``tests/test_prebuild.py`` checks it bit for bit.
"""

import keras

from kerastl import _keras_private as _private


def batch_structure(arrays):
    """``keras.KerasTensor`` stand-ins (batch size None) for one batch of
    ``(x, y[, sample_weight])`` arrays, nested as they are."""
    def spec(a):
        return keras.KerasTensor((None,) + tuple(a.shape[1:]),
                                 keras.backend.standardize_dtype(a.dtype))

    return tuple(None if a is None else keras.tree.map_structure(spec, a)
                 for a in arrays)


def build_before_fit(model, x=None, y=None, sample_weight=None):
    """Builds what ``model.compile`` left unbuilt (the optimizer's and the
    compiled metrics' and losses' variables) from the structure of one
    batch of the data ``fit`` gets, as ``fit`` takes it: arrays ``x``,
    ``y``, ``sample_weight``, or a ``tf.data.Dataset`` ``x`` of batches;
    the optimizer over the model's trainable variables (as Keras would) in
    any case.

    Only where Keras would otherwise build them inside the first trace
    (the TensorFlow backend, no distribution strategy). Data whose
    structure cannot be read this way (none, a generator, a ``PyDataset``,
    a DataFrame, strings) or that Keras cannot build from gets the
    optimizer only; Keras builds the rest in the first trace, as without this call.

    The optimizer is built over the variables trainable when this runs
    (before ``fit``'s callbacks), where Keras's own build takes those
    trainable at the first trace: a callback that unfreezes layers in
    ``on_train_begin`` needs an optimizer that already covers them (as
    :class:`~kerastl.GradualUnfreezing` ensures)."""
    if keras.backend.backend() != "tensorflow" or \
            _private.has_distribution_strategy(model) or \
            getattr(model, "optimizer", None) is None:
        return
    try:
        batch = None
        if getattr(x, "element_spec", None) is not None:
            spec = keras.tree.map_structure(
                lambda s: keras.KerasTensor(
                    tuple(s.shape), keras.backend.standardize_dtype(s.dtype)),
                x.element_spec)
            batch = spec if isinstance(spec, tuple) else (spec,)
        elif x is not None:
            batch = batch_structure((x, y, sample_weight))
        if batch is not None:
            _private.symbolic_build(model, batch)
    except Exception:  # noqa: BLE001 - an optimisation: Keras builds what
        pass  # is left in the trace, as without this call
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
