"""``adapt``: kerastl's default domain-adaptation recipe in one call.

Labelled source images, unlabelled target images, a feature extractor:
:func:`adapt` trains :class:`~kerastl.adaptation.AdaMatch` on both for a
budget of optimizer steps, then re-estimates the BatchNorm statistics on the
target (AdaBN, :func:`~kerastl.adaptation.adapt_batch_norm`), and returns the
model. It is one recipe for every pair of domains, with one choice that
depends on the target, made without its labels: ``zoom=``, the strong
view's zoom, which :func:`~kerastl.adaptation.scale_shift` gives (further
in where the target draws its objects larger than the source).
``benchmarks/domain_adaptation.py`` measures it on
every ordered pair of kerastl's offline digit domains.
"""

import inspect

import keras
import numpy as np

from kerastl.adaptation.adabn import adapt_batch_norm
from kerastl.adaptation.adamatch import AdaMatch
from kerastl.adaptation.data import domain_dataset, is_batched, known_size
from kerastl.errors import KerastlError


# What adapt() passes on to AdaMatch (**options), besides what it sets.
_ADAMATCH_OPTIONS = set(inspect.signature(AdaMatch.__init__).parameters) - {
    "self", "feature_extractor", "num_classes", "seed", "zoom",
    "kwargs"} | {"name"}


def _size(data, what):
    """Samples in ``data`` (arrays, an ``(x, y)`` tuple of arrays or a
    dataset of single samples), or None when a dataset's length is
    unknown."""
    if hasattr(data, "element_spec"):  # a tf.data.Dataset
        if what == "target" and isinstance(data.element_spec, tuple):
            raise KerastlError(
                "The target dataset yields tuples (images and labels?): "
                "adapt() takes the target images only, unlabelled; pass "
                "dataset.map(lambda x, *_: x).")
        if is_batched(data):
            spec = data.element_spec
            shape = (spec[0] if isinstance(spec, tuple) else spec).shape
            raise KerastlError(
                f"The {what} dataset yields batches (its images have shape "
                f"{tuple(shape)}): adapt() batches the data itself; pass "
                f"dataset.unbatch().")
    else:
        images = data[0] if isinstance(data, tuple) else data
        if not isinstance(images, np.ndarray):
            raise KerastlError(
                f"The {what} is a {type(images).__name__}"
                + (" of them" if isinstance(images, (list, tuple)) else "")
                + f": adapt() takes arrays "
                f"({'an (x, y) tuple' if what == 'source' else 'images'}) "
                f"or a tf.data.Dataset of single samples.")
    return known_size(data, labelled=what == "source")


def _check_labels(labels, num_classes):
    """One integer label per image, in ``0 .. num_classes - 1``; returns
    ``(labels, num_classes)`` (labels of shape ``(n, 1)``, as
    ``keras.datasets`` gives them, flattened; ``num_classes`` the largest
    label + 1 when None)."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels.reshape(-1)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise KerastlError(
            f"The source labels have shape {labels.shape} and dtype "
            f"{labels.dtype}: adapt() takes one integer label per image "
            "(one-hot labels: labels.argmax(-1)).")
    if not len(labels):
        raise KerastlError("The source has no labelled images.")
    if num_classes is not None and (isinstance(num_classes, bool) or
                                    not isinstance(num_classes, (
                                        int, np.integer))):
        raise KerastlError(f"num_classes={num_classes!r}: expected an int "
                           ">= 2, or None to count the source labels.")
    if labels.min() < 0:
        raise KerastlError(
            f"The source labels go from {labels.min()} to {labels.max()}: "
            "expected class indices from 0; map the labels.")
    if num_classes is None:
        if labels.max() < 1:
            raise KerastlError(
                "The source labels are all 0: adapt() needs at least two "
                "classes (or pass num_classes= when some classes have no "
                "source images).")
        return labels, int(labels.max()) + 1
    if labels.max() >= num_classes:
        raise KerastlError(
            f"The source labels go from {labels.min()} to {labels.max()}, "
            f"outside 0..{num_classes - 1} for num_classes={num_classes}: "
            f"pass num_classes={int(labels.max()) + 1}, or map the labels.")
    return labels, num_classes


def _check_images(source, target, value_range):
    """Array images only: the same image shape in both domains, and pixels
    inside ``value_range`` (the default strong view's RandAugment and
    RandomErasing draw in that range)."""
    xs = source[0] if isinstance(source, tuple) else None
    if not isinstance(xs, np.ndarray) or not isinstance(target, np.ndarray):
        return
    if xs.shape[1:] != target.shape[1:]:
        raise KerastlError(
            f"The source images have shape {xs.shape[1:]} and the target "
            f"images {target.shape[1:]}: resize (and convert grayscale to "
            "RGB, e.g. np.repeat(x, 3, axis=-1)) so that both domains "
            "match the feature extractor's input.")
    low, high = (float(v) for v in value_range)
    for what, x in (("source", xs), ("target", target)):
        if not x.size:
            continue
        lo, hi = float(np.min(x)), float(np.max(x))
        if lo < low or hi > high:
            raise KerastlError(
                f"The {what} images go from {lo:g} to {hi:g}, outside "
                f"value_range=({low:g}, {high:g}): pass value_range= with "
                "their pixel range (the strong augmentation draws in it).")
        if high - low > 2 and hi - lo <= 2 and lo >= -1:
            raise KerastlError(
                f"The {what} images go from {lo:g} to {hi:g}, but "
                f"value_range=({low:g}, {high:g}): pass value_range=(0, 1) "
                "(or (-1, 1)) for scaled images, or give the images in "
                f"{low:g}..{high:g}.")


def adapt(feature_extractor, source, target, num_classes=None, *,
          steps=1500, batch_size=32, learning_rate=1e-3, adabn=True,
          zoom=None, seed=None, verbose="auto", callbacks=(), **options):
    """Adapts a classifier to an unlabelled target domain: AdaMatch, then
    AdaBN (kerastl's default recipe).

    1. :class:`~kerastl.adaptation.AdaMatch` on ``feature_extractor`` (a
       Dense 256 + BatchNorm + ReLU bottleneck, then the softmax head),
       trained with ``Adam(learning_rate)`` on
       :func:`~kerastl.adaptation.domain_dataset` batches of
       ``batch_size`` source and ``batch_size`` target images for about
       ``steps`` optimizer steps (whole passes over the source).
    2. ``adabn=True``: :func:`~kerastl.adaptation.adapt_batch_norm` on the
       target images.

    What it costs and gains is measured in ``benchmarks/
    domain_adaptation.py`` (docs/domain-adaptation.md, "The default
    recipe"): every ordered pair of kerastl's offline digit domains,
    against the best source-only baseline, the target-only oracle, ADAPT's
    DANN and the keras.io AdaMatch recipe. When it does not help: the
    target's classes look different from the source's in a way no shift,
    zoom, rotation or colour change bridges, or source and target are already
    alike (compare with the source-only model on a few labelled target
    images).

    Args:
        feature_extractor: a ``keras.Model`` or :class:`~kerastl.Backbone`
            mapping images to features (a pooled vector or a feature map).
        source: labelled source data: an ``(x, y)`` tuple of arrays
            (integer labels, shape ``(n,)`` or ``(n, 1)``), or a
            ``tf.data.Dataset`` of single ``(image, label)`` samples.
        target: unlabelled target images: an array or a
            ``tf.data.Dataset`` of single images.
        num_classes: the number of classes; default: the largest source
            label + 1 (arrays only).
        steps: optimizer steps, rounded to whole passes over the source
            (at least one). The strong view's zoom makes the source slower
            to learn: a few hundred steps can leave the model short of
            the source-only one (docs/domain-adaptation.md).
        batch_size: images per domain per step.
        learning_rate: Adam's rate.
        adabn: re-estimate BatchNorm statistics on the target afterwards.
        zoom: the strong view's ``keras.layers.RandomZoom`` factor
            (default ``(-0.2, 0.5)``: 20% in to 50% out, for a target that
            draws its objects as large as the source or smaller); pass
            :func:`~kerastl.adaptation.scale_shift`'s ``.zoom``, the label-
            free check of the target's scale (``(-0.4, 0.5)`` when its
            objects are larger). Passed to
            :class:`~kerastl.adaptation.AdaMatch` (``zoom=``).
        seed: seeds the augmentations (the batches come in
            :func:`~kerastl.adaptation.domain_dataset`'s own seeded order;
            for a repeatable run, also call ``keras.utils.set_random_seed``
            first: it seeds the new layers' initial weights).
        verbose, callbacks: passed to ``fit``.
        **options: more :class:`~kerastl.adaptation.AdaMatch` arguments
            (``tau``, ``bottleneck``, ``weak``, ``strong``, ...; any other
            name is an error). ``value_range``: the images' pixel range,
            default ``(0, 255)``, which the default strong view draws in;
            array images outside it, or scaled to ``[0, 1]`` under the
            default, are an error naming the range to pass.

    Returns:
        The trained :class:`~kerastl.adaptation.AdaMatch` model (compiled
        with accuracy; ``model.history`` is ``fit``'s ``History``):
        ``predict`` and ``evaluate`` on target images, ``.classifier`` to
        export.

    Example::

        model = kerastl.adapt(kerastl.pretrained.small_cnn(), (xs, ys), xt)
        model.evaluate(xt_test, yt_test)
        kerastl.export(model, "exported/")  # the classifier only
    """
    if isinstance(source, (list, tuple)) and len(source) != 2:
        raise KerastlError(
            f"source has {len(source)} items: expected an (x, y) tuple of "
            "images and integer labels.")
    if isinstance(source, list):
        source = tuple(source)
    if isinstance(source, np.ndarray):
        raise KerastlError(
            "source is an array of images only: adapt() needs the source "
            "labels too, as an (x, y) tuple.")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(
                value, (int, np.integer)) or value < 1:
            raise KerastlError(f"{name}={value!r}: expected an int >= 1.")
    unknown = sorted(set(options) - _ADAMATCH_OPTIONS)
    if unknown:
        raise KerastlError(
            f"adapt() got {', '.join(k + '=' for k in unknown)}: not an "
            "argument of adapt() or AdaMatch (it takes "
            f"{', '.join(k + '=' for k in sorted(_ADAMATCH_OPTIONS))}); "
            "steps= sets how long it trains.")
    if isinstance(source, tuple):
        labels, num_classes = _check_labels(source[1], num_classes)
        source = (source[0], labels)
    elif num_classes is None:
        raise KerastlError(
            "num_classes=None needs the source labels as an array to "
            "count them: pass num_classes=.")
    n = _size(source, "source")
    if n is None:
        raise KerastlError(
            "The source dataset's length is unknown, so steps cannot be "
            "turned into passes over it: pass arrays, or a dataset of known "
            "length (dataset.apply(tf.data.experimental.assert_cardinality("
            "n))).")
    _size(target, "target")
    model = AdaMatch(feature_extractor, num_classes, zoom=zoom,
                     **{"bottleneck": 256, "seed": seed, **options})
    if options.get("strong") is None:  # the default view: value_range's
        _check_images(source, target, model.value_range)
    # (domain_dataset refuses a source smaller than one batch.)
    data = domain_dataset(source, target, batch_size=batch_size)
    # Whole passes over the source (n // batch_size steps each: batches
    # drop the remainder), the nearest to ``steps``.
    epochs = max(1, round(steps / (n // batch_size)))
    model.compile(keras.optimizers.Adam(learning_rate),
                  metrics=["accuracy"])
    model.fit(data, epochs=epochs, verbose=verbose,
              callbacks=list(callbacks or ()))
    if adabn:
        if not isinstance(target, np.ndarray):
            target = target.batch(64)  # a dataset of single images
        adapt_batch_norm(model, target)
    return model
