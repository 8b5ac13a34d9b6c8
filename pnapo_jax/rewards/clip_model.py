"""The two-tower CLIP of image-text rewards, in transformers' `CLIPModel` layout, and its HF-folder loader.

Text tower: models/clip.py; vision tower: models/clip_vision.py; bias-free projections to a shared space
and a learned `logit_scale` (log of the temperature's inverse). open_clip checkpoints load into the same
modules through rewards/open_clip_layout.py's key mapping.
"""

import dataclasses
import os
from collections.abc import Collection
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import transformers

from pnapo_jax.convert import hf as hf_files
from pnapo_jax.models import clip, clip_vision, hf

_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")  # older checkpoints


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text: clip.CLIPTextConfig
    vision: clip_vision.CLIPVisionConfig
    projection_dim: int

    @classmethod
    def from_hf(cls, config: transformers.CLIPConfig, **dtypes: Any) -> "CLIPConfig":
        return cls(clip.CLIPTextConfig.from_hf(config.text_config, **dtypes),
                   clip_vision.CLIPVisionConfig.from_hf(config.vision_config, **dtypes), config.projection_dim)

    @property
    def param_dtype(self) -> str:
        """The storage dtype loading casts to (the towers' configs carry the same dtypes)."""
        return self.text.param_dtype


class CLIPModel(nn.Module):
    """(pixels [B, H, W, C], input ids [B, L]) -> (image embeds [B, E], text embeds [B, E], logit_scale []).

    Embeds are projected but not normalized, as transformers' get_image_features / get_text_features.
    """

    cfg: CLIPConfig

    @nn.compact
    def __call__(self, pixels_BxHxWxC: jax.Array, input_ids_BxL: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.cfg
        project = lambda tower, name: hf.dense(cfg.projection_dim, ("embed", "embed_out"), tower.dtype,
                                               tower.param_dtype, False, name)
        image = clip_vision.CLIPVisionModel(cfg.vision, name="vision_model")(pixels_BxHxWxC)[1]
        text = clip.CLIPTextModel(cfg.text, name="text_model")(input_ids_BxL)[1]
        init = nn.with_logical_partitioning(nn.initializers.constant(2.6592), ())  # transformers' log(1 / 0.07)
        logit_scale = self.param("logit_scale", init, (), jnp.dtype(cfg.param_dtype))
        return project(cfg.vision, "visual_projection")(image), project(cfg.text, "text_projection")(text), logit_scale


def init_params(cfg: CLIPConfig, rng: jax.Array) -> dict[str, Any]:
    """Randomly initialised params (boxed with logical axis names; `nn.meta.unbox` strips them)."""
    size = cfg.vision.image_size
    pixels = jnp.zeros((1, size, size, cfg.vision.num_channels))
    return CLIPModel(cfg).init(rng, pixels, jnp.zeros((1, 8), jnp.int32))["params"]


def stored_keys(keys: Collection[str]) -> dict[str, str]:
    """Our key -> stored key: the same names, stored position_ids buffers ignored."""
    return {k: k for k in keys if k not in _BUFFERS}


def load(folder: str | os.PathLike, dtype: Any = None, param_dtype: Any = None) -> tuple[CLIPConfig, dict[str, Any]]:
    """(config, params) from a transformers `CLIPModel` folder (config.json + model.safetensors, sharded or not)."""
    hf_config = transformers.CLIPConfig(**hf_files.read_config(folder))
    cfg = CLIPConfig.from_hf(hf_config, **hf_files.dtypes(dtype, param_dtype))
    return cfg, hf_files.load_params(folder, init_params, cfg, stored_keys)
