"""The experiment's schema: every key of ``kerastl finetune``, declared once.

An experiment is a set of keys, written in a YAML file (``--config``), as
command-line flags, or as a dict. Each key is one :class:`Key` in
:data:`KEYS`: its default, the YAML types it takes, the values it allows,
its help text and so its flag (``freeze_up_to`` is ``--freeze-up-to``).
The defaults (:func:`defaults`), the checks (:func:`resolve`) and the
command line's flags (``kerastl finetune --help``) are all derived from
:data:`KEYS`, so a new key is one new entry there. How the keys become a
:class:`kerastl.plan.TrainingPlan` is :meth:`~kerastl.plan.TrainingPlan.from_experiment`.

Importable without Keras or TensorFlow: the command line reads and checks an
experiment before it imports them.
"""

import dataclasses
import difflib
import numbers
import os

from kerastl import _yaml
from kerastl.errors import ConfigError
from kerastl.spec import (AUGMENT_POLICIES, BN_MODES, DEVICE_STRATEGIES,
                          EXPORT_FORMATS, CUT_STRATEGIES,
                          FINE_TUNING_STRATEGIES, INPUT_MODES, QUANTIZATIONS,
                          SCHEDULES, default_strategy)

NoneType = type(None)
# Words that stand for null on the command line (YAML has its own null).
NULL_WORDS = ("none", "null")
# The values of a three-way switch (YAML also reads on/off as true/false).
SWITCH = ("auto", "on", "off", True, False)


@dataclasses.dataclass(frozen=True)
class Key:
    """One experiment key.

    Attributes:
        name: the key (the flag is ``--`` + the name with ``-`` for ``_``).
        default: its value when neither the config nor a flag sets it.
        types: the YAML types it takes (``str``, ``int``, ``numbers.Real``,
            ``bool``, ``NoneType``).
        help: what it means, for ``--help``.
        choices: the values it allows (None: any value of ``types``).
        check: ``check(value) -> bool`` for values of the right type.
        expected: what ``check`` wants, for its error message.
        required: the experiment cannot run without it.
        aliases: other spellings of values (``{"random": None}``), read
            in YAML and on the command line alike.
    """

    name: str
    default: object
    types: tuple
    help: str
    choices: tuple = None
    check: object = None
    expected: str = None
    required: bool = False
    aliases: tuple = ()

    @property
    def flag(self):
        """The command-line flag: ``--freeze-up-to`` for ``freeze_up_to``."""
        return "--" + self.name.replace("_", "-")

    @property
    def is_switch(self):
        """A flag without a value (``--overwrite``): a bool key."""
        return self.types == (bool,)

    def cli_choices(self):
        """The choices as the command line spells them, or None."""
        if self.choices is None:
            return None
        return [("none" if c is None else c) for c in self.choices
                if not isinstance(c, bool)]

    def from_text(self, text):
        """A command-line string as the value it stands for.

        Raises:
            ValueError: the text is none of the key's types.
        """
        if text.lower() in NULL_WORDS and NoneType in self.types:
            return None
        for kind in self.types:
            if kind is int:
                try:
                    return int(text)
                except ValueError:
                    continue
            if kind is numbers.Real:
                try:
                    return float(text)
                except ValueError:
                    continue
            if kind is str:
                return text
        raise ValueError(f"{text!r} is not {describe(self.types)}")

    def canonical(self, value):
        """``value`` with an alias replaced by what it stands for."""
        for alias, meaning in self.aliases:
            if isinstance(value, str) and value == alias:
                return meaning
        if isinstance(value, str) and numbers.Real in self.types and \
                str not in self.types:
            # (YAML reads 1e-4, without a decimal point, as a string)
            try:
                number = float(value)
            except ValueError:
                return value
            if abs(number) < float("inf"):  # (not NaN, not infinite)
                return number
        return value

    def refuse(self, value, expected):
        raise ConfigError(f"Experiment key {self.name!r} is "
                          f"{_yaml.short(value)} ({self.flag}): expected "
                          f"{expected}.")

    def validate(self, value):
        """Checks ``value`` (after :meth:`canonical`); raises
        :class:`ConfigError` naming the key, its flag and what it takes."""
        if value is None and self.required:
            raise ConfigError(f"The experiment needs {self.name!r} (in the "
                              f"config or as {self.flag}).")
        bad_bool = isinstance(value, bool) and bool not in self.types and \
            not (self.choices and value in self.choices)
        if bad_bool or not isinstance(value, self.types):
            self.refuse(value, describe(self.types))
        if self.choices is not None and not (
                value is None and NoneType in self.types) and not any(
                value is c or (type(value) is type(c) and value == c)
                for c in self.choices):
            self.refuse(value, "one of " + ", ".join(self.cli_choices()))
        if self.check is not None and value is not None and \
                not self.check(value):
            self.refuse(value, self.expected)


def describe(types):
    """``(int, NoneType)`` as "an integer or null"."""
    names = {str: "a string", int: "an integer", numbers.Real: "a number",
             bool: "true or false", NoneType: "null"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _positive(value):
    return value >= 1


def _formats(value):
    """``"savedmodel,litert"`` as a tuple of formats, or None if a name is
    not a format (or one repeats)."""
    names = tuple(n.strip() for n in value.split(","))
    if not names or any(n not in EXPORT_FORMATS for n in names) or \
            len(set(names)) != len(names):
        return None
    return names


def export_formats(experiment):
    """The formats an experiment exports (an empty tuple for none)."""
    value = experiment.get("export")
    return () if value is None else _formats(value)


KEYS = (
    Key("model", None, (str, NoneType),
        "zoo name, hub:<name or handle>, kerashub:<preset or folder>, or a "
        ".keras file", required=True),
    Key("data", None, (str, NoneType),
        "image folder, one subfolder per class", required=True),
    Key("output", "kerastl_run", (str,),
        "output folder: new, empty, or an earlier kerastl run with "
        "--overwrite"),
    Key("weights", "imagenet", (str, NoneType),
        "imagenet, none (random), or a weights file",
        aliases=(("none", None), ("None", None), ("null", None),
                 ("random", None))),
    Key("image_size", None, (int, NoneType),
        "input height and width; none: the model's own",
        check=lambda v: v >= 8, expected="at least 8 pixels"),
    Key("validation_split", 0.2, (numbers.Real,),
        "share of the images held out", check=lambda v: 0 < v < 1,
        expected="a fraction between 0 and 1 (exclusive)"),
    Key("seed", 0, (int,), "random seed of the split and the training",
        check=lambda v: 0 <= v < 2 ** 32,
        expected="an integer from 0 to 4294967295"),
    Key("batch_size", 32, (int,), "images per step", check=_positive,
        expected="a positive integer"),
    Key("strategy", None, (str, NoneType),
        "what trains: the head only, the later blocks too, everything, or "
        "in the blocks only LoRA factors, biases or norm layers; none: "
        "full, or partial when freeze_up_to is given",
        choices=FINE_TUNING_STRATEGIES),
    Key("freeze_up_to", None, (int, str, NoneType),
        "partial, lora, bias, norm: the last frozen block (a name or a "
        "count); none: the first half (partial), no block (the others)"),
    Key("lora_rank", 8, (int,), "lora: the rank of the LoRA factors",
        check=_positive, expected="a positive integer"),
    Key("bn", "frozen", (str,), "BatchNorm of trainable blocks",
        choices=BN_MODES),
    Key("dropout", 0.2, (numbers.Real,), "dropout before the new head",
        check=lambda v: 0 <= v < 1, expected="a rate in [0, 1)"),
    Key("optimizer", "adam", (str,),
        "a Keras optimizer name: adam, adamw, sgd, ..."),
    Key("learning_rate", 3e-3, (numbers.Real,), "learning rate",
        check=lambda v: v > 0, expected="a positive number"),
    Key("layer_decay", None, (numbers.Real, NoneType),
        "per-block rate decay, e.g. 0.7; none: one rate",
        check=lambda v: 0 < v <= 1, expected="a number in (0, 1]"),
    Key("schedule", "cosine", (str,),
        "the learning rate over training: cosine (a warmup from 0 over "
        "the first tenth of the steps, then a cosine decay to 0 at the last "
        "step) or constant",
        choices=SCHEDULES),
    Key("head_epochs", None, (int, NoneType),
        "epochs of the head phase (the backbone frozen, the new head "
        "trained first); none: 10 passes over the data, raised until it "
        "takes a third of min_steps and lowered to at most a third of "
        "max_steps, in epochs of at least 20 steps; 0: none",
        check=lambda v: v >= 0, expected="an integer >= 0"),
    Key("epochs", None, (int, NoneType),
        "training epochs; none: 10 passes over the data, raised until "
        "training takes min_steps steps and lowered until it takes at most "
        "max_steps, in epochs of at least 20 steps (small data repeated)",
        check=_positive, expected="a positive integer"),
    Key("min_steps", 300, (int,), "with epochs none: the fewest optimizer "
        "steps (small datasets train more passes)", check=lambda v: v >= 0,
        expected="an integer >= 0"),
    Key("max_steps", 3000, (int,), "with epochs none: the most optimizer "
        "steps (large datasets train fewer passes)", check=_positive,
        expected="a positive integer"),
    Key("augment", "none", (str,),
        "training-time augmentation (Keras layers; never flips unless "
        "+flip): none, light (shift, zoom, small rotation), strong (also "
        "brightness, contrast, erasing); +flip for photos whose left and "
        "right mean the same",
        choices=tuple(p + f for p in AUGMENT_POLICIES for f in
                      (("",) if p == "none" else ("", "+flip")))),
    Key("early_stopping", 3, (int, NoneType),
        "patience in epochs; none: train every epoch", check=_positive,
        expected="a patience of at least 1 epoch"),
    Key("export", "savedmodel", (str, NoneType),
        "the files written for serving, comma-separated: "
        f"{', '.join(EXPORT_FORMATS)} (each run by its runtime before it "
        "is kept); none: no export", check=lambda v: _formats(v) is not None,
        expected=f"formats among {', '.join(EXPORT_FORMATS)}, "
                 "comma-separated", aliases=(("none", None),)),
    Key("export_input", "float", (str,),
        "what the exported files take: float or uint8 pixels, or encoded "
        "image bytes (savedmodel only)", choices=INPUT_MODES),
    Key("quantize", None, (str, NoneType),
        "the LiteRT file's quantization (int8 calibrates on up to 200 "
        "training images and reports its agreement with the float model)",
        choices=(None,) + QUANTIZATIONS),
    Key("boundary_cache", "auto", (str, bool),
        "run the frozen blocks once and train the rest on their output: "
        "auto (whenever valid), on (required), off", choices=SWITCH),
    Key("mixed_precision", None, (str, NoneType),
        "half-precision compute: float16 on GPUs, bfloat16 on TPUs and "
        "recent CPUs (slower on other CPUs)",
        choices=(None, "float16", "bfloat16")),
    Key("jit", "auto", (str, bool), "XLA compilation of the train step",
        choices=SWITCH),
    Key("distribute", "none", (str,),
        "every GPU of this machine, or several machines (each with its "
        "TF_CONFIG; see docs/devices.md)", choices=DEVICE_STRATEGIES),
    Key("overwrite", False, (bool,),
        "replace an earlier kerastl run in the output folder (at the end); "
        "kerastl never replaces a folder it did not write"),
    Key("resume", False, (bool,),
        "continue an interrupted run of the same output folder from its "
        "last completed epoch"),
)


def keys():
    """``{name: Key}`` of :data:`KEYS`, read at each call (so that a key
    added to :data:`KEYS` is everywhere at once)."""
    return {k.name: k for k in KEYS}


def defaults():
    """Every key with its default."""
    return {k.name: k.default for k in KEYS}


def flags():
    """``{flag: key name}`` of every key."""
    return {k.flag: k.name for k in KEYS}


def load(path):
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


def resolve(*layers):
    """The complete, checked experiment: the defaults, then each of
    ``layers`` (dicts: a config file's keys, then the flags given) in order.

    Raises:
        ConfigError: an unknown key (with the nearest key and its flag), a
            value of the wrong type or out of range (naming key and flag),
            or keys that contradict each other.
    """
    table = keys()
    merged = defaults()
    for layer in layers:
        for name, value in layer.items():
            if name not in table:
                close = difflib.get_close_matches(str(name), list(table), n=1)
                hint = (f" (did you mean {close[0]!r}, "
                        f"{table[close[0]].flag}?)" if close else "")
                raise ConfigError(
                    f"Unknown experiment key {_yaml.short(name)}{hint}; "
                    f"keys: {', '.join(table)}.")
            merged[name] = table[name].canonical(value)
    for name, key in table.items():
        key.validate(merged[name])
    if merged["strategy"] is None:  # as TrainingPlan decides it
        merged["strategy"] = default_strategy(merged["freeze_up_to"])
    formats = export_formats(merged)
    if merged["quantize"] is not None and "litert" not in formats:
        raise ConfigError(
            f"quantize (--quantize {merged['quantize']}) applies to the "
            "LiteRT file: add litert to export (--export "
            f"{','.join(formats + ('litert',))}).")
    if merged["export_input"] == "bytes" and set(formats) - {"savedmodel"}:
        raise ConfigError(
            "export_input bytes (--export-input bytes) is for the SavedModel "
            "only; LiteRT and ONNX files take pixels: use --export-input "
            "float or uint8.")
    if merged["strategy"] not in CUT_STRATEGIES and \
            merged["freeze_up_to"] is not None:
        raise ConfigError(
            f"freeze_up_to (--freeze-up-to) applies to the strategies "
            f"{', '.join(CUT_STRATEGIES)}, not {merged['strategy']!r}.")
    if merged["max_steps"] < merged["min_steps"]:
        raise ConfigError(
            f"max_steps {merged['max_steps']} (--max-steps) is below "
            f"min_steps {merged['min_steps']} (--min-steps): raise "
            "--max-steps or lower --min-steps.")
    return merged
