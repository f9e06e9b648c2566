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
import math
import numbers

import keras

from kerastl import augment as augment_lib
from kerastl import freezing
from kerastl.distribute import strategy_scope
from kerastl.errors import ConfigError, KerastlError
from kerastl.layerwise import LayerDecay, MultiplierRule
from kerastl.spec import (BN_MODES, CUT_STRATEGIES, FINE_TUNING_STRATEGIES,
                          PRECISIONS, SCHEDULES, default_strategy)

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


# A phase without an explicit number of epochs trains DEFAULT_EPOCHS,
# raised until it has min_steps optimizer steps and lowered until it has at
# most max_steps (the head phase: a third of each).
DEFAULT_EPOCHS = 10
HEAD_RATE = 1e-3  # the head phase's rate (the new head only)
WARMUP = 0.1  # share of a phase's steps that warm its rate up from 0
# Variables that decoupled weight decay leaves alone: biases and the scale
# and offset of normalisation layers.
NO_DECAY = ("bias", "gamma", "beta")


# Under the step budget, an epoch of small data repeats it until the epoch
# has at least EPOCH_STEPS optimizer steps, so that validation, early
# stopping and checkpoints run every EPOCH_STEPS steps or more, not every
# few: 100 images train 15 epochs of 20 steps, not 75 epochs of 4 (whose 75
# validation passes took about as long as the training).
EPOCH_STEPS = 20


def phase_budget(epochs, batches, min_steps, max_steps, repeat=True):
    """``(epochs, passes per epoch)`` of a phase on data of ``batches``
    steps per pass (None: unknown): ``(epochs, 1)`` when ``epochs`` is
    given (an epoch is one pass, as in Keras); else the :func:`phase_epochs`
    passes in epochs of enough passes for :data:`EPOCH_STEPS` steps each
    (one pass each for data of unknown length or, ``repeat=False``, that
    cannot be repeated), never more than ``max_steps`` in all."""
    total = phase_epochs(epochs, batches, min_steps, max_steps)
    if epochs is not None or not batches or not repeat:
        return total, 1
    passes = min(total, max(1, math.ceil(EPOCH_STEPS / batches)))
    n = -(-total // passes)  # rounded up: at least min_steps
    if n * passes * batches > max_steps:
        n = max(1, max_steps // (passes * batches))
    return n, passes


def phase_epochs(epochs, batches, min_steps, max_steps):
    """Passes over the data in a phase: ``epochs`` when given; else
    :data:`DEFAULT_EPOCHS`, raised until the phase has ``min_steps`` steps
    of ``batches`` per pass and lowered until it has at most
    ``max_steps`` (``batches`` None, data of unknown length: the default).
    :func:`phase_budget` groups them into epochs.
    """
    if epochs is not None:
        return epochs
    if not batches:
        return DEFAULT_EPOCHS
    return int(min(max(DEFAULT_EPOCHS, math.ceil(min_steps / batches)),
                   max(1, max_steps // batches)))


def cosine(rate, steps, warmup=WARMUP):
    """Keras's ``CosineDecay`` with linear warmup: 0 to ``rate`` over the
    first ``warmup`` of ``steps``, then a half cosine to 0 at the last."""
    warm = max(1, int(warmup * steps)) if steps > 1 else 0
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warm else rate, max(1, steps - warm),
        warmup_target=rate if warm else None, warmup_steps=warm)


def make_optimizer(optimizer, default_rate, steps=None, schedule="constant",
                   weight_decay=0.0):
    """A Keras optimizer from a plan's ``optimizer`` value: an optimizer
    (used as given, its schedule its own), a name or a config dict (made
    now), or None (``AdamW(default_rate, weight_decay)`` without decay on
    biases and normalisation layers, or ``Adam`` when ``weight_decay`` is
    0). With ``schedule="cosine"`` and the phase's ``steps``, the rate of an
    optimizer made here follows :func:`cosine`."""
    scheduled = schedule == "cosine" and bool(steps)

    def rate(value):
        return cosine(value, steps) if scheduled else value
    if optimizer is None:
        if not weight_decay:
            return keras.optimizers.Adam(rate(default_rate))
        made = keras.optimizers.AdamW(rate(default_rate),
                                      weight_decay=weight_decay)
        made.exclude_from_weight_decay(var_names=list(NO_DECAY))
        return made
    if not isinstance(optimizer, (str, dict)):
        return optimizer
    try:
        made = keras.optimizers.get(optimizer)
    except (ValueError, TypeError):
        name = optimizer.get("class_name") if isinstance(
            optimizer, dict) else optimizer
        raise KerastlError(
            f"Unknown optimizer {name!r}; use a Keras optimizer "
            "(keras.optimizers.AdamW(1e-4)) or a name such as 'adam', "
            "'adamw', 'sgd'.") from None
    if scheduled:
        value = float(keras.ops.convert_to_numpy(made.learning_rate))
        made = type(made)(**dict(made.get_config(),
                                 learning_rate=rate(value)))
    return made


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    """How :func:`kerastl.fine_tune` trains a model.

    Two phases: the *head phase* (``head_epochs > 0``) trains only the new
    heads, every backbone block frozen, with ``head_optimizer`` (a fresh
    head's gradients would otherwise disturb the pretrained blocks); the
    *main phase* trains what ``strategy`` says with ``optimizer`` and the
    ``multipliers``, for ``epochs``.

    Attributes:
        strategy: what trains in the main phase: ``"full"`` (everything;
            the default, or ``"partial"`` when ``freeze_up_to`` is given),
            ``"features"`` (only the head), ``"partial"``
            (the first half of the backbone's blocks frozen, or up to
            ``freeze_up_to``), or parameter-efficient tuning of the
            blocks after ``freeze_up_to`` (all of them by default):
            ``"lora"`` (LoRA factors beside frozen kernels, see
            :func:`kerastl.lora`), ``"bias"`` (biases only) or ``"norm"``
            (normalisation layers only). ``"full"`` measured best in the
            recipes benchmark (``benchmarks/recipes.py``).
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
        head_epochs: epochs of the head phase (0: none); None (default):
            the step budget with a third of ``min_steps`` and
            ``max_steps``. Skipped for a backbone with random weights
            (``weights=None``): nothing pretrained to protect from a new
            head's first gradients. Such a backbone trained with
            ``strategy="full"`` also trains its BatchNorm (``bn="train"``)
            with momentum at most 0.9, so that the moving statistics reach
            the data's in a short run.
        epochs: epochs of the main phase; None (default): the step budget,
            10 passes over the data raised until the phase takes
            ``min_steps`` optimizer steps (a folder of 180 images trains
            300 steps, not 60) and lowered until it takes at most
            ``max_steps`` (data of unknown length: 10 epochs). Under the
            budget, an epoch of small data repeats it until the epoch has
            at least 20 steps (:data:`~kerastl.plan.EPOCH_STEPS`): 100
            images train 15 epochs of 20 steps, so validation, early
            stopping (``patience`` counts these epochs) and checkpoints run
            every 20 steps, not every 4.
        min_steps, max_steps: the main phase's step budget (see
            ``epochs``); 300 and 3,000 by default.
        head_optimizer: the head phase's optimizer: a Keras optimizer
            (used as given), a name or a config dict; default ``Adam``
            at a constant 1e-3.
        optimizer: the main phase's, the same way; default ``Adam`` at
            ``learning_rate`` (``AdamW`` with ``weight_decay``), following
            ``schedule``. An optimizer object keeps its own rate and
            schedule; a name or config dict gets ``schedule``.
        learning_rate: the main phase's peak rate (default 3e-3).
        schedule: ``"cosine"`` (default): the main phase's rate rises
            linearly from 0 over its first 10% of steps, then falls along a
            half cosine to 0 at its last step (Keras's ``CosineDecay`` with
            ``warmup_steps``); ``"constant"``: one rate throughout.
        weight_decay: decoupled weight decay (``AdamW``) of the default
            optimizers, biases and normalisation layers excluded; 0
            (default): ``Adam``.
        patience: early stopping's patience in epochs, watching the
            validation loss and keeping the best weights (only with
            validation data; under the cosine schedule from the second
            half of each phase on); None: every epoch runs.
        batch_size: for array input (default: Keras' 32).
        seed: the batch order of array input: each pass's order is drawn
            from ``(seed, pass)`` alone, so it does not depend on the
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

    strategy: object = None
    freeze_up_to: object = None
    lora_rank: object = None
    lora_alpha: object = None
    lora_targets: str = "auto"
    bn: str = "frozen"
    multipliers: object = None
    head_epochs: object = None
    epochs: object = None
    min_steps: int = 300
    max_steps: int = 3000
    head_optimizer: object = None
    optimizer: object = None
    learning_rate: float = 3e-3
    schedule: str = "cosine"
    weight_decay: float = 0.0
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
        if self.strategy is None:
            object.__setattr__(self, "strategy",
                               default_strategy(self.freeze_up_to))
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
        _count(self.head_epochs, "head_epochs", 0, none=True)
        _count(self.epochs, "epochs", 1, none=True)
        _count(self.min_steps, "min_steps", 0)
        _count(self.max_steps, "max_steps", 1)
        if self.max_steps < self.min_steps:
            raise KerastlError(
                f"max_steps={self.max_steps} is below min_steps="
                f"{self.min_steps}: raise max_steps or lower min_steps.")
        for name in ("learning_rate", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(
                    value, numbers.Real) or value < 0 or (
                    name == "learning_rate" and value == 0):
                raise KerastlError(
                    f"{name}={value!r}: expected a "
                    + ("positive number." if name == "learning_rate" else
                       "number >= 0 (0: no weight decay)."))
        if self.schedule not in SCHEDULES:
            raise KerastlError(f"schedule={self.schedule!r}: expected "
                               f"{' or '.join(map(repr, SCHEDULES))}.")
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

    def budget(self, batches, head=False, repeat=True):
        """``(epochs, passes per epoch)`` of the main (or head) phase on
        data of ``batches`` steps per pass (None: unknown; ``repeat=False``,
        data that cannot be repeated): see :func:`phase_budget`, the head
        phase with a third of the steps. :meth:`phase_epochs` and
        :meth:`epoch_passes` are its two parts."""
        if head:
            return phase_budget(self.head_epochs, batches,
                                self.min_steps // 3, self.max_steps // 3,
                                repeat)
        return phase_budget(self.epochs, batches, self.min_steps,
                            self.max_steps, repeat)

    def phase_epochs(self, batches, head=False, repeat=True):
        """The epochs of the main (or head) phase on data of ``batches``
        steps per pass (None: unknown): :attr:`epochs` (or
        :attr:`head_epochs`) when set, else the step budget (see
        :func:`phase_budget`; the head phase gets a third of the steps) in
        epochs of :meth:`epoch_passes` passes each (``repeat=False``, data
        that cannot be repeated: one pass each)."""
        return self.budget(batches, head, repeat)[0]

    def epoch_passes(self, batches, head=False, repeat=True):
        """Passes over data of ``batches`` steps in one epoch of the main
        (or head) phase: 1 when its epochs are given (or ``repeat`` is
        False), else enough for :data:`EPOCH_STEPS` steps (see
        :func:`phase_budget`)."""
        return self.budget(batches, head, repeat)[1]

    def optimizers(self, model, head_steps=None, steps=None):
        """``(head optimizer or None, main optimizer)`` for phases of
        ``head_steps`` and ``steps`` optimizer steps (their schedules' length;
        None: not known yet, no schedule), made in the model's distribution
        scope (mirrored state on several devices)."""
        with strategy_scope(model):
            main = make_optimizer(self.optimizer, self.learning_rate, steps,
                                  self.schedule, self.weight_decay)
            # (The head phase at one rate: what the recipes benchmark
            # measured; a new head on frozen features needs no warmup.)
            head = make_optimizer(self.head_optimizer, HEAD_RATE,
                                  head_steps, "constant",
                                  self.weight_decay) \
                if self.head_epochs != 0 else None
        return head, main

    @classmethod
    def from_experiment(cls, experiment):
        """The plan of a checked experiment (:func:`kerastl.schema.resolve`):
        what ``kerastl finetune`` and an experiment YAML train with.

        Its ``optimizer`` and ``learning_rate`` make the main phase's
        optimizer, ``layer_decay`` its multipliers, ``early_stopping`` the
        patience; the head phase is ``fine_tune``'s.
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
            lora_rank=e["lora_rank"], bn=e["bn"],
            head_epochs=e["head_epochs"],
            epochs=e["epochs"], min_steps=e["min_steps"],
            max_steps=e["max_steps"], optimizer=optimizer,
            schedule=e["schedule"],
            multipliers=None if e["layer_decay"] is None
            else LayerDecay(e["layer_decay"]),
            patience=e["early_stopping"], augment=e["augment"],
            boundary_cache=_SWITCH[e["boundary_cache"]],
            mixed_precision=_PRECISION[e["mixed_precision"]],
            jit_compile=_SWITCH[e["jit"]])
