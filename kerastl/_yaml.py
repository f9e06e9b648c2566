"""YAML files read as bounded data: safe tags only, a cap on size.

``yaml.safe_load`` never runs code, but a few hundred bytes of nested
aliases (a "billion laughs" file) stand for billions of values: anything
that walks or prints the loaded value then runs out of memory. :func:`load`
measures what a document expands to before building it, and :func:`short`
formats a value for an error message without walking all of it.
"""

import reprlib

import yaml

from kerastl.errors import ConfigError

#: The most values (scalars, lists, mappings, with aliases expanded) that
#: a kerastl config file may hold.
MAX_VALUES = 100_000

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 2, 6, 6
_REPR.maxstring = _REPR.maxother = 80


def short(value):
    """A ``repr`` of ``value`` bounded in length and depth."""
    return _REPR.repr(value)


def _expanded_size(node, sizes, limit):
    """Values ``node`` stands for with aliases expanded (memoised on the
    shared nodes, so an alias bomb costs one visit per distinct node)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    sizes[key] = limit + 1  # a cycle counts as too big
    if isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded_size(k, sizes, limit) +
                        _expanded_size(v, sizes, limit)
                        for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded_size(v, sizes, limit) for v in node.value)
    else:
        total = 1
    sizes[key] = min(total, limit + 1)
    return sizes[key]


def load(stream, source):
    """``yaml.safe_load(stream)`` for a config file named ``source``.

    Raises:
        ConfigError: not valid YAML, or more than :data:`MAX_VALUES`
            values once its aliases are expanded.
    """
    loader = yaml.SafeLoader(stream)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = _expanded_size(node, {}, MAX_VALUES)
        except RecursionError:
            size = MAX_VALUES + 1
        if size > MAX_VALUES:
            raise ConfigError(
                f"{source} expands to more than {MAX_VALUES:,} values "
                "(nested YAML aliases?); a kerastl config is a few dozen "
                "keys. Write the values out plainly.")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: "
                          f"{' '.join(str(e).split())}") from None
    finally:
        loader.dispose()
