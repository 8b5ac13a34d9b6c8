"""The world's base model: a small FLUX transformer (the project's own code) and its shipped weights.

The weights ship as a diffusers `FluxTransformer2DModel` folder (config.json + safetensors, stored in float16
to halve the file; loaded as float32), so that training loads them like any FLUX checkpoint
(`config.model.pretrained`) and diffusers reads them too; pretrain.json beside them records how
`pnapo_jax.world.pretrain` made them.
"""

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pnapo_jax import convert, flow
from pnapo_jax.models import flux
from pnapo_jax.models.flux import FluxConfig
from pnapo_jax.world import latents, text

DEFAULT_BASE = pathlib.Path(__file__).parent.parent / "assets" / "demo_base"
MODEL_ID = "pnapo_jax/assets/demo_base"
STORE_DTYPE = np.float16
PRETRAIN_INFO = "pretrain.json"
LATENT_SHAPE = (latents.LATENT_H_TOKENS * latents.LATENT_W_TOKENS, latents.IN_CHANNELS)  # one sample's [I, C]


def demo_model_config() -> FluxConfig:
    """About 2.3M parameters: 2 double-stream + 4 single-stream blocks, 4 heads of 32."""
    return FluxConfig(in_channels=latents.IN_CHANNELS, num_layers=2, num_single_layers=4, attention_head_dim=32,
                      num_attention_heads=4, joint_attention_dim=text.TEXT_DIM, pooled_projection_dim=text.POOLED_DIM,
                      guidance_embeds=False, axes_dims_rope=(8, 12, 12))


def save_base(folder: str | pathlib.Path, cfg: FluxConfig, params: Any, info: dict[str, Any],
              info_name: str = PRETRAIN_INFO) -> None:
    """Write the diffusers folder (weights in STORE_DTYPE) and `info` (how they were made) as `info_name`."""
    convert.save_diffusers_transformer(cfg, jax.tree.map(lambda x: np.asarray(x, STORE_DTYPE), params), folder)
    (pathlib.Path(folder) / info_name).write_text(json.dumps(info, indent=2) + "\n")


def load_base(folder: str | pathlib.Path = DEFAULT_BASE) -> tuple[FluxConfig, dict[str, Any]]:
    """(config, float32 params) of the shipped base model, or of another `save_base` output."""
    return convert.load_diffusers_transformer(folder, dtype=jnp.float32)


def sample_latents(cfg: FluxConfig, params: Any, prompts: Sequence[str], noise_BxIxC: jax.Array, num_steps: int,
                   guidance: float = 0.0, return_trajectory: bool = False) -> jax.Array:
    """Final latents [B, I, C] from the given noise by `flow.euler_sample` (FluxPipeline schedule), or with
    `return_trajectory` every solver state [num_steps + 1, B, I, C] at the noise levels of `flow.flux_sigmas`."""
    velocity = flux.Velocity(cfg, latents.LATENT_H_TOKENS, latents.LATENT_W_TOKENS)
    cond = flux.conditioning(*text.encode_prompts(prompts), guidance)
    return flow.euler_sample(velocity, {"params": params}, noise_BxIxC, cond, num_steps,
                             return_trajectory=return_trajectory)


def sample(cfg: FluxConfig, params: Any, prompts: Sequence[str], seed: int, num_steps: int = 20) -> np.ndarray:
    """[B, 32, 32, 3] images from the model: prompt n from noise n of `seed` by `sample_seeded`."""
    return latents.decode(sample_seeded(cfg, params, prompts, range(len(prompts)), seed, num_steps)[1])


def sample_seeded(cfg: FluxConfig, params: Any, prompts: Sequence[str], seeds_N: Sequence[int], seed: int,
                  num_steps: int, guidance: float = 0.0, batch: int = 64, return_trajectory: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Sample prompt n from its own noise `flow.seeded_noise(seed, seeds_N[n])` (reproducible by its seed alone),
    in batches of `batch` (the last padded, so that one compile serves all). Returns (noises [N, I, C], final
    latents [N, I, C] or with `return_trajectory` every solver state [num_steps + 1, N, I, C]).

    The noise is drawn as packed tokens [I, C], the layout of pair generation (pnapo_jax.sampling.Sampler), whose
    records' seeds name their noises. `python -m pnapo_jax.sample` draws FluxPipeline's unpacked [C, H, W] and
    packs it (its --noise files and seeds share diffusers' `latents=` layout, for FLUX folders and the demo base
    alike); both layouts are fixed by what they reproduce (recorded pairs, sample's outputs), so they stay two.
    Either way the noise is `flow.seeded_noise` and the sampler `sample_latents` / `flow.euler_sample`."""
    N, batch = len(prompts), min(batch, len(prompts))
    noise_NxIxC = np.asarray(flow.seeded_noise(seed, np.asarray(seeds_N), LATENT_SHAPE))
    out = []
    for s in range(0, N, batch):
        pad = max(0, s + batch - N)
        texts = list(prompts[s:s + batch]) + [prompts[-1]] * pad
        noise = np.concatenate([noise_NxIxC[s:s + batch], np.repeat(noise_NxIxC[-1:], pad, 0)])
        x = np.asarray(sample_latents(cfg, params, texts, noise, num_steps, guidance, return_trajectory))
        out.append(x[..., :batch - pad, :, :])
    return noise_NxIxC, np.concatenate(out, axis=-3)
