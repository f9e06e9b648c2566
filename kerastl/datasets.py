"""Offline digit domains for demos, tests and domain-adaptation benchmarks.

Four domains of the ten digits, built only from data that ships inside
installed packages (nothing is downloaded):

* :func:`digits` — scikit-learn's 1,797 handwritten digits (8x8, 17 grey
  levels), upsampled to 32x32 RGB.
* :func:`digits_m` — the MNIST-M recipe on those digits: each digit is
  blended with a random patch of a colour photo as ``|patch - digit|`` per
  pixel and channel. The photos are scikit-learn's bundled sample images.
* :func:`syn_digits` — digits rendered from the fonts that ship with
  matplotlib (DejaVu, STIX, Computer Modern), with random font, size,
  rotation, stroke width, position, colours, blur and noise: the SynNumbers
  idea, any number of samples.
* :func:`photo_digits` — the same fonts drawn smaller over patches of the
  sample photos, in a colour that contrasts with the patch, with parts of
  neighbouring digits at the left and right edges: the look of street
  house numbers (SVHN), any number of samples.

Every function is seeded and deterministic, returns ``(x, y)`` with ``x`` of
shape ``(n, size, size, 3)`` holding RGB values in [0, 255] (kerastl's input
contract) and integer labels ``y`` in 0..9, and takes ``split="train"`` /
``"test"`` / ``None`` (all). ``digits`` and ``digits_m`` share one split, so
their test sets show the same handwritten digits.

Needs scikit-learn (digits and photos), matplotlib (fonts) and Pillow
(drawing and resizing; it comes with matplotlib): ``pip install
"kerastl[data]"``.
"""

import numpy as np

from kerastl.errors import KerastlError
from kerastl.rendering import DigitRenderer, require
from kerastl.sampling import few_shot

__all__ = ["digits", "digits_m", "syn_digits", "photo_digits", "DOMAINS",
           "load", "few_shot"]

SPLITS = ("train", "test", None)
TEST_FRACTION = 0.25
_SPLIT_SEED = 1234  # fixed: the split never depends on the caller's seed


def _check(split, size):
    if split not in SPLITS:
        raise KerastlError(
            f"split={split!r}: expected 'train', 'test' or None (all).")
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise KerastlError(f"size={size!r}: expected an int >= 8.")


def _finish(x, y, dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or not (dt.kind == "f" or dt == np.uint8):
        raise KerastlError(
            f"dtype={dtype!r}: pixels in [0, 255] need a float dtype "
            "('float32', 'float16') or 'uint8'; other integer types wrap "
            "around or clip.")
    x = np.clip(x, 0, 255)
    if dt == np.uint8:
        x = np.round(x)
    return x.astype(dtype), y.astype("int64")


def _split_index(n, split):
    order = np.random.default_rng(_SPLIT_SEED).permutation(n)
    n_test = int(round(TEST_FRACTION * n))
    if split == "test":
        return np.sort(order[:n_test])
    if split == "train":
        return np.sort(order[n_test:])
    return np.arange(n)


def _resize(images, size):
    """Bicubic resize of a stack of 2-D float images (PIL, mode "F")."""
    require("PIL", "pillow")
    from PIL import Image
    out = np.empty((len(images), size, size), "float32")
    for i, img in enumerate(images):
        out[i] = np.asarray(Image.fromarray(img.astype("float32"), "F").resize(
            (size, size), Image.BICUBIC))
    return out


def digit_masks(split, size):
    """scikit-learn's digits as grey masks in [0, 1], and their labels."""
    require("sklearn", "scikit-learn")
    from sklearn.datasets import load_digits
    d = load_digits()
    idx = _split_index(len(d.target), split)
    masks = _resize(d.images[idx] / 16.0, size)
    return np.clip(masks, 0.0, 1.0), d.target[idx]


def digits(split=None, size=32, dtype="float32"):
    """scikit-learn's handwritten digits as ``size x size`` RGB images.

    White strokes on black, like MNIST. 1,797 samples: 1,348 ``"train"``,
    449 ``"test"``.

    Returns:
        ``(x, y)``: ``x`` of shape ``(n, size, size, 3)`` in [0, 255].
    """
    _check(split, size)
    masks, y = digit_masks(split, size)
    x = np.repeat(masks[..., None] * 255.0, 3, axis=-1)
    return _finish(x, y, dtype)


def photos():
    """scikit-learn's bundled sample photos, float32 RGB in [0, 255]."""
    require("sklearn", "scikit-learn")
    from sklearn.datasets import load_sample_images
    return [np.asarray(img, "float32") for img in load_sample_images().images]


def _patch(pictures, rng, size):
    """A random ``size x size`` patch of a random one of ``pictures``."""
    photo = pictures[rng.integers(len(pictures))]
    r = rng.integers(0, photo.shape[0] - size + 1)
    c = rng.integers(0, photo.shape[1] - size + 1)
    return photo[r:r + size, c:c + size]


def digits_m(split=None, size=32, seed=0, dtype="float32"):
    """The MNIST-M recipe applied to :func:`digits`.

    Each digit (grey level ``d`` in [0, 255]) is blended with a random
    ``size x size`` patch ``p`` of one of scikit-learn's sample photos as
    ``|p - d|`` per pixel and channel (Ganin et al., 2016). The same digits
    and split as :func:`digits`; ``seed`` picks the patches.

    Returns:
        ``(x, y)``: ``x`` of shape ``(n, size, size, 3)`` in [0, 255].
    """
    _check(split, size)
    masks, y = digit_masks(split, size)
    pictures = photos()
    rng = np.random.default_rng([seed, 0 if split is None else
                                 SPLITS.index(split) + 1])
    x = np.empty(masks.shape + (3,), "float32")
    for i, mask in enumerate(masks):
        x[i] = np.abs(_patch(pictures, rng, size) - mask[..., None] * 255.0)
    return _finish(x, y, dtype)


# -- syn_digits ---------------------------------------------------------------

def _colours(rng):
    """Background and foreground RGB with a visible contrast."""
    while True:
        bg, fg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if abs(bg.mean() - fg.mean()) > 60:
            return bg, fg


def _rendering(n, split, size, seed, stream):
    """What a rendered domain starts from, its arguments checked: the
    renderer, the random stream ``(seed, split, stream)``, the empty images
    and the balanced, shuffled labels."""
    _check(split, size)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise KerastlError(f"n={n!r}: expected a positive number of samples.")
    require("PIL", "matplotlib")
    renderer = DigitRenderer()
    rng = np.random.default_rng([seed, 0 if split is None else
                                 SPLITS.index(split) + 1, stream])
    y = rng.permutation(np.arange(n) % 10)
    return renderer, rng, np.empty((n, size, size, 3), "float32"), y


def syn_digits(n=10000, split="train", size=32, seed=0, dtype="float32"):
    """Digits rendered from matplotlib's fonts, SynNumbers style.

    Random font (21 faces of DejaVu, STIX and Computer Modern), size,
    rotation (+-15 degrees), stroke width, aspect, position, foreground and
    background colours, blur and noise. Labels are balanced (``i % 10``,
    shuffled). ``"train"`` and ``"test"`` draw from different random
    streams of the same distribution; ``n`` is the number of samples.

    Returns:
        ``(x, y)``: ``x`` of shape ``(n, size, size, 3)`` in [0, 255].
    """
    renderer, rng, x, y = _rendering(n, split, size, seed, stream=7)
    for i, digit in enumerate(y):
        mask = renderer.mask(int(digit), rng, size)[..., None]
        bg, fg = _colours(rng)
        img = bg * (1.0 - mask) + fg * mask
        img += rng.normal(0.0, rng.uniform(0, 12), img.shape)
        x[i] = img
    return _finish(x, y, dtype)


def _shifted(mask, dx):
    """``mask`` moved ``dx`` pixels right (left if negative), zero-filled."""
    out = np.zeros_like(mask)
    if dx >= 0:
        out[:, dx:] = mask[:, :mask.shape[1] - dx]
    else:
        out[:, :dx] = mask[:, -dx:]
    return out


def photo_digits(n=10000, split="train", size=32, seed=0, dtype="float32"):
    """Font digits over photo patches, with neighbours: house-number style.

    The fonts of :func:`syn_digits`, drawn at 40 to 70% of the image height
    (:func:`syn_digits`: 60 to 100%) on a random ``size x size`` patch of
    one of scikit-learn's sample photos, in a random colour at least 60
    grey levels from the patch's mean (lighter or darker: both contrasts
    occur), with a random neighbouring digit cut by each side edge in two
    images of three (the labelled digit is the one in the middle), and
    noise. Labels are balanced and shuffled; ``"train"`` and ``"test"``
    draw from different random streams; ``n`` is the number of samples.

    A fourth domain for the adaptation benchmark, unlike each of the three
    others in a different way: handwriting is absent (against ``digits``
    and ``digits_m``), backgrounds are natural textures (against
    ``syn_digits``) and digits are smaller with distractors (against all).

    Returns:
        ``(x, y)``: ``x`` of shape ``(n, size, size, 3)`` in [0, 255].
    """
    renderer, rng, x, y = _rendering(n, split, size, seed, stream=11)
    pictures = photos()
    for i, digit in enumerate(y):
        patch = _patch(pictures, rng, size)
        mask = renderer.mask(int(digit), rng, size, height=(0.4, 0.7),
                             jitter=1)
        if rng.uniform() < 2 / 3:
            gap = int(round(size * rng.uniform(0.45, 0.6)))
            for side in (-1, 1):
                other = renderer.mask(int(rng.integers(10)), rng, size,
                                      height=(0.4, 0.7), jitter=1)
                mask = np.maximum(mask, _shifted(other, side * gap))
        level = patch.mean()
        while True:
            fg = rng.uniform(0, 255, 3)
            if abs(fg.mean() - level) > 60:
                break
        img = patch * (1.0 - mask[..., None]) + fg * mask[..., None]
        img += rng.normal(0.0, rng.uniform(0, 8), img.shape)
        x[i] = img
    return _finish(x, y, dtype)


DOMAINS = {"digits": digits, "digits_m": digits_m, "syn_digits": syn_digits,
           "photo_digits": photo_digits}
"""The offline domains by name: ``digits``, ``digits_m``, ``syn_digits``,
``photo_digits`` (each a function of ``split``, ``size``, ...;
:func:`load` calls one)."""


def load(name, split=None, **kwargs):
    """One of :data:`DOMAINS` by name: ``load("digits_m", "test")``."""
    if name not in DOMAINS:
        raise KerastlError(
            f"Unknown dataset {name!r}; the offline domains are "
            f"{', '.join(DOMAINS)}.")
    return DOMAINS[name](split=split, **kwargs)
