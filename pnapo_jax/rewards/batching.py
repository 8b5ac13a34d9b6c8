"""Scoring in fixed-size batches, so that one jit compilation serves every call of a reward at an image size."""

from collections.abc import Callable, Sequence

import numpy as np


def in_batches(score: Callable[..., object], batch_size: int, *rows: np.ndarray) -> np.ndarray:
    """score(*batch) -> [n] for consecutive batches of `batch_size` rows (fewer if there are fewer rows) of
    each array in `rows` (all [B, ...]); the last batch repeats its last row to full size. Returns [B]."""
    B = len(rows[0])
    if not B:
        return np.zeros(0, np.float32)
    n = min(batch_size, B)
    out = []
    for start in range(0, B, n):
        index = np.arange(start, start + n).clip(max=B - 1)
        out.append(np.asarray(score(*(x[index] for x in rows))))
    return np.concatenate(out)[:B]


def images_and_prompts(images_BxHxWx3: np.ndarray, prompts: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """A text-image reward's inputs as float32 images [B, H, W, 3] and B prompts, checked to match."""
    images, prompts = np.asarray(images_BxHxWx3, np.float32), list(prompts)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(prompts):
        raise ValueError(f"expected images [B, H, W, 3] and B prompts, got {images.shape} and {len(prompts)}")
    return images, prompts
