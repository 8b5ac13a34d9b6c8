"""The world's programmatic reward: how well an image follows its prompt, times a preference for big shapes.

Prompt following is the mean of four scores in [0, 1], measured on the foreground (pixels whose colour is at
least FG_THRESHOLD from the background's) and its blobs (connected foreground components with the area of a
shape, MIN_AREA to MAX_AREA px; an image without any scores 0 on everything):
  colour    share of foreground pixels whose hue (direction from the background colour) is the prompt's colour
  count     exp(-|blobs - prompt count|)
  shape     per blob, the softmax weight of the prompt's shape among the three shapes, each drawn at the
            blob's centroid with the blob's area, by how well it matches the blob (squared error per px)
  position  softmax weight of the prompt's region among the regions' centres, from the blobs' centroid
The preference: bigger shapes. `size` maps the blobs' mean half-size (from their area and the prompt's shape)
linearly from HALF_SIZE_RANGE onto [0, 1]. Renderings draw the half-size uniformly from that range, so the
preferred images are on the data manifold (a model can satisfy it without losing fidelity), but a model that
imitates the data satisfies it (size >= 0.75) only about a quarter of the time.

    reward = follow * (1 - PREFERENCE_WEIGHT + PREFERENCE_WEIGHT * size)      in [0, 1]
"""

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from pnapo_jax.world import grammar, render

FG_THRESHOLD = 0.3
MIN_AREA, MAX_AREA = 3.0, 100.0  # px of coverage; the largest clean shape covers ~52 px
SHAPE_TEMPERATURE = 0.01  # template errors: ~0.003 for the right shape of a clean blob, >= 0.035 for a wrong one
POSITION_SIGMA = 3.0  # px; region centres are 8 px apart
AREA_PER_HALF_SIZE_SQ = {"circle": np.pi, "square": (2 * render.SQUARE_SCALE) ** 2, "triangle": 2.0}
PREFERENCE_WEIGHT = 0.25
_COLOURS = list(render.PALETTE)
_HUES_KxC = np.array([render.PALETTE[c] for c in _COLOURS], np.float32) - render.BACKGROUND
_HUES_KxC /= np.linalg.norm(_HUES_KxC, axis=-1, keepdims=True)
_REGIONS = list(render.REGION_CENTRES)
_REGION_XY = np.array([render.REGION_CENTRES[r] for r in _REGIONS])
_Y_HxW, _X_HxW = np.mgrid[0:render.SIZE, 0:render.SIZE] + 0.5  # pixel centres


def _softmax_weight(logits_K: np.ndarray, target: int) -> float:
    w = np.exp(logits_K - logits_K.max())
    return float(w[target] / w.sum())


def _blobs(cov_HxW: np.ndarray, fg_HxW: np.ndarray) -> list[np.ndarray]:
    """The shape-sized connected foreground components, each as its coverage grown by 1 px (to hold its
    anti-aliased edge) [H, W]."""
    labels_HxW, n = ndimage.label(fg_HxW)
    blobs = [cov_HxW * ndimage.binary_dilation(labels_HxW == i) for i in range(1, n + 1)]
    return [b for b in blobs if MIN_AREA <= b.sum() <= MAX_AREA]


def _template_errors(blob_HxW: np.ndarray) -> np.ndarray:
    """[3] squared error per px of area between a blob and each shape (grammar.SHAPES order) drawn with the
    blob's area at its centroid (a triangle's centroid is h/3 below its box centre), near the blob."""
    area = blob_HxW.sum()
    cx, cy = (blob_HxW * _X_HxW).sum() / area, (blob_HxW * _Y_HxW).sum() / area
    errors = []
    for shape in grammar.SHAPES:
        h = np.sqrt(area / AREA_PER_HALF_SIZE_SQ[shape])
        up = h / 3 if shape == "triangle" else 0.0
        template_HxW = np.clip(0.5 - render.signed_distance(shape, _X_HxW - cx, _Y_HxW - cy + up, h), 0, 1)
        errors.append(((blob_HxW - template_HxW * (blob_HxW > 0)) ** 2).sum() / area)
    return np.array(errors)


def scores(image_HxWx3: np.ndarray, prompt: grammar.Prompt) -> dict[str, float]:
    """colour, count, shape, position, size in [0, 1], plus follow (the mean of the first four) and half_size."""
    diff_HxWxC = np.asarray(image_HxWx3, np.float32) - render.BACKGROUND
    dist_HxW = np.linalg.norm(diff_HxWxC, axis=-1)
    target_norm = np.linalg.norm(np.array(render.PALETTE[prompt.colour]) - render.BACKGROUND)
    cov_HxW = np.clip(dist_HxW / target_norm, 0, 1)  # coverage, were the pixel the prompt's colour
    fg_HxW = dist_HxW > FG_THRESHOLD
    blobs = _blobs(cov_HxW, fg_HxW)
    if not blobs:
        return dict.fromkeys(("colour", "count", "shape", "position", "size", "follow", "half_size"), 0.0)
    hue_idx = np.argmax(diff_HxWxC[fg_HxW] @ _HUES_KxC.T, axis=-1)
    w = dist_HxW[fg_HxW]
    colour = float(w[hue_idx == _COLOURS.index(prompt.colour)].sum() / w.sum())
    count = float(np.exp(-abs(len(blobs) - prompt.count)))
    target_shape = grammar.SHAPES.index(prompt.shape)
    shape = float(np.mean([_softmax_weight(-_template_errors(b) / SHAPE_TEMPERATURE, target_shape) for b in blobs]))
    mass_HxW = np.max(blobs, axis=0)
    xy = np.array([(mass_HxW * _X_HxW).sum(), (mass_HxW * _Y_HxW).sum()]) / mass_HxW.sum()
    position = _softmax_weight(-((_REGION_XY - xy) ** 2).sum(-1) / (2 * POSITION_SIGMA**2),
                               _REGIONS.index(prompt.position))
    half_size = float(np.sqrt(np.mean([b.sum() for b in blobs]) / AREA_PER_HALF_SIZE_SQ[prompt.shape]))
    lo, hi = render.HALF_SIZE_RANGE
    size = float(np.clip((half_size - lo) / (hi - lo), 0, 1))
    return dict(colour=colour, count=count, shape=shape, position=position, size=size,
                follow=(colour + count + shape + position) / 4, half_size=half_size)


def score_table(images_BxHxWx3: np.ndarray, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Every score of `scores`, as [B] arrays."""
    rows = [scores(im, grammar.parse(p)) for im, p in zip(images_BxHxWx3, prompts, strict=True)]
    return {k: np.array([r[k] for r in rows], np.float32) for k in rows[0]}


def reward(images_BxHxWx3: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """[B] reward in [0, 1]: prompt following times the big-shapes preference (higher is better)."""
    t = score_table(images_BxHxWx3, prompts)
    return t["follow"] * (1 - PREFERENCE_WEIGHT + PREFERENCE_WEIGHT * t["size"])

