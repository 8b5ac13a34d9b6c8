"""CLIP text model in Flax linen, computing what transformers' `CLIPTextModel` computes (FLUX's text_encoder), and
with `projection_dim` set what `CLIPTextModelWithProjection` computes (SD3's CLIP-L and CLIP-G).

Token + learned position embeddings, pre-norm causal transformer layers, a final LayerNorm; the pooled output
is the final state at the end-of-text token (with a projection: that state through the bias-free
`text_projection`, transformers' `text_embeds`). SD3 reads the penultimate layer's states, which
`output_hidden_states` returns as transformers does (the embeddings, then every layer's output).

Param names follow transformers v5's state dict (`encoder/layers_3/self_attn/q_proj/kernel`); checkpoints written
before v5, and every CLIPTextModelWithProjection, prefix them with `text_model.`, which loading strips.
Norm statistics, attention logits and softmax are fp32.
"""

import dataclasses
from collections.abc import Collection
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import transformers

from pnapo_jax.models import hf
from pnapo_jax.models.layers import layer_norm

HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id")
LEGACY_EOS_TOKEN_ID = 2  # configs from before transformers PR #24773: pool at argmax(input_ids) instead
_LEGACY_PREFIX = "text_model."
_BUFFERS = ("embeddings.position_ids",)  # non-persistent buffer older checkpoints stored


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture (transformers CLIPTextConfig names; defaults: FLUX's CLIP ViT-L/14 text model) plus dtypes."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = LEGACY_EOS_TOKEN_ID  # as openai/clip-vit-large-patch14, FLUX's text_encoder
    projection_dim: int | None = None  # CLIPTextModelWithProjection's text_projection width; None: no projection
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of the parameters

    @classmethod
    def from_hf(cls, config: transformers.CLIPTextConfig, **overrides: Any) -> "CLIPTextConfig":
        return cls(**{**{k: getattr(config, k) for k in HF_FIELDS}, **overrides})


class LayerNorm(nn.Module):
    """torch LayerNorm (`weight` is our `scale`, `bias`), computed in fp32."""

    cfg: CLIPTextConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        init = lambda f: nn.with_logical_partitioning(f, ("norm",))
        scale = self.param("scale", init(nn.initializers.ones_init()), (x.shape[-1],), jnp.dtype(cfg.param_dtype))
        bias = self.param("bias", init(nn.initializers.zeros_init()), (x.shape[-1],), jnp.dtype(cfg.param_dtype))
        y = layer_norm(x.astype(jnp.float32), cfg.layer_norm_eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(jnp.dtype(cfg.dtype))


class Attention(nn.Module):
    cfg: CLIPTextConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, mask_Bx1xLxL: jax.Array) -> jax.Array:
        cfg = self.cfg
        B, L, D = x_BxLxD.shape
        N = cfg.num_attention_heads
        H = D // N
        proj = lambda n, axes: hf.dense(D, axes, cfg.dtype, cfg.param_dtype, True, n)
        q, k, v = (proj(n, ("embed", "heads"))(x_BxLxD).reshape(B, L, N, H) for n in ("q_proj", "k_proj", "v_proj"))
        out = hf.attention(q, k, v, H ** -0.5, mask_BxNxQxK=mask_Bx1xLxL).reshape(B, L, D)
        return proj("out_proj", ("heads", "embed"))(out)


class MLP(nn.Module):
    cfg: CLIPTextConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        h = hf.dense(cfg.intermediate_size, ("embed", "mlp"), cfg.dtype, cfg.param_dtype, True, "fc1")(x_BxLxD)
        h = hf.activation(cfg.hidden_act)(h)
        return hf.dense(cfg.hidden_size, ("mlp", "embed"), cfg.dtype, cfg.param_dtype, True, "fc2")(h)


class EncoderLayer(nn.Module):
    cfg: CLIPTextConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, mask_Bx1xLxL: jax.Array) -> jax.Array:
        cfg = self.cfg
        x = x_BxLxD + Attention(cfg, name="self_attn")(LayerNorm(cfg, name="layer_norm1")(x_BxLxD), mask_Bx1xLxL)
        return x + MLP(cfg, name="mlp")(LayerNorm(cfg, name="layer_norm2")(x))


class Embeddings(nn.Module):
    cfg: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids_BxL: jax.Array) -> jax.Array:
        cfg = self.cfg
        L = input_ids_BxL.shape[1]
        if L > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {L} exceeds max_position_embeddings {cfg.max_position_embeddings}")
        table = lambda n, axis, name: hf.embed(n, cfg.hidden_size, (axis, "embed"), cfg.dtype, cfg.param_dtype, name)
        tokens = table(cfg.vocab_size, "vocab", "token_embedding")(input_ids_BxL)
        return tokens + table(cfg.max_position_embeddings, None, "position_embedding")(jnp.arange(L))[None]


class Encoder(nn.Module):
    cfg: CLIPTextConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, mask_Bx1xLxL: jax.Array, all_states: bool = False
                 ) -> jax.Array | tuple[jax.Array, ...]:
        """The last layer's output; with `all_states` every state: the input, then each layer's output."""
        states = [x_BxLxD]
        for i in range(self.cfg.num_hidden_layers):
            states.append(EncoderLayer(self.cfg, name=f"layers_{i}")(states[-1], mask_Bx1xLxL))
        return tuple(states) if all_states else states[-1]


def pool_index(input_ids_BxL: jax.Array, eos_token_id: int) -> jax.Array:
    """Where CLIPTextModel pools: the first `eos_token_id`, or argmax(input_ids) for legacy configs (eos id 2)."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids_BxL, axis=-1)
    return jnp.argmax(input_ids_BxL == eos_token_id, axis=-1)


class CLIPTextModel(nn.Module):
    """input ids [B, L] (and optional attention mask, 1 = attend) -> (last hidden state [B, L, D], pooled [B, D]
    or with cfg.projection_dim [B, projection_dim]); with `output_hidden_states` also every layer's states
    (num_hidden_layers + 1 of [B, L, D], before the final LayerNorm, as transformers' `hidden_states`)."""

    cfg: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids_BxL: jax.Array, attention_mask_BxL: jax.Array | None = None,
                 output_hidden_states: bool = False) -> tuple[Any, ...]:
        cfg = self.cfg
        L = input_ids_BxL.shape[1]
        mask = jnp.tril(jnp.ones((L, L), bool))[None, None]
        if attention_mask_BxL is not None:
            mask = mask & attention_mask_BxL.astype(bool)[:, None, None, :]
        states = Encoder(cfg, name="encoder")(Embeddings(cfg, name="embeddings")(input_ids_BxL), mask, True)
        x = LayerNorm(cfg, name="final_layer_norm")(states[-1])
        pooled = jnp.take_along_axis(x, pool_index(input_ids_BxL, cfg.eos_token_id)[:, None, None], axis=1)[:, 0]
        if cfg.projection_dim is not None:
            pooled = hf.dense(cfg.projection_dim, ("embed", "embed_out"), cfg.dtype, cfg.param_dtype, False,
                              "text_projection")(pooled)
        return (x, pooled, states) if output_hidden_states else (x, pooled)


def init_params(cfg: CLIPTextConfig, rng: jax.Array, seq_len: int = 8) -> dict[str, Any]:
    """Randomly initialised params (boxed with logical axis names; `nn.meta.unbox` strips them)."""
    return CLIPTextModel(cfg).init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]


def stored_keys(keys: Collection[str]) -> dict[str, str]:
    """Our key -> stored key: a pre-v5 `text_model.` prefix is dropped, stored buffers ignored."""
    out = {k.removeprefix(_LEGACY_PREFIX): k for k in keys}
    return {k: v for k, v in out.items() if k not in _BUFFERS}
