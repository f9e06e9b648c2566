"""Layer-wise learning-rate multipliers, right for every Keras optimizer.

"Freeze the first blocks, then let the learning rate grow block by block
towards the head" is the standard fine-tuning advice. The usual Keras
workaround, scaling gradients, is wrong for adaptive optimizers: Adam, RMSprop
and Lion are invariant to the scale of the gradient, so a block whose
gradients are multiplied by 0.1 moves exactly as fast as before.

:class:`LayerwiseOptimizer` wraps one optimizer and gives every variable an
effective learning rate of ``multiplier x the optimizer's current learning
rate``: the wrapped optimizer's own update rule runs with that rate, so
momentum, Adam's moments and its bias correction are those of a plain
optimizer with the smaller rate. Learning-rate schedules and callbacks that
change the rate (``ReduceLROnPlateau``, ``LearningRateScheduler``) act on the
base rate and so on every block. Decoupled weight decay (AdamW, Lion,
``weight_decay=``) scales with the effective rate, as it does for a plain
optimizer with that rate.

Multipliers are given per block of the model's block map (see
:func:`kerastl.block_map`): an explicit mapping, :class:`LayerDecay` or
:class:`LRSpread`. A multiplier of 0 freezes the block (``trainable = False``,
no gradient is computed for it).
"""

import math
import numbers
import re

import keras
from keras import ops

from kerastl import _keras_private as _private
from kerastl.blocks import block_map
from kerastl.errors import BlockError, KerastlError
from kerastl.freezing import (freeze_weights, keras_model_of,
                              trainable_summary)

__all__ = ["LayerwiseOptimizer", "LayerDecay", "LRSpread",
           "describe_learning_rates", "resolve_multipliers"]


def _check_multiplier(value, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise KerastlError(
            f"Learning-rate multiplier for {what} is {value!r}: expected a "
            f"number >= 0 (0 freezes the block).")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise KerastlError(
            f"Learning-rate multiplier for {what} is {value}: multipliers "
            f"must be finite and >= 0 (0 freezes the block).")
    return value


class MultiplierRule:
    """Base of the rules that give one learning-rate multiplier per block
    (not to be confused with :class:`kerastl.spec.BlockRule`, which says
    which layers a block owns)."""

    def per_block(self, names):
        raise NotImplementedError

    def __eq__(self, other):
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self):
        return hash((type(self).__name__, repr(self)))


class LayerDecay(MultiplierRule):
    """Geometric layer decay, as in BEiT and timm: ``decay ** depth``.

    The last block (the head of a classifier) gets ``top``, the block below
    ``top * decay``, the one below that ``top * decay**2``, and so on.

    Args:
        decay: the ratio between the rates of neighbouring blocks, in (0, 1].
        top: the multiplier of the last block.
        shared: blocks that share the rate of the block above them rather
            than taking a rung of their own. ``shared=("top",)`` on a
            transformer classifier is the BEiT / MAE / timm schedule: the
            final norm (``top``) and the head learn at ``top``, encoder
            layer ``i`` of ``N`` at ``top * decay ** (N - i)`` (``layer0``
            at ``decay ** N``), the embeddings at ``decay ** (N + 1)``.

    Example::

        opt = kerastl.LayerwiseOptimizer(keras.optimizers.AdamW(1e-3),
                                         kerastl.LayerDecay(0.7), model)
        # A ViT / DINOv2 classifier, BEiT's schedule:
        kerastl.LayerDecay(0.75, shared=("top",))
    """

    def __init__(self, decay, top=1.0, shared=()):
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real) \
                or not 0 < decay <= 1:
            raise KerastlError(
                f"LayerDecay({decay!r}): the decay must be a number in "
                f"(0, 1], e.g. 0.75.")
        self.decay = float(decay)
        self.top = _check_multiplier(top, "the top block")
        if isinstance(shared, str):
            shared = (shared,)
        if shared is not None and (not isinstance(shared, (list, tuple)) or
                                   not all(isinstance(b, str)
                                           for b in shared)):
            raise KerastlError(
                f"LayerDecay(shared={shared!r}): expected a block name or a "
                "list of block names (the blocks that share the top "
                "block's rate).")
        self.shared = tuple(shared or ())

    def per_block(self, names):
        unknown = [b for b in self.shared if b not in names]
        if unknown:
            raise KerastlError(
                f"LayerDecay(shared={self.shared!r}): the model has no block "
                f"{unknown[0]!r}; its blocks are {', '.join(names)}.")
        rungs = [0] * len(names)
        for i in range(len(names) - 2, -1, -1):
            rungs[i] = rungs[i + 1] + (names[i] not in self.shared)
        return {b: self.top * self.decay ** r for b, r in zip(names, rungs)}

    def __repr__(self):
        shared = f", shared={self.shared}" if self.shared else ""
        return f"LayerDecay({self.decay}, top={self.top}{shared})"


class LRSpread(MultiplierRule):
    """Multipliers spread geometrically from ``lo`` (first block) to ``hi``.

    fastai's ``slice(lo, hi)``: the first block gets ``lo``, the last ``hi``,
    and the blocks between are evenly spaced on a log scale.

    Example::

        kerastl.LRSpread(0.01, 1.0)  # the stem learns 100x slower
    """

    def __init__(self, lo, hi=1.0):
        lo = _check_multiplier(lo, "LRSpread lo")
        hi = _check_multiplier(hi, "LRSpread hi")
        if lo == 0 or hi == 0 or lo > hi:
            raise KerastlError(
                f"LRSpread({lo}, {hi}): expected 0 < lo <= hi (a geometric "
                f"spread cannot start or end at 0; freeze blocks instead).")
        self.lo, self.hi = lo, hi

    def per_block(self, names):
        n = len(names)
        if n == 1:
            return {names[0]: self.hi}
        ratio = self.hi / self.lo
        return {b: self.lo * ratio ** (i / (n - 1))
                for i, b in enumerate(names)}

    def __repr__(self):
        return f"LRSpread({self.lo}, {self.hi})"


def resolve_multipliers(model, multipliers, default=1.0, by="layer"):
    """Resolves a multiplier spec to ``{layer name: multiplier}``.

    Args:
        model: a ``keras.Model`` or :class:`~kerastl.Backbone`.
        multipliers: a :class:`LayerDecay` or :class:`LRSpread` rule, or a
            mapping whose keys are block names, block indices (negative
            counts from the top) or regular expressions matched against layer
            names (``re.match``, as in zoo configs). A block key sets every
            layer of the block; a regex key then overrides the layers it
            matches.
        default: the multiplier of blocks the mapping does not mention.
        by: ``"layer"`` or ``"variable"``.

    Returns:
        ``{layer name: multiplier}`` for every layer that owns weights or,
        with ``by="variable"``, ``{variable path: multiplier}`` for every
        weight: the form that is exact for a layer whose variables lie in
        several blocks (a :class:`~kerastl.HubLayer` under a variable-path
        block map; by layer, such a layer shows the multiplier of its last
        block).

    Raises:
        BlockError: a key is neither a block nor matches a layer (the message
            lists the blocks).
        KerastlError: a multiplier is negative or not a number.
    """
    bm = block_map(keras_model_of(model))
    default = _check_multiplier(default, "default")
    per_block = {b: default for b in bm.names}
    layer_rules = []
    if isinstance(multipliers, MultiplierRule):
        per_block.update(multipliers.per_block(bm.names))
    elif isinstance(multipliers, dict):
        layer_names = [l.name for l in bm.weighted_layers()]
        for key, value in multipliers.items():
            value = _check_multiplier(value, repr(key))
            if isinstance(key, int) and not isinstance(key, bool):
                per_block[bm.resolve(key)] = value
            elif isinstance(key, str) and key in bm:
                per_block[key] = value
            elif isinstance(key, str):
                try:
                    pattern = re.compile(key)
                except re.error:
                    pattern = None
                if pattern is None or not any(
                        pattern.match(n) for n in layer_names):
                    bm.resolve(key)  # raises a BlockError listing the blocks
                layer_rules.append((pattern, value))
            else:
                raise BlockError(
                    f"Multiplier key {key!r}: expected a block name, a block "
                    f"index or a layer-name regex. The blocks are: "
                    f"{', '.join(bm.names)}.")
    else:
        raise KerastlError(
            f"multipliers={multipliers!r}: expected a dict "
            f"{{block or layer regex: multiplier}}, kerastl.LayerDecay(...) "
            f"or kerastl.LRSpread(...).")
    if by not in ("layer", "variable"):
        raise KerastlError(f"by={by!r}: expected 'layer' or 'variable'.")

    def rate(layer, block):
        m = per_block[block]
        for pattern, value in layer_rules:
            if pattern.match(layer.name):
                m = value
        return m

    out = {}
    for layer in bm.weighted_layers():
        if by == "layer":
            out[layer.name] = rate(layer, bm.block_of(layer))
            continue
        for v in layer.weights:
            out.setdefault(v.path, rate(layer, bm.block_of(v)))
    return out


def _unwrap(optimizer):
    """The LayerwiseOptimizer inside (LossScaleOptimizer), or ``None``."""
    while optimizer is not None:
        if isinstance(optimizer, LayerwiseOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return None


def _group(items, multipliers):
    """Groups ``items`` (index-aligned with ``multipliers``) by multiplier."""
    groups = {}
    for item, m in zip(items, multipliers):
        groups.setdefault(m, []).append(item)
    return groups


@keras.saving.register_keras_serializable(package="kerastl")
class LayerwiseOptimizer(keras.optimizers.Optimizer):
    """One optimizer, a learning-rate multiplier per block.

    Wraps any Keras 3 optimizer (SGD, Adam, AdamW, RMSprop, Lion, ...). The
    effective learning rate of a variable is ``multiplier x`` the wrapped
    optimizer's current learning rate (schedules and ``ReduceLROnPlateau``
    included); decoupled weight decay scales the same way. The wrapped
    optimizer's update rule runs with the scaled rate, which is what makes
    the multiplier right for Adam, where scaling the gradient does nothing.

    Build it after freezing (a multiplier of 0 freezes its block) and before
    ``compile``::

        opt = kerastl.LayerwiseOptimizer(
            keras.optimizers.Adam(1e-3),
            {"stage3": 0.1, "stage4": 0.3, "head": 1.0}, model)
        model.compile(opt, "sparse_categorical_crossentropy")

    Multipliers are stored per variable path, so ``get_config`` round-trips
    and a model saved to ``.keras`` trains on with the same multipliers after
    ``keras.models.load_model``. LoRA factors added after the optimizer was
    made (``kerastl.lora``) get their layer's multiplier; any other
    variable the table does not know (a layer added since, or another
    model's) is refused when training starts: make the optimizer after
    the model's last change.

    Works with ``jit_compile=True``, inside the ``LossScaleOptimizer`` of
    ``mixed_float16`` and under ``tf.distribute`` strategies, on the
    TensorFlow and JAX backends. (Keras's PyTorch optimizers update all
    variables in one fused call, which a per-variable rate cannot enter:
    the PyTorch backend is refused with a clear error.)

    Args:
        optimizer: the Keras optimizer to wrap (an instance, or a name such
            as ``"adam"``).
        multipliers: a dict ``{block name | block index | layer regex:
            multiplier}``, :class:`LayerDecay` or :class:`LRSpread`.
        model: the model (or :class:`~kerastl.Backbone`) whose block map the
            multipliers refer to.
        default: the multiplier of blocks a dict does not mention.
        name: the optimizer's name.
    """

    def __init__(self, optimizer, multipliers=None, model=None, default=1.0,
                 name=None, variable_multipliers=None, **kwargs):
        if kwargs:
            raise KerastlError(
                f"LayerwiseOptimizer does not take "
                f"{', '.join(sorted(kwargs))}: set them on the wrapped "
                f"optimizer.")
        if isinstance(optimizer, str):
            try:
                optimizer = keras.optimizers.get(optimizer)
            except ValueError:
                raise KerastlError(
                    f"LayerwiseOptimizer({optimizer!r}): Keras has no "
                    "optimizer of that name; pass one such as 'adam', "
                    "'adamw', 'sgd', or an instance (keras.optimizers."
                    "Adam(1e-3)).") from None
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise KerastlError(
                f"LayerwiseOptimizer wraps a Keras optimizer (an instance of "
                f"keras.optimizers.Optimizer, e.g. keras.optimizers.Adam(1e-3))"
                f"; got {type(optimizer).__name__}: {optimizer!r}.")
        if isinstance(optimizer, (LayerwiseOptimizer,
                                  keras.optimizers.LossScaleOptimizer)):
            raise KerastlError(
                f"Wrap the plain optimizer, not a {type(optimizer).__name__}: "
                f"Keras adds the LossScaleOptimizer itself under "
                f"mixed_float16.")
        if optimizer.built:
            raise KerastlError(
                "The optimizer to wrap is already built (it has been used); "
                "pass a fresh one, e.g. optimizer.from_config("
                "optimizer.get_config()).")
        if keras.backend.backend() not in ("tensorflow", "jax"):
            raise KerastlError(
                f"LayerwiseOptimizer supports the TensorFlow and JAX Keras "
                f"backends, not {keras.backend.backend()!r}: Keras's "
                f"{keras.backend.backend()} optimizers update every variable "
                f"in one fused call. Set KERAS_BACKEND=tensorflow or jax.")
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = optimizer
        self.default = _check_multiplier(default, "default")
        if variable_multipliers is not None:  # from get_config
            if multipliers is not None or model is not None:
                raise KerastlError(
                    "Pass either multipliers and model, or "
                    "variable_multipliers, not both.")
            table = {str(p): _check_multiplier(m, p)
                     for p, m in dict(variable_multipliers).items()}
        else:
            if model is None:
                raise KerastlError(
                    "LayerwiseOptimizer needs the model its multipliers refer "
                    "to: LayerwiseOptimizer(optimizer, multipliers, model).")
            if multipliers is None:
                multipliers = {}
            keras_model = keras_model_of(model)
            table = resolve_multipliers(keras_model, multipliers,
                                        default=self.default, by="variable")
            # A multiplier of 0 freezes, through the one place that changes
            # trainability (so BatchNorm in inference mode, as freeze()).
            freeze_weights(keras_model, [
                v for v in keras_model.weights if table.get(v.path) == 0])
        self._table = {_stable_path(p): m for p, m in table.items()}
        self._multipliers = []  # aligned with the inner optimizer's variables
        self._hook(optimizer)

    # -- the mechanism ------------------------------------------------------

    def _hook(self, inner):
        """Routes the inner optimizer's updates through the multipliers.

        Every Keras optimizer updates one variable at a time in
        ``update_step(gradient, variable, learning_rate)``; the wrapper gives
        it ``learning_rate * multiplier``. Decoupled weight decay is applied
        in ``_apply_weight_decay(variables)`` from the current learning rate
        (``_get_current_learning_rate()``): it runs once per group of
        variables with equal multipliers, with that rate scaled. Both are
        wrapped on the inner instance, and the lookups happen while the step
        is traced: the compiled step only has one extra multiply per variable.
        """
        # The multiplier of the weight-decay group being applied. Under a
        # MirroredStrategy every replica thread runs the same groups in the
        # same order and writes the same values here, and TensorFlow's
        # weight decay reads the rate inside a merge_call that waits for all
        # replicas, so a shared value (written, never deleted) is safe.
        self._decay_multiplier = 1.0

        def multiplier_of(variable):
            return self._multipliers[_private.variable_index(inner, variable)]

        def wrap_update_step(update_step):
            def update_step_fn(gradient, variable, learning_rate):
                m = multiplier_of(variable)
                if m != 1.0:
                    learning_rate = ops.multiply(learning_rate, m)
                return update_step(gradient, variable, learning_rate)
            return update_step_fn

        def wrap_current_rate(current_rate):
            def current_rate_fn():
                m = self._decay_multiplier
                return current_rate() if m == 1.0 else ops.multiply(
                    current_rate(), m)
            return current_rate_fn

        def wrap_weight_decay(apply_weight_decay):
            def apply_weight_decay_fn(variables):
                variables = list(variables)
                ms = [multiplier_of(v) for v in variables]
                try:
                    for m, group in _group(variables, ms).items():
                        self._decay_multiplier = m
                        apply_weight_decay(group)
                finally:
                    self._decay_multiplier = 1.0
            return apply_weight_decay_fn

        _private.hook_optimizer(inner, wrap_update_step, wrap_weight_decay,
                                wrap_current_rate)

    def multiplier(self, variable):
        """The multiplier of one variable (by its path)."""
        path = _stable_path(
            variable if isinstance(variable, str) else variable.path)
        if path in self._table:
            return self._table[path]
        # After load_model, variables of nested models lose their outer
        # prefix ("inner/dense/kernel" becomes "dense/kernel").
        found = {m for p, m in self._table.items() if p.endswith("/" + path)}
        if not found and _is_lora_factor(path):
            found = self._layer_multipliers(path)
        if len(found) > 1:
            raise KerastlError(
                f"Variable {path!r} matches several entries of the "
                f"multiplier table with different multipliers "
                f"({sorted(found)}); give the nested models' layers unique "
                f"names.")
        return found.pop() if found else self.default

    def _known(self, path):
        path = _stable_path(path)
        return path in self._table or any(
            p.endswith("/" + path) for p in self._table) or (
            _is_lora_factor(path) and bool(self._layer_multipliers(path)))

    def _layer_multipliers(self, path):
        """The multipliers of the table's entries in the layer of
        ``path`` (a LoRA factor added after the optimizer was made belongs
        to its layer's block, as its kernel does)."""
        layer = path.rsplit("/", 1)[0]
        return {m for p, m in self._table.items()
                if p.rsplit("/", 1)[0] == layer
                or p.rsplit("/", 1)[0].endswith("/" + layer)}

    def build(self, var_list):
        var_list = list(var_list)
        unknown = [v.path for v in var_list if not self._known(v.path)] \
            if self._table else []
        if unknown:
            # Every variable must be in the table: a model that merely
            # shares some layer names (two kerastl classifiers share their
            # head's) would otherwise train the rest at 1.0 without a word.
            raise KerastlError(
                f"This LayerwiseOptimizer was made for another model, or "
                f"before layers were added to this one: {len(unknown)} of "
                f"the {len(var_list)} variables it is asked to train are "
                f"not in its multiplier table (e.g. "
                f"{', '.join(unknown[:3])}). Make it after the model's last "
                "change: LayerwiseOptimizer(optimizer, multipliers, model) "
                "with the model you compile it into.")
        self._multipliers = [self.multiplier(v) for v in var_list]
        self.inner_optimizer.build(var_list)
        self.built = True

    def apply(self, grads, trainable_variables=None):
        if not self.built and trainable_variables is not None:
            self.build(trainable_variables)
        return self.inner_optimizer.apply(grads, trainable_variables)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        return self.inner_optimizer.stateless_apply(
            optimizer_variables, grads, trainable_variables)

    # -- delegation to the wrapped optimizer ---------------------------------

    @property
    def variables(self):
        return self.inner_optimizer.variables

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        if "inner_optimizer" in self.__dict__:
            self.inner_optimizer.learning_rate = learning_rate
        else:  # the base constructor sets a placeholder
            keras.optimizers.Optimizer.learning_rate.fset(self, learning_rate)

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    @property
    def use_ema(self):
        inner = self.__dict__.get("inner_optimizer")
        return inner.use_ema if inner is not None else False

    @use_ema.setter
    def use_ema(self, value):
        if value:
            raise KerastlError("Set use_ema on the wrapped optimizer.")

    @property
    def multipliers(self):
        """``{variable path: multiplier}``, as stored in the config."""
        return dict(self._table)

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(
                self.inner_optimizer),
            "default": self.default,
            "variable_multipliers": dict(self._table),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)


def _is_lora_factor(path):
    """Whether ``path`` names a factor Keras's ``enable_lora`` adds
    (``lora_kernel_a``, ``lora_embeddings_b``, ...)."""
    return path.rsplit("/", 1)[-1].startswith("lora_")


def _stable_path(path):
    """A variable path that is the same in every process: a variable created
    without a name is called ``variable_<n>``, ``n`` counting every unnamed
    variable made so far (SigLIP's pooling probe is one), so the number
    changes when the model is loaded again. Unnamed variables of one layer
    share its block, hence its multiplier."""
    return _AUTO_NAMED.sub("/variable", path)


_AUTO_NAMED = re.compile(r"/variable_\d+$")


class LearningRateTable(list):
    """Rows of :func:`describe_learning_rates`; ``print()`` shows a table."""

    def __str__(self):
        head = (f"{'block':<14}{'state':<11}{'multiplier':>14}"
                f"{'learning rate':>16}")
        lines = [head, "-" * len(head)]
        for r in self:
            lo, hi = r["multiplier"]
            mult = f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"
            rlo, rhi = r["learning_rate"]
            rate = f"{rlo:.3g}" if rlo == rhi else f"{rlo:.3g}-{rhi:.3g}"
            lines.append(f"{r['block']:<14}{r['state']:<11}{mult:>14}"
                         f"{rate:>16}")
        return "\n".join(lines)


def _current_learning_rate(optimizer):
    return float(ops.convert_to_numpy(optimizer.learning_rate))


def describe_learning_rates(model, optimizer=None):
    """A table of block, state, multiplier and effective learning rate now.

    Args:
        model: a ``keras.Model`` or :class:`~kerastl.Backbone`.
        optimizer: the optimizer (default: ``model.optimizer``); a plain
            optimizer shows a multiplier of 1 everywhere.

    Returns:
        A :class:`LearningRateTable`: a list of dicts with ``block``,
        ``state`` (``trainable``, ``frozen`` or ``partial``),
        ``multiplier`` and ``learning_rate`` (each a ``(lowest, highest)``
        pair over the block's trainable weights; a frozen block shows the
        multiplier it would train with and a rate of 0); ``print()`` it.
    """
    keras_model = keras_model_of(model)
    if optimizer is None:
        optimizer = getattr(keras_model, "optimizer", None)
        if optimizer is None:
            raise KerastlError(
                "The model has no optimizer: compile it, or pass optimizer=.")
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise KerastlError(
            f"optimizer={optimizer!r} is not a Keras optimizer.")
    layerwise = _unwrap(optimizer)
    lr = _current_learning_rate(optimizer)
    bm = block_map(keras_model)
    states = {r["block"]: r["state"] for r in trainable_summary(keras_model)}
    rows = LearningRateTable()
    for b in bm.names:
        trainable = bm.variables(b, trainable=True)
        variables = trainable or bm.variables(b)
        if layerwise is None:
            ms = [1.0] * len(variables)
        else:
            ms = [layerwise.multiplier(v) for v in variables]
        lo, hi = (min(ms), max(ms)) if ms else (0.0, 0.0)
        rates = (lo * lr, hi * lr) if trainable else (0.0, 0.0)
        rows.append(dict(block=b, state=states[b], multiplier=(lo, hi),
                         learning_rate=rates))
    return rows
