"""BLIP's two encoders in Flax linen, as ImageReward uses them (salesforce BLIP's vit.py and med.py).

- `VisionTransformer`: timm-style ViT: a stride-`patch` conv with bias, a class token, learned positions, pre-norm
  blocks with a fused `qkv` projection and exact GELU, then a final LayerNorm over every token (no pre-norm,
  unlike CLIP's). ImageReward's is ViT-L/16 at 224 (width 1024, 24 blocks, 16 heads), LayerNorm eps 1e-6.
- `TextEncoder`: BERT (word + absolute position embeddings, post-norm layers) whose every layer also
  cross-attends to the image tokens (med.py's "multimodal" mode: bidirectional self-attention over the
  unpadded tokens, then cross-attention to all image tokens, then the feed-forward).

Module names are ImageReward's state-dict names, dots included (`blocks.3` / `attn` / `qkv` / `kernel` is
`visual_encoder.blocks.3.attn.qkv.weight`), so convert/hf.py's `hf_key` gives each param's stored key; a
Linear's `weight` is our `kernel` transposed. transformers' BlipVisionModel / BlipTextModel
compute the same functions under other names (the parity tests use them).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from pnapo_jax.models import clip, clip_vision, hf


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """BLIP ViT (defaults: ImageReward's ViT-L/16 at 224). Field names as models/clip.py's layers read them."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    mlp_ratio: int = 4
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """BLIP's BERT (med_config.json's names; defaults: bert-base plus BLIP's two added tokens)."""

    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    encoder_width: int = 1024  # the image tokens' width (med_config.json's is overwritten with the ViT's)
    dtype: str = "float32"
    param_dtype: str = "float32"


def _dense(cfg: VisionConfig | TextConfig, features: int, name: str) -> nn.Dense:
    return hf.dense(features, ("embed", "mlp"), cfg.dtype, cfg.param_dtype, True, name)


def _heads(x_BxLxD: jax.Array, n: int) -> jax.Array:
    B, L, D = x_BxLxD.shape
    return x_BxLxD.reshape(B, L, n, D // n)


class ViTAttention(nn.Module):
    cfg: VisionConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        B, L, D = x_BxLxD.shape
        N = cfg.num_attention_heads
        q, k, v = jnp.split(_dense(cfg, 3 * D, "qkv")(x_BxLxD), 3, axis=-1)
        out = hf.attention(_heads(q, N), _heads(k, N), _heads(v, N), (D // N) ** -0.5).reshape(B, L, D)
        return _dense(cfg, D, "proj")(out)


class ViTBlock(nn.Module):
    cfg: VisionConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        x = x_BxLxD + ViTAttention(cfg, name="attn")(clip.LayerNorm(cfg, name="norm1")(x_BxLxD))
        h = clip.LayerNorm(cfg, name="norm2")(x)
        h = jax.nn.gelu(_dense(cfg, cfg.mlp_ratio * cfg.hidden_size, "mlp.fc1")(h), approximate=False)
        return x + _dense(cfg, cfg.hidden_size, "mlp.fc2")(h)


class VisionTransformer(nn.Module):
    """pixels [B, S, S, 3] (normalized) -> image tokens [B, 1 + patches, D], final-normed."""

    cfg: VisionConfig

    @nn.compact
    def __call__(self, pixels_BxHxWxC: jax.Array) -> jax.Array:
        cfg = self.cfg
        B, H, W, _ = pixels_BxHxWxC.shape
        if (H, W) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"images are {H}x{W}; the model takes {cfg.image_size}x{cfg.image_size}")
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        patches = clip_vision.PatchEmbedding(cfg, name="patch_embed.proj")(pixels_BxHxWxC)
        zeros = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",))
        bias = self.param("patch_embed.proj.bias", zeros, (cfg.hidden_size,), pdt)
        init = lambda axes: nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
        cls = self.param("cls_token", init((None, None, "embed")), (1, 1, cfg.hidden_size), pdt)
        pos = self.param("pos_embed", init((None, None, "embed")), (1, cfg.num_positions, cfg.hidden_size), pdt)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (B, 1, cfg.hidden_size)),
                             patches + bias.astype(dt)], axis=1) + pos.astype(dt)
        for i in range(cfg.num_hidden_layers):
            x = ViTBlock(cfg, name=f"blocks.{i}")(x)
        return clip.LayerNorm(cfg, name="norm")(x)


class BertAttention(nn.Module):
    """Self- or cross-attention, then `output`: LayerNorm(dense(context) + x) (BERT's post-norm)."""

    cfg: TextConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, context_BxKxE: jax.Array, mask_Bx1x1xK: jax.Array | None
                 ) -> jax.Array:
        cfg = self.cfg
        B, L, D = x_BxLxD.shape
        N = cfg.num_attention_heads
        q = _dense(cfg, D, "self.query")(x_BxLxD)
        k, v = (_dense(cfg, D, f"self.{n}")(context_BxKxE) for n in ("key", "value"))
        out = hf.attention(_heads(q, N), _heads(k, N), _heads(v, N), (D // N) ** -0.5,
                           mask_BxNxQxK=mask_Bx1x1xK).reshape(B, L, D)
        return clip.LayerNorm(cfg, name="output.LayerNorm")(_dense(cfg, D, "output.dense")(out) + x_BxLxD)


class BertLayer(nn.Module):
    cfg: TextConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, mask_Bx1x1xL: jax.Array, image_BxKxE: jax.Array) -> jax.Array:
        cfg = self.cfg
        x = BertAttention(cfg, name="attention")(x_BxLxD, x_BxLxD, mask_Bx1x1xL)
        x = BertAttention(cfg, name="crossattention")(x, image_BxKxE, None)  # every image token is attended
        h = hf.activation(cfg.hidden_act)(_dense(cfg, cfg.intermediate_size, "intermediate.dense")(x))
        return clip.LayerNorm(cfg, name="output.LayerNorm")(_dense(cfg, cfg.hidden_size, "output.dense")(h) + x)


class TextEncoder(nn.Module):
    """(input ids [B, L], attention mask [B, L] (1 = token), image tokens [B, K, E]) -> last hidden [B, L, D]."""

    cfg: TextConfig

    @nn.compact
    def __call__(self, input_ids_BxL: jax.Array, attention_mask_BxL: jax.Array, image_BxKxE: jax.Array
                 ) -> jax.Array:
        cfg = self.cfg
        L = input_ids_BxL.shape[1]
        if L > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {L} exceeds max_position_embeddings {cfg.max_position_embeddings}")
        table = lambda n, name: hf.embed(n, cfg.hidden_size, (None, "embed"), cfg.dtype, cfg.param_dtype, name)
        x = (table(cfg.vocab_size, "embeddings.word_embeddings")(input_ids_BxL)
             + table(cfg.max_position_embeddings, "embeddings.position_embeddings")(jnp.arange(L))[None])
        x = clip.LayerNorm(cfg, name="embeddings.LayerNorm")(x)
        mask = attention_mask_BxL.astype(bool)[:, None, None, :]
        for i in range(cfg.num_hidden_layers):
            x = BertLayer(cfg, name=f"encoder.layer.{i}")(x, mask, image_BxKxE.astype(x.dtype))
        return x
