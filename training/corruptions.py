"""MNIST-C's 15 corruptions (Mu and Gilmer 2019, github.com/google-research/mnist-c,
corruptions.py), ported function by function with its severity tables: each takes a digit as
float [28, 28] in [0, 1] (white on black), a numpy Generator and a severity (1-5; ignored by the
four that have none) and returns the same shape and range. training/shifts.py builds the sets.

MNIST-C's code uses skimage, wand (ImageMagick) and cv2, which we lack; the same operations in
numpy:
- gaussian filter: a separable kernel truncated at 4 sigma, reflected edges (skimage's
  defaults); affine warps: bilinear, zero outside, the centre (13.5, 13.5) fixed (skimage's
  warp order 1, constant 0);
- motion_blur: ImageMagick's kernel (one-sided Gaussian weights along the angle, width
  2 * radius + 1 pixels) summed from bilinearly shifted copies (ImageMagick rounds the
  offsets to whole pixels), edges repeated;
- canny_edges: Gaussian sigma 1, Sobel, non-maximum suppression in 4 directions, hysteresis
  0.1 / 0.2 (skimage's defaults for float input) by iterated dilation;
- brightness: HSV value + c of a grey image is exactly clip(x + c);
- glass_blur quantizes to uint8 between its blurs, as MNIST-C does;
- randomness: the caller's Generator; MNIST-C drew from numpy's global state, so our images
  follow the same distribution, not the same pixels as its released dataset.
"""
from __future__ import annotations

import numpy as np

SIZE = 28
CENTRE = 13.5
MNIST_C = ("shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "scale", "rotate", "brightness",
           "translate", "stripe", "fog", "spatter", "dotted_line", "zigzag", "canny_edges")
# MNIST-C's dataset used each function's default severity.
SEVERITY = {"shot_noise": 5, "impulse_noise": 4, "glass_blur": 1, "motion_blur": 1, "shear": 2, "scale": 3,
            "rotate": 2, "brightness": 5, "translate": 3, "fog": 5, "spatter": 4}


# --- helpers ------------------------------------------------------------------------------------
def gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    radius = int(4 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (0, 1):
        padded = np.pad(x, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="symmetric")
        x = np.apply_along_axis(lambda v: np.convolve(v, taps, mode="valid"), axis, padded)
    return x


def sample(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, edge: str = "zero") -> np.ndarray:
    """Bilinear x at (rows, cols); outside: 0 (edge 'zero') or the nearest pixel ('repeat')."""
    if edge == "repeat":
        rows, cols = np.clip(rows, 0, SIZE - 1), np.clip(cols, 0, SIZE - 1)
    padded = np.pad(x, 1)
    r0, c0 = np.floor(rows), np.floor(cols)
    fr, fc = rows - r0, cols - c0
    r0 = np.clip(r0.astype(int) + 1, 0, SIZE)
    c0 = np.clip(c0.astype(int) + 1, 0, SIZE)
    return ((1 - fr) * (1 - fc) * padded[r0, c0] + (1 - fr) * fc * padded[r0, c0 + 1]
            + fr * (1 - fc) * padded[r0 + 1, c0] + fr * fc * padded[r0 + 1, c0 + 1])


def warp(x: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """skimage's warp(x, inverse_map=AffineTransform(matrix)): output (c, r) samples matrix @ (c, r, 1)."""
    rows, cols = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    src_c = matrix[0, 0] * cols + matrix[0, 1] * rows + matrix[0, 2]
    src_r = matrix[1, 0] * cols + matrix[1, 1] * rows + matrix[1, 2]
    return sample(x, src_r, src_c)


def centred(linear: np.ndarray) -> np.ndarray:
    """The affine map of `linear` that keeps the centre (13.5, 13.5) fixed, as MNIST-C computes it."""
    matrix = np.eye(3)
    matrix[:2, :2] = linear
    matrix[:2, 2] = CENTRE * (1 - linear.sum(axis=1))
    return matrix


def line_from_points(c0: float, r0: float, c1: float, r1: float) -> np.ndarray:
    if c1 == c0:
        return np.zeros((SIZE, SIZE))
    cc, rr = np.meshgrid(np.arange(SIZE, dtype=float), np.arange(SIZE, dtype=float), sparse=True)
    dist = np.clip(np.abs(rr - ((r1 - r0) / (c1 - c0) * (cc - c0) + r0)), 0, 2.3 - 1e-10)
    line = np.clip(np.log(1 - dist / 2.3) + 1, 0, 1) * np.ones((SIZE, SIZE))
    line[:, :int(np.floor(c0))] = 0
    line[:, int(np.ceil(c1)):] = 0
    return np.clip(line, 0, 1)


def plasma_fractal(rng: np.random.Generator, mapsize: int = 256, wibbledecay: float = 3) -> np.ndarray:
    """MNIST-C's diamond-square heightmap in [0, 1]."""
    maparray = np.zeros((mapsize, mapsize))
    stepsize, wibble = mapsize, 100.0
    while stepsize >= 2:
        half = stepsize // 2
        corners = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        squares = corners + np.roll(corners, -1, axis=0)
        squares += np.roll(squares, -1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = squares / 4 + wibble * rng.uniform(-wibble, wibble, squares.shape)
        dr = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        ul = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        lt = dr + np.roll(dr, 1, axis=0) + ul + np.roll(ul, -1, axis=1)
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = lt / 4 + wibble * rng.uniform(-wibble, wibble, lt.shape)
        tt = dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=0)
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = tt / 4 + wibble * rng.uniform(-wibble, wibble, tt.shape)
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min()
    return maparray / maparray.max()


# --- MNIST-C's corruptions: x float [28, 28] in [0, 1] -> same --------------------------------------
def shot_noise(x, rng, severity):
    c = [60, 25, 12, 5, 3][severity - 1]
    return np.clip(rng.poisson(x * c) / c, 0, 1)


def impulse_noise(x, rng, severity):
    c = [.03, .06, .09, 0.17, 0.27][severity - 1]
    x = x.copy()
    hit = rng.random(x.shape) < c
    x[hit] = rng.random(int(hit.sum())) < 0.5     # salt or pepper, half each (skimage's s&p)
    return x


def glass_blur(x, rng, severity):
    sigma, delta, iterations = [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)][severity - 1]
    x = np.uint8(gaussian(x, sigma) * 255).astype(float)
    for _ in range(iterations):
        for h in range(SIZE - delta, delta, -1):
            for w in range(SIZE - delta, delta, -1):
                if rng.random() < 0.5:
                    dx, dy = rng.integers(-delta, delta, size=2)
                    x[h, w], x[h + dy, w + dx] = x[h + dy, w + dx], x[h, w]
    return np.clip(gaussian(x / 255, sigma), 0, 1)


def motion_blur(x, rng, severity):
    radius, sigma = [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)][severity - 1]
    angle = np.deg2rad(rng.uniform(-45, 45))
    weights = np.exp(-0.5 * (np.arange(2 * radius + 1) / sigma) ** 2)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    out = sum(w * sample(x, rows + i * np.sin(angle), cols + i * np.cos(angle), edge="repeat")
              for i, w in enumerate(weights))
    return np.clip(out / weights.sum(), 0, 1)


def _sign(rng) -> int:
    return int(rng.choice([-1, 1]))


def shear(x, rng, severity):
    c = [0.2, 0.4, 0.6, 0.8, 1.][severity - 1] * _sign(rng)
    # skimage's AffineTransform(shear=c): [[1, -sin c], [0, cos c]]
    return np.clip(warp(x, centred(np.array([[1, -np.sin(c)], [0, np.cos(c)]]))), 0, 1)


def rotate(x, rng, severity):
    c = [0.2, 0.4, 0.6, 0.8, 1.][severity - 1] * _sign(rng)
    return np.clip(warp(x, centred(np.array([[np.cos(c), -np.sin(c)], [np.sin(c), np.cos(c)]]))), 0, 1)


def scale(x, rng, severity):
    c = [1 / .9, 1 / .8, 1 / .7, 1 / .6, 1 / .5][severity - 1]
    return np.clip(warp(x, centred(np.diag([c, c]))), 0, 1)


def brightness(x, rng, severity):
    return np.clip(x + [.1, .2, .3, .4, .5][severity - 1], 0, 1)


def translate(x, rng, severity):
    c = [1, 2, 3, 4, 5][severity - 1]
    matrix = np.eye(3)
    matrix[:2, 2] = c * rng.choice([-1, 1], 2)
    return np.clip(warp(x, matrix), 0, 1)


def stripe(x, rng, severity):
    x = x.copy()
    x[:, :7], x[:, 21:] = 1 - x[:, :7], 1 - x[:, 21:]
    return x


def fog(x, rng, severity):
    strength, decay = [(1.5, 2), (2., 2), (2.5, 1.7), (2.5, 1.5), (3., 1.4)][severity - 1]
    peak = x.max()
    return np.clip((x + strength * plasma_fractal(rng, wibbledecay=decay)[:SIZE, :SIZE]) * peak / (peak + strength), 0, 1)


def spatter(x, rng, severity):
    loc, spread, sigma, cut, sigma2, _ = [(0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0),
                                          (0.65, 0.3, 2, 0.68, 0.5, 0), (0.65, 0.3, 1, 0.65, 1.5, 1),
                                          (0.67, 0.4, 1, 0.65, 1.5, 1)][severity - 1]
    liquid = gaussian(rng.normal(loc, spread, x.shape), sigma)
    mask = gaussian(np.where(liquid > cut, 1.0, 0.0), sigma2)
    mask[mask < 0.8] = 0
    return np.clip(x * (1 - mask) + 63 / 255 * mask, 0, 1)


def dotted_line(x, rng, severity):
    r0, r1 = rng.integers(0, 27, size=2)
    line = line_from_points(0, r0, 27, r1)
    for start in range(0, 28, 4):     # MNIST-C blanks every other 2-px run: 0-2, 4-6, ...
        line[:, start:start + 2] = 0
    return np.clip(x + line, 0, 1)


def zigzag(x, rng, severity):
    a = b = 2.
    c0, c1 = 2, 25
    r0 = rng.integers(0, 27)
    r1 = r0 + rng.integers(-5, 5)
    theta = np.arctan((r1 - r0) / (c1 - c0))
    d = (c1 - c0) / np.cos(theta)
    ends = [(0., 0.)]
    for i in range(int((d - a) // (2 * a)) + 1):
        ends.append(((2 * i + 1) * a, (-1) ** i * b))
    r_i = ends[-1][1]
    max_c = (2 * a) * (d // (2 * a))
    if d != max_c:
        ends.append((d, r_i / (2 * (d - max_c))))
    cs, rs = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) @ np.array(ends).T
    cs, rs = cs + c0, rs + r0
    for i in range(1, len(cs)):
        x = np.clip(x + line_from_points(cs[i - 1], rs[i - 1], cs[i], rs[i]), 0, 1)
    return x


def canny_edges(x, rng, severity):
    smooth = gaussian(x, 1.0)
    padded = np.pad(smooth, 1, mode="edge")
    gy = (padded[2:, :-2] + 2 * padded[2:, 1:-1] + padded[2:, 2:]
          - padded[:-2, :-2] - 2 * padded[:-2, 1:-1] - padded[:-2, 2:])
    gx = (padded[:-2, 2:] + 2 * padded[1:-1, 2:] + padded[2:, 2:]
          - padded[:-2, :-2] - 2 * padded[1:-1, :-2] - padded[2:, :-2])
    magnitude = np.hypot(gx, gy)
    direction = (np.round(np.arctan2(gy, gx) / (np.pi / 4)) % 4).astype(int)   # 0: E-W, 1: NE, 2: N-S, 3: NW
    steps = {0: (0, 1), 1: (1, 1), 2: (1, 0), 3: (1, -1)}
    m = np.pad(magnitude, 1)
    keep = np.zeros_like(magnitude, dtype=bool)
    for code, (dr, dc) in steps.items():
        ahead = m[1 + dr:SIZE + 1 + dr, 1 + dc:SIZE + 1 + dc]
        behind = m[1 - dr:SIZE + 1 - dr, 1 - dc:SIZE + 1 - dc]
        keep |= (direction == code) & (magnitude >= ahead) & (magnitude >= behind)
    keep[0, :] = keep[-1, :] = keep[:, 0] = keep[:, -1] = False
    weak, strong = keep & (magnitude >= 0.1), keep & (magnitude >= 0.2)
    while True:   # hysteresis: weak edges 8-connected to strong ones
        grown = np.pad(strong, 1)
        grown = np.logical_or.reduce([grown[1 + dr:SIZE + 1 + dr, 1 + dc:SIZE + 1 + dc]
                                      for dr in (-1, 0, 1) for dc in (-1, 0, 1)]) & weak
        if (grown == strong).all():
            return strong.astype(float)
        strong = grown


CORRUPTIONS = {name: globals()[name] for name in MNIST_C}
