"""The world has no VAE: a latent is the image itself, mapped from [0, 1] to [-1, 1] (x * 2 - 1) so that data
and the unit-Gaussian prior noise are on the same scale, then packed 2x2 like FLUX latents (flux.pack_latents):
a [32, 32, 3] image is 16 x 16 tokens of 12 channels."""

import numpy as np

from pnapo_jax.models import flux
from pnapo_jax.world.render import SIZE

PATCH_PIXELS = 2  # image pixels per token side
LATENT_H_TOKENS = LATENT_W_TOKENS = SIZE // PATCH_PIXELS
IN_CHANNELS = 12


def encode(images_BxHxWx3: np.ndarray) -> np.ndarray:
    """[B, 32, 32, 3] images in [0, 1] -> [B, 256, 12] packed latents."""
    x_Bx3xHxW = np.transpose(np.asarray(images_BxHxWx3, np.float32) * 2 - 1, (0, 3, 1, 2))
    return np.asarray(flux.pack_latents(x_Bx3xHxW))


def decode(latents_BxIxC: np.ndarray) -> np.ndarray:
    """[B, 256, 12] packed latents -> [B, 32, 32, 3] images, clipped to [0, 1]."""
    x_Bx3xHxW = np.asarray(flux.unpack_latents(np.asarray(latents_BxIxC, np.float32), SIZE, SIZE))
    return np.clip((np.transpose(x_Bx3xHxW, (0, 2, 3, 1)) + 1) / 2, 0, 1)
