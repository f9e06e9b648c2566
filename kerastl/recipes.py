"""Transfer-learning recipes as code: strategy advice and two-phase fine-tuning."""

import dataclasses
import math

import keras

from kerastl import freezing
from kerastl.blocks import HEAD, block_map
from kerastl.errors import KerastlError
from kerastl.layerwise import LayerwiseOptimizer

# Labelled target samples per class: below FEW is "few", at or above MANY
# is "many" (the domain brief's data-size axis).
FEW, MANY = 100, 1000


@dataclasses.dataclass
class Strategy:
    """What :func:`recommend_strategy` advises.

    Attributes:
        name: ``feature_extraction``, ``partial_fine_tuning`` or
            ``full_fine_tuning``.
        freeze_fraction: share of the backbone's blocks to freeze (from the
            input).
        head_learning_rate: learning rate of the new head.
        backbone_learning_rate: learning rate of the fine-tuned blocks
            (0 where nothing is fine-tuned).
        freeze_up_to: with a model, the last frozen block (None: none).
        reasoning: why, as text.
    """

    name: str
    freeze_fraction: float
    head_learning_rate: float
    backbone_learning_rate: float
    reasoning: str
    freeze_up_to: object = None

    def __str__(self):
        return (f"{self.name}: freeze {self.freeze_fraction:.0%} of the "
                f"blocks (up to {self.freeze_up_to}), head lr "
                f"{self.head_learning_rate:g}, backbone lr "
                f"{self.backbone_learning_rate:g}.\n{self.reasoning}")


def recommend_strategy(n_labelled_per_class, similarity, model=None):
    """Advice from the data-size / similarity table of transfer learning.

    Args:
        n_labelled_per_class: labelled target samples per class.
        similarity: how close the target is to the source domain:
            ``"high"``/``"low"`` or a number in [0, 1] (>= 0.5 is similar).
        model: optional model or backbone: the advice then names the last
            block to freeze.

    Returns:
        A :class:`Strategy`.
    """
    if not isinstance(n_labelled_per_class, (int, float)) or \
            n_labelled_per_class < 1:
        raise KerastlError(
            f"n_labelled_per_class={n_labelled_per_class!r}: expected a "
            "positive number.")
    if isinstance(similarity, str):
        if similarity not in ("high", "low"):
            raise KerastlError(f"similarity={similarity!r}: expected 'high', "
                               "'low' or a number in [0, 1].")
        similar = similarity == "high"
    elif isinstance(similarity, (int, float)) and 0 <= similarity <= 1:
        similar = similarity >= 0.5
    else:
        raise KerastlError(f"similarity={similarity!r}: expected 'high', "
                           "'low' or a number in [0, 1].")
    n = n_labelled_per_class
    size = "few" if n < FEW else "many" if n >= MANY else "a medium number of"
    if similar and n < FEW:
        s = Strategy(
            "feature_extraction", 1.0, 1e-3, 0.0,
            f"With {size} labels per class ({n}) on a domain similar to the "
            "source, fine-tuning would overfit: freeze the whole backbone, "
            "drop its classifier and train only a new softmax head. The "
            "frozen features can be computed once and cached.")
    elif similar and n < MANY:
        s = Strategy(
            "partial_fine_tuning", 0.5, 1e-3, 1e-4,
            f"With {size} labels per class ({n}) on a similar domain, keep "
            "the general early blocks frozen and fine-tune the later, more "
            "task-specific ones from their pretrained weights at a lower "
            "learning rate than the new head.")
    elif similar:
        s = Strategy(
            "full_fine_tuning", 0.0, 1e-3, 1e-4,
            f"With {size} labels per class ({n}) on a similar domain, use "
            "the pretrained weights as initialisation and train everything, "
            "the backbone at a lower learning rate.")
    elif n >= MANY:
        s = Strategy(
            "full_fine_tuning", 0.0, 1e-3, 1e-3,
            f"With {size} labels per class ({n}) on a dissimilar domain, "
            "transfer may not help much: train everything at the full rate "
            "from the pretrained initialisation, and compare with training "
            "from scratch as a baseline.")
    else:
        s = Strategy(
            "partial_fine_tuning", 0.25, 1e-3, 1e-4,
            f"With {size} labels per class ({n}) on a dissimilar domain, only "
            "the earliest blocks (edges, colours, textures) are general "
            "enough to keep frozen; fine-tune the rest at a low learning "
            "rate and stop early: the late blocks are specific to the "
            "source task.")
    if model is not None:
        bm = block_map(model)  # a Backbone or a keras.Model
        names = [b for b in bm.names if b != HEAD]
        k = math.ceil(s.freeze_fraction * len(names))
        s.freeze_up_to = names[k - 1] if k else None
    return s


def early_stopping(patience=3, monitor="val_loss"):
    """Stop when the validation loss starts to increase; keep the best weights."""
    return keras.callbacks.EarlyStopping(monitor=monitor, patience=patience,
                                         restore_best_weights=True)


def fine_tune(model, train, validation, unfreeze_from=-3, head_epochs=10,
              fine_tune_epochs=10, head_learning_rate=1e-3,
              fine_tune_learning_rate=1e-5, loss="sparse_categorical_crossentropy",
              metrics=("accuracy",), patience=3, bn="frozen", callbacks=(),
              multipliers=None, verbose=0):
    """Two-phase fine-tuning of a classifier built on a backbone.

    Phase 1 trains the head with every backbone block frozen; phase 2
    unfreezes the blocks from ``unfreeze_from`` (a name or index; ``-3``:
    the last two backbone blocks and the head) and continues at a lower
    learning rate. Both phases stop early when the validation loss starts to
    increase and keep the best weights.

    Args:
        train: a ``tf.data.Dataset`` (or other ``fit`` input) of ``(x, y)``
            batches, or an ``(x, y)`` tuple of arrays.
        validation: anything ``fit`` takes as ``validation_data``.
        multipliers: layer-wise learning-rate multipliers for phase 2 (see
            :class:`~kerastl.LayerwiseOptimizer`), e.g.
            ``kerastl.layer_decay(0.7)``; ``None``: one rate for all.

    Returns:
        ``(history_head, history_fine_tune)``, two ``keras.callbacks.History``.
    """
    x, y = train if isinstance(train, tuple) else (train, None)
    freezing.freeze(model, bn=bn, recompile=False)
    model.compile(optimizer=keras.optimizers.Adam(head_learning_rate),
                  loss=loss, metrics=list(metrics))
    cbs = [early_stopping(patience)] + list(callbacks)
    h1 = model.fit(x, y, validation_data=validation, epochs=head_epochs,
                   callbacks=cbs, verbose=verbose)
    freezing.unfreeze(model, from_block=unfreeze_from, bn=bn,
                      recompile=False)
    optimizer = keras.optimizers.Adam(fine_tune_learning_rate)
    if multipliers is not None:
        optimizer = LayerwiseOptimizer(optimizer, multipliers, model)
    model.compile(optimizer=optimizer, loss=loss, metrics=list(metrics))
    cbs = [early_stopping(patience)] + list(callbacks)
    h2 = model.fit(x, y, validation_data=validation, epochs=fine_tune_epochs,
                   callbacks=cbs, verbose=verbose)
    return h1, h2
