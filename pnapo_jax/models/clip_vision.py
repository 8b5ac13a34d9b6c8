"""CLIP vision tower (ViT) in Flax linen, computing what transformers' `CLIPVisionModel` computes.

Patch embedding (a stride-`patch` conv without bias), a class token, learned position embeddings, a pre-norm
(`pre_layrnorm`, sic), the same encoder layers as the text tower (models/clip.py) without a mask, and
`post_layernorm` on the class token. Param names follow the transformers state dict. The patch conv keeps
torch's [out, in, kh, kw] layout under the name `weight`, so the shared loader copies it as stored instead of
transposing it like a Linear's kernel. Pixels come channels-last: [B, H, W, 3], normalized.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import transformers

from pnapo_jax.models import clip, hf

HF_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
             "image_size", "patch_size", "hidden_act", "layer_norm_eps")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Architecture (transformers CLIPVisionConfig names; defaults: ViT-H/14, PickScore's and HPSv2's) plus dtypes.

    The field names the encoder layers read are those of `clip.CLIPTextConfig`, so the text tower's layers serve.
    """

    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"

    @classmethod
    def from_hf(cls, config: transformers.CLIPVisionConfig, **overrides: Any) -> "CLIPVisionConfig":
        return cls(**{**{k: getattr(config, k) for k in HF_FIELDS}, **overrides})

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


class PatchEmbedding(nn.Module):
    """Non-overlapping patches -> hidden_size features: a conv with stride = kernel = patch, no bias."""

    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixels_BxHxWxC: jax.Array) -> jax.Array:
        cfg = self.cfg
        shape = (cfg.hidden_size, cfg.num_channels, cfg.patch_size, cfg.patch_size)
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(in_axis=(1, 2, 3), out_axis=0),
                                            ("embed", None, None, None))
        weight = self.param("weight", init, shape, jnp.dtype(cfg.param_dtype))
        dt = jnp.dtype(cfg.dtype)
        out = jax.lax.conv_general_dilated(pixels_BxHxWxC.astype(dt), weight.astype(dt), (cfg.patch_size,) * 2,
                                           "VALID", dimension_numbers=("NHWC", "OIHW", "NHWC"))
        return out.reshape(out.shape[0], -1, cfg.hidden_size)


class Embeddings(nn.Module):
    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixels_BxHxWxC: jax.Array) -> jax.Array:
        cfg = self.cfg
        B, H, W, _ = pixels_BxHxWxC.shape
        if (H, W) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"images are {H}x{W}; the model takes {cfg.image_size}x{cfg.image_size}")
        init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed",))
        cls = self.param("class_embedding", init, (cfg.hidden_size,), jnp.dtype(cfg.param_dtype))
        patches = PatchEmbedding(cfg, name="patch_embedding")(pixels_BxHxWxC)
        cls = jnp.broadcast_to(cls.astype(patches.dtype), (B, 1, cfg.hidden_size))
        positions = hf.embed(cfg.num_positions, cfg.hidden_size, (None, "embed"), cfg.dtype, cfg.param_dtype,
                             "position_embedding")(jnp.arange(cfg.num_positions))
        return jnp.concatenate([cls, patches], axis=1) + positions[None]


class CLIPVisionModel(nn.Module):
    """pixels [B, H, W, C] -> (last hidden state [B, 1 + patches, D], pooled [B, D]: the normed class token)."""

    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixels_BxHxWxC: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        x = clip.LayerNorm(cfg, name="pre_layrnorm")(Embeddings(cfg, name="embeddings")(pixels_BxHxWxC))
        L = x.shape[1]
        x = clip.Encoder(cfg, name="encoder")(x, jnp.ones((1, 1, L, L), bool))  # every token sees every token
        return x, clip.LayerNorm(cfg, name="post_layernorm")(x[:, 0])
