"""Clean renderings: a prompt and a seed -> a 32x32 RGB image in [0, 1], anti-aliased, with numpy only.

The shapes of one image share a size and sit in a row (horizontal for top / bottom / center, vertical for
left / right) at fixed spacing around their region's centre; the seed draws only the row's offset
(uniform in +-MAX_OFFSET px on each axis) and the shapes' half-size (uniform in HALF_SIZE_RANGE px).
Anti-aliasing is the coverage of each pixel estimated from the signed distance to the shape's edge.
"""

import dataclasses
import zlib
from collections.abc import Sequence

import numpy as np

from pnapo_jax.world import grammar

SIZE = 32
BACKGROUND = np.array([0.1, 0.1, 0.1], np.float32)
PALETTE = {"red": (0.9, 0.15, 0.15), "green": (0.15, 0.75, 0.2), "blue": (0.2, 0.35, 0.95),
           "yellow": (0.95, 0.85, 0.15)}
REGION_CENTRES = {"left": (8.0, 16.0), "right": (24.0, 16.0), "top": (16.0, 8.0), "bottom": (16.0, 24.0),
                  "center": (16.0, 16.0)}  # (x, y) in pixels; pixel (i, j) covers [j, j+1] x [i, i+1]
VERTICAL_ROWS = ("left", "right")
SPACING = 10.0  # between the centres of neighbouring shapes
MAX_OFFSET = 1.5
HALF_SIZE_RANGE = (2.0, 4.0)  # with SPACING, neighbours stay >= 2 px apart
SQUARE_SCALE = 0.9  # a square's half-side relative to the half-size, so squares are not much bigger than circles


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a seed decides: the row's offset from its region's centre and the shapes' half-size (px)."""

    dx: float
    dy: float
    half: float


def layout(text: str, seed: int) -> Layout:
    """The seed's layout for a prompt; the same (text, seed) gives the same layout everywhere."""
    rng = np.random.default_rng([zlib.crc32(text.encode()), seed])
    dx, dy = rng.uniform(-MAX_OFFSET, MAX_OFFSET, 2)
    return Layout(float(dx), float(dy), float(rng.uniform(*HALF_SIZE_RANGE)))


def centres(prompt: grammar.Prompt, lay: Layout) -> list[tuple[float, float]]:
    """(x, y) of each shape."""
    cx, cy = REGION_CENTRES[prompt.position]
    along = [(k - (prompt.count - 1) / 2) * SPACING for k in range(prompt.count)]
    if prompt.position in VERTICAL_ROWS:
        return [(cx + lay.dx, cy + lay.dy + a) for a in along]
    return [(cx + lay.dx + a, cy + lay.dy) for a in along]


def signed_distance(shape: str, x_HxW: np.ndarray, y_HxW: np.ndarray, h: float) -> np.ndarray:
    """Distance (px) from each pixel centre to the edge of a shape centred at the origin; negative inside.
    The triangle points up with its base and height 2h (exact inside, a close bound outside)."""
    if shape == "circle":
        return np.hypot(x_HxW, y_HxW) - h
    if shape == "square":
        qx, qy = np.abs(x_HxW) - SQUARE_SCALE * h, np.abs(y_HxW) - SQUARE_SCALE * h
        return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)
    if shape == "triangle":
        s = np.sqrt(5.0)
        return np.maximum.reduce([y_HxW - h, (-2 * (x_HxW + h) - (y_HxW - h)) / s, (2 * (x_HxW - h) - (y_HxW - h)) / s])
    raise ValueError(f"unknown shape {shape!r}")


def coverage(prompt: grammar.Prompt, lay: Layout) -> np.ndarray:
    """[SIZE, SIZE] fraction of each pixel covered by the prompt's shapes."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    cov = [np.clip(0.5 - signed_distance(prompt.shape, x - cx, y - cy, lay.half), 0, 1)
           for cx, cy in centres(prompt, lay)]
    return np.max(cov, axis=0)


def draw(prompt: grammar.Prompt, lay: Layout) -> np.ndarray:
    """[SIZE, SIZE, 3] image of the prompt's shapes laid out by `lay` on the plain background."""
    cov = coverage(prompt, lay)[..., None]
    return ((1 - cov) * BACKGROUND + cov * np.array(PALETTE[prompt.colour], np.float32)).astype(np.float32)


def render(texts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
    """[B, SIZE, SIZE, 3] clean renderings, one per (prompt text, seed)."""
    return np.stack([draw(grammar.parse(t), layout(t, int(s))) for t, s in zip(texts, seeds, strict=True)])
