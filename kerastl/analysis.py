"""Representation and transfer-depth analysis.

* :func:`linear_cka`: linear centred kernel alignment (Kornblith et al.,
  2019), plain and debiased; :func:`cka_by_block` compares two models block
  by block (what stays the same after fine-tuning, what changes).
* :func:`transfer_depth_sweep`: fine-tune once per number of frozen leading
  blocks and record target accuracy, for several target-set sizes (Gerace et
  al., 2023: the best depth depends on the amount of target data).
* :func:`rank_backbones`: score candidate backbones (and, optionally, each
  of their blocks) for a target task from their features, without
  fine-tuning (LogME, regularised H-score, LEEP, NCE, or a cross-validated
  linear probe; :mod:`kerastl.features.transferability`).

Plots need matplotlib (``pip install kerastl[plots]``); the functions that
compute return plain data without it.
"""

import dataclasses
import numbers
import os
import time

import keras
import numpy as np

from kerastl import _keras_private as _private
from kerastl.backbone import Backbone, load_backbone
from kerastl.blocks import block_map, model_input
from kerastl.errors import KerastlError
from kerastl.features import transferability
from kerastl.features.extract import (data_labels, extract_features,
                                      flat_features, labelled_subset)
from kerastl.features.probes import softmax_probe
from kerastl.freezing import keras_model_of, restored_trainability
from kerastl.heads import build_classifier
from kerastl.plan import TrainingPlan
from kerastl.spec import RANK_METHODS
from kerastl.sampling import few_shot
from kerastl.training import fine_tune


def _pyplot():
    try:  # matplotlib is optional (kerastl[plots]): imported when plotting
        import matplotlib.pyplot as plt
    except ImportError:
        raise KerastlError("Plots need matplotlib: pip install "
                           "'kerastl[plots]'.") from None
    return plt


# -- CKA --------------------------------------------------------------------------

def _debiased_dot(xty, rows_x, rows_y, norm_x, norm_y, n):
    """Unbiased HSIC estimator terms (Song et al., 2012), feature space."""
    return (xty - n / (n - 2.0) * rows_x.dot(rows_y)
            + norm_x * norm_y / ((n - 1) * (n - 2)))


def linear_cka(x, y, debiased=False):
    """Linear CKA between two representations of the same ``n`` examples.

    ``x`` is ``(n, p1)``, ``y`` is ``(n, p2)`` (more dimensions are
    flattened). Columns are centred, then
    ``CKA = ||yᵀx||²_F / (||xᵀx||_F · ||yᵀy||_F)``, computed in float64.
    1 for identical representations; invariant to orthogonal transforms and
    isotropic scaling, not to arbitrary invertible linear maps.
    ``debiased=True`` uses the unbiased HSIC estimator (needs n > 3), which
    corrects the upward bias of CKA when features outnumber examples.
    """
    x = np.asarray(x, dtype="float64")
    y = np.asarray(y, dtype="float64")
    if x.ndim < 2 or y.ndim < 2:
        raise KerastlError("linear_cka needs (n, features) arrays.")
    x = x.reshape(len(x), -1)
    y = y.reshape(len(y), -1)
    n = len(x)
    if len(y) != n:
        raise KerastlError(f"linear_cka: x has {n} examples, y {len(y)}; "
                           "they must describe the same examples.")
    if n < (4 if debiased else 2):
        raise KerastlError(f"linear_cka needs at least {4 if debiased else 2}"
                           f" examples, got {n}.")
    x = x - x.mean(axis=0, keepdims=True)
    y = y - y.mean(axis=0, keepdims=True)
    xty = np.linalg.norm(y.T @ x) ** 2
    norm_x = np.linalg.norm(x.T @ x)
    norm_y = np.linalg.norm(y.T @ y)
    if debiased:
        rows_x = np.einsum("ij,ij->i", x, x)
        rows_y = np.einsum("ij,ij->i", y, y)
        sq_x, sq_y = rows_x.sum(), rows_y.sum()
        xty = _debiased_dot(xty, rows_x, rows_y, sq_x, sq_y, n)
        norm_x = np.sqrt(max(_debiased_dot(norm_x ** 2, rows_x, rows_x,
                                           sq_x, sq_x, n), 0.0))
        norm_y = np.sqrt(max(_debiased_dot(norm_y ** 2, rows_y, rows_y,
                                           sq_y, sq_y, n), 0.0))
    denominator = norm_x * norm_y
    if denominator == 0:
        return float("nan")  # a constant representation
    return float(xty / denominator)


@dataclasses.dataclass
class CKAResult:
    """CKA between the blocks of two models.

    Attributes:
        matrix: ``(len(blocks_a), len(blocks_b))`` CKA values.
        blocks_a, blocks_b: the block names of the rows and the columns.
    """

    matrix: np.ndarray
    blocks_a: list
    blocks_b: list

    def diagonal(self):
        """``{block: CKA}`` for the blocks both models have."""
        return {b: float(self.matrix[i, self.blocks_b.index(b)])
                for i, b in enumerate(self.blocks_a) if b in self.blocks_b}

    def __str__(self):
        width = max(len(b) for b in self.blocks_a + self.blocks_b) + 2
        lines = [" " * width + "".join(f"{b:>{width}}" for b in self.blocks_b)]
        for b, row in zip(self.blocks_a, self.matrix):
            lines.append(f"{b:<{width}}" + "".join(f"{v:>{width}.3f}"
                                                   for v in row))
        return "\n".join(lines)

    def plot(self, path=None, ax=None, title=None, labels=("model a",
                                                           "model b")):
        """A heatmap of :attr:`matrix`; saved to ``path`` if given.

        Returns the matplotlib figure.
        """
        plt = _pyplot()
        if ax is None:
            fig, ax = plt.subplots(figsize=(1.2 + 0.5 * len(self.blocks_b),
                                            1.0 + 0.45 * len(self.blocks_a)))
        else:
            fig = ax.figure
        im = ax.imshow(self.matrix, vmin=0, vmax=1, cmap="magma",
                       origin="lower")
        ax.set_xticks(range(len(self.blocks_b)), self.blocks_b, rotation=45,
                      ha="right")
        ax.set_yticks(range(len(self.blocks_a)), self.blocks_a)
        ax.set_xlabel(labels[1])
        ax.set_ylabel(labels[0])
        if title:
            ax.set_title(title)
        fig.colorbar(im, ax=ax, label="linear CKA")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def _block_names(model, blocks):
    if blocks is not None:
        return [blocks] if isinstance(blocks, str) else list(blocks)
    return block_map(model).base_blocks


def cka_by_block(model_a, model_b, data, blocks=None, blocks_b=None,
                 pooling="avg", debiased=False, batch_size=64):
    """Linear CKA between every block of ``model_a`` and ``model_b``.

    Typical use: the pretrained backbone vs the fine-tuned one (which blocks
    did fine-tuning change?), or two nets trained on source and on target.

    Args:
        model_a, model_b: kerastl Backbones or Keras models with block maps
            (e.g. a backbone and the classifier fine-tuned from it).
        data: the images both see (anything :func:`extract_features` takes;
            a few hundred examples are enough).
        blocks: the blocks to compare (default: every block but ``head``);
            ``blocks_b`` for ``model_b`` if its names differ.
        pooling: how spatial block outputs become vectors: ``"avg"``
            (default, cheap), ``"max"`` or ``None`` (flattened, the full
            activation; memory grows with resolution).
        debiased: the debiased estimator (see :func:`linear_cka`).

    Returns:
        A :class:`CKAResult`; ``print()`` it or call ``.plot()``.
    """
    names_a = _block_names(model_a, blocks)
    names_b = _block_names(model_b, blocks if blocks_b is None else blocks_b)

    def feats(model, names):
        f = extract_features(model, data, layers=names, pooling=pooling,
                             batch_size=batch_size, as_dict=True, verbose=0)
        return [f[n] for n in names]  # linear_cka flattens

    fa = feats(model_a, names_a)
    fb = fa if model_b is model_a and names_b == names_a else \
        feats(model_b, names_b)
    matrix = np.array([[linear_cka(a, b, debiased) for b in fb] for a in fa])
    return CKAResult(matrix, names_a, names_b)


# -- transfer depth ------------------------------------------------------------------

class DepthSweep(list):
    """Rows of :func:`transfer_depth_sweep`: one dict per run.

    Keys: ``train_size`` (labelled examples per class, or ``"all"``),
    ``seed``, ``frozen`` (number of frozen leading blocks), ``frozen_up_to``
    (the last frozen block, or ``"-"``) and ``accuracy`` (validation).
    """

    def mean(self):
        """``{(train_size, frozen): mean accuracy over seeds}``."""
        out = {}
        for r in self:
            out.setdefault((r["train_size"], r["frozen"]), []).append(
                r["accuracy"])
        return {k: float(np.mean(v)) for k, v in out.items()}

    def best(self):
        """``{train_size: number of frozen blocks with the best mean}``."""
        best = {}
        for (size, frozen), acc in self.mean().items():
            if size not in best or acc > best[size][1]:
                best[size] = (frozen, acc)
        return {size: f for size, (f, _) in best.items()}

    def __str__(self):
        means = self.mean()
        sizes = list(dict.fromkeys(r["train_size"] for r in self))
        depths = sorted({r["frozen"] for r in self})
        names = {r["frozen"]: r["frozen_up_to"] for r in self}
        lines = [f"{'frozen blocks':<26}" + "".join(f"{str(s) + '/class':>12}"
                                                   for s in sizes)]
        for d in depths:
            label = f"{d} ({names[d]})"
            lines.append(f"{label:<26}" + "".join(
                f"{means.get((s, d), float('nan')):>12.3f}" for s in sizes))
        best = self.best()
        lines.append(f"{'best':<26}" + "".join(f"{best[s]:>12}"
                                               for s in sizes))
        return "\n".join(lines)

    def plot(self, path=None, ax=None, title=None):
        """Accuracy vs number of frozen blocks, one line per target size."""
        plt = _pyplot()
        if ax is None:
            fig, ax = plt.subplots(figsize=(6, 4))
        else:
            fig = ax.figure
        means = self.mean()
        for size in dict.fromkeys(r["train_size"] for r in self):
            depths = sorted(d for s, d in means if s == size)
            ax.plot(depths, [means[(size, d)] for d in depths], marker="o",
                    label=f"{size} per class")
        names = {r["frozen"]: r["frozen_up_to"] for r in self}
        ticks = sorted(names)
        ax.set_xticks(ticks, [f"{d}\n{names[d]}" for d in ticks],
                      fontsize=8)
        ax.set_xlabel("frozen leading blocks (last frozen)")
        ax.set_ylabel("target accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
        if title:
            ax.set_title(title)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


@_private.quiet_retracing()
def transfer_depth_sweep(backbone, train, validation, depths=None,
                         train_sizes=None, seeds=(0,), epochs=20,
                         batch_size=32, optimizer=None, bn="frozen",
                         dropout=0.0, verbose=0, pooling="avg",
                         boundary_cache="auto"):
    """Fine-tune once per number of frozen blocks; record target accuracy.

    Every run starts from the backbone's weights as given, puts a new head
    on it (:func:`kerastl.build_classifier`), freezes the first ``d``
    blocks (``d = 0``: full fine-tuning; ``d = len(blocks)``: feature
    extraction) and trains for ``epochs`` with :func:`kerastl.fine_tune`
    (so the frozen blocks run once per run, not once per epoch: the
    boundary cache).

    Args:
        backbone: a :class:`~kerastl.Backbone` or a ``keras.Model`` with a
            spatial output and a block map.
        train: ``(x, y)`` arrays of the target task (integer labels).
        validation: ``(x, y)`` to score on.
        depths: numbers of frozen leading blocks (default: all of
            ``0 .. len(blocks)``).
        train_sizes: labelled examples per class to draw from ``train``
            (several sizes draw one curve each; default: all of ``train``).
        seeds: one run per seed: the subset, the head's initialisation,
            its dropout and the batch order all follow it (the global
            random state is left alone).
        epochs, batch_size: training per run.
        optimizer: a callable returning a fresh optimizer (default Adam
            1e-3).
        bn: BatchNorm mode of trainable blocks (see :func:`kerastl.freeze`).
        dropout: head dropout.
        pooling: the head's pooling (see :func:`kerastl.build_classifier`;
            ``"cls"`` for a transformer's class token).
        boundary_cache: as :attr:`kerastl.TrainingPlan.boundary_cache`
            (``False``: every epoch runs the whole model).

    Returns:
        A :class:`DepthSweep`: ``print()`` it, ``.best()``, ``.plot()``.
    """
    model = keras_model_of(backbone)
    names = block_map(model).names
    if depths is None:
        depths = range(len(names) + 1)
    depths = [int(d) for d in depths]
    for d in depths:
        if not 0 <= d <= len(names):
            raise KerastlError(f"depth {d}: the backbone has {len(names)} "
                               f"blocks ({', '.join(names)}); depths go from "
                               f"0 to {len(names)}.")
    for name, data in (("train", train), ("validation", validation)):
        if not isinstance(data, tuple) or len(data) != 2:
            raise KerastlError(
                f"transfer_depth_sweep: {name} must be an (images, labels) "
                f"tuple of arrays; got {type(data).__name__}.")
    x, y = (np.asarray(a) for a in train)
    validation = tuple(np.asarray(a) for a in validation)
    for name, labels in (("train", y), ("validation", validation[1])):
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or \
                not len(labels):
            raise KerastlError(
                f"transfer_depth_sweep: the {name} labels have shape "
                f"{labels.shape} and dtype {labels.dtype}; expected one "
                "class index per image (one-hot labels: labels.argmax(-1)).")
    if isinstance(seeds, (int, np.integer)):
        seeds = [seeds]  # (one seed)
    seeds = list(seeds)
    if not seeds:
        raise KerastlError("transfer_depth_sweep: seeds=[]; pass at least "
                           "one seed.")
    num_classes = int(max(np.max(y), np.max(validation[1]))) + 1
    sizes = [None] if train_sizes is None else list(train_sizes)
    optimizer = optimizer or (lambda: keras.optimizers.Adam(1e-3))
    initial = model.get_weights()
    rows = DepthSweep()
    try:
        with restored_trainability(_private.all_sublayers(model)):
            for size in sizes:
                for seed in seeds:
                    if size is None:
                        subset = (x, y)
                    else:
                        idx = few_shot(y, size, seed)
                        subset = (x[idx], y[idx])
                    for d in depths:
                        model.set_weights(initial)
                        clf = build_classifier(
                            backbone, num_classes, dropout=dropout,
                            freeze=None, seed=seed, pooling=pooling)
                        plan = TrainingPlan(
                            strategy="partial", freeze_up_to=d, bn=bn,
                            head_epochs=0, epochs=epochs,
                            optimizer=optimizer(), patience=None,
                            batch_size=batch_size, seed=seed,
                            boundary_cache=boundary_cache,
                            check_features=False)
                        fine_tune(clf, subset, None, plan, verbose=verbose)
                        acc = clf.evaluate(*validation, verbose=0,
                                           return_dict=True)["accuracy"]
                        rows.append(dict(
                            train_size="all" if size is None else size,
                            seed=seed, frozen=d,
                            frozen_up_to=names[d - 1] if d else "-",
                            accuracy=float(acc)))
                        if verbose:
                            print(rows[-1])
    finally:
        model.set_weights(initial)
    return rows


# -- ranking backbones ---------------------------------------------------------------



class BackboneRanking(list):
    """Rows of :func:`rank_backbones`, best first; ``print()`` shows a
    table. Each row: ``model``, ``block`` (None: the model's feature
    output), ``scores`` (method -> score), ``score`` (the first method's),
    ``seconds`` (loading, features and scoring of that model) and
    ``skipped`` (why a model was not scored, else None). ``samples``:
    ``(ranked on, labelled)`` image counts when ``max_samples`` took a
    subset, else None."""

    def __init__(self, rows, methods, blocks=None, samples=None):
        scored = sorted((r for r in rows if r["skipped"] is None),
                        key=lambda r: -r["score"])
        super().__init__(scored + [r for r in rows if r["skipped"]])
        self.methods = list(methods)
        self.samples = None if samples is None else tuple(samples)
        # model -> its scored blocks in order (rankings with blocks=True)
        self.blocks = dict(blocks or {})

    @property
    def best(self):
        """The first row (the recommended model, and block), or None."""
        return self[0] if self and self[0]["skipped"] is None else None

    @property
    def freeze_up_to(self):
        """Where to cut the recommended model for fine-tuning (rankings with
        ``blocks=True``): its first-ranked block, but never its last one.
        The block scores say how well a linear head does on each block's
        features; freezing every block is that linear head (feature
        extraction, scored by the model's own row), and fine-tuning the
        last block beat it by 7 to 20 points on every target of
        ``benchmarks/ranking.py``, where every score peaked at the last
        block. So the best block is frozen, or the one
        before it when the best is the last. None: no per-block ranking,
        or a model of one block (train it all)."""
        best = self.best
        order = self.blocks.get(best["model"]) if best else None
        if not order or best["block"] not in order:
            return None
        i = order.index(best["block"])
        if i == len(order) - 1:
            i -= 1
        return order[i] if i >= 0 else None

    def to_dict(self):
        """The ranking as plain data (what ``kerastl rank --json`` prints)."""
        return {"methods": self.methods, "rows": [dict(r) for r in self],
                "samples": None if self.samples is None else list(
                    self.samples),
                "best": None if self.best is None else {
                    "model": self.best["model"], "block": self.best["block"],
                    "freeze_up_to": self.freeze_up_to}}

    def __str__(self):
        head = ["model", "block"] + self.methods + ["seconds"]
        lines = []
        for r in self:
            if r["skipped"]:
                continue
            lines.append([r["model"], r["block"] or "-"] + [
                f"{r['scores'][m]:.4f}" for m in self.methods] + [
                f"{r['seconds']:.1f}"])
        widths = [max(len(str(x)) for x in col)
                  for col in zip(head, *lines)] if lines else \
            [len(h) for h in head]
        out = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths)),
               "  ".join("-" * w for w in widths)]
        out += ["  ".join(str(x).ljust(w) for x, w in zip(line, widths))
                for line in lines]
        out += [f"skipped {r['model']}: {r['skipped']}" for r in self
                if r["skipped"]]
        if self.samples is not None:
            out.append(f"ranked on {self.samples[0]} of the {self.samples[1]}"
                       " labelled images, classes in proportion (every "
                       "image: max_samples=None, kerastl rank --max-samples "
                       "all)")
        if self.best is not None:
            where = f", block {self.best['block']}" if self.best["block"] \
                else ""
            out.append(f"recommended: {self.best['model']}{where} (by "
                       f"{self.methods[0]})")
            if self.freeze_up_to:
                out.append(f"to fine-tune it: freeze up to "
                           f"{self.freeze_up_to} (fine_tune(freeze_up_to="
                           f"{self.freeze_up_to!r}), kerastl finetune "
                           f"--freeze-up-to {self.freeze_up_to})")
        return "\n".join(out)


def _candidate_name(candidate):
    if isinstance(candidate, (str, os.PathLike)):
        return os.fspath(candidate)
    return getattr(candidate, "name", None) or type(candidate).__name__


def _load_candidate(candidate, weights, input_shape):
    """``(keras model, its feature layer or None)``."""
    if isinstance(candidate, (str, os.PathLike)):
        candidate = load_backbone(os.fspath(candidate), weights=weights,
                                  input_shape=input_shape)
    model = keras_model_of(candidate) if isinstance(
        candidate, (Backbone, keras.Model)) else None
    if model is None:
        raise KerastlError(
            f"Cannot rank {candidate!r}: expected a zoo name, a .keras file, "
            "a Hub/KerasHub handle, a kerastl Backbone or a keras.Model.")
    bm = block_map(model)
    # A classifier is ranked on the features before its head.
    feature_block = bm.base_blocks[-1] if bm.head_blocks and \
        bm.base_blocks and bm.has_output(bm.base_blocks[-1]) else None
    return model, feature_block


# Input pixels per extraction batch when rank_backbones chooses: 1,000
# images of 32x32 in one eager pass took MobileNetV2 2.5 s where predict in
# batches of 64 took 4.4 s (2 CPU cores), and a wide CNN 1.3 s for 2.6 s.
_RANK_BATCH_PIXELS = 2 ** 22


def _rank_batch_size(model, batch_size):
    if batch_size is not None:
        return batch_size
    height, width = tuple(model_input(model).shape[1:3])
    if height is None or width is None:
        return 64
    return int(max(1, min(1024, _RANK_BATCH_PIXELS // (height * width))))


def _cv_probe_accuracy(features, labels, folds=5, seed=0):
    """Mean accuracy of a softmax probe (:func:`~kerastl.features.probes.softmax_probe`, as
    :class:`~kerastl.LinearProbe`) over stratified folds: the slower, often
    as good baseline of the estimators."""
    # (one-hot or (n, 1) labels, one class or fewer samples than classes:
    # as the estimators take or refuse them)
    codes, num_classes = transferability.class_codes(
        labels, len(features), "linear_probe")
    features = np.asarray(features, "float64")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), int)
    for c in np.unique(codes):  # each class spread over the folds
        idx = rng.permutation(np.flatnonzero(codes == c))
        fold_of[idx] = np.arange(len(idx)) % folds
    scores = []
    for k in range(folds):
        test = fold_of == k
        if not test.any() or len(np.unique(codes[~test])) < 2:
            continue
        predicted = softmax_probe(features[~test], codes[~test],
                                   features[test], num_classes, seed=seed)
        scores.append(float(np.mean(predicted == codes[test])))
    return float(np.mean(scores))


def _score(method, features, probabilities, labels):
    if method == "linear_probe":
        return _cv_probe_accuracy(features, labels)
    fn, takes = transferability.ESTIMATORS[method]
    if takes == "source":
        return fn(probabilities, labels)
    return fn(features, labels)


@_private.quiet_retracing()
def rank_backbones(candidates, data, method="logme", blocks=False,
                   weights="imagenet", input_shape=None, pooling="avg",
                   cache=None, max_samples="auto", seed=0, verbose=1,
                   batch_size=None):
    """Ranks pretrained backbones for a target task without fine-tuning them.

    Each candidate's features of the target images (through
    :func:`extract_features`, so ``cache=`` makes a second ranking on the
    same data a cache read) are scored by a transferability estimator
    (:mod:`kerastl.features.transferability`); higher is better. With
    ``blocks=True`` every block with an output is scored too, so one call
    also suggests where to cut (the transfer depth).

    Args:
        candidates: zoo names, ``.keras`` files, Hub/KerasHub handles,
            Backbones or Keras models (a list, or ``{name: candidate}``).
            A candidate that cannot be loaded (weights not downloadable
            offline, a missing file) is skipped with the reason.
        data: labelled target data: an image folder, ``(images, labels)``
            arrays, or a dataset of ``(images, labels)``.
        method: ``"logme"`` (default), ``"h_score"`` (regularised),
            ``"leep"`` and ``"nce"`` (these two need the source classifier:
            pass classifier models whose output is a softmax), and
            ``"linear_probe"`` (cross-validated accuracy of a linear probe:
            slower, the baseline the estimators are judged against); or a
            list of them (the first one orders the rows).
        blocks: also score every block's output.
        weights: for zoo names: ``"imagenet"`` (pretrained) or None.
        input_shape: for zoo names: the input size (default: the model's).
        pooling: how feature maps become vectors (see
            :func:`extract_features`).
        cache: a :class:`~kerastl.FeatureCache` or a folder.
        max_samples: rank on about this many of the labelled images (a
            seeded subset, classes in proportion, at least one image of
            each; only they go through the models). ``"auto"`` (default):
            30 times the number of classes, at least 300, which keeps
            ranking ten models far cheaper than one fine-tuning (see
            ``docs/features.md``); None: every image.
        verbose: 1 prints one line per model as it is scored.
        batch_size: images per forward pass when extracting features;
            default: about 4 million input pixels (1,024 images of 32x32,
            83 of 224x224), so a small dataset is a few eager passes
            instead of a traced ``predict`` per model.

    Returns:
        A :class:`BackboneRanking`: rows best first, ``.best``, ``print()``;
        with ``blocks=True``, ``.freeze_up_to``: where to cut the
        recommended model for fine-tuning.

    Example::

        ranking = kerastl.analysis.rank_backbones(
            ["mobilenet_v2", "efficientnet_b0", "resnet50"], "photos/")
        print(ranking)
    """
    methods = [method] if isinstance(method, str) else list(method)
    unknown = [m for m in methods if m not in RANK_METHODS]
    if unknown or not methods:
        raise KerastlError(f"method={method!r}: expected one or more of "
                           f"{', '.join(RANK_METHODS)}.")
    if isinstance(candidates, dict):
        named = list(candidates.items())
    else:
        if isinstance(candidates, (str, os.PathLike, keras.Model)) or \
                isinstance(getattr(candidates, "model", None), keras.Model):
            candidates = [candidates]  # (one; a Backbone too)
        named = [(_candidate_name(c), c) for c in candidates]
        # Two models of the same name (Keras's default "functional") are
        # told apart in the rows: "name", "name#2", ...
        seen = {}
        for i, (name, c) in enumerate(named):
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                named[i] = (f"{name}#{seen[name]}", c)
    if not named:
        raise KerastlError("rank_backbones: no candidates given.")
    needs_source = [m for m in methods if m in ("leep", "nce")]
    indices, total = _ranked_indices(data, max_samples, seed)
    with labelled_subset(data, indices) as data:
        rows, orders = _rank(named, data, methods, needs_source, blocks,
                             weights, input_shape, pooling, cache, verbose,
                             batch_size)
    return BackboneRanking(rows, methods, orders, samples=None if indices is
                           None else (len(indices), total))


def _rank(named, data, methods, needs_source, blocks, weights, input_shape,
          pooling, cache, verbose, batch_size):
    rows, orders = [], {}
    for i, (name, candidate) in enumerate(named):
        start = time.perf_counter()
        try:
            model, feature_block = _load_candidate(candidate, weights,
                                                   input_shape)
            if needs_source and feature_block is None:
                raise KerastlError(
                    f"{', '.join(needs_source)} need the source classifier's "
                    f"predictions, and {name} has no classification head "
                    "(zoo backbones are loaded without theirs). Pass the "
                    "classifier model itself, or use method='logme'.")
        except (KerastlError, OSError) as e:
            rows.append(dict(model=name, block=None, scores={}, score=None,
                             seconds=time.perf_counter() - start,
                             skipped=" ".join(str(e).split())))
            if verbose:
                print(f"[{i + 1}/{len(named)}] {name}: skipped: "
                      f"{rows[-1]['skipped']}", flush=True)
            continue
        bm = block_map(model)
        cut = [feature_block] if feature_block else [None]
        if blocks:
            # (a model without block outputs: its feature output only)
            cut = [b for b in bm.base_blocks if bm.has_output(b)] or cut
            orders[name] = [b for b in cut if b is not None]
        layers = [b for b in cut if b is not None] or None
        outputs = extract_features(
            model, data, layers=layers, pooling=pooling, cache=cache,
            as_dict=True, return_labels=True,
            batch_size=_rank_batch_size(model, batch_size),
            verbose=0)
        features, labels = outputs
        if labels is None:
            raise KerastlError("rank_backbones needs labelled data: an image "
                               "folder with class subfolders, (images, "
                               "labels) or a dataset of (images, labels).")
        probabilities = None
        if needs_source:
            probabilities = extract_features(
                model, data, layers=None, pooling=None, cache=cache,
                batch_size=_rank_batch_size(model, batch_size), verbose=0)
        scored = []
        for block in cut:
            f = features[block] if block is not None else next(
                iter(features.values()))
            f = flat_features(np.asarray(f))
            scored.append((block, {m: _score(m, f, probabilities, labels)
                                   for m in methods}))
        seconds = time.perf_counter() - start
        rows += [dict(model=name, block=block if blocks else None,
                      scores=scores, score=scores[methods[0]],
                      seconds=seconds, skipped=None)
                 for block, scores in scored]
        if verbose:
            best = max(rows[-len(cut):], key=lambda r: r["score"])
            where = f" (block {best['block']})" if blocks else ""
            print(f"[{i + 1}/{len(named)}] {name}: {methods[0]} "
                  f"{best['score']:.4f}{where}, {seconds:.1f} s", flush=True)
    return rows, orders


# max_samples="auto": images per class, and the least in all. Ranking M
# models passes M x K images forward; the default fine-tuning's shortest
# main phase trains on 300 batches of 32 (each about three forward passes'
# work): 10 models on 300 images cost about a tenth of it.
_AUTO_PER_CLASS, _AUTO_LEAST = 30, 300


def _ranked_indices(data, max_samples, seed):
    """``(positions of the examples ranked on, how many are labelled)``;
    ``(None, None)``: all of them."""
    if max_samples is None:
        return None, None
    auto = isinstance(max_samples, str) and max_samples == "auto"
    if not auto and (isinstance(max_samples, bool) or
                     not isinstance(max_samples, numbers.Integral) or
                     max_samples < 2):
        raise KerastlError(
            f"max_samples={max_samples!r}: expected 'auto' (30 images per "
            "class on average, at least 300), an int >= 2, or None (every "
            "image).")
    labels = data_labels(data)
    if labels is None:
        return None, None  # (rank_backbones says it needs labels)
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] > 1:  # one-hot
        labels = labels.argmax(-1)
    labels = labels.reshape(-1)
    if auto:
        max_samples = max(_AUTO_LEAST,
                          _AUTO_PER_CLASS * len(np.unique(labels)))
    if max_samples >= len(labels):
        return None, None
    return _subset(labels, max_samples, seed), len(labels)


def _subset(labels, max_samples, seed):
    """Indices of at most ``max_samples`` examples, classes in proportion
    (all of them when None)."""
    labels = np.asarray(labels).reshape(-1)
    if max_samples is None or max_samples >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    by_class = {c: order[labels[order] == c] for c in np.unique(labels)}
    share = max_samples / len(labels)
    keep = np.concatenate([idx[:max(1, int(round(len(idx) * share)))]
                           for idx in by_class.values()])
    return np.sort(keep)
