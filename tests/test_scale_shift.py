"""kerastl.adaptation.scale_shift: the label-free check of a change of
scale that sets kerastl.adapt's zoom."""

import keras
import numpy as np
import pytest
from keras import ops

import kerastl
from kerastl.adaptation import scale


def squares(width, n=4):
    """``n`` black 32x32 images with a white ``width``-pixel square in the
    middle."""
    x = np.zeros((n, 32, 32, 3), "float32")
    lo = 16 - width // 2
    x[:, lo:lo + width, lo:lo + width] = 255
    return x


def width(x):
    """The white run's width along the middle row of the first image."""
    return int((np.asarray(x)[0, 16, :, 0] > 127).sum())


class Sized(keras.Model):
    """A 'source-only model' sure of its class where the middle row's white
    run is ``liked`` pixels wide, less sure the further from it."""

    def __init__(self, liked):
        super().__init__()
        self.liked = float(liked)

    def call(self, x):
        run = ops.sum(ops.cast(x[:, 16, :, 0] > 127, "float32"), axis=1)
        sure = 0.5 + 0.45 * ops.exp(-ops.square(run - self.liked) / 8.0)
        return ops.stack([sure, 1.0 - sure], axis=1)


def test_zoomed_shows_the_image_larger_in_and_smaller_out():
    image = squares(8)
    assert width(scale.zoomed(image, 0.5)) == 16  # a window half the size
    assert width(scale.zoomed(image, 1.25)) in (6, 7)  # 8 / 1.25 = 6.4
    assert scale.zoomed(image, 1.0) is image


def test_the_verdict_needs_the_margin_and_names_the_direction():
    flat = {z: 0.80 for z in scale.ZOOMS}
    assert scale.scale_verdict(flat) == "same"
    assert scale.scale_verdict({**flat, 0.75: 0.86}) == "smaller"
    assert scale.scale_verdict({**flat, 1.5: 0.86}) == "larger"
    assert scale.scale_verdict({**flat, 1.5: 0.84}) == "same"
    assert scale.scale_verdict({**flat, 1.5: 0.84}, margin=0.03) == "larger"
    # margin=0: any gain counts, but the images as they are scoring best
    # (or a tie) is no change of scale.
    assert scale.scale_verdict(flat, margin=0) == "same"
    assert scale.scale_verdict({**flat, 1.0: 0.9}, margin=0) == "same"
    assert scale.scale_verdict({**flat, 1.5: 0.8001}, margin=0) == "larger"


@pytest.mark.parametrize("liked, verdict, zoom", [
    (8, "same", (-0.2, 0.5)),      # the target as the source draws it
    (13, "smaller", (-0.2, 0.5)),  # the source's squares were larger
    (5, "larger", (-0.4, 0.5)),    # ... smaller: zoom in more
])
def test_scale_shift_finds_the_scale_the_model_is_sure_at(liked, verdict,
                                                          zoom):
    shift = kerastl.adaptation.scale_shift(Sized(liked), squares(8))
    assert isinstance(shift, kerastl.adaptation.ScaleShift)
    assert (shift.verdict, shift.zoom, shift.n) == (verdict, zoom, 4)
    assert list(shift.confidence) == list(scale.ZOOMS)
    # At zoom 1 the run is 8 pixels wide: the model's confidence there.
    assert shift.confidence[1.0] == pytest.approx(
        0.5 + 0.45 * np.exp(-(8 - liked) ** 2 / 8), abs=1e-6)


def test_scale_shift_refuses_what_it_cannot_read():
    with pytest.raises(kerastl.KerastlError, match="no predict method"):
        kerastl.adaptation.scale_shift("model", squares(8))
    with pytest.raises(kerastl.KerastlError, match=r"shape \(32, 32, 3\)"):
        kerastl.adaptation.scale_shift(Sized(8), squares(8)[0])
    with pytest.raises(kerastl.KerastlError, match="margin=2"):
        kerastl.adaptation.scale_shift(Sized(8), squares(8), margin=2)
    with pytest.raises(kerastl.KerastlError, match="max_samples=0"):
        kerastl.adaptation.scale_shift(Sized(8), squares(8), max_samples=0)
    with pytest.raises(kerastl.KerastlError, match="no target images"):
        kerastl.adaptation.scale_shift(Sized(8), squares(8)[:0])

    class Logits(Sized):
        def call(self, x):
            return 10.0 * super().call(x)

    with pytest.raises(kerastl.KerastlError, match="logits"):
        kerastl.adaptation.scale_shift(Logits(8), squares(8))
