"""Which strategy for my data: the transfer-learning table as advice.

:func:`recommend_strategy` reads the amount of labelled target data and how
close the target is to the source, and says what to freeze and at which
learning rates, and why. Its ``name`` and ``freeze_up_to`` go straight into
:class:`kerastl.TrainingPlan` (and :func:`kerastl.fine_tune`, and the
experiment's ``strategy`` and ``freeze_up_to`` keys).
"""

import dataclasses
import math
import numbers

from kerastl.blocks import block_map
from kerastl.errors import KerastlError

# Labelled target samples per class: below FEW is "few", at or above MANY
# is "many" (the data-size axis of the transfer-learning table).
FEW, MANY = 100, 1000


@dataclasses.dataclass
class Strategy:
    """What :func:`recommend_strategy` advises.

    Attributes:
        name: the strategy: ``"features"``, ``"partial"`` or ``"full"``
            (pass it and ``freeze_up_to`` to :func:`fine_tune`).
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
    if isinstance(n_labelled_per_class, bool) or not isinstance(
            n_labelled_per_class, numbers.Real) or not math.isfinite(
            n_labelled_per_class) or n_labelled_per_class < 1:
        raise KerastlError(
            f"n_labelled_per_class={n_labelled_per_class!r}: expected a "
            "positive number.")
    if isinstance(similarity, str):
        if similarity not in ("high", "low"):
            raise KerastlError(f"similarity={similarity!r}: expected 'high', "
                               "'low' or a number in [0, 1].")
        similar = similarity == "high"
    elif isinstance(similarity, numbers.Real) and \
            not isinstance(similarity, bool) and 0 <= similarity <= 1:
        similar = similarity >= 0.5
    else:
        raise KerastlError(f"similarity={similarity!r}: expected 'high', "
                           "'low' or a number in [0, 1].")
    n = n_labelled_per_class
    size = "few" if n < FEW else "many" if n >= MANY else "a medium number of"
    if similar and n < FEW:
        s = Strategy(
            "features", 1.0, 1e-3, 0.0,
            f"With {size} labels per class ({n}) on a domain similar to the "
            "source, fine-tuning would overfit: freeze the whole backbone, "
            "drop its classifier and train only a new softmax head. The "
            "frozen features can be computed once and cached.")
    elif similar and n < MANY:
        s = Strategy(
            "partial", 0.5, 1e-3, 1e-4,
            f"With {size} labels per class ({n}) on a similar domain, keep "
            "the general early blocks frozen and fine-tune the later, more "
            "task-specific ones from their pretrained weights at a lower "
            "learning rate than the new head.")
    elif similar:
        s = Strategy(
            "full", 0.0, 1e-3, 1e-4,
            f"With {size} labels per class ({n}) on a similar domain, use "
            "the pretrained weights as initialisation and train everything, "
            "the backbone at a lower learning rate.")
    elif n >= MANY:
        s = Strategy(
            "full", 0.0, 1e-3, 1e-3,
            f"With {size} labels per class ({n}) on a dissimilar domain, "
            "transfer may not help much: train everything at the full rate "
            "from the pretrained initialisation, and compare with training "
            "from scratch as a baseline.")
    else:
        s = Strategy(
            "partial", 0.25, 1e-3, 1e-4,
            f"With {size} labels per class ({n}) on a dissimilar domain, only "
            "the earliest blocks (edges, colours, textures) are general "
            "enough to keep frozen; fine-tune the rest at a low learning "
            "rate and stop early: the late blocks are specific to the "
            "source task.")
    if model is not None:
        bm = block_map(model)  # a Backbone or a keras.Model
        names = bm.base_blocks
        k = math.ceil(s.freeze_fraction * len(names))
        s.freeze_up_to = names[k - 1] if k else None
    return s
