"""The vocabulary kerastl's files and commands share, importable without Keras.

Block rules, preprocessing modes, Hub handle syntax and the words an
experiment is written in (strategies, BatchNorm modes, export inputs, device
strategies) are what a zoo YAML file or an experiment file holds. They live here,
apart from the code that acts on models, so that reading the zoo and the
command line's ``--help``, ``--version`` and ``zoo list`` never import Keras
or TensorFlow (which take seconds and print start-up logs).
"""

import dataclasses
import re

from kerastl.errors import BlockError

# Preprocessing a zoo entry may name (see kerastl.preprocessing).
PREPROCESSING_MODES = ("caffe", "tf", "torch", "unit", "builtin")

# A Kaggle model handle: owner/model/framework/variation[/version].
KAGGLE_HANDLE = re.compile(r"^[\w.-]+/[\w.-]+/[\w.-]+/[\w.-]+(/\d+)?$")

# What trains after the head phase (``fine_tune(strategy=...)``, the
# experiment's ``strategy`` key, ``recommend_strategy``): the whole backbone
# frozen, its first half frozen, nothing frozen; or, in the backbone's
# blocks, only LoRA factors beside frozen kernels, only biases, only the
# normalisation layers (parameter-efficient tuning, kerastl.peft).
FINE_TUNING_STRATEGIES = ("features", "partial", "full", "lora", "bias",
                          "norm")
# The strategies that train a selection of each tuned block's weights.
PEFT_STRATEGIES = ("lora", "bias", "norm")
# The strategies ``freeze_up_to`` applies to (the blocks before it frozen).
CUT_STRATEGIES = ("partial",) + PEFT_STRATEGIES


def default_strategy(freeze_up_to):
    """The strategy when none is given: ``"partial"`` with a
    ``freeze_up_to`` (where to cut says to cut), else ``"full"`` (what the
    recipes benchmark measured best)."""
    return "full" if freeze_up_to is None else "partial"


# Training-time augmentation policies (kerastl.augment; "+flip" may follow a
# policy: "light+flip").
AUGMENT_POLICIES = ("none", "light", "strong")

# The learning rate over a phase (kerastl.plan.cosine: warmup, then cosine).
SCHEDULES = ("cosine", "constant")

# BatchNormalization in the blocks that train (see kerastl.freezing).
BN_MODES = ("frozen", "train")
# kerastl.rank_backbones's estimators (and kerastl rank --method).
RANK_METHODS = ("logme", "h_score", "leep", "nce", "linear_probe")

# What an exported SavedModel's serve signature takes (see kerastl.serving).
INPUT_MODES = ("float", "uint8", "bytes")

# The files kerastl.export writes, and the LiteRT quantizations it makes.
EXPORT_FORMATS = ("savedmodel", "litert", "onnx")
QUANTIZATIONS = ("dynamic", "float16", "int8")

# Where training runs: one device, every GPU of this machine, or several
# machines (``--distribute``; see kerastl.distribute).
DEVICE_STRATEGIES = ("none", "mirrored", "multi-worker")

# Keras dtype policies fine_tune's ``mixed_precision`` takes.
PRECISIONS = (None, "float32", "mixed_float16", "mixed_bfloat16")


@dataclasses.dataclass(frozen=True)
class BlockRule:
    """How one block is recognised among a model's layers.

    Exactly one of the selectors is used:

    * ``layers``: regexes matched with ``re.match`` (anchored at the start of
      the layer name; add ``$`` to anchor the end).
    * ``until``: every not-yet-assigned layer the named layer depends on,
      the named layer included. Works where inner layers have auto-generated
      names (``conv2d_17``) but the block's output layer has a stable name.
    * ``before``: every not-yet-assigned layer computed before the cell that
      produces the named layer starts, i.e. the ancestors of its immediate
      dominator (the last layer every path to it goes through), included.
    * ``variables``: for opaque models (TF Hub SavedModels, which have
      variables but no layers): regexes matched with ``re.search`` against
      the SavedModel's variable names (``MobilenetV2/Conv/weights:0``), so a
      prefix a Hub wrapper adds does not break them.

    A ``layers`` rule whose name contains ``{i}`` is a *repeated* rule: it
    stands for one block per distinct number that ``{i}`` in its regexes
    matches (``name: layer{i}``, ``layers: ['^encoder_block_{i}$']``), in
    increasing order of that number, the blocks numbered from ``first``
    (default 0) whatever numbers the layer names use. Transformers get one
    block per encoder layer this way, whatever their depth.
    """

    name: str
    layers: tuple = ()
    until: str = None
    before: str = None
    variables: tuple = ()
    first: int = 0

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "variables", tuple(self.variables))
        if self.repeated and (not self.layers or self.until or self.before
                              or not all("{i}" in p for p in self.layers)):
            raise BlockError(
                f"Block rule {self.name!r}: a repeated rule ('{{i}}' in its "
                "name) needs 'layers' regexes that each contain '{i}'.")
        object.__setattr__(
            self, "_compiled", tuple(re.compile(
                p.replace("{i}", r"(?P<i>\d+)") if self.repeated else p)
                for p in self.layers))
        object.__setattr__(
            self, "_compiled_vars",
            tuple(re.compile(p) for p in self.variables))

    @property
    def repeated(self):
        """Whether the rule stands for one block per number (``{i}``)."""
        return "{i}" in self.name

    def matches(self, layer_name):
        return any(p.match(layer_name) for p in self._compiled)

    def number(self, layer_name):
        """The number ``{i}`` matches in ``layer_name`` (repeated rules),
        or None if the rule does not match it."""
        for p in self._compiled:
            found = p.match(layer_name)
            if found and "i" in p.groupindex:
                return int(found.group("i"))
        return None

    def block_name(self, ordinal):
        """The name of a repeated rule's ``ordinal``-th block (from 0)."""
        return self.name.replace("{i}", str(self.first + ordinal))

    def matches_variable(self, variable_name):
        return any(p.search(variable_name) for p in self._compiled_vars)

    @property
    def selector(self):
        """Which selector the rule uses: ``layers``, ``until``, ``before``
        or ``variables``."""
        for key in ("until", "before"):
            if getattr(self, key):
                return key
        return "variables" if self.variables else "layers"

    def get_config(self):
        """The rule as JSON-able data (what a saved model stores)."""
        value = getattr(self, self.selector)
        config = {"name": self.name, self.selector:
                  list(value) if isinstance(value, tuple) else value}
        if self.first:
            config["first"] = self.first
        return config

    @classmethod
    def from_config(cls, config):
        """The inverse of :meth:`get_config` (checked)."""
        first = config.get("first", 0) if isinstance(config, dict) else 0
        if not isinstance(config, dict) or not isinstance(
                config.get("name"), str) or len(config) != 2 + (
                "first" in config) or not isinstance(first, int):
            raise BlockError(
                f"A block rule must be {{'name': ..., one of 'layers', "
                f"'until', 'before', 'variables': ...}}; got {config!r:.200}.")
        key = next(k for k in config if k not in ("name", "first"))
        if key not in ("layers", "until", "before", "variables"):
            raise BlockError(f"Block rule {config['name']!r}: unknown "
                             f"selector {key!r}.")
        value = config[key]
        if key in ("layers", "variables"):
            value = [value] if isinstance(value, str) else list(value)
        try:
            return cls(config["name"], first=first, **{key: value})
        except (re.error, TypeError) as e:
            raise BlockError(f"Block rule {config['name']!r}: {e}.") from None


def rules_to_config(rules):
    """A list of rules as JSON-able data; ``None`` for no rules."""
    return [rule.get_config() for rule in rules] if rules else None


def rules_from_config(data):
    """The inverse of :func:`rules_to_config`: a tuple of rules."""
    if not data:
        return ()
    return tuple(r if isinstance(r, BlockRule) else BlockRule.from_config(r)
                 for r in data)
