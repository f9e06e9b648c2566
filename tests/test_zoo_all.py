"""Every one of the 40 Keras Applications builds with a correct block map."""

import keras
import pytest

import kerastl
from kerastl import blocks

NAMES = [c.name for c in kerastl.list_configs("keras.applications")]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_block_map_of_every_application(name):
    config = kerastl.zoo_entry(name)
    size = max(config.min_size, 32)
    backbone = kerastl.load_backbone(name, weights=None,
                                     input_shape=(size, size, 3))
    bm = backbone.block_map
    assert bm.names == config.block_names  # block count and order
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
    keras.backend.clear_session()
