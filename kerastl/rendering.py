"""Digits drawn from the fonts that ship with matplotlib (for
:func:`kerastl.datasets.syn_digits`): random font, size, rotation, stroke,
aspect, position and blur, drawn with Pillow. Nothing is downloaded."""

import os

import numpy as np

from kerastl.errors import KerastlError


def require(module, extra):
    """Imports ``module`` or says which package to install."""
    try:
        return __import__(module)
    except ImportError:
        raise KerastlError(
            f"kerastl.datasets needs {extra} for this dataset: "
            f"pip install {extra} (or pip install \"kerastl[data]\")"
        ) from None


# matplotlib's fonts with ordinary digit glyphs (the STIX size variants and
# the TeX math fonts draw symbols instead).
_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf", "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf", "cmr10.ttf",
    "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf",
)


def font_paths():
    """Paths of the matplotlib fonts :func:`syn_digits` renders with."""
    matplotlib = require("matplotlib", "matplotlib")
    folder = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    paths = [os.path.join(folder, f) for f in _FONTS
             if os.path.exists(os.path.join(folder, f))]
    if not paths:
        raise KerastlError(f"No fonts found in {folder}: matplotlib's "
                           f"bundled fonts are missing.")
    return paths


class DigitRenderer:
    """Draws one digit on a canvas with PIL; caches fonts per size."""

    CANVAS = 96

    def __init__(self):
        from PIL import Image, ImageDraw, ImageFilter, ImageFont
        self.Image, self.ImageDraw = Image, ImageDraw
        self.ImageFilter, self.ImageFont = ImageFilter, ImageFont
        self.paths = font_paths()
        self._fonts = {}

    def font(self, path, px):
        key = (path, px)
        if key not in self._fonts:
            self._fonts[key] = self.ImageFont.truetype(path, px)
        return self._fonts[key]

    def mask(self, digit, rng, size, height=(0.6, 1.0), jitter=2):
        """The digit's grey mask in [0, 1], ``size x size``: random font,
        point size, stroke, rotation (+-15 degrees), glyph height (a
        fraction of ``size`` drawn from ``height``), aspect, position
        (+-``jitter`` pixels from the centre) and blur."""
        Image, c = self.Image, self.CANVAS
        img = Image.new("L", (c, c), 0)
        font = self.font(self.paths[rng.integers(len(self.paths))],
                         int(rng.integers(36, 60)))
        self.ImageDraw.Draw(img).text(
            (c // 2, c // 2), str(digit), fill=255, font=font, anchor="mm",
            stroke_width=int(rng.integers(0, 3)), stroke_fill=255)
        img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
        box = img.getbbox()
        if box is None:  # nothing drawn: cannot happen with these fonts
            raise KerastlError(f"Font rendered digit {digit} empty.")
        glyph = img.crop(box)
        gw, gh = glyph.size
        h = rng.uniform(*height) * size
        w = min(float(size), h * gw / gh * rng.uniform(0.8, 1.3))
        w, h = max(2, int(round(w))), max(2, int(round(h)))
        glyph = glyph.resize((w, h), Image.BILINEAR)
        out = Image.new("L", (size, size), 0)
        left = (size - w) // 2 + int(rng.integers(-jitter, jitter + 1))
        top = (size - h) // 2 + int(rng.integers(-jitter, jitter + 1))
        out.paste(glyph, (min(max(left, 0), size - w),
                          min(max(top, 0), size - h)))
        blur = rng.uniform(0.0, 1.0)
        if blur > 0.3:
            out = out.filter(self.ImageFilter.GaussianBlur(blur))
        return np.asarray(out, "float32") / 255.0
