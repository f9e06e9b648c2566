"""Parameter-efficient fine-tuning by block: LoRA, biases only, norms only.

Freezing by block decides which blocks train; these decide which *weights*
of a block train, so that a large backbone adapts with a small fraction of
its parameters (and of the optimizer state):

* :func:`lora` calls Keras's own ``layer.enable_lora(rank, lora_alpha)``
  (Hu et al., 2021: a low-rank update ``A @ B``, scaled by
  ``alpha / rank``, beside a frozen kernel) on the supported layers of the
  chosen blocks; no LoRA arithmetic is written here.
* :func:`tune_biases` trains only the ``bias`` of each layer (BitFit);
* :func:`tune_norms` trains only the normalisation layers (LayerNorm,
  BatchNorm, GroupNorm: scale and offset; BatchNorm with its batch
  statistics).

All three resolve to a :class:`kerastl.freezing.Trainable` with a ``mode``
and go through :func:`kerastl.freezing.apply_trainable`, the one place
that sets what trains; ``fine_tune(strategy="lora" | "bias" | "norm")``,
``kerastl finetune --strategy lora --lora-rank 8`` and the experiment YAML
take them the same way. The added LoRA variables belong to their layer's
block, so :class:`~kerastl.LayerwiseOptimizer`, ``trainable_summary`` and
the boundary cache work unchanged.

Saving. Keras saves a LoRA layer with its factors merged into the kernel
and restores the factors as zeros (and a Dense layer's ``lora_alpha`` as
the rank): the file serves correctly, but training cannot continue from
it. :func:`kerastl.save_model` also stores the unmerged kernels, the
factors, alpha and every weight's trainable flag in the ``.keras`` archive
(:func:`write_state`), and :func:`kerastl.load_model` puts them back before
the optimizer is built, so a resumed run continues exactly.
:func:`merge_lora` gives the plain model, each kernel merged, for serving;
every export of kerastl merges first.
"""

import io
import json
import numbers
import os
import tempfile
import zipfile

import keras
import numpy as np

from kerastl import _keras_private as _private
from kerastl import freezing
from kerastl.blocks import block_map
from kerastl.errors import BlockError, KerastlError

# The layers Keras 3 gives enable_lora (depthwise and separable
# convolutions, transposed convolutions and others have none).
LORA_LAYERS = (keras.layers.Dense, keras.layers.EinsumDense,
               keras.layers.Embedding, keras.layers.Conv1D,
               keras.layers.Conv2D, keras.layers.Conv3D)
LORA_TARGETS = ("auto", "all", "attention")

# The archive member kerastl.save_model adds to a .keras file.
STATE_MEMBER = "kerastl_peft_state.npz"


def _check_rank(rank, alpha):
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or \
            rank < 1:
        raise KerastlError(f"rank={rank!r}: expected a positive integer "
                           "(LoRA's rank; 4 to 16 is usual).")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(
            alpha, numbers.Real) or alpha <= 0):
        raise KerastlError(f"alpha={alpha!r}: expected a positive number or "
                           "None (alpha = rank: the update scaled by 1).")


def select_blocks(model, blocks="all"):
    """The blocks of the pretrained network that ``blocks`` names.

    Args:
        blocks: ``"all"`` (every block but the new heads); a block name;
            a range of names ``"stage3:"`` (that block to the last),
            ``"stage2:stage4"`` or ``":stage2"`` (both ends included); a
            block index; or a list of names and indices.

    Raises:
        BlockError: a name the model does not have (the blocks listed), or
            a new head (it trains whole).
    """
    bm = block_map(freezing.keras_model_of(model))
    base = bm.base_blocks
    if isinstance(blocks, str) and blocks == "all":
        chosen = list(base)
    elif isinstance(blocks, str) and ":" in blocks:
        ends = [bm.resolve(end) if end else None
                for end in blocks.partition(":")[::2]]
        if any(end is not None and end not in base for end in ends):
            raise BlockError(
                f"blocks={blocks!r}: a new head trains whole; a range goes "
                f"over the pretrained blocks {', '.join(base)}.")
        i = base.index(ends[0]) if ends[0] else 0
        j = base.index(ends[1]) if ends[1] else len(base) - 1
        chosen = base[i:j + 1]
    elif isinstance(blocks, (str, int)) and not isinstance(blocks, bool):
        chosen = [bm.resolve(blocks)]
    elif isinstance(blocks, (list, tuple, range)):
        chosen = [bm.resolve(b) for b in blocks]
    else:
        raise KerastlError(
            f"blocks={blocks!r}: expected 'all', a block name, a range such "
            f"as '{base[-1] if base else 'block'}:' or a list of blocks.")
    heads = [b for b in chosen if b in bm.head_blocks]
    if heads:
        raise BlockError(
            f"blocks: {', '.join(heads)} is a new head, which trains whole; "
            f"choose among the pretrained blocks {', '.join(base)}.")
    if not chosen:
        raise BlockError(f"blocks={blocks!r} names no block; the blocks are "
                         f"{', '.join(base)}.")
    return [b for b in bm.names if b in chosen]


def _attention_layers(model):
    return [l for l in _private.all_sublayers(model)
            if isinstance(l, keras.layers.MultiHeadAttention)]


def lora_targets(model, blocks="all", targets="auto"):
    """The layers :func:`lora` gives LoRA factors, in model order.

    Args:
        blocks: as in :func:`select_blocks`.
        targets: ``"auto"`` (default): in a block with attention layers,
            the query and value projections of its attention (as Hu et al.
            and PEFT's default for ViT); in other blocks, every Dense,
            EinsumDense, Embedding and Conv1D/2D/3D layer. ``"all"``: every
            such layer in every chosen block. ``"attention"``: the query,
            key, value and output projections of the attention layers only.
    """
    if targets not in LORA_TARGETS:
        raise KerastlError(f"targets={targets!r}: expected one of "
                           f"{', '.join(LORA_TARGETS)}.")
    keras_model = freezing.keras_model_of(model)
    bm = block_map(keras_model)
    chosen = set(select_blocks(keras_model, blocks))
    attention = {}  # block -> ids of its attention projections
    for mha in _attention_layers(keras_model):
        names = ("query", "value") if targets == "auto" else \
            ("query", "key", "value", "output")
        for n in names:
            dense = getattr(mha, f"_{n}_dense", None)
            if dense is not None and dense.weights:
                block = bm.block_of(dense.weights[0])
                attention.setdefault(block, set()).add(id(dense))
    out = []
    for layer in freezing.leaf_layers(keras_model):
        if not isinstance(layer, LORA_LAYERS) or bm.is_split(layer):
            continue
        block = bm.block_of(layer.weights[0])
        if block not in chosen:
            continue
        if targets == "all" or (targets == "auto" and block not in attention):
            out.append(layer)
        elif id(layer) in attention.get(block, ()):
            out.append(layer)
    return out


def lora_layers(model):
    """The layers of ``model`` with LoRA enabled, in model order."""
    return [l for l in freezing.leaf_layers(freezing.keras_model_of(model))
            if getattr(l, "lora_enabled", False)]


def lora(model, rank=None, alpha=None, blocks="all", targets="auto",
         bn="frozen", recompile=True):
    """Adds LoRA factors (Keras's ``enable_lora``) to ``blocks`` and trains
    only them and the new heads.

    In each chosen block, the layers :func:`lora_targets` names get
    ``layer.enable_lora(rank, lora_alpha=alpha)``: their kernels freeze
    and two factors ``A`` (``he_uniform``) and ``B`` (zeros) train, so the
    model starts exactly where it was. Every other weight of the
    pretrained network freezes (depthwise convolutions, normalisation
    layers and the layers ``targets`` leaves out stay as they were
    trained); the heads train whole. Calling it again with the same rank
    on more blocks adds to the LoRA layers.

    Args:
        model: a ``keras.Model`` with a block map (a classifier from
            :func:`kerastl.build_classifier`, a ``.keras`` file's model, a
            KerasHub backbone's classifier) or a Backbone.
        rank: the factors' rank; None: the rank of the model's LoRA
            layers, or 8 (the benchmark's choice, see the docs).
        alpha: the update's scale is ``alpha / rank``; None: ``rank``.
        blocks: ``"all"`` (default), a block, ``"stage3:"`` (from that
            block on) or a list (see :func:`select_blocks`); the blocks
            before the first chosen one are frozen, and the boundary cache
            runs them once.
        targets: which layers of a block (see :func:`lora_targets`).
        bn: ``"frozen"`` only: the chosen blocks' normalisation layers
            stay as they were trained (their statistics too); the heads
            train whole. To tune norms, :func:`tune_norms`.
        recompile: recompile a compiled model (see :func:`kerastl.freeze`).

    Returns:
        The names of the layers that have LoRA factors now.

    Raises:
        KerastlError: no layer in the chosen blocks supports LoRA, or a
            layer already has LoRA of another rank.

    Example::

        model = kerastl.build_classifier(backbone, num_classes=10)
        kerastl.lora(model, rank=8)            # or blocks="stage4:"
        kerastl.fine_tune(model, train, val, strategy="lora")
    """
    if bn != "frozen":  # (checked before the model changes)
        raise KerastlError(
            f"lora(bn={bn!r}): LoRA trains only the factors and the heads; "
            "the normalisation layers of the chosen blocks stay frozen, "
            "statistics included (bn='frozen'). To tune them too, call "
            "kerastl.tune_norms, or fine-tune whole with kerastl.freeze("
            "model, bn='train').")
    keras_model = freezing.keras_model_of(model)
    chosen = enable_lora(keras_model, rank, alpha, blocks, targets)
    _train(keras_model, chosen, "lora", bn, recompile)
    return [l.name for l in lora_layers(keras_model)]


def enable_lora(model, rank=None, alpha=None, blocks="all", targets="auto"):
    """The first half of :func:`lora`: LoRA factors added to the chosen
    blocks' layers (kept where they exist), what trains left as it is.
    ``rank`` None: the rank the model's LoRA layers have, or 8. Returns
    the chosen blocks."""
    keras_model = freezing.keras_model_of(model)
    if rank is None:
        ranks = {l.lora_rank for l in lora_layers(keras_model)}
        rank = ranks.pop() if len(ranks) == 1 else 8
    _check_rank(rank, alpha)
    rank = int(rank)
    chosen = select_blocks(keras_model, blocks)
    layers = lora_targets(keras_model, chosen, targets)
    if not layers:
        bm = block_map(keras_model)
        kinds = sorted({type(l).__name__ for l in freezing.leaf_layers(
            keras_model) if bm.block_of(l.weights[0]) in chosen})
        raise KerastlError(
            f"No layer in blocks {', '.join(chosen)} supports LoRA (Keras "
            f"has enable_lora for {', '.join(c.__name__ for c in LORA_LAYERS)}"
            f"; these blocks hold {', '.join(kinds) or 'no weights'}). "
            "Choose other blocks, or strategy 'bias' / 'norm'.")
    for layer in layers:
        if layer.lora_enabled:
            if layer.lora_rank != rank:
                raise KerastlError(
                    f"Layer {layer.name!r} already has LoRA of rank "
                    f"{layer.lora_rank}; use rank={layer.lora_rank}, or "
                    "merge_lora(model) first to start a new one.")
            if alpha is not None and \
                    float(layer.lora_alpha) != float(alpha):
                raise KerastlError(
                    f"Layer {layer.name!r} already has LoRA with alpha "
                    f"{layer.lora_alpha:g}; use alpha={layer.lora_alpha:g} "
                    "(or leave alpha out), or merge_lora(model) first to "
                    "start a new one.")
            continue
        layer.enable_lora(rank, lora_alpha=alpha)
    return chosen


def _train(keras_model, chosen, mode, bn, recompile):
    """``mode`` in the ``chosen`` blocks, the heads whole, the rest
    frozen: through the one applier."""
    bm = block_map(keras_model)  # new after enable_lora: more weights
    freezing.apply_trainable(
        keras_model, freezing.Trainable.of(bm, chosen + bm.head_blocks, mode),
        bn=bn, recompile=recompile)


def _tune(model, blocks, mode, bn, recompile):
    keras_model = freezing.keras_model_of(model)
    _train(keras_model, select_blocks(keras_model, blocks), mode, bn,
           recompile)
    return [v.path for v in keras_model.trainable_variables]


def tune_biases(model, blocks="all", recompile=True):
    """Trains only the biases of ``blocks`` (BitFit) and the new heads.

    Every layer's ``bias`` variable in the chosen blocks trains (Dense,
    EinsumDense, convolutions); everything else of the pretrained network
    is frozen, BatchNorm included. Arguments as in :func:`lora`.

    Returns:
        The paths of the variables that train now.
    """
    return _tune(model, blocks, "bias", "frozen", recompile)


def tune_norms(model, blocks="all", recompile=True):
    """Trains only the normalisation layers of ``blocks`` and the new heads.

    LayerNormalization, GroupNormalization and BatchNormalization layers
    train their scale and offset; a BatchNormalization layer then trains
    as Keras trains one (batch statistics in ``fit``, moving averages
    updated), which is the point of tuning it. Everything else of the
    pretrained network is frozen. Arguments as in :func:`lora`.

    Returns:
        The paths of the variables that train now.
    """
    return _tune(model, blocks, "norm", "train", recompile)


# -- merging and saving --------------------------------------------------------


def _without_lora_config(config):
    """A model config with every layer's ``lora_rank`` / ``lora_alpha``
    removed (in place, recursively)."""
    if isinstance(config, dict):
        config.pop("lora_rank", None)
        config.pop("lora_alpha", None)
        for value in config.values():
            _without_lora_config(value)
    elif isinstance(config, list):
        for value in config:
            _without_lora_config(value)
    return config


def merge_lora(model):
    """The model with every LoRA update merged into its kernel: a plain
    Keras model of the same architecture, without LoRA variables or
    operations, for serving.

    Keras merges (``kernel + alpha / rank * A @ B``, in the kernel's dtype)
    when it saves a LoRA layer; this saves the model, removes LoRA from
    its configuration and loads it back. ``model`` itself is unchanged.
    A model without LoRA is returned as it is.
    """
    keras_model = freezing.keras_model_of(model)
    if not lora_layers(keras_model):
        return keras_model
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        keras_model.save(path)
        merged_path = os.path.join(tmp, "merged.keras")
        with zipfile.ZipFile(path) as src, \
                zipfile.ZipFile(merged_path, "w") as dst:
            for item in src.infolist():
                data = src.read(item.filename)
                if item.filename == "config.json":
                    data = json.dumps(_without_lora_config(
                        json.loads(data))).encode()
                dst.writestr(item, data)
        merged = keras.models.load_model(merged_path, compile=False)
    if lora_layers(merged):  # pragma: no cover - a Keras change
        raise KerastlError("merge_lora: Keras kept LoRA layers after merging; "
                           "please report this with your Keras version.")
    return merged


def model_state(model):
    """What Keras's ``.keras`` file loses of a model and
    :func:`kerastl.save_model` keeps: each LoRA layer's place (its index
    among the model's sublayers), rank, alpha, unmerged kernel and
    factors, and the trainable flag of every weight (a flag set on one
    variable is not in Keras's config). A dict of arrays and one JSON
    string."""
    keras_model = freezing.keras_model_of(model)
    sublayers = _private.all_sublayers(keras_model)
    index = {id(l): i for i, l in enumerate(sublayers)}
    layers, arrays = [], {}
    for n, layer in enumerate(lora_layers(keras_model)):
        layers.append({"index": index[id(layer)],
                       "class": type(layer).__name__,
                       "rank": int(layer.lora_rank),
                       "alpha": float(layer.lora_alpha)})
        arrays[f"lora{n}_base"] = np.asarray(
            _private.lora_base_weight(layer).numpy())
        a, b = _private.lora_factors(layer)
        arrays[f"lora{n}_a"] = np.asarray(a.numpy())
        arrays[f"lora{n}_b"] = np.asarray(b.numpy())
    trainable = {id(v) for v in keras_model.trainable_weights}
    meta = {"lora": layers,
            "weights": [[list(v.shape), id(v) in trainable]
                        for v in keras_model.weights]}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    return arrays


def write_state(model, path):
    """Adds :func:`model_state` to the ``.keras`` archive at ``path`` (a
    member Keras does not read)."""
    buffer = io.BytesIO()
    np.savez(buffer, **model_state(model))
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(STATE_MEMBER, buffer.getvalue())


def read_state(path):
    """The state :func:`write_state` stored in a ``.keras`` file, or None."""
    with zipfile.ZipFile(path) as archive:
        if STATE_MEMBER not in archive.namelist():
            return None
        data = np.load(io.BytesIO(archive.read(STATE_MEMBER)))
        state = {k: data[k] for k in data.files}
    state["meta"] = json.loads(bytes(state["meta"]).decode())
    return state


def _mismatch(path, what):
    return KerastlError(
        f"{path!r}: the kerastl state saved with the model does not match "
        f"it ({what}); load it with keras.models.load_model (LoRA merged, "
        "factors at zero) or save it again with kerastl.save_model.")


def restore_structure(model, state, path="the model file"):
    """Before the optimizer is built: LoRA enabled where Keras did not
    (a KerasHub layer's sublayers are built without it), each LoRA
    layer's alpha (Keras resets a Dense layer's to its rank) and every
    weight's trainable flag as saved."""
    sublayers = _private.all_sublayers(model)
    for entry in state["meta"]["lora"]:
        i = entry["index"]
        if i >= len(sublayers) or \
                type(sublayers[i]).__name__ != entry["class"]:
            raise _mismatch(path, f"no {entry['class']} at sublayer {i}")
        layer = sublayers[i]
        if not layer.lora_enabled:
            layer.enable_lora(entry["rank"], lora_alpha=entry["alpha"])
        layer.lora_alpha = entry["alpha"]
    saved = state["meta"]["weights"]
    weights = model.weights
    if len(saved) != len(weights) or any(
            tuple(s) != tuple(v.shape) for (s, _), v in zip(saved, weights)):
        if state["meta"]["lora"]:
            raise _mismatch(path, f"{len(saved)} weights saved, "
                            f"{len(weights)} in the model")
        return  # no LoRA to lose: Keras's own flags stand
    wanted = {id(v) for (_, t), v in zip(saved, weights) if t}
    for layer in freezing.leaf_layers(model):
        freezing.train_only(layer, wanted)
    for v in model.trainable_weights:  # a container's own (a class token)
        if id(v) not in wanted:
            v.trainable = False


def restore_values(model, state):
    """After the weights are loaded: each LoRA layer's unmerged kernel and
    its factors (Keras loaded the merged kernel and zeroed the factors)."""
    sublayers = _private.all_sublayers(model)
    for n, entry in enumerate(state["meta"]["lora"]):
        layer = sublayers[entry["index"]]
        _private.lora_base_weight(layer).assign(state[f"lora{n}_base"])
        a, b = _private.lora_factors(layer)
        a.assign(state[f"lora{n}_a"])
        b.assign(state[f"lora{n}_b"])

