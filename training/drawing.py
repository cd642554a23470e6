"""Drawing as people draw: paper, ink, text in a font, smooth strokes, and each digit's strokes
in the variants people use. training/synthetic.py composes the sets from these."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def paper(rng: np.random.Generator, size: tuple[int, int] | None = None) -> Image.Image:
    width, height = size or (int(rng.integers(90, 220)), int(rng.integers(90, 220)))
    return Image.new("L", (width, height), int(rng.integers(200, 256)))


def ink(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 90))


def font(rng: np.random.Generator, fonts: list[Path], size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), size)


def draw_text(rng: np.random.Generator, fonts: list[Path], text: str) -> Image.Image:
    """Text in a random font and size, slightly rotated, off-centre on a sheet of paper."""
    face = font(rng, fonts, int(rng.integers(28, 90)))
    left, top, right, bottom = face.getbbox(text)
    sheet = paper(rng, (right - left + int(rng.integers(20, 90)), bottom - top + int(rng.integers(20, 90))))
    background = sheet.getpixel((0, 0))
    x = int(rng.integers(5, sheet.width - (right - left) - 4)) - left
    y = int(rng.integers(5, sheet.height - (bottom - top) - 4)) - top
    ImageDraw.Draw(sheet).text((x, y), text, fill=ink(rng), font=face)
    return sheet.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR, expand=True, fillcolor=background)


def smooth_path(points: np.ndarray, steps: int = 8) -> np.ndarray:
    """A Catmull-Rom curve through the points, so drawn strokes bend instead of kinking."""
    if len(points) < 3:
        return points
    padded = np.vstack([points[0], points, points[-1]])
    t = np.linspace(0, 1, steps, endpoint=False)[:, None]
    curve = []
    for p0, p1, p2, p3 in zip(padded, padded[1:], padded[2:], padded[3:]):
        curve.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                            + (3 * p1 - p0 - 3 * p2 + p3) * t ** 3))
    return np.vstack(curve + [points[-1:]])


def draw_strokes(rng: np.random.Generator, strokes: list[np.ndarray], width_share: tuple[float, float],
                 jitter: float = 0.02) -> Image.Image:
    """Strokes in the unit box (y down), bent by a random affine map and jitter, drawn with a
    pen of random thickness on paper, as on the draw-a-digit page or with a marker."""
    size = int(rng.integers(100, 220))
    sheet = paper(rng, (size, size))
    angle, shear = math.radians(rng.uniform(-12, 12)), rng.uniform(-0.25, 0.25)
    scale = np.array([rng.uniform(0.65, 1.1), rng.uniform(0.85, 1.1)])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    transform = rotation @ np.array([[1, shear], [0, 1]]) * scale
    offset = rng.uniform(-0.08, 0.08, 2)
    pen = max(1, int(size * 0.6 * rng.uniform(*width_share)))
    draw = ImageDraw.Draw(sheet)
    colour = ink(rng)
    for stroke in strokes:
        points = stroke + rng.normal(0, jitter, stroke.shape)
        points = ((points - 0.5) @ transform.T + 0.5 + offset) * size * 0.6 + size * 0.2
        path = [tuple(point) for point in smooth_path(points)]
        draw.line(path, fill=colour, width=pen, joint="curve")
        for end in (path[0], path[-1]):   # round pen ends
            draw.ellipse([end[0] - pen / 2, end[1] - pen / 2, end[0] + pen / 2, end[1] + pen / 2], fill=colour)
    return sheet


def ellipse(cx: float, cy: float, rx: float, ry: float, start: float = 0.0, turn: float = 1.0,
            points: int = 14) -> np.ndarray:
    t = start + np.linspace(0, 2 * math.pi * turn, points)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def pts(*xy: float) -> np.ndarray:
    return np.array(xy, dtype=float).reshape(-1, 2)


# Each digit as people draw it, in a few common variants (1 with and without flag and base,
# open and closed 4, 7 with and without the bar, 9 with a straight and a curved tail).
DIGIT_STROKES: dict[int, list[list[np.ndarray]]] = {
    0: [[ellipse(0.5, 0.5, 0.3, 0.45, -math.pi / 2, 1.05)]],
    1: [[pts(0.5, 0.05, 0.5, 0.95)], [pts(0.3, 0.25, 0.55, 0.05, 0.55, 0.95)],
        [pts(0.3, 0.25, 0.55, 0.05, 0.55, 0.95), pts(0.3, 0.95, 0.8, 0.95)]],
    2: [[pts(0.2, 0.25, 0.35, 0.08, 0.65, 0.08, 0.8, 0.28, 0.7, 0.5, 0.2, 0.95, 0.85, 0.95)]],
    3: [[pts(0.2, 0.15, 0.5, 0.05, 0.78, 0.2, 0.7, 0.42, 0.45, 0.5, 0.75, 0.6, 0.8, 0.82, 0.5, 0.96, 0.2, 0.85)],
        [pts(0.2, 0.08, 0.78, 0.08, 0.45, 0.42, 0.78, 0.62, 0.72, 0.88, 0.45, 0.96, 0.2, 0.88)]],
    4: [[pts(0.65, 0.95, 0.65, 0.05, 0.15, 0.65, 0.85, 0.65)],
        [pts(0.25, 0.05, 0.2, 0.6, 0.85, 0.6), pts(0.65, 0.3, 0.65, 0.95)]],
    5: [[pts(0.75, 0.07, 0.3, 0.07, 0.25, 0.45, 0.55, 0.4, 0.78, 0.55, 0.75, 0.85, 0.5, 0.96, 0.2, 0.87)]],
    6: [[pts(0.7, 0.08, 0.4, 0.3, 0.25, 0.65, 0.35, 0.92, 0.6, 0.95, 0.75, 0.75, 0.6, 0.55, 0.35, 0.58,
             0.27, 0.7)]],
    7: [[pts(0.15, 0.08, 0.85, 0.08, 0.4, 0.95)],
        [pts(0.15, 0.08, 0.85, 0.08, 0.4, 0.95), pts(0.35, 0.5, 0.75, 0.5)]],
    8: [[ellipse(0.5, 0.27, 0.22, 0.21, math.pi / 2, 1.0), ellipse(0.5, 0.71, 0.27, 0.24, -math.pi / 2, 1.0)]],
    9: [[ellipse(0.5, 0.3, 0.26, 0.24, 0, 1.0), pts(0.76, 0.3, 0.74, 0.95)],
        [ellipse(0.5, 0.3, 0.26, 0.24, 0, 1.0), pts(0.76, 0.3, 0.72, 0.7, 0.45, 0.95)]],
}


# --- non-digit strokes, in the unit box (training/synthetic.py draws them) ---------------------
def polygon(rng) -> np.ndarray:
    corners = int(rng.integers(3, 7))
    angles = np.sort(rng.uniform(0, 2 * math.pi, corners))
    radius = rng.uniform(0.5, 1.0, corners)
    outline = np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)
    return np.vstack([outline, outline[:1]])


def shape_outline(rng) -> np.ndarray:
    """A polygon or a circle, at a random place and size in the unit box."""
    unit = polygon(rng) if rng.random() < 0.6 else ellipse(0, 0, 1.0, rng.uniform(0.5, 1.0), 0, 1.0, 16)
    size, centre = rng.uniform(0.15, 0.35), rng.uniform(0.3, 0.7, 2)
    return centre + size * unit


def star(rng) -> list[np.ndarray]:
    spikes = int(rng.integers(5, 8))
    t = np.linspace(-math.pi / 2, 1.5 * math.pi, 2 * spikes + 1)
    radius = np.where(np.arange(2 * spikes + 1) % 2 == 0, 0.48, rng.uniform(0.15, 0.3))
    return [np.stack([0.5 + radius * np.cos(t), 0.5 + radius * np.sin(t)], axis=1)]


def house(rng) -> list[np.ndarray]:
    return [pts(0.15, 0.45, 0.5, 0.08, 0.85, 0.45, 0.85, 0.95, 0.15, 0.95, 0.15, 0.45, 0.85, 0.45),
            pts(0.42, 0.95, 0.42, 0.7, 0.58, 0.7, 0.58, 0.95)]


def smiley(rng) -> list[np.ndarray]:
    return [ellipse(0.5, 0.5, 0.45, 0.45, 0, 1.0, 20), ellipse(0.35, 0.38, 0.04, 0.05, 0, 1.0, 6),
            ellipse(0.65, 0.38, 0.04, 0.05, 0, 1.0, 6), ellipse(0.5, 0.55, 0.22, 0.2, 0.2, 0.38, 8)]


def spiral(rng) -> list[np.ndarray]:
    t = np.linspace(0, rng.uniform(3, 5) * math.pi, 40)
    radius = 0.45 * t / t[-1]
    return [np.stack([0.5 + radius * np.cos(t), 0.5 + radius * np.sin(t)], axis=1)]


def grid(rng) -> list[np.ndarray]:
    lines = np.linspace(0.1, 0.9, int(rng.integers(3, 5)))
    return [pts(x, 0.05, x, 0.95) for x in lines] + [pts(0.05, y, 0.95, y) for y in lines]


def zigzag(rng) -> list[np.ndarray]:
    count = int(rng.integers(4, 9))
    return [np.stack([np.linspace(0.05, 0.95, count), np.where(np.arange(count) % 2, 0.2, 0.8)], axis=1)]


def sun(rng) -> list[np.ndarray]:
    rays = [pts(0.5 + 0.28 * math.cos(a), 0.5 + 0.28 * math.sin(a), 0.5 + 0.48 * math.cos(a),
                0.5 + 0.48 * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 9)[:-1]]
    return [ellipse(0.5, 0.5, 0.2, 0.2, 0, 1.0, 12)] + rays


def heart(rng) -> list[np.ndarray]:
    t = np.linspace(0, 2 * math.pi, 30)
    x, y = 16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return [np.stack([0.5 + x / 36, 0.45 + y / 36], axis=1)]


DOODLES = (star, house, smiley, spiral, grid, zigzag, sun, heart)
