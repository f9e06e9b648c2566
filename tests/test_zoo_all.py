"""Every one of the 40 Keras Applications builds with a correct block map."""

import json
import os
import sys

import keras
import pytest

import kerastl
from kerastl import blocks, cli

# (clear_session after each test: see the fixture)
pytestmark = pytest.mark.usefixtures("collect_only_this_modules_garbage")

NAMES = [c.name for c in kerastl.list_configs("keras.applications")]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_block_map_of_every_application(name):
    # Auto-generated layer names (ConvNeXt's `add_2`) count from the last
    # clear_session; the stored tables were built in a fresh session, so
    # this test must not depend on what ran before it on its worker.
    keras.backend.clear_session()
    config = kerastl.zoo_entry(name)
    size = max(config.min_size, 32)
    backbone = kerastl.load_backbone(name, weights=None,
                                     input_shape=(size, size, 3))
    bm = backbone.block_map
    assert bm.names == config.block_names  # block count and order

    # `kerastl zoo show` prints a stored table (at the default input size):
    # all but the spatial size of the outputs is the same at any size.
    stored = cli.stored_block_table(config)
    assert stored is not None, "run `python tests/test_zoo_all.py`"
    assert stored["input_shape"][:2] == [config.default_size] * 2
    assert [_size_free(r) for r in stored["rows"]] == \
        [_size_free(r) for r in backbone.block_table()], \
        "stale block table: run `python tests/test_zoo_all.py`"
    assert blocks.HEAD not in bm.names
    assert bm.validate() == []  # non-empty blocks, depth order

    # Every layer that owns weights is in exactly one block, and every
    # weight variable is counted once.
    weighted = [l for l, _ in blocks.layer_graph(backbone.model) if
                getattr(l, "weights", None)]
    owners = {}
    for b in bm.names:
        for layer in bm.weighted_layers(b):
            assert id(layer) not in owners, (layer.name, owners.get(id(layer)))
            owners[id(layer)] = b
    assert len(owners) == len(weighted)
    assert sum(bm.params(b) for b in bm.names) == backbone.model.count_params()
    n_vars = sum(len(bm.variables(b)) for b in bm.names)
    assert n_vars == len(backbone.model.weights)

    # Named endpoints exist and are image feature maps.
    assert set(config.endpoints) >= {"stride32"}
    for endpoint in list(config.endpoints) + bm.names:
        layer = backbone.endpoint_layer(endpoint)
        assert len(layer.output.shape) == 4, endpoint
    # ... on the main path: every path from the input to the output goes
    # through it (not a residual branch before its add, as Xception's
    # block2_pool and ConvNeXt's *_identity layers were). NASNet's cells
    # each read the two cells before them, so no cell output is on every
    # path: its endpoints are cell outputs, as its paper's features are.
    main_path = not name.startswith("nasnet")
    graph = blocks.layer_graph(backbone.model)
    children = {}
    for layer, parents in graph:
        for parent in parents:
            children.setdefault(id(parent), []).append(layer)
    first, last = graph[0][0], backbone.model.layers[-1]
    for endpoint in config.endpoints if main_path else ():
        layer = backbone.endpoint_layer(endpoint)
        if layer is last:
            continue
        seen, todo = {id(layer)}, [first]
        while todo:
            node = todo.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            todo += children.get(id(node), [])
        assert id(last) not in seen, (
            f"endpoint {endpoint} ({layer.name}) is not on the main path")
    keras.backend.clear_session()


def _size_free(row):
    """A block-table row without the outputs' spatial size."""
    return (row["block"], row["layers"], row["weighted_layers"],
            row["params"], row["output_layer"], row["output_shape"][-1])


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet50",
                                  "efficientnet_b0"])
def test_the_stored_block_table_is_the_built_one(name, capsys):
    """For three models, the whole stored table (spatial sizes too) is
    what building the model at its default size gives."""
    backbone = kerastl.load_backbone(name, weights=None)
    stored = cli.stored_block_table(backbone.config)
    assert tuple(stored["input_shape"]) == backbone.input_shape
    assert stored["rows"] == _table(backbone)
    keras.backend.clear_session()


def _table(backbone):
    return [dict(r, output_shape=list(r["output_shape"]))
            for r in backbone.block_table()]


def write_block_tables():
    """Builds every Keras Applications entry at its default size and writes
    the tables `kerastl zoo show` prints (zoo_configs/block_tables.json)."""
    tables = {}
    for i, name in enumerate(NAMES):
        print(f"[{i + 1}/{len(NAMES)}] {name}", file=sys.stderr)
        backbone = kerastl.load_backbone(name, weights=None)
        tables[name] = {"input_shape": list(backbone.input_shape),
                        "rows": _table(backbone)}
        keras.backend.clear_session()
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                        "zoo_configs", cli.BLOCK_TABLES)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tables, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    write_block_tables()
