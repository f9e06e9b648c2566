"""The offline digit domains: shapes, determinism, splits, the recipes."""

import numpy as np
import pytest

import kerastl
from kerastl import datasets, rendering


def test_digits_shapes_range_and_split():
    x, y = datasets.digits()
    assert x.shape == (1797, 32, 32, 3) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 255.0
    assert np.array_equal(np.unique(y), np.arange(10))
    xtr, ytr = datasets.digits("train")
    xte, yte = datasets.digits("test")
    assert len(xtr) + len(xte) == 1797 and len(xte) == 449
    # Disjoint: no test image is also a training image.
    train_rows = {row.tobytes() for row in xtr.reshape(len(xtr), -1)}
    assert sum(row.tobytes() in train_rows
               for row in xte.reshape(len(xte), -1)) < 5  # true duplicates
    # Grey: the three channels are equal.
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
    small, _ = datasets.digits("test", size=16, dtype="uint8")
    assert small.shape == (449, 16, 16, 3) and small.dtype == np.uint8


def test_digits_m_recipe():
    xd, yd = datasets.digits("test")
    xm, ym = datasets.digits_m("test", seed=0)
    np.testing.assert_array_equal(yd, ym)  # the same digits, same order
    assert xm.shape == xd.shape and 0 <= xm.min() and xm.max() <= 255
    assert not np.array_equal(xm[..., 0], xm[..., 1])  # colour
    # |patch - digit|: where the digit is full white (255) the output is
    # 255 - patch, where it is black the output is the patch itself, so the
    # two regions of one image sum to 255 only through the photo: check the
    # recipe on a reconstruction with the same random stream.
    photos = datasets.photos()
    masks, _ = datasets.digit_masks("test", 32)
    rng = np.random.default_rng([0, 2])
    photo = photos[rng.integers(len(photos))]
    r = rng.integers(0, photo.shape[0] - 31)
    c = rng.integers(0, photo.shape[1] - 31)
    patch = photo[r:r + 32, c:c + 32]
    np.testing.assert_allclose(xm[0], np.abs(patch - masks[0][..., None]
                                             * 255.0), atol=1e-4)
    again, _ = datasets.digits_m("test", seed=0)
    np.testing.assert_array_equal(xm, again)
    other, _ = datasets.digits_m("test", seed=1)
    assert not np.array_equal(xm, other)


def test_syn_digits_is_seeded_balanced_and_varied():
    x, y = datasets.syn_digits(60, seed=3)
    assert x.shape == (60, 32, 32, 3) and x.dtype == np.float32
    assert np.array_equal(np.bincount(y), np.full(10, 6))
    assert 0 <= x.min() and x.max() <= 255
    x2, y2 = datasets.syn_digits(60, seed=3)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    x3, _ = datasets.syn_digits(60, seed=3, split="test")
    assert not np.array_equal(x, x3)
    # Colour and background vary from image to image.
    means = x.mean(axis=(1, 2))
    assert means.std(axis=0).min() > 15
    assert len(rendering.font_paths()) >= 15


def test_photo_digits_is_seeded_balanced_and_over_photos():
    x, y = datasets.photo_digits(60, seed=3)
    assert x.shape == (60, 32, 32, 3) and x.dtype == np.float32
    assert np.array_equal(np.bincount(y), np.full(10, 6))
    assert 0 <= x.min() and x.max() <= 255
    again, y2 = datasets.load("photo_digits", "train", n=60, seed=3)
    np.testing.assert_array_equal(x, again)
    np.testing.assert_array_equal(y, y2)
    test, _ = datasets.photo_digits(60, seed=3, split="test")
    assert not np.array_equal(x, test)
    with pytest.raises(kerastl.KerastlError, match="positive"):
        datasets.photo_digits(0)


def test_photo_digits_draws_on_the_photos_in_both_contrasts(monkeypatch):
    grey = np.full((48, 64, 3), 128.0, "float32")
    monkeypatch.setattr(datasets, "photos", lambda: [grey])
    x, _ = datasets.photo_digits(40, seed=0)
    # The background is the photo (plus noise): the corners stay near 128.
    corners = x[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert np.median(np.abs(corners - 128.0)) < 12
    # The digit is at least 60 grey levels from the photo, either way.
    ink = x.mean(-1).reshape(40, -1)
    farthest = ink[np.arange(40), np.abs(ink - 128).argmax(1)]
    assert (farthest < 128 - 40).sum() >= 5 and \
        (farthest > 128 + 40).sum() >= 5


def test_rendered_digit_height_follows_the_range():
    renderer = rendering.DigitRenderer()
    rng = np.random.default_rng(0)
    for lo, hi in ((0.4, 0.4), (0.9, 0.9)):
        mask = renderer.mask(8, rng, 32, height=(lo, hi), jitter=0)
        rows = np.nonzero(mask.max(axis=1) > 0.2)[0]
        assert abs((rows[-1] - rows[0] + 1) - lo * 32) <= 3


def test_load_and_bad_input():
    x, y = datasets.load("digits", "test", size=16)
    assert x.shape == (449, 16, 16, 3)
    with pytest.raises(kerastl.KerastlError, match="digits_m"):
        datasets.load("mnist")
    with pytest.raises(kerastl.KerastlError, match="split"):
        datasets.digits("validation")
    with pytest.raises(kerastl.KerastlError, match="size"):
        datasets.digits(size=4)
    with pytest.raises(kerastl.KerastlError, match="positive"):
        datasets.syn_digits(0)
