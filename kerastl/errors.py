"""Errors raised by kerastl.

Every error kerastl raises on bad input derives from :class:`KerastlError`, so
``except kerastl.KerastlError`` catches all of them. Messages say what was
wrong, what was expected and what to do next.
"""


class KerastlError(Exception):
    """Base class of every error raised by kerastl."""


class ConfigError(KerastlError, ValueError):
    """A zoo config file is malformed (bad YAML, unknown key, wrong type)."""


class UnknownModelError(KerastlError, KeyError):
    """A model name that the zoo does not know."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class WeightsError(KerastlError):
    """Pretrained weights could not be found, downloaded or loaded."""


class InputShapeError(KerastlError, ValueError):
    """An input shape that the backbone cannot take."""


class BlockError(KerastlError, ValueError):
    """A block name or block map that does not fit the model."""


class ExportError(KerastlError):
    """The export could not be written or does not match the Keras model."""


class BoundaryCacheError(KerastlError):
    """The boundary cache cannot be used here (the message says why)."""
