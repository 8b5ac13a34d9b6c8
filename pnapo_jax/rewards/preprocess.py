"""Images [B, H, W, 3] in [0, 1] -> the normalized [B, S, S, 3] pixels a reward's CLIP was trained on, in JAX.

Two recipes, both bicubic (Keys a = -0.5) with antialiasing when shrinking, then OpenAI CLIP's mean / std:

- "crop", transformers' CLIPImageProcessor (PickScore): the image as 8-bit, shortest side resized to S (the
  other to int(S * long / short)) as PIL resizes 8-bit images (width pass, rounded and clipped to 8 bits,
  then height pass, likewise), the centre S x S (offset (size - S) // 2). PIL's fixed-point weights are not
  reproduced: 0.01% to 0.6% of the values differ from CLIPImageProcessor's by one 8-bit step, rarely two
  (tests/test_rewards.py bounds the maximum and mean differences).
- "pad", HPSv2's `preprocess_val` (open_clip's ResizeMaxSize on float tensors): longest side resized to S (the
  other to round(S * side / long)), no quantization or clipping, zero-padded (black) to S x S with the extra
  pixel, if odd, after. torchvision >= 0.17 antialiases such tensor resizes, as we do (older versions did not).

A square image, FLUX's usual output, is only resized in both recipes.
"""

import jax
import jax.numpy as jnp
import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODES = ("crop", "pad")


def _resize(images_BxHxWx3: jax.Array, h: int, w: int) -> jax.Array:
    if (h, w) == images_BxHxWx3.shape[1:3]:
        return images_BxHxWx3
    return jax.image.resize(images_BxHxWx3, (images_BxHxWx3.shape[0], h, w, 3), "bicubic", antialias=True)


def _crop(images_BxHxWx3: jax.Array, size: int) -> jax.Array:
    H, W = images_BxHxWx3.shape[1:3]
    short = min(H, W)
    h, w = (size, int(size * W / H)) if H == short else (int(size * H / W), size)
    x = jnp.round(images_BxHxWx3 * 255) / 255
    for shape in ((H, w), (h, w)):
        x = jnp.clip(jnp.round(_resize(x, *shape) * 255), 0, 255) / 255
    top, left = (h - size) // 2, (w - size) // 2
    return x[:, top:top + size, left:left + size]


def _pad(images_BxHxWx3: jax.Array, size: int) -> jax.Array:
    H, W = images_BxHxWx3.shape[1:3]
    scale = size / max(H, W)
    h, w = round(H * scale), round(W * scale)
    x = _resize(images_BxHxWx3, h, w)
    top, left = (size - h) // 2, (size - w) // 2
    return jnp.pad(x, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)))


def preprocess(images_BxHxWx3: jax.Array, mode: str, size: int) -> jax.Array:
    """Normalized float32 pixels [B, size, size, 3] (shapes are static: jit compiles once per input size)."""
    if mode not in MODES:
        raise ValueError(f"preprocessing mode {mode!r}: known modes are {MODES}")
    x = jnp.clip(jnp.asarray(images_BxHxWx3, jnp.float32), 0, 1)
    x = _crop(x, size) if mode == "crop" else _pad(x, size)
    return (x - np.asarray(OPENAI_CLIP_MEAN, np.float32)) / np.asarray(OPENAI_CLIP_STD, np.float32)
