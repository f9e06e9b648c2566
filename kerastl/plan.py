"""The training plan: how a model is fine-tuned, decided once, as one value.

A :class:`TrainingPlan` holds everything that decides a fine-tuning run:
what trains (a strategy and how far to freeze), the BatchNorm policy, the
layer-wise multipliers, the two phases and their budgets and optimizers,
early stopping, the batch order, precision, XLA and the boundary cache.
Every entry point builds one the same way and hands it to
:func:`kerastl.fine_tune`:

* Python: ``TrainingPlan(strategy="partial", freeze_up_to="stage3", ...)``,
  or the same keywords given to ``fine_tune`` itself;
* the experiment YAML and the command line (``kerastl finetune``):
  :meth:`TrainingPlan.from_experiment` on the keys that
  :mod:`kerastl.schema` checked;
* the demo, :func:`kerastl.analysis.transfer_depth_sweep` and
  :func:`kerastl.adaptation.joint_fine_tune`.

What trains is resolved against the model's block map once, by
:meth:`TrainingPlan.resolve` (through the one resolver,
:func:`kerastl.freezing.resolve_trainable`); ``fine_tune`` resolves a plan
only if nobody did before.
"""

import dataclasses
import numbers

import keras

from kerastl import augment as augment_lib
from kerastl import freezing
from kerastl.distribute import strategy_scope
from kerastl.errors import ConfigError, KerastlError
from kerastl.layerwise import LayerDecay, MultiplierRule
from kerastl.spec import (BN_MODES, CUT_STRATEGIES, FINE_TUNING_STRATEGIES,
                          PRECISIONS)

# The experiment's words for fine_tune's values.
_SWITCH = {"auto": "auto", "on": True, "off": False, True: True,
           False: False}
_PRECISION = {None: None, "float16": "mixed_float16",
              "bfloat16": "mixed_bfloat16"}


def _count(value, name, low, none=False):
    ok = (value is None and none) or (
        isinstance(value, numbers.Integral) and not isinstance(value, bool)
        and value >= low)
    if not ok:
        raise KerastlError(f"{name}={value!r}: expected an integer >= {low}"
                           + (" or None." if none else "."))


def _check_optimizer(value, name):
    if value is None or isinstance(value, (str, dict,
                                           keras.optimizers.Optimizer)):
        return
    raise KerastlError(f"{name}={value!r}: expected a Keras optimizer or its "
                       "name.")


def make_optimizer(optimizer, default_rate):
    """A Keras optimizer from a plan's ``optimizer`` value: an optimizer
    (used as given), a name or a config dict (made now), or None
    (``Adam(default_rate)``)."""
    if optimizer is None:
        return keras.optimizers.Adam(default_rate)
    if isinstance(optimizer, (str, dict)):
        try:
            return keras.optimizers.get(optimizer)
        except (ValueError, TypeError):
            name = optimizer.get("class_name") if isinstance(
                optimizer, dict) else optimizer
            raise KerastlError(
                f"Unknown optimizer {name!r}; use a Keras optimizer "
                "(keras.optimizers.AdamW(1e-4)) or a name such as 'adam', "
                "'adamw', 'sgd'.") from None
    return optimizer


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    """How :func:`kerastl.fine_tune` trains a model.

    Two phases: the *head phase* (``head_epochs > 0``) trains only the new
    heads, every backbone block frozen, with ``head_optimizer`` (a fresh
    head's gradients would otherwise disturb the pretrained blocks); the
    *main phase* trains what ``strategy`` says with ``optimizer`` and the
    ``multipliers``, for ``epochs``.

    Attributes:
        strategy: what trains in the main phase: ``"features"`` (only the
            head), ``"partial"`` (default: the first half of the
            backbone's blocks frozen, or up to ``freeze_up_to``),
            ``"full"`` (everything), or parameter-efficient tuning of the
            blocks after ``freeze_up_to`` (all of them by default):
            ``"lora"`` (LoRA factors beside frozen kernels, see
            :func:`kerastl.lora`), ``"bias"`` (biases only) or ``"norm"``
            (normalisation layers only).
        freeze_up_to: ``"partial"``, ``"lora"``, ``"bias"``, ``"norm"``:
            the last frozen block (a name) or the number of frozen leading
            blocks.
        lora_rank: ``"lora"``: the rank of the factors; None: the rank
            of the model's LoRA layers if it has some, else 8.
        lora_alpha: ``"lora"``: the update is scaled by
            ``lora_alpha / lora_rank``; None: by 1.
        lora_targets: ``"lora"``: which layers of a block get factors
            (``"auto"``, ``"all"``, ``"attention"``; see
            :func:`kerastl.peft.lora_targets`).
        bn: BatchNormalization of trainable pretrained blocks: ``"frozen"``
            (default, inference mode) or ``"train"`` (see
            :func:`kerastl.freeze`).
        multipliers: layer-wise learning-rate multipliers for the main
            phase (a dict by block, :class:`~kerastl.LayerDecay` or
            :class:`~kerastl.LRSpread`; see
            :class:`~kerastl.LayerwiseOptimizer`), or None: one rate.
        head_epochs: epochs of the head phase (0: none). Skipped for a
            backbone with random weights (``weights=None``): nothing
            pretrained to protect from a new head's first gradients.
            Such a backbone trained with ``strategy="full"`` also trains
            its BatchNorm (``bn="train"``) with momentum at most 0.9, so
            that the moving statistics reach the data's in a short run.
        epochs: epochs of the main phase.
        head_optimizer: the head phase's optimizer: a Keras optimizer
            (used as given), a name or a config dict; default
            ``Adam(1e-3)``.
        optimizer: the main phase's, the same way; default ``Adam(1e-5)``.
        patience: early stopping's patience in epochs, watching the
            validation loss and keeping the best weights (only with
            validation data); None: every epoch runs.
        batch_size: for array input (default: Keras' 32).
        seed: the batch order of array input: each epoch's order is drawn
            from ``(seed, epoch)`` alone, so it does not depend on the
            global random state and a resumed run sees the same order.
            None: Keras shuffles (global random state).
        augment: training-time augmentation of the images, in both phases
            (validation data and the model are never augmented): None or
            ``"none"``, ``"light"``, ``"strong"``, either with ``"+flip"``
            for photos whose left and right mean the same, or a Keras
            layer of your own (see :mod:`kerastl.augment`). Array data or a
            ``tf.data.Dataset`` of ``(images, labels)`` batches.
        boundary_cache: ``"auto"`` (default): run the frozen blocks once
            and train the rest on their output where that is valid;
            ``True``: require it; ``False``: never (see
            :mod:`kerastl.boundary`).
        mixed_precision: None (float32), ``"mixed_float16"`` or
            ``"mixed_bfloat16"``.
        jit_compile: ``"auto"``, True (XLA) or False.
        check_features: before training, refuse frozen blocks that give
            constant or non-finite features; after it, warn when
            validation accuracy stayed at chance.
        trainable: what trains, resolved for one model
            (:meth:`resolve` sets it); None until then.

    Example::

        plan = kerastl.TrainingPlan(strategy="partial", freeze_up_to="stage3",
                                    multipliers=kerastl.LayerDecay(0.7))
        kerastl.fine_tune(model, train, val, plan)
    """

    strategy: str = "partial"
    freeze_up_to: object = None
    lora_rank: object = None
    lora_alpha: object = None
    lora_targets: str = "auto"
    bn: str = "frozen"
    multipliers: object = None
    head_epochs: int = 10
    epochs: int = 10
    head_optimizer: object = None
    optimizer: object = None
    patience: object = 3
    batch_size: object = None
    seed: object = None
    augment: object = None
    boundary_cache: object = "auto"
    mixed_precision: object = None
    jit_compile: object = "auto"
    check_features: bool = True
    trainable: object = None

    def __post_init__(self):
        if self.strategy not in FINE_TUNING_STRATEGIES:
            raise KerastlError(
                f"strategy={self.strategy!r}: expected one of "
                f"{', '.join(FINE_TUNING_STRATEGIES)}.")
        if self.freeze_up_to is not None:
            if self.strategy not in CUT_STRATEGIES:
                raise KerastlError(
                    f"freeze_up_to applies to the strategies "
                    f"{', '.join(CUT_STRATEGIES)}, not {self.strategy!r}.")
            if isinstance(self.freeze_up_to, bool) or not isinstance(
                    self.freeze_up_to, (str, numbers.Integral)):
                raise KerastlError(
                    f"freeze_up_to={self.freeze_up_to!r}: expected a block "
                    "name or a number of leading blocks.")
        _count(self.lora_rank, "lora_rank", 1, none=True)
        if self.lora_alpha is not None and (
                isinstance(self.lora_alpha, bool) or not isinstance(
                    self.lora_alpha, numbers.Real) or self.lora_alpha <= 0):
            raise KerastlError(f"lora_alpha={self.lora_alpha!r}: expected a "
                               "positive number or None.")
        if self.lora_targets not in ("auto", "all", "attention"):
            raise KerastlError(f"lora_targets={self.lora_targets!r}: "
                               "expected 'auto', 'all' or 'attention'.")
        if self.bn not in BN_MODES:
            raise KerastlError(f"bn={self.bn!r}: expected 'frozen' or "
                               "'train'.")
        if self.multipliers is not None and not isinstance(
                self.multipliers, (dict, MultiplierRule)):
            raise KerastlError(
                f"multipliers={self.multipliers!r}: expected a dict {{block: "
                "multiplier}, kerastl.LayerDecay(...), kerastl.LRSpread(...) "
                "or None.")
        _count(self.head_epochs, "head_epochs", 0)
        _count(self.epochs, "epochs", 1)
        _count(self.patience, "patience", 0, none=True)
        _count(self.batch_size, "batch_size", 1, none=True)
        if self.seed is not None and (isinstance(self.seed, bool) or
                                      not isinstance(self.seed,
                                                     numbers.Integral)):
            raise KerastlError(f"seed={self.seed!r}: expected an integer or "
                               "None.")
        augment_lib.check(self.augment)
        _check_optimizer(self.optimizer, "optimizer")
        _check_optimizer(self.head_optimizer, "head_optimizer")
        if self.boundary_cache not in ("auto", True, False):
            raise KerastlError(f"boundary_cache={self.boundary_cache!r}: "
                               "expected 'auto', True or False.")
        if self.jit_compile not in ("auto", True, False):
            raise KerastlError(f"jit_compile={self.jit_compile!r}: expected "
                               "'auto', True or False.")
        if self.mixed_precision not in PRECISIONS:
            raise KerastlError(
                f"mixed_precision={self.mixed_precision!r}: expected None, "
                "'mixed_float16' (GPUs) or 'mixed_bfloat16' (TPUs, recent "
                "CPUs).")
        if not isinstance(self.check_features, bool):
            raise KerastlError(f"check_features={self.check_features!r}: "
                               "expected True or False.")
        if self.trainable is not None and not isinstance(
                self.trainable, freezing.Trainable):
            raise KerastlError(
                f"trainable={self.trainable!r}: set by TrainingPlan.resolve"
                "(model); leave it out.")

    @classmethod
    def fields(cls):
        """The names a plan (and ``fine_tune``) takes."""
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **changes):
        """A copy with ``changes``; what trains is resolved again (by
        :meth:`resolve`) unless ``trainable`` is among them."""
        unknown = sorted(set(changes) - set(self.fields()))
        if unknown:
            raise TypeError(
                f"unexpected keyword argument(s) {', '.join(unknown)}; a "
                f"TrainingPlan takes {', '.join(self.fields())}.")
        changes.setdefault("trainable", None)
        return dataclasses.replace(self, **changes)

    def resolve(self, model):
        """This plan with :attr:`trainable` resolved for ``model``: the
        one call to :func:`kerastl.freezing.resolve_trainable` for it.

        Raises:
            BlockError: ``freeze_up_to`` names no block of the model, or
                counts out of range.
        """
        trainable = freezing.resolve_trainable(
            model, self.strategy, self.freeze_up_to, name="freeze_up_to")
        return dataclasses.replace(self, trainable=trainable)

    @property
    def request(self):
        """What the user asked to train, as given (before resolution):
        ``strategy``, ``freeze_up_to``, ``bn`` and ``multipliers``."""
        return {"strategy": self.strategy, "freeze_up_to": self.freeze_up_to,
                "bn": self.bn, "multipliers": self.multipliers}

    def optimizers(self, model):
        """``(head optimizer or None, main optimizer)``, made in the model's
        distribution scope (mirrored state on several devices)."""
        with strategy_scope(model):
            main = make_optimizer(self.optimizer, 1e-5)
            head = make_optimizer(self.head_optimizer, 1e-3) \
                if self.head_epochs else None
        return head, main

    @classmethod
    def from_experiment(cls, experiment):
        """The plan of a checked experiment (:func:`kerastl.schema.resolve`):
        what ``kerastl finetune`` and an experiment YAML train with.

        The experiment has no head phase; its ``optimizer`` and
        ``learning_rate`` make the main phase's optimizer, ``layer_decay``
        its multipliers, ``early_stopping`` the patience.
        """
        e = experiment
        optimizer = {"class_name": e["optimizer"],
                     "config": {"learning_rate": e["learning_rate"]}}
        try:
            make_optimizer(optimizer, None)
        except KerastlError:
            raise ConfigError(
                f"Unknown optimizer {e['optimizer']!r} (--optimizer); use a "
                "Keras optimizer name such as adam, adamw, sgd.") from None
        return cls(
            strategy=e["strategy"], freeze_up_to=e["freeze_up_to"],
            lora_rank=e["lora_rank"], bn=e["bn"], head_epochs=0, epochs=e["epochs"],
            optimizer=optimizer,
            multipliers=None if e["layer_decay"] is None
            else LayerDecay(e["layer_decay"]),
            patience=e["early_stopping"], augment=e["augment"],
            boundary_cache=_SWITCH[e["boundary_cache"]],
            mixed_precision=_PRECISION[e["mixed_precision"]],
            jit_compile=_SWITCH[e["jit"]])
