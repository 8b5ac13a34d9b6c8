"""Fidelity: how far an image is from the data, whatever the reward says (lower is closer; 0 is a clean rendering).

fidelity = min over a bank of clean renderings of the image's prompt of the mean squared difference in a
fixed feature space: the image blurred (Gaussian, sigma BLUR_SIGMA px) and average-pooled 2x2, so a
sub-pixel misplacement costs little while smudges, wrong colours, noise, extra or missing shapes cost a lot.
The bank is a grid over everything a seed can change (row offset x, y and half-size, GRID points each), so
any clean rendering of the prompt is within half a grid step of the bank. No preference uses this measure:
a model that gains reward by leaving the data manifold shows it as rising fidelity.
"""

import functools
import itertools
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from pnapo_jax.world import grammar, render

BLUR_SIGMA = 1.0
GRID = 5


def features(images_BxHxWx3: np.ndarray) -> np.ndarray:
    """[B, H/2, W/2, 3] blurred, pooled images."""
    x = ndimage.gaussian_filter(np.asarray(images_BxHxWx3, np.float32), (0, BLUR_SIGMA, BLUR_SIGMA, 0),
                                mode="nearest")
    B, H, W, C = x.shape
    return x.reshape(B, H // 2, 2, W // 2, 2, C).mean((2, 4))


@functools.cache
def _bank(text: str) -> np.ndarray:
    """[GRID**3, H/2, W/2, 3] features of the prompt's clean renderings on the layout grid (~0.4 MB)."""
    offsets = np.linspace(-render.MAX_OFFSET, render.MAX_OFFSET, GRID)
    halves = np.linspace(*render.HALF_SIZE_RANGE, GRID)
    prompt = grammar.parse(text)
    return features(np.stack([render.draw(prompt, render.Layout(dx, dy, h))
                              for dx, dy, h in itertools.product(offsets, offsets, halves)]))


def fidelity(images_BxHxWx3: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """[B] distance from each image to the nearest clean rendering of its prompt (lower is better)."""
    feats = features(images_BxHxWx3)
    return np.array([((_bank(p) - f) ** 2).mean((1, 2, 3)).min() for f, p in zip(feats, prompts, strict=True)],
                    np.float32)
