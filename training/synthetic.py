"""Images that are not MNIST, made here, reproducibly: non-digits by category, and digits as
people outside MNIST write, type and photograph them.

Every image is drawn as a user would send it (dark ink on light paper, any size, off-centre)
and then goes through the server's own preprocessing (serving.handler.preprocess: invert, crop, fit
into 20x20, centre of mass), so what the model sees here is what the served model sees.

Disjoint splits, by fonts and by seeds:
    "train": outlier exposure during training (training/outliers.py) and the real-world
             VALIDATION digits (the augmentations are chosen on them);
    "eval":  the evaluation sets the bench reports, never trained on or chosen by;
    "fit":   labelled digits that training may mix in (--synthetic-digits): the "train" fonts,
             other seeds;
    "val":   non-digits a training recipe is chosen on (benchmarks/choose.py), never trained on:
             the "train" fonts, other seeds.
Outlier exposure trains on TRAINED_CATEGORIES only: symbols and doodles are never trained on,
in any split, so their refusal measures categories the model has never seen.

There is no photo set on this machine: "textures" are generated gradients, gratings, smooth
noise and blurred shape collages that stand in for photos of surfaces and scenes.

    python -m training.synthetic out_dir     # writes a contact sheet PNG per set, to look at
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from serving.handler import photo, preprocess
from serving.handler.preprocess import ImageError, to_grayscale, to_mnist

from . import drawing, model, set_cache
from .drawing import DIGIT_STROKES, DOODLES, draw_strokes, draw_text, shape_outline
from .model import NUM_CLASSES

FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation")
SPLITS = ("train", "eval", "fit", "val")
# Disjoint seed ranges: no image is in two splits. "fit" (labelled digits mixed into training,
# --synthetic-digits) and "val" (non-digits that recipes are chosen on, benchmarks/choose.py) draw
# with the "train" split's fonts but their own seeds.
SPLIT_SEEDS = {"train": 1_000, "eval": 2_000, "fit": 3_000, "val": 4_000}
SPLIT_FONTS = {"train": 0, "eval": 1, "fit": 0, "val": 0}   # which half of the fonts

# Letters that ARE digits in many fonts (O/0, l/1, Z/2, S/5, B/8, G/6, g/q/9, ...) are left out:
# no model can refuse them without refusing real digits.
LETTERS = "ACEFHKLMNPRUVWXYacdefhkmnprtuvwxy"
WORDS = ("cat", "dog", "the", "and", "hello", "yes", "ok", "hi", "sun", "tree", "love", "abc", "xyz",
         "word", "test", "mama", "help", "stop", "text", "ink", "pen", "map", "key", "data", "run")
# Symbols a 20x20 crop would turn into a plain stroke (| / \ ! ( ) [ ] { } -) look like a 1: left out.
SYMBOLS = "+=#%&@$?*~^<>§¶€£¥©®→←↑↓∞π∑√µΩ÷×"
# Cyrillic letters, for glyph shapes Latin lacks; those that look like a digit or a Latin letter
# left out above (З Э 3, О 0, Б б 6, Ч ч У 4, Ь Ъ b, Т Г 7) are left out too.
CYRILLIC = "АВДЕЖИЙКЛМНПРСФХЦШЩЫЮЯджийклмнпфцшщыюя"
NON_DIGIT_CATEGORIES = ("letters", "words", "symbols", "doodles", "scribbles", "textures", "noise", "glyphs",
                        "shapes")
# Outlier exposure uses these; symbols and doodles stay unseen.
TRAINED_CATEGORIES = ("letters", "words", "scribbles", "textures", "noise", "glyphs", "shapes")
DIGIT_STYLES = ("typed", "drawn", "photographed")
# An image's seed holds its category's place here: append only, or every set made before changes.
SEED_NAMES = ("letters", "words", "symbols", "doodles", "scribbles", "textures", "noise",
              "typed", "drawn", "photographed", "glyphs", "shapes")
# The code that makes a set's images: a change to any of these files is a new cache key.
SOURCES = tuple(Path(module.__file__) for module in (drawing, model, photo, preprocess)) + (Path(__file__),)
SOURCES_DIGEST = set_cache.sources_digest(SOURCES)


class FontsMissing(Exception):
    """The fonts that letters, words and typed digits are drawn in are not installed."""


def font_paths(split: str) -> list[Path]:
    """The split's fonts: every other font file on this machine, in name order, so each split
    holds sans, serif, mono, condensed, light and bold faces, and none is in both."""
    fonts = sorted(path for directory in FONT_DIRS for path in Path(directory).glob("*.ttf")
                   if "MathTeX" not in path.name)
    if len(fonts) < 2:
        raise FontsMissing(f"no fonts in {', '.join(FONT_DIRS)}: `make fonts` (or `make system`) installs them")
    return fonts[SPLIT_FONTS[split]::2]


@dataclass(frozen=True)
class SyntheticSet:
    """images float32 [N, 28, 28] in [0, 1], white ink on black, as serving's preprocessing
    made them; categories [N] (a category or a digit style); labels [N] (-1: not a digit).
    blank: per category, the images that preprocessing itself refused as blank (the server
    answers those 422 no_digit: refused before the model)."""
    images: np.ndarray
    categories: np.ndarray
    labels: np.ndarray
    blank: dict

    def only(self, category: str) -> np.ndarray:
        return self.images[self.categories == category]

    def as_uint8(self) -> np.ndarray:
        return np.round(self.images * 255).astype(np.uint8)


# --- digits from outside MNIST -----------------------------------------------------------------
def typed_digit(rng: np.random.Generator, fonts: list[Path], digit: int) -> Image.Image:
    return draw_text(rng, fonts, str(digit))


def drawn_digit(rng: np.random.Generator, fonts: list[Path], digit: int) -> Image.Image:
    variants = DIGIT_STROKES[digit]
    return draw_strokes(rng, variants[int(rng.integers(len(variants)))], width_share=(0.03, 0.16))


def photographed(rng: np.random.Generator, sheet: Image.Image) -> Image.Image:
    """A photo of the sheet: off-centre in a bigger frame, uneven light, low contrast, blur,
    sensor noise and JPEG compression."""
    frame_w, frame_h = (int(sheet.width * rng.uniform(1.2, 2.0)), int(sheet.height * rng.uniform(1.2, 2.0)))
    frame = Image.new("L", (frame_w, frame_h), sheet.getpixel((0, 0)))
    corner = int(rng.integers(0, frame_w - sheet.width + 1)), int(rng.integers(0, frame_h - sheet.height + 1))
    frame.paste(sheet, corner)
    pixels = np.asarray(frame, dtype=np.float32) / 255.0
    contrast = rng.uniform(0.45, 1.0)                       # grey pencil, faded print, glare
    pixels = 1.0 - (1.0 - pixels) * contrast
    yy, xx = np.mgrid[0:frame_h, 0:frame_w] / max(frame_w, frame_h)
    angle = rng.uniform(0, 2 * math.pi)
    light = 1.0 - rng.uniform(0.0, 0.15) * (np.cos(angle) * xx + np.sin(angle) * yy)   # a shadow across the page
    pixels = pixels * light + rng.normal(0, rng.uniform(0.005, 0.04), pixels.shape)
    photo = Image.fromarray(np.clip(pixels * 255, 0, 255).astype(np.uint8))
    photo = photo.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 2.0)))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=int(rng.integers(30, 90)))
    return Image.open(buffer)


def photographed_digit(rng: np.random.Generator, fonts: list[Path], digit: int) -> Image.Image:
    sheet = typed_digit(rng, fonts, digit) if rng.random() < 0.5 else drawn_digit(rng, fonts, digit)
    return photographed(rng, sheet)


DIGIT_MAKERS: dict[str, Callable] = {"typed": typed_digit, "drawn": drawn_digit, "photographed": photographed_digit}


# --- non-digits --------------------------------------------------------------------------------
def character(rng, fonts, characters: str) -> Image.Image:
    """One of characters, typed."""
    return draw_text(rng, fonts, characters[int(rng.integers(len(characters)))])


def letter(rng, fonts) -> Image.Image:
    return character(rng, fonts, LETTERS)


def word(rng, fonts) -> Image.Image:
    text = WORDS[int(rng.integers(len(WORDS)))]
    return draw_text(rng, fonts, text.upper() if rng.random() < 0.3 else text)


def symbol(rng, fonts) -> Image.Image:
    return character(rng, fonts, SYMBOLS)


def glyph(rng, fonts) -> Image.Image:
    return character(rng, fonts, CYRILLIC)


def shapes(rng, fonts) -> Image.Image:
    """Two to four overlapping outlines (one alone could be a 0)."""
    return draw_strokes(rng, [shape_outline(rng) for _ in range(int(rng.integers(2, 5)))],
                        width_share=(0.02, 0.08), jitter=0.01)


def doodle(rng, fonts) -> Image.Image:
    shape = DOODLES[int(rng.integers(len(DOODLES)))]
    return draw_strokes(rng, shape(rng), width_share=(0.02, 0.08), jitter=0.01)


def scribble(rng, fonts) -> Image.Image:
    strokes = [np.cumsum(rng.normal(0, 0.25, (int(rng.integers(5, 14)), 2)), axis=0)
               for _ in range(int(rng.integers(1, 4)))]
    every = np.vstack(strokes)
    low, high = every.min(axis=0), every.max(axis=0)
    strokes = [(stroke - low) / np.maximum(high - low, 1e-6) for stroke in strokes]
    return draw_strokes(rng, strokes, width_share=(0.02, 0.12), jitter=0.0)


def texture(rng, fonts) -> Image.Image:
    """A stand-in for a photo: smooth noise, a grating, a checkerboard or a collage of blurred shapes."""
    size = (int(rng.integers(80, 200)), int(rng.integers(80, 200)))
    kind = int(rng.integers(4))
    yy, xx = np.mgrid[0:size[1], 0:size[0]] / 40.0
    if kind == 0:
        coarse = rng.random((int(rng.integers(3, 9)), int(rng.integers(3, 9)))).astype(np.float32)
        pixels = np.asarray(Image.fromarray(coarse, mode="F").resize(size, Image.BICUBIC))
    elif kind == 1:
        angle, frequency = rng.uniform(0, math.pi), rng.uniform(0.5, 4)
        pixels = 0.5 + 0.5 * np.sin(2 * math.pi * frequency * (np.cos(angle) * xx + np.sin(angle) * yy))
    elif kind == 2:
        cell = rng.uniform(0.3, 1.5)
        pixels = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)
    else:
        collage = Image.new("L", size, int(rng.integers(0, 256)))
        draw = ImageDraw.Draw(collage)
        for _ in range(int(rng.integers(3, 12))):
            box = sorted(rng.integers(0, size[0], 2)), sorted(rng.integers(0, size[1], 2))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([box[0][0], box[1][0], box[0][1], box[1][1]], fill=int(rng.integers(0, 256)))
        pixels = np.asarray(collage.filter(ImageFilter.GaussianBlur(rng.uniform(0, 4))), dtype=np.float32) / 255
    pixels = np.clip(pixels + rng.normal(0, 0.03, pixels.shape), 0, 1)
    return Image.fromarray((pixels * 255).astype(np.uint8))


def noise(rng, fonts) -> Image.Image:
    size = (int(rng.integers(28, 200)), int(rng.integers(28, 200)))
    kind = int(rng.integers(3))
    if kind == 0:
        pixels = rng.random(size[::-1])
    elif kind == 1:
        pixels = np.clip(rng.normal(0.5, rng.uniform(0.1, 0.4), size[::-1]), 0, 1)
    else:
        pixels = np.where(rng.random(size[::-1]) < rng.uniform(0.01, 0.2), 0.0, 1.0)   # specks on paper
    return Image.fromarray((pixels * 255).astype(np.uint8))


NON_DIGIT_MAKERS: dict[str, Callable] = {"letters": letter, "words": word, "symbols": symbol, "doodles": doodle,
                                         "scribbles": scribble, "textures": texture, "noise": noise,
                                         "glyphs": glyph, "shapes": shapes}


# --- the sets ----------------------------------------------------------------------------------
def served(image: Image.Image) -> np.ndarray | None:
    """The image as the server's preprocessing hands it to the model; None when it refuses it."""
    try:
        return to_mnist(to_grayscale(image))
    except ImageError:
        return None


def image_rng(split: str, category: str, index: int) -> np.random.Generator:
    """One generator per image: an image does not change when a set is made larger or smaller."""
    return np.random.default_rng([SPLIT_SEEDS[split], SEED_NAMES.index(category), index])


def build_set(split: str, per_category: dict[str, int], make_one: Callable) -> SyntheticSet:
    """The set from the cache (training/set_cache.py) when this code made it before."""
    fonts = font_paths(split)
    request = {"split": split, "per_category": per_category, "maker": make_one.__name__}
    arrays, blank = set_cache.cached(set_cache.set_key(request, SOURCES_DIGEST, fonts),
                                     lambda: generate_set(split, per_category, make_one, fonts))
    return SyntheticSet(arrays["images"], arrays["categories"], arrays["labels"], blank)


def generate_set(split: str, per_category: dict[str, int], make_one: Callable,
                 fonts: list[Path]) -> tuple[dict[str, np.ndarray], dict]:
    images, categories, labels, blank = [], [], [], {}
    for category, count in per_category.items():
        blank[category] = 0
        for index in range(count):
            rng = image_rng(split, category, index)
            picture, label = make_one(category, index, rng, fonts)
            pixels = served(picture)
            if pixels is None:
                blank[category] += 1
                continue
            images.append(pixels)
            categories.append(category)
            labels.append(label)
    return {"images": np.stack(images).astype(np.float32), "categories": np.array(categories),
            "labels": np.array(labels, dtype=np.int64)}, blank


def non_digit(category: str, index: int, rng: np.random.Generator, fonts: list[Path]) -> tuple[Image.Image, int]:
    return NON_DIGIT_MAKERS[category](rng, fonts), -1


def real_world_digit(style: str, index: int, rng: np.random.Generator, fonts: list[Path]) -> tuple[Image.Image, int]:
    return DIGIT_MAKERS[style](rng, fonts, index % NUM_CLASSES), index % NUM_CLASSES


def non_digits(split: str, per_category: int, categories: tuple[str, ...] = NON_DIGIT_CATEGORIES) -> SyntheticSet:
    """per_category images of each category (fewer where preprocessing refused some as blank)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    return build_set(split, {category: per_category for category in categories}, non_digit)


def real_world_digits(split: str, per_style: int, styles: tuple[str, ...] = DIGIT_STYLES) -> SyntheticSet:
    """per_style digits of each style, the digits 0-9 in turn. Split "train" is the
    validation part (augmentations are chosen on it), "eval" the held-out part the bench reports."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    return build_set(split, {style: per_style for style in styles}, real_world_digit)


def contact_sheet(images: np.ndarray, columns: int = 20) -> Image.Image:
    rows = math.ceil(len(images) / columns)
    sheet = np.zeros((rows * 30, columns * 30), dtype=np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        sheet[row * 30 + 1:row * 30 + 29, column * 30 + 1:column * 30 + 29] = np.round(image * 255)
    return Image.fromarray(sheet)


if __name__ == "__main__":
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "synthetic")
    out.mkdir(parents=True, exist_ok=True)
    for name, made in (("non_digits", non_digits("eval", 40)), ("real_world_digits", real_world_digits("eval", 60))):
        contact_sheet(made.images).save(out / f"{name}.png")
        print(f"{out / name}.png: {len(made.images)} images, refused as blank: {made.blank}")
