"""Reads a demo picture back with plain pixel rules, to compare with its prompt.

1. Background: the per-channel median of the 1-px border, named by the nearest palette colour.
2. Shape colour: the median of the pixels far from the background (over a third of the smallest distance between
   two palette colours), named by the nearest palette colour other than the background's.
3. Shape pixels: those nearer the shape colour than the background's; the largest 4-connected group of them.
4. Shape kind: how much of its bounding box that group fills: a square ~1, a circle ~pi/4, an upright triangle ~1/2.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from sdtrt.demo.grammar import COLOURS

_NAMES = list(COLOURS)
_RGB = np.array([COLOURS[n] for n in _NAMES], dtype=np.float64)  # (6, 3)
_MIN_GAP = min(np.linalg.norm(_RGB[i] - _RGB[j]) for i in range(len(_RGB)) for j in range(i))
SQUARE_FILL = 0.89  # between a square (1.0) and a circle (pi/4 = 0.785)
CIRCLE_FILL = 0.65  # between a circle (0.785) and a triangle (0.5)


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None  # None: no shape found
    shape: str | None
    fill: float  # share of the bounding box the shape covers
    area: float  # share of the image the shape covers


def _nearest(rgb: np.ndarray, exclude: str | None = None) -> str:
    d = np.linalg.norm(_RGB - rgb, axis=1)
    if exclude is not None:
        d[_NAMES.index(exclude)] = np.inf
    return _NAMES[int(np.argmin(d))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        group, todo = [], deque([(y0, x0)])
        while todo:
            y, x = todo.popleft()
            group.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    todo.append((ny, nx))
        if len(group) > len(best):
            best = group
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best, strict=True)
        out[list(ys), list(xs)] = True
    return out


def read_image(image) -> Reading:
    """``image``: a PIL image or an (H, W, 3) uint8 array."""
    px = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)
    border = np.concatenate([px[0], px[-1], px[1:-1, 0], px[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb)
    far = np.linalg.norm(px - bg_rgb, axis=2) > _MIN_GAP / 3
    if far.sum() < 4:
        return Reading(background, None, None, 0.0, 0.0)
    colour = _nearest(np.median(px[far], axis=0), exclude=background)
    near_shape = np.linalg.norm(px - _RGB[_NAMES.index(colour)], axis=2) < np.linalg.norm(px - bg_rgb, axis=2)
    mask = _largest_component(near_shape)
    if not mask.any():
        return Reading(background, colour, None, 0.0, 0.0)
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = float(mask.sum() / box)
    shape = "square" if fill >= SQUARE_FILL else "circle" if fill >= CIRCLE_FILL else "triangle"
    return Reading(background, colour, shape, fill, float(mask.mean()))
