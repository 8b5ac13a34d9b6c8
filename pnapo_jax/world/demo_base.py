"""The world's base model: a small transformer of a registered backbone (pnapo_jax.backbones: FLUX, the default,
or SD3) and its shipped weights. Everything here goes through the backbone's interface (init, velocity,
conditioning, save) and the converter's folder loader, so that the world runs the same on either family.

The weights ship as a diffusers transformer folder (`FluxTransformer2DModel`: assets/demo_base;
`SD3Transformer2DModel`: assets/demo_base_sd3; config.json + safetensors, stored in float16 to halve the file;
loaded as float32), so that training loads them like any checkpoint of that family (`config.model.pretrained`)
and diffusers reads them too; pretrain.json beside them records how `pnapo_jax.world.pretrain` made them.
"""

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pnapo_jax import backbones, convert, flow
from pnapo_jax.convert import files, layout
from pnapo_jax.errors import UserError
from pnapo_jax.models import sd3
from pnapo_jax.models.flux import FluxConfig
from pnapo_jax.world import latents, text

ASSETS = pathlib.Path(__file__).parent.parent / "assets"
BASES = {"flux": ASSETS / "demo_base", "sd3": ASSETS / "demo_base_sd3"}  # backbone -> its shipped base folder
DEFAULT_BASE = BASES["flux"]
MODEL_IDS = {name: f"pnapo_jax/assets/{folder.name}" for name, folder in BASES.items()}  # names them in records
MODEL_ID = MODEL_IDS["flux"]
STORE_DTYPE = np.float16
PRETRAIN_INFO = "pretrain.json"
LATENT_SHAPE = (latents.LATENT_H_TOKENS * latents.LATENT_W_TOKENS, latents.IN_CHANNELS)  # one sample's [I, C]
ModelConfig = Any  # a backbone's model config (FluxConfig, SD3Config): its `backbone` names its family


def demo_model_config(backbone: str = "flux") -> ModelConfig:
    """The world's base architecture on `backbone`, about 2.3M parameters either way, 4 heads of 32, reading the
    world's text table (TEXT_DIM-wide states, POOLED_DIM pooled) and its 16 x 16 tokens of 2x2 RGB pixels.

    flux: 2 double-stream + 4 single-stream blocks (2.29M). sd3: 4 joint blocks (2.27M) on 3 "latent" channels
    (RGB: SD3's own 2x2 patching of the 32x32 image gives the world's packed tokens), a 16-token position table
    for the 16 x 16 grid (sample_size 32 = 16 tokens of 2 pixels, so the table is not rescaled) and SD3.5's QK
    RMSNorm, as FLUX has."""
    if backbone == "flux":
        return FluxConfig(in_channels=latents.IN_CHANNELS, num_layers=2, num_single_layers=4, attention_head_dim=32,
                          num_attention_heads=4, joint_attention_dim=text.TEXT_DIM,
                          pooled_projection_dim=text.POOLED_DIM, guidance_embeds=False, axes_dims_rope=(8, 12, 12))
    if backbone == "sd3":
        rgb = latents.IN_CHANNELS // latents.PATCH_PIXELS ** 2
        side = latents.LATENT_H_TOKENS
        return sd3.SD3Config(sample_size=side * latents.PATCH_PIXELS, patch_size=latents.PATCH_PIXELS,
                             in_channels=rgb, out_channels=rgb, num_layers=4, attention_head_dim=32,
                             num_attention_heads=4, joint_attention_dim=text.TEXT_DIM, caption_projection_dim=128,
                             pooled_projection_dim=text.POOLED_DIM, pos_embed_max_size=side, qk_norm="rms_norm")
    raise UserError(f"backbone {backbone!r}: the world's base is one of {', '.join(backbones.BACKBONES)}")


def save_base(folder: str | pathlib.Path, cfg: ModelConfig, params: Any, info: dict[str, Any],
              info_name: str = PRETRAIN_INFO) -> None:
    """Write the diffusers folder (weights in STORE_DTYPE) and `info` (how they were made) as `info_name`."""
    stored = jax.tree.map(lambda x: np.asarray(x, STORE_DTYPE), params)
    backbones.BACKBONES[cfg.backbone].save(cfg, stored, str(folder), "diffusers")
    (pathlib.Path(folder) / info_name).write_text(json.dumps(info, indent=2) + "\n")


def folder_backbone(folder: str | pathlib.Path) -> str:
    """The backbone a diffusers transformer folder is for, by its config.json's _class_name."""
    config = pathlib.Path(folder) / "config.json"
    if not config.is_file():
        raise UserError(f"{folder}: not a diffusers transformer folder (no config.json)")
    class_name = files.read_json(config).get("_class_name")
    name = layout.class_backbone(class_name)
    if name is None:
        raise UserError(f"{config}: _class_name {class_name!r} is no backbone's transformer "
                        f"({', '.join(backbones.BACKBONES)})")
    return name


def base_config(folder: str | pathlib.Path) -> ModelConfig:
    """A transformer folder's model config, of the backbone its config.json's _class_name names: read before the
    weights, so that a folder of other sizes can be refused before they load."""
    config_class = backbones.BACKBONES[folder_backbone(folder)].config_class
    return config_class.from_diffusers(files.read_json(pathlib.Path(folder) / "config.json"))


def load_base(folder: str | pathlib.Path = DEFAULT_BASE, dtype: Any = jnp.float32
              ) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, params, float32 unless `dtype`) of a shipped base model, or of another `save_base` output, of either
    backbone."""
    config_class = backbones.BACKBONES[folder_backbone(folder)].config_class
    return convert.load_diffusers_transformer(folder, dtype=dtype, config_cls=config_class)


def sample_latents(cfg: ModelConfig, params: Any, prompts: Sequence[str], noise_BxIxC: jax.Array, num_steps: int,
                   guidance: float = 0.0, return_trajectory: bool = False) -> jax.Array:
    """Final latents [B, I, C] from the given noise by `flow.euler_sample` (FluxPipeline schedule, the world's on
    every backbone), or with `return_trajectory` every solver state [num_steps + 1, B, I, C] at the noise levels
    of `flow.flux_sigmas`. `guidance` is the guidance input of a model that has one (the backbone's conditioning)."""
    backbone = backbones.BACKBONES[cfg.backbone]
    velocity = backbone.velocity(cfg, latents.LATENT_H_TOKENS, latents.LATENT_W_TOKENS)
    cond = backbone.conditioning(*text.encode_prompts(prompts), guidance)
    return flow.euler_sample(velocity, {"params": params}, noise_BxIxC, cond, num_steps,
                             return_trajectory=return_trajectory)


def sample(cfg: ModelConfig, params: Any, prompts: Sequence[str], seed: int, num_steps: int = 20) -> np.ndarray:
    """[B, 32, 32, 3] images from the model: prompt n from noise n of `seed` by `sample_seeded`."""
    return latents.decode(sample_seeded(cfg, params, prompts, range(len(prompts)), seed, num_steps)[1])


def sample_seeded(cfg: ModelConfig, params: Any, prompts: Sequence[str], seeds_N: Sequence[int], seed: int,
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
