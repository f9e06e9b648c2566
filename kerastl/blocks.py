"""The block map: an ordered partition of a model's layers into named blocks.

Every backbone in kerastl is a ``keras.Model`` plus a block map: an ordered
list of blocks (``stem``, ``stage1``, ..., ``top``), each owning a set of
layers. Every layer that owns weights belongs to exactly one block, and
blocks follow depth: a layer is never in an earlier block than the layers
that feed it. Freezing, learning-rate multipliers, feature endpoints and the
analysis tools all speak in blocks.

A block map comes from a zoo config (regexes over layer names plus the
structural rules ``until`` / ``before``) or, for models the zoo does not
know, from :func:`structural_block_map`'s splitting at the layers that
reduce the spatial resolution.

The rules travel with the model: the layer that applies them (a backbone's
:class:`~kerastl.preprocessing.ImagePreprocessing`, a
:class:`~kerastl.HubLayer`) exposes them as ``block_rules`` and stores them
in its config, so a model saved to ``.keras`` has the same block map after
``load_model`` without the zoo entry that made it. A model kerastl builds
around other models (``DANN``) lists its parts through
``kerastl_block_parts()``; see :func:`composite_block_map`.

This module depends on Keras and :mod:`kerastl.errors` only: the zoo supplies
rules to it, never the other way round.
"""

import difflib
import numbers
import weakref

import keras

from kerastl import _keras_private as _private
from kerastl.errors import BlockError
# The rules are plain data (read without Keras by the zoo and the CLI).
from kerastl.spec import BlockRule, rules_from_config, rules_to_config

HEAD = "head"


# --------------------------------------------------------------------------
# The layer graph, with nested functional models expanded.
# --------------------------------------------------------------------------


def _graph_of(model):
    """The functional graph behind ``model`` (Sequential builds one)."""
    return _private.functional_graph(model)


def _expand(model, input_parents, outer=None):
    """Leaf layers of ``model`` in topological order with their parents.

    Returns ``(entries, output_leaves)`` where ``entries`` is a list of
    ``(layer, parent_layers, outer)``; ``outer`` is the layer of the
    outermost model that contains the leaf (the leaf itself if top-level).
    """
    graph = _graph_of(model)
    if graph is None:  # a subclassed model: one opaque leaf
        return [(model, list(input_parents), outer or model)], [model]
    by_depth = _private.nodes_by_depth(graph)
    in_graph = {id(n) for ns in by_depth.values() for n in ns}
    produced = {}  # id(operation) -> leaf layers standing for its output
    entries = []
    for depth in sorted(by_depth, reverse=True):
        for node in by_depth[depth]:
            op = node.operation
            if node.is_input or not node.parent_nodes:
                parents = list(input_parents)
            else:
                parents = []
                for parent in node.parent_nodes:
                    if id(parent) in in_graph:
                        parents.extend(produced.get(id(parent.operation), []))
            if isinstance(op, keras.Model) and _graph_of(op) is not None:
                inner, outs = _expand(op, parents, outer or op)
                entries.extend(inner)
                produced[id(op)] = outs
            elif isinstance(op, keras.layers.InputLayer) and input_parents:
                # The input of a nested model: pass the outer parents on.
                produced[id(op)] = list(input_parents)
            else:
                entries.append((op, parents, outer or op))
                produced[id(op)] = [op]
    outputs = []
    for tensor in graph.outputs:
        outputs.extend(produced.get(
            id(_private.producing_operation(tensor)), []))
    return entries, outputs


def layer_graph(model, with_outer=False):
    """Leaf layers of ``model`` in topological order, with their parents.

    Nested functional and Sequential models are expanded, so a backbone used
    as a layer inside a bigger model contributes its own layers.

    Returns:
        A list of ``(layer, parent_layers)`` pairs; with ``with_outer``,
        ``(layer, parent_layers, outermost_containing_layer)`` triples.
    """
    entries, _ = _expand(model, [])
    seen, unique = set(), []
    for entry in entries:  # a shared layer appears once
        if id(entry[0]) not in seen:
            seen.add(id(entry[0]))
            unique.append(entry if with_outer else entry[:2])
    return unique


def _one(tensors):
    return tensors[0] if isinstance(tensors, (list, tuple)) and \
        len(tensors) == 1 else tensors


def _endpoints(model, which):
    try:
        return getattr(model, which)
    except (AttributeError, ValueError):
        # A Sequential model was never called as a layer: its graph's
        # inputs and outputs are still there (``inputs``/``outputs``).
        tensors = getattr(model, which + "s", None)
        if not tensors:
            raise BlockError(
                f"{type(model).__name__} {model.name!r} has no {which} yet: "
                "a Sequential model without an input shape. Start it with "
                "keras.Input((height, width, 3)), or call "
                "model.build((None, height, width, 3)) first.") from None
        return _one(tensors)


def model_input(model):
    """The symbolic input of a functional or Sequential model (a list for
    several inputs)."""
    return _endpoints(model, "input")


def model_output(model):
    """The symbolic output of a functional or Sequential model (a list or
    dict for several outputs)."""
    return _endpoints(model, "output")


def _graph_tables(model):
    """Leaf names in order, name->layer, name->parent names, name->outer."""
    graph = layer_graph(model, with_outer=True)
    order = [layer.name for layer, _, _ in graph]
    by_name = {layer.name: layer for layer, _, _ in graph}
    parents = {layer.name: [p.name for p in ps] for layer, ps, _ in graph}
    outer = {layer.name: o for layer, _, o in graph}
    return order, by_name, parents, outer


def _weights(layer):
    """Weights of a leaf; bare Keras operations (``x + y``) have none."""
    return getattr(layer, "weights", None) or []


def _owns_weights(layer):
    return bool(_weights(layer))


# --------------------------------------------------------------------------
# Assignment.
# --------------------------------------------------------------------------


def _ancestors(name, parents_by_name):
    """``name`` and every layer it depends on."""
    seen, stack = {name}, [name]
    while stack:
        for parent in parents_by_name[stack.pop()]:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _immediate_dominator(name, parents_by_name, order):
    """The latest layer that every path from the inputs to ``name`` crosses."""
    ancestors = _ancestors(name, parents_by_name) - {name}
    position = {n: i for i, n in enumerate(order)}
    for candidate in sorted(ancestors, key=position.get, reverse=True):
        before = _ancestors(candidate, parents_by_name)
        # Every ancestor of `name` must be before or after `candidate`; one
        # beside it (a parallel branch) means `candidate` is not on every path.
        after = {a for a in ancestors if candidate in _ancestors(a, parents_by_name)}
        if ancestors <= before | after:
            return candidate
    raise BlockError(f"Layer {name!r} has no dominating layer.")


def assign_blocks(model, rules, unmatched=HEAD):
    """Assigns every leaf layer of ``model`` to a block.

    Args:
        model: a functional or Sequential ``keras.Model``.
        rules: a sequence of :class:`BlockRule`, input to output.
        unmatched: what happens to a layer that owns weights but matches no
            rule: ``"head"`` puts it into a trailing ``head`` block (the new
            layers of a classifier built on a backbone); ``"inherit"`` gives
            it the block of its inputs.

    Layers without weights that no rule names take the latest block among
    their inputs (the first block if they have none).

    Returns:
        A :class:`BlockMap`.
    """
    order, by_name, parents, outer = _graph_tables(model)
    names = []
    index = {}
    upstream = set()  # layers that earlier blocks depend on
    for rule in rules:
        if rule.repeated:  # one block per number, in increasing order
            numbers = {}
            for n in order:
                if n not in index and rule.matches(n):
                    numbers.setdefault(rule.number(n), []).append(n)
            groups = [numbers[k] for k in sorted(numbers)]
        elif rule.until or rule.before:
            anchor = rule.until or rule.before
            if anchor not in by_name:
                raise BlockError(
                    f"Block {rule.name!r} refers to layer {anchor!r}, which "
                    f"model {model.name!r} does not have.")
            if rule.before:
                anchor = _immediate_dominator(anchor, parents, order)
            groups = [_ancestors(anchor, parents) - upstream]
        else:
            groups = [[n for n in order if rule.matches(n)]]
        for k, chosen in enumerate(groups):
            i = len(names)
            names.append(rule.block_name(k) if rule.repeated else rule.name)
            for n in chosen:
                if n not in index:
                    index[n] = i
                    upstream |= _ancestors(n, parents)
    if len(set(names)) != len(names):
        raise BlockError(f"Block names repeat: {names}.")
    head = len(names)  # the index of a trailing head block, if one is needed
    for n in order:
        if n in index:
            continue
        if _owns_weights(by_name[n]) and unmatched == HEAD:
            index[n] = head
        else:  # max() also carries the head on to what follows it
            index[n] = max((index[p] for p in parents[n] if p in index), default=0)
    if head in index.values():
        names.append(HEAD)
    assignment = {n: names[index[n]] for n in order}
    return BlockMap(names, [by_name[n] for n in order], assignment, parents,
                    source="rules", outer=outer)


def _opaque_variables(layer):
    """``{variable name: variable}`` of an opaque layer (a HubLayer), or None."""
    return getattr(layer, "hub_variables", None)


def variable_block_map(model, rules=None):
    """The block map of a model built around one opaque layer (a HubLayer).

    The layer's variables are split into blocks by ``rules`` (default: the
    rules the layer carries, ``HubLayer(..., blocks=...)``): each variable
    goes to the first rule whose ``variables`` regexes it matches
    (``re.search`` on the SavedModel's variable name). Layers before the
    opaque layer (preprocessing) join the first block; layers with weights
    after it (a new classifier) form the ``head`` block.

    Variables no rule matches go into the last block and are reported by
    :meth:`BlockMap.validate`.
    """
    order, by_name, parents, outer = _graph_tables(model)
    opaque = [by_name[n] for n in order
              if _opaque_variables(by_name[n]) is not None]
    if len(opaque) != 1:
        raise BlockError(
            f"A variable-path block map needs exactly one HubLayer in the "
            f"model; {model.name!r} has {len(opaque)}.")
    hub = opaque[0]
    rules = list(rules if rules is not None else hub.block_rules or ())
    if not rules:
        raise BlockError(f"HubLayer {hub.name!r} has no block rules.")
    names = [rule.name for rule in rules]
    if len(set(names)) != len(names):
        raise BlockError(f"Block names repeat: {names}.")
    variable_blocks, unmatched = {}, []
    for var_name, v in _opaque_variables(hub).items():
        block = next((r.name for r in rules if r.matches_variable(var_name)),
                     None)
        if block is None:
            unmatched.append(var_name)
            block = names[-1]
        variable_blocks[id(v)] = block
    index, after_hub = {}, False
    for n in order:  # topological: the hub's inputs come before it
        if n == hub.name:
            index[n] = len(names) - 1
            after_hub = True
        elif not after_hub:
            index[n] = 0
        elif _owns_weights(by_name[n]):
            index[n] = len(names)
        else:
            index[n] = max((index[p] for p in parents[n] if p in index),
                           default=0)
    if len(names) in index.values():
        names.append(HEAD)
    assignment = {n: names[index[n]] for n in order}
    return BlockMap(names, [by_name[n] for n in order], assignment, parents,
                    source="variables", outer=outer,
                    variable_blocks=variable_blocks,
                    unmatched_variables=unmatched)


def structural_block_map(model):
    """A block map for a model the zoo does not know.

    Blocks split where a layer that owns weights first produces a smaller
    spatial resolution than any layer before it (``block1``, ``block2``,
    ...). Layers with weights after the spatial dimensions are gone (dense
    layers after global pooling) form the ``head`` block. A model without
    spatial layers gets one block per layer that owns weights.
    """
    order, by_name, parents, outer = _graph_tables(model)

    def resolution(layer):
        try:
            shape = tuple(layer.output.shape)
        except (AttributeError, ValueError):
            return None
        if len(shape) == 4:  # channels_last images
            return shape[1] * shape[2] if None not in shape[1:3] else None
        return 0 if len(shape) == 2 else None

    spatial = any(resolution(l) for l in by_name.values())
    names, index, current = [], {}, None
    for n in order:
        layer = by_name[n]
        inherited = max((index[p] for p in parents[n] if p in index), default=0)
        if not _owns_weights(layer):
            index[n] = inherited
            continue
        if not spatial:
            names.append(n)
            index[n] = len(names) - 1
            continue
        res = resolution(layer)
        if res == 0 or (res is None and current is not None and names[-1] == HEAD):
            if not names or names[-1] != HEAD:
                names.append(HEAD)
            index[n] = len(names) - 1
        elif not names or (res is not None and current is not None and res < current):
            names.append(f"block{len(names) + 1}")
            index[n] = len(names) - 1
            current = res
        else:
            index[n] = max(inherited, len(names) - 1)
            if current is None:
                current = res
    if not names:
        raise BlockError(f"Model {model.name!r} has no layer with weights.")
    assignment = {n: names[index[n]] for n in order}
    return BlockMap(names, [by_name[n] for n in order], assignment, parents,
                    source="structural", outer=outer)


# --------------------------------------------------------------------------
# The block map object.
# --------------------------------------------------------------------------


class BlockMap:
    """An ordered mapping from blocks to the layers (and weights) they own.

    Build one with :func:`block_map` rather than directly.

    Attributes:
        names: block names, input to output.
        source: ``"rules"`` (layer rules of a zoo config), ``"variables"``
            (variable-path rules of a HubLayer), ``"structural"`` or
            ``"composite"`` (a model built around others, such as DANN).
        head_blocks: the blocks that a new task added on top of the
            pretrained network (a classifier's ``head``; DANN's
            ``bottleneck``, ``label_head`` and ``domain_head``): what
            ``freeze(model)`` leaves trainable.
    """

    def __init__(self, names, layers, assignment, parents, source,
                 outer=None, variable_blocks=None, unmatched_variables=(),
                 head_blocks=None):
        self.names = list(names)
        self.head_blocks = [b for b in self.names if b == HEAD] \
            if head_blocks is None else list(head_blocks)
        self._outer = dict(outer or {})
        self.source = source
        self._layers = list(layers)
        self._assignment = dict(assignment)
        self._parents = dict(parents)
        self._index = {n: i for i, n in enumerate(self.names)}
        self.unmatched_variables = list(unmatched_variables)
        self._var_block = dict(variable_blocks or {})
        # Layers whose variables are split over several blocks (a HubLayer
        # under a variable-path block map): layer name -> their blocks.
        self._split = {}
        for layer in self._layers:
            for v in _weights(layer):
                self._var_block.setdefault(id(v), assignment[layer.name])
            blocks = {self._var_block[id(v)] for v in _weights(layer)}
            if blocks - {assignment[layer.name]}:
                self._split[layer.name] = blocks

    # Sequence protocol over block names.
    def __len__(self):
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    def __contains__(self, block):
        return block in self._index

    def __repr__(self):
        return f"BlockMap({self.names})"

    def resolve(self, block):
        """Returns the block name for a name, a negative/positive index."""
        if isinstance(block, numbers.Integral) and \
                not isinstance(block, bool):
            block = int(block)
            if not -len(self.names) <= block < len(self.names):
                raise BlockError(
                    f"Block index {block} is out of range: the model has "
                    f"{len(self.names)} blocks ({', '.join(self.names)}).")
            return self.names[block]
        if not isinstance(block, str):
            raise BlockError(
                f"Block {block!r}: expected a block name or an index (a "
                f"list holds names or indices, not lists). The blocks are, "
                f"input to output: {', '.join(self.names)}.")
        if block not in self._index:
            close = difflib.get_close_matches(str(block), self.names, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise BlockError(
                f"Unknown block {block!r}.{hint} The blocks are, input to "
                f"output: {', '.join(self.names)}.")
        return block

    def index(self, block):
        """Position of ``block`` (0 is nearest the input)."""
        return self._index[self.resolve(block)]

    @property
    def base_blocks(self):
        """The blocks that are not new heads, input to output."""
        return [b for b in self.names if b not in self.head_blocks]

    def block_of(self, item):
        """The block of a layer, a layer name or a weight variable."""
        if isinstance(item, str):
            if item not in self._assignment:
                raise BlockError(f"The model has no layer named {item!r}.")
            return self._assignment[item]
        if id(item) in self._var_block:
            return self._var_block[id(item)]
        name = getattr(item, "name", None)
        if isinstance(item, keras.layers.Layer) and name in self._assignment:
            return self._assignment[name]
        raise BlockError(f"{item!r} is not a layer or weight of this model.")

    def layers(self, block=None):
        """Layers of one block (or of all blocks), in topological order.

        A layer split over several blocks (a HubLayer under a variable-path
        block map) is listed in each of them.
        """
        if block is None:
            return list(self._layers)
        block = self.resolve(block)
        return [l for l in self._layers if self._assignment[l.name] == block
                or block in self._split.get(l.name, ())]

    def is_split(self, layer):
        """Whether ``layer``'s variables lie in more than one block."""
        return getattr(layer, "name", layer) in self._split

    def weighted_layers(self, block=None):
        """The layers that own weights, of one block or of all."""
        return [l for l in self.layers(block) if _owns_weights(l)]

    def variables(self, block=None, trainable=None):
        """Weight variables of a block; ``trainable`` filters if not None.

        ``trainable`` is the variable's own flag: a variable of a frozen
        layer still reads ``True`` here (the model's
        ``trainable_variables`` is what training uses).
        """
        blocks = self.names if block is None else [self.resolve(block)]
        out, seen = [], set()
        for b in blocks:
            for layer in self.layers(b):
                for v in _weights(layer):
                    if id(v) in seen or self._var_block[id(v)] != b:
                        continue
                    if trainable is None or bool(v.trainable) == trainable:
                        seen.add(id(v))
                        out.append(v)
        return out

    def params(self, block):
        """Number of scalars in the weights of ``block``."""
        return sum(variable_size(v) for v in self.variables(block))

    def output_layer(self, block):
        """The layer of the model whose output ends ``block``.

        The last layer of the block in topological order or, where that layer
        sits inside a nested model (ConvNeXt's stem), the nested model.
        """
        block = self.resolve(block)
        last = self.layers(block)[-1]
        if not self.has_output(block):
            raise BlockError(
                f"Block {block!r} ends inside {last.name!r}, an opaque "
                f"SavedModel that exposes only its final output; use a "
                f"later block ({self._assignment[last.name]!r}) as the "
                f"feature endpoint.")
        return self._outer.get(last.name, last)

    def has_output(self, block):
        """Whether :meth:`output_layer` exists for ``block``: false for a
        block that ends inside a split layer (a Hub SavedModel)."""
        block = self.resolve(block)
        last = self.layers(block)[-1]
        return not self.is_split(last) or self._assignment[last.name] == block

    def assignment(self):
        """A dict from layer name to block name."""
        return dict(self._assignment)

    def parents(self, layer_name):
        """The names of the layers that ``layer_name`` takes input from."""
        return list(self._parents.get(layer_name, []))

    def outer_layer(self, layer_name):
        """The layer of the top-level model that holds ``layer_name``: the
        layer itself, or the nested model it sits in."""
        layer = next((l for l in self._layers if l.name == layer_name), None)
        return self._outer.get(layer_name, layer)

    def variable_blocks(self):
        """``{id(variable): block}`` for every weight of the model."""
        return dict(self._var_block)

    def validate(self):
        """Checks the invariants; returns a list of problems (empty if fine).

        * every block owns at least one layer with weights;
        * blocks follow depth: no layer is in an earlier block than a layer
          it takes input from.
        """
        problems = []
        if self.unmatched_variables:
            problems.append(
                f"{len(self.unmatched_variables)} variables match no block "
                f"(e.g. {', '.join(self.unmatched_variables[:3])})")
        for name in self.names:
            if not self.weighted_layers(name):
                problems.append(
                    f"block {name!r} matches no variable"
                    if self.source == "variables" and name != HEAD else
                    f"block {name!r} owns no layer with weights")
        for layer in self._layers:
            i = self._index[self._assignment[layer.name]]
            for parent in self._parents.get(layer.name, []):
                j = self._index[self._assignment[parent]]
                if j > i:
                    problems.append(
                        f"layer {layer.name!r} (block "
                        f"{self.names[i]!r}) takes input from {parent!r} in "
                        f"the later block {self.names[j]!r}")
        return problems


def variable_size(v):
    """Number of scalars in a weight variable."""
    n = 1
    for d in v.shape:
        n *= int(d)
    return n


# --------------------------------------------------------------------------
# Finding the block map of any model.
# --------------------------------------------------------------------------

_CACHE = weakref.WeakKeyDictionary()

# Callables ``provider(layer) -> rules or None`` that supply rules for layers
# saved before rules travelled with the model (the zoo registers one that
# maps a backbone's recorded zoo name to its entry's rules).
_RULE_PROVIDERS = []


def register_rule_provider(provider):
    """Registers ``provider(layer) -> rules or None`` as a source of rules.

    Asked only for layers that carry no ``block_rules`` of their own.
    """
    if provider not in _RULE_PROVIDERS:
        _RULE_PROVIDERS.append(provider)


def _rules_in(model, graph=None):
    """The block rules carried by a layer of ``model``, or ``()``."""
    graph = layer_graph(model) if graph is None else graph
    for layer, _ in graph:
        rules = getattr(layer, "block_rules", None)
        if rules:
            return tuple(rules)
    for layer, _ in graph:
        for provider in _RULE_PROVIDERS:
            rules = provider(layer)
            if rules:
                return tuple(rules)
    return ()


def block_map(model):
    """The block map of ``model``.

    ``model`` can be a kerastl :class:`~kerastl.Backbone`, the Keras model of
    one, any model that contains one (a classifier built on it, even after
    ``.keras`` save and load: the block rules travel inside the model), a
    model around a :class:`~kerastl.HubLayer` that carries variable-path
    block rules (:func:`variable_block_map`), a model kerastl builds around
    others (a :class:`~kerastl.DANN`: :func:`composite_block_map`), or any
    other functional/Sequential model (structural fallback). Layers with
    weights that a classifier adds after a zoo backbone form the ``head``
    block.

    Raises:
        BlockError: a subclassed model that kerastl does not know: its
            layers and their order cannot be read from a graph.

    Returns:
        A :class:`BlockMap`. The result is cached per model and recomputed if
        the model's layers or the block rules they carry change.
    """
    keras_model = getattr(model, "model", model)
    if not isinstance(keras_model, keras.Model):
        raise BlockError(
            f"Expected a keras.Model or kerastl.Backbone, got "
            f"{type(model).__name__}.")
    parts = getattr(keras_model, "kerastl_block_parts", None)
    if parts is not None:
        return composite_block_map(keras_model, parts())
    if _graph_of(keras_model) is None:
        raise BlockError(
            f"{type(keras_model).__name__} {keras_model.name!r} is a "
            f"subclassed model: kerastl cannot see its layers or their "
            f"order, so it has no block map (freezing, layer-wise rates and "
            f"feature endpoints need one). Build it with the functional API "
            f"(keras.Model(inputs, outputs)) or keras.Sequential.")
    graph = layer_graph(keras_model)
    rules = _rules_in(keras_model, graph)
    # The key: the layers, their number of weights and the rules (a layer
    # given new rules, as the KerasHub loader does while it tries candidate
    # entries, or new weights, as enable_lora adds, gets a new map).
    signature = (tuple(id(l) for l, _ in graph), len(keras_model.weights),
                 rules)
    cached = _CACHE.get(keras_model)
    if cached is not None and cached[0] == signature:
        return cached[1]
    if rules and all(rule.variables for rule in rules):
        result = variable_block_map(keras_model, rules)
    elif rules:
        result = assign_blocks(keras_model, rules)
    else:
        result = structural_block_map(keras_model)
    _CACHE[keras_model] = (signature, result)
    return result


def composite_block_map(model, parts):
    """The block map of a model kerastl builds around other models.

    Args:
        model: the composite model (for messages).
        parts: input to output, each either a ``keras.Model`` (its own block
            map's blocks are taken as they are) or a ``(block name, layers,
            is_head)`` triple: a new block of the composite's own layers;
            ``is_head`` marks a newly added head (see
            :attr:`BlockMap.head_blocks`). A triple without weighted layers
            is skipped, its layers joining the next block.

    Returns:
        A :class:`BlockMap` over every part's layers.
    """
    names, layers, assignment, parents, outer = [], [], {}, {}, {}
    variable_blocks, heads, unmatched, carry = {}, [], [], []
    previous, seen = [], {}

    def add(layer, block, layer_parents):
        if layer.name in seen and seen[layer.name] is not layer:
            raise BlockError(
                f"{model.name!r}: two different layers are named "
                f"{layer.name!r}; a block map names layers uniquely. Rename "
                f"the layer in the feature extractor.")
        seen[layer.name] = layer
        layers.append(layer)
        assignment[layer.name] = block
        parents[layer.name] = layer_parents

    def new_block(block):
        if block in names:
            raise BlockError(f"{model.name!r}: block {block!r} repeats.")
        names.append(block)

    for part in parts:
        if isinstance(part, keras.Model):
            sub = block_map(part)
            for b in sub.names:
                new_block(b)
            heads.extend(sub.head_blocks)
            for layer in carry:
                add(layer, sub.names[0], [p.name for p in previous])
            carry = []
            for layer in sub.layers():
                own = sub.parents(layer.name) or [p.name for p in previous]
                add(layer, sub.block_of(layer.name), own)
                outer[layer.name] = sub.outer_layer(layer.name)
            variable_blocks.update(sub.variable_blocks())
            unmatched.extend(sub.unmatched_variables)
            previous = [sub.layers()[-1]]
            continue
        block, part_layers, is_head = part
        part_layers = list(part_layers)
        if not any(_owns_weights(l) for l in part_layers):
            carry.extend(part_layers)
            continue
        new_block(block)
        if is_head:
            heads.append(block)
        for layer in carry + part_layers:
            add(layer, block, [p.name for p in previous])
            previous = [layer]
        carry = []
    for layer in carry:  # weightless layers at the end join the last block
        add(layer, names[-1], [p.name for p in previous])
    return BlockMap(names, layers, assignment, parents, source="composite",
                    outer=outer, variable_blocks=variable_blocks,
                    unmatched_variables=unmatched, head_blocks=heads)
