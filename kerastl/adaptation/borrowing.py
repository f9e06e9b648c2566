"""Borrowing source data: selective joint fine-tuning (Ge & Yu, CVPR 2017).

With few target labels and a large labelled source set at hand, retrieve
for every target image its nearest source images in a low-level feature
space (an early block: textures and colours, not classes), and fine-tune one
shared backbone on the target images plus those source images, with one
head per task. Hard targets (misclassified, or with high prediction
entropy) get more neighbours.

    low = kerastl.extract_features(backbone, x_src, layers="stage1")
    low_t = kerastl.extract_features(backbone, x_tgt, layers="stage1")
    sel = kerastl.adaptation.select_source_samples(low, low_t, k=10)
    joint = kerastl.adaptation.joint_fine_tune(backbone, (x_tgt, y_tgt),
                                    (x_src[sel.indices], y_src[sel.indices]))
    joint.target_model.evaluate(x_test, y_test)
"""

import dataclasses

import keras
import numpy as np

from kerastl import heads
from kerastl.blocks import model_input, model_output
from kerastl.errors import KerastlError
from kerastl.features.extract import check_finite, flat_features
from kerastl.plan import TrainingPlan
from kerastl.training import fine_tune

METRICS = ("cosine", "l2")


@dataclasses.dataclass
class SourceSelection:
    """What :func:`select_source_samples` picked.

    Attributes:
        indices: the selected source rows, unique and sorted (index the
            source data with it).
        neighbours: ``(n_target, k_max)`` source rows per target, nearest
            first; ``-1`` pads targets that got fewer than ``k_max``.
        distances: the matching distances (``inf`` for padding); cosine
            distance is ``1 - cosine similarity``.
        k: neighbours given to each target.
    """

    indices: np.ndarray
    neighbours: np.ndarray
    distances: np.ndarray
    k: np.ndarray

    def __len__(self):
        return len(self.indices)


def _matrix(features, name):
    if not isinstance(features, dict) and np.ndim(features) < 2:
        raise KerastlError(f"{name} must be a non-empty (n, features) array; "
                           f"got shape {np.shape(features)}.")
    f = flat_features(features)
    if len(f) == 0:
        raise KerastlError(f"{name} must be a non-empty (n, features) array; "
                           f"got shape {f.shape}.")
    check_finite(f, name)
    return f


def hard_examples(probabilities, labels, entropy_quantile=0.75):
    """Hard target examples: misclassified or with high prediction entropy.

    Args:
        probabilities: ``(n, classes)`` predictions of the current model.
        labels: ``(n,)`` integer labels.
        entropy_quantile: examples whose entropy is above this quantile of
            all entropies count as hard too (``None``: misclassified only).

    Returns:
        A boolean mask, for ``hard=`` of :func:`select_source_samples`.
    """
    p = np.asarray(probabilities, dtype="float64")
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]  # (n, 1), as keras.datasets gives them
    if p.ndim != 2 or labels.shape != (len(p),):
        raise KerastlError(
            f"hard_examples: probabilities of shape {p.shape} and labels of "
            f"shape {labels.shape}; expected (n, classes) and (n,).")
    hard = np.argmax(p, axis=1) != labels
    if entropy_quantile is not None:
        entropy = -np.sum(p * np.log(np.clip(p, 1e-12, 1.0)), axis=1)
        hard |= entropy > np.quantile(entropy, entropy_quantile)
    return hard


def select_source_samples(source_features, target_features, k=10,
                          metric="cosine", hard=None, k_hard=None,
                          chunk_size=1024):
    """The nearest source samples of every target sample.

    Exact search, in chunks of ``chunk_size`` targets (memory
    ``chunk_size x n_source``).

    Args:
        source_features: ``(n_source, d)`` (or a dict of blocks, joined).
            Low-level features work best (an early block; Ge & Yu used
            filter-bank responses): the point is to find source images that
            look alike, not ones of the same class.
        target_features: ``(n_target, d)``, the same feature space.
        k: neighbours per target (an int, or one int per target).
        metric: ``"cosine"`` or ``"l2"``.
        hard: a boolean mask (or indices) of hard targets, see
            :func:`hard_examples`; they get ``k_hard`` neighbours.
        k_hard: neighbours for hard targets (default ``2 * k``).

    Returns:
        A :class:`SourceSelection`; ``.indices`` are the rows to borrow.
    """
    if metric not in METRICS:
        raise KerastlError(f"metric={metric!r}: expected 'cosine' or 'l2'.")
    src = _matrix(source_features, "source_features")
    tgt = _matrix(target_features, "target_features")
    if src.shape[1] != tgt.shape[1]:
        raise KerastlError(
            f"source features have {src.shape[1]} dimensions, target "
            f"features {tgt.shape[1]}: extract both from the same layer.")
    if isinstance(chunk_size, bool) or not isinstance(
            chunk_size, (int, np.integer)) or chunk_size < 1:
        raise KerastlError(f"chunk_size={chunk_size!r}: expected an int "
                           ">= 1.")
    k_array = np.asarray(k)
    if k_array.dtype.kind not in "iu" or k_array.ndim > 1 or (
            k_array.ndim == 1 and len(k_array) != len(tgt)):
        raise KerastlError(
            f"k={k!r}: expected an int, or one int per target "
            f"({len(tgt)}).")
    ks = np.broadcast_to(k_array, (len(tgt),)).astype("int64").copy()
    if hard is not None:
        hard = np.asarray(hard)
        if hard.dtype == bool:
            if len(hard) != len(tgt):
                raise KerastlError(f"hard has {len(hard)} entries for "
                                   f"{len(tgt)} targets.")
            mask = hard
        else:
            if hard.dtype.kind not in "iu" or (len(hard) and (
                    hard.min() < 0 or hard.max() >= len(tgt))):
                raise KerastlError(
                    f"hard: expected a boolean mask or the indices of hard "
                    f"targets, 0 to {len(tgt) - 1}.")
            mask = np.zeros(len(tgt), bool)
            mask[hard.astype("int64")] = True
        if k_hard is not None and (isinstance(k_hard, bool) or
                                   not isinstance(k_hard, (int, np.integer))):
            raise KerastlError(f"k_hard={k_hard!r}: expected an int >= 1.")
        ks[mask] = 2 * ks[mask] if k_hard is None else int(k_hard)
    if ks.min() < 1:
        raise KerastlError(f"k={k!r}: every target needs at least one "
                           "neighbour.")
    ks = np.minimum(ks, len(src))
    k_max = int(ks.max())
    if metric == "cosine":
        src = src / np.maximum(np.linalg.norm(src, axis=1, keepdims=True),
                               1e-12)
        tgt = tgt / np.maximum(np.linalg.norm(tgt, axis=1, keepdims=True),
                               1e-12)
    else:
        src_sq = np.einsum("ij,ij->i", src, src)
    neighbours = np.full((len(tgt), k_max), -1, dtype="int64")
    distances = np.full((len(tgt), k_max), np.inf, dtype="float32")
    for start in range(0, len(tgt), chunk_size):
        t = tgt[start:start + chunk_size]
        if metric == "cosine":
            d = 1.0 - t @ src.T
        else:
            d = np.maximum(np.einsum("ij,ij->i", t, t)[:, None]
                           - 2.0 * t @ src.T + src_sq[None, :], 0.0)
        if k_max < len(src):
            part = np.argpartition(d, k_max - 1, axis=1)[:, :k_max]
        else:
            part = np.tile(np.arange(len(src)), (len(t), 1))
        dp = np.take_along_axis(d, part, axis=1)
        order = np.argsort(dp, axis=1, kind="stable")
        nn = np.take_along_axis(part, order, axis=1)
        dn = np.take_along_axis(dp, order, axis=1)
        if metric == "l2":
            dn = np.sqrt(dn)
        keep = np.arange(k_max)[None, :] < ks[start:start + len(t), None]
        neighbours[start:start + len(t)] = np.where(keep, nn, -1)
        distances[start:start + len(t)] = np.where(keep, dn, np.inf)
    indices = np.unique(neighbours[neighbours >= 0])
    return SourceSelection(indices, neighbours, distances, ks)


@dataclasses.dataclass
class JointFineTuning:
    """What :func:`joint_fine_tune` returns.

    Attributes:
        model: the two-headed training model (outputs ``target``, ``source``).
        target_model: images to target classes (what to evaluate, export).
        source_model: images to source classes.
        history: the Keras ``History``.
    """

    model: keras.Model
    target_model: keras.Model
    source_model: keras.Model
    history: keras.callbacks.History


def joint_fine_tune(backbone, target, source, epochs=10, batch_size=32,
                    optimizer=None, source_weight=1.0, freeze=False,
                    bn="frozen", pooling="avg", dropout=0.0,
                    validation_data=None, callbacks=None, verbose=0,
                    seed=0):
    """Fine-tunes one backbone on target + borrowed source data, two heads.

    Each batch mixes target and source samples; a sample's loss counts on
    its own task's head only (the other head's loss gets weight 0). The
    target samples are repeated so that both tasks weigh alike per epoch
    (Ge & Yu trained on the union with per-task losses). Trains through
    :func:`kerastl.fine_tune` (one phase, the batch order drawn from
    ``seed``).

    Args:
        backbone: a :class:`~kerastl.Backbone` or ``keras.Model`` with a
            spatial output.
        target: ``(x, y)`` target images and integer labels.
        source: ``(x, y)`` selected source images and their labels (their
            own label space).
        source_weight: the source loss weight relative to the target's.
        freeze: ``False`` (default) trains everything, ``True`` only the
            heads, a block name or int freezes up to it.
        validation_data: ``(x, y)`` target data; reported as
            ``val_target_accuracy``.
        callbacks: Keras callbacks for ``fit``.

    Returns:
        A :class:`JointFineTuning`.
    """
    model = getattr(backbone, "model", backbone)
    if not isinstance(model, keras.Model) or \
            len(getattr(model_output(model), "shape", ())) != 4:
        raise KerastlError("joint_fine_tune needs a kerastl.Backbone or a "
                           "keras.Model with a spatial output.")
    for name, data in (("target", target), ("source", source)):
        if not isinstance(data, tuple) or len(data) != 2:
            raise KerastlError(
                f"joint_fine_tune: {name} must be an (images, labels) tuple "
                f"of arrays; got {type(data).__name__}.")
    (xt, yt), (xs, ys) = target, source
    xt, yt, xs, ys = (np.asarray(a) for a in (xt, yt, xs, ys))
    if len(xt) != len(yt) or len(xs) != len(ys):
        raise KerastlError("target and source must be (x, y) with as many "
                           "labels as images.")
    if len(xs) == 0:
        raise KerastlError("No source samples to borrow: select some with "
                           "select_source_samples().")
    if len(xt) == 0:
        raise KerastlError("joint_fine_tune: the target has no images; it "
                           "is what the model is fine-tuned for.")
    labels = []
    for name, y in (("target", yt), ("source", ys)):
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]  # (n, 1), as keras.datasets gives them
        if y.ndim != 1 or y.dtype.kind not in "iu" or y.min() < 0:
            raise KerastlError(
                f"joint_fine_tune: the {name} labels have shape {y.shape} "
                f"and dtype {y.dtype}; expected one class index (an int >= "
                "0) per image (one-hot labels: labels.argmax(-1)).")
        labels.append(y)
    yt, ys = labels
    n_t, n_s = int(yt.max()) + 1, int(ys.max()) + 1
    pool = heads.pooling_layer(pooling, "joint_pool")(model_output(model))
    if dropout:
        pool = keras.layers.Dropout(dropout, name="joint_dropout")(pool)
    out_t = heads.output_layer(n_t, "softmax", "target")(pool)
    out_s = heads.output_layer(n_s, "softmax", "source")(pool)
    joint = keras.Model(model_input(model),
                        {"target": out_t, "source": out_s},
                        name=f"{model.name}_joint")
    repeat = max(1, int(round(len(xs) / len(xt))))
    xt_r, yt_r = np.concatenate([xt] * repeat), np.concatenate([yt] * repeat)
    x = np.concatenate([xt_r, xs]).astype("float32")
    is_t = np.concatenate([np.ones(len(xt_r)), np.zeros(len(xs))])
    y = {"target": np.concatenate([yt_r, np.zeros(len(xs), yt.dtype)]),
         "source": np.concatenate([np.zeros(len(xt_r), ys.dtype), ys])}
    w = {"target": is_t.astype("float32"),
         "source": ((1 - is_t) * source_weight).astype("float32")}
    val = None
    if validation_data is not None:
        vx, vy = validation_data
        vy = np.asarray(vy)
        val = (np.asarray(vx, "float32"),
               {"target": vy, "source": np.zeros_like(vy)},
               {"target": np.ones(len(vy), "float32"),
                "source": np.zeros(len(vy), "float32")})
    if freeze is True or freeze is False:
        strategy, up_to = ("features" if freeze else "full"), None
    else:
        strategy, up_to = "partial", freeze
    plan = TrainingPlan(
        strategy=strategy, freeze_up_to=up_to, bn=bn, head_epochs=0,
        epochs=epochs, optimizer=optimizer or keras.optimizers.Adam(1e-3),
        patience=None, batch_size=batch_size, seed=seed,
        check_features=False)
    history = fine_tune(
        joint, (x, y, w), val, plan,
        loss={"target": "sparse_categorical_crossentropy",
              "source": "sparse_categorical_crossentropy"},
        metrics=None, weighted_metrics={"target": ["accuracy"],
                                        "source": ["accuracy"]},
        callbacks=callbacks or (), verbose=verbose).fine_tune
    target_model = keras.Model(model_input(model), out_t,
                               name=f"{model.name}_target")
    source_model = keras.Model(model_input(model), out_s,
                               name=f"{model.name}_source")
    return JointFineTuning(joint, target_model, source_model, history)
