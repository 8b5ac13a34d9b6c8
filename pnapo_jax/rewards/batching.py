"""Scoring in fixed-size batches, so that one jit compilation serves every call of a reward at an image size."""

from collections.abc import Callable

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
