"""The demo model's world: ``a {colour} {shape} on a {colour} background``, and the renderer of its training images.

Shared by the training script (``tools/train_demo_model.py``), ``make demo``'s prompts and the tests' checker, so
the colours the checker reads back are exactly the ones the model was trained on.
"""

from __future__ import annotations

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# (shape colour, shape, background colour) never rendered for training. Each colour is held out once as a shape
# colour and once as a background, each shape twice; every word still appears in many training captions.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "blue"),
    ("green", "square", "yellow"),
    ("blue", "triangle", "white"),
    ("yellow", "circle", "black"),
    ("white", "square", "red"),
    ("black", "triangle", "green"),
)
# Pixels; latents are 8x8 (each latent pixel codes an 8x8 patch, as in SD). Not 32: its 4x4 latents put a shape on
# 1.4-2.4 latent pixels, and the VAE alone turned squares and triangles into blobs (shape kind read back right
# from 53% of its reconstructions), so no UNet could draw them.
SIZE = 64
WORDS: tuple[str, ...] = ("a", "on", "background", *COLOURS, *SHAPES)


def caption(fg: str, shape: str, bg: str) -> str:
    return f"a {fg} {shape} on a {bg} background"


def combos(held_out: bool = False) -> list[tuple[str, str, str]]:
    """Every (shape colour, shape, background colour) with two different colours: the training ones, or the
    held-out ones."""
    out = [(f, s, b) for f in COLOURS for s in SHAPES for b in COLOURS if f != b]
    return [c for c in out if (c in HELD_OUT) == held_out]


def render(fg: str, shape: str, bg: str, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """(size, size, 3) uint8: the shape (side 35-60% of the image, anywhere fully inside) on a plain background,
    with hard edges (no anti-aliasing: every pixel is one of the two colours)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), COLOURS[bg])
    d = ImageDraw.Draw(img)
    s = int(rng.integers(round(0.35 * size), round(0.60 * size) + 1))
    x0 = int(rng.integers(0, size - s + 1))
    y0 = int(rng.integers(0, size - s + 1))
    box = (x0, y0, x0 + s - 1, y0 + s - 1)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[fg])
    elif shape == "square":
        d.rectangle(box, fill=COLOURS[fg])
    else:  # upright isosceles triangle filling half its box
        d.polygon([(x0 + (s - 1) / 2, y0), (x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1)], fill=COLOURS[fg])
    return np.asarray(img, dtype=np.uint8)
