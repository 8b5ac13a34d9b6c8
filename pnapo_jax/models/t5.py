"""T5 encoder in Flax linen, computing what transformers' `T5EncoderModel` computes (FLUX's text_encoder_2).

Pre-norm blocks with T5's LayerNorm (RMS, no mean, no bias), unscaled attention with a bucketed relative
position bias (held by block 0, shared by all), a gated or plain MLP, no biases anywhere. Param names follow
the transformers state dict (`encoder/block_3/layer_1/DenseReluDense/wi_0/kernel`), see pnapo_jax/convert/hf.py.

Precision: norm statistics, attention logits and softmax are fp32, and so are the residual stream and `wo`
whatever the compute dtype (T5 overflows in fp16). That is also what transformers computes in bf16: it keeps
`wo` in fp32 (`_keep_in_fp32_modules`), whose output then promotes the residual stream to fp32.
"""

import dataclasses
import math
from collections.abc import Collection
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import transformers

from pnapo_jax.models import hf
from pnapo_jax.models.layers import RMSNorm

# transformers T5Config fields we read; `dense_act_fn` / `is_gated_act` are derived there from feed_forward_proj.
HF_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
             "relative_attention_max_distance", "layer_norm_epsilon", "dense_act_fn", "is_gated_act")
TIED_KEY = "encoder.embed_tokens.weight"  # a tied copy of `shared.weight` some checkpoints store


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture (transformers T5Config names; defaults: google/t5-v1_1-xxl) plus how to compute it."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64  # head dim
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "gelu_new"  # "gated-gelu" means gelu_new (tanh) in transformers
    is_gated_act: bool = True
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of the parameters

    @classmethod
    def from_hf(cls, config: transformers.T5Config, **overrides: Any) -> "T5Config":
        return cls(**{**{k: getattr(config, k) for k in HF_FIELDS}, **overrides})


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """[q_len, k_len] bucket ids, bidirectional, as transformers' `T5Attention._relative_position_bucket`.

    Computed with NumPy at trace time in the same float32 steps, so the table is a constant of the program.
    """
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    half = num_buckets // 2
    exact = half // 2
    dist = np.abs(rel)
    log_ratio = np.log(np.maximum(dist, 1).astype(np.float32) / exact) / math.log(max_distance / exact)
    large = np.minimum(exact + (log_ratio * (half - exact)).astype(np.int64), half - 1)
    return ((rel > 0) * half + np.where(dist < exact, dist, large)).astype(np.int32)


class SelfAttention(nn.Module):
    """Unscaled multi-head attention plus the relative position bias [1, N, L, L]; returns (out, bias)."""

    cfg: T5Config
    has_relative_attention_bias: bool

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, bias_1xNxLxL: jax.Array | None, mask_Bx1x1xL: jax.Array | None
                 ) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        B, L, _ = x_BxLxD.shape
        N, H = cfg.num_heads, cfg.d_kv
        q, k, v = (hf.dense(N * H, ("embed", "heads"), cfg.dtype, cfg.param_dtype, False, n)(x_BxLxD)
                   .reshape(B, L, N, H) for n in ("q", "k", "v"))
        if self.has_relative_attention_bias:
            table = hf.embed(cfg.relative_attention_num_buckets, N, (None, "heads"), jnp.float32, cfg.param_dtype,
                             "relative_attention_bias")
            buckets_LxL = relative_position_buckets(L, L, cfg.relative_attention_num_buckets,
                                                    cfg.relative_attention_max_distance)
            bias_1xNxLxL = table(jnp.asarray(buckets_LxL)).transpose(2, 0, 1)[None]
        out = hf.attention(q, k, v, 1.0, bias_1xNxLxL, mask_Bx1x1xL).reshape(B, L, N * H)
        return hf.dense(cfg.d_model, ("heads", "embed"), cfg.dtype, cfg.param_dtype, False, "o")(out), bias_1xNxLxL


class LayerSelfAttention(nn.Module):
    cfg: T5Config
    has_relative_attention_bias: bool

    @nn.compact
    def __call__(self, x_BxLxD, bias, mask) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        h = RMSNorm(cfg.dtype, cfg.param_dtype, cfg.layer_norm_epsilon, name="layer_norm")(x_BxLxD)
        return SelfAttention(cfg, self.has_relative_attention_bias, name="SelfAttention")(h, bias, mask)


class DenseReluDense(nn.Module):
    """`wo(act(wi_0 x) * wi_1 x)` (gated) or `wo(act(wi x))`; `wo` in fp32."""

    cfg: T5Config

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        act = hf.activation(cfg.dense_act_fn)
        up = lambda name: hf.dense(cfg.d_ff, ("embed", "mlp"), cfg.dtype, cfg.param_dtype, False, name)(x_BxLxD)
        h = act(up("wi_0")) * up("wi_1") if cfg.is_gated_act else act(up("wi"))
        return hf.dense(cfg.d_model, ("mlp", "embed"), jnp.float32, cfg.param_dtype, False, "wo")(h)


class LayerFF(nn.Module):
    cfg: T5Config

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        h = RMSNorm(cfg.dtype, cfg.param_dtype, cfg.layer_norm_epsilon, name="layer_norm")(x_BxLxD)
        return DenseReluDense(cfg, name="DenseReluDense")(h)


class Block(nn.Module):
    """layer_0: self-attention, layer_1: MLP, each pre-norm and residual; returns (x, position bias)."""

    cfg: T5Config
    has_relative_attention_bias: bool

    @nn.compact
    def __call__(self, x_BxLxD, bias, mask) -> tuple[jax.Array, jax.Array]:
        h, bias = LayerSelfAttention(self.cfg, self.has_relative_attention_bias, name="layer_0")(x_BxLxD, bias, mask)
        x = x_BxLxD + h
        return x + LayerFF(self.cfg, name="layer_1")(x), bias


class Stack(nn.Module):
    """The encoder stack: blocks, then the final norm. Block 0 computes the position bias the others reuse."""

    cfg: T5Config

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, mask_Bx1x1xL: jax.Array | None) -> jax.Array:
        cfg = self.cfg
        x = x_BxLxD.astype(jnp.float32)
        bias = None
        for i in range(cfg.num_layers):
            x, bias = Block(cfg, i == 0, name=f"block_{i}")(x, bias, mask_Bx1x1xL)
        return RMSNorm(cfg.dtype, cfg.param_dtype, cfg.layer_norm_epsilon, name="final_layer_norm")(x)


class T5Encoder(nn.Module):
    """input ids [B, L] (and optional attention mask, 1 = attend) -> last hidden state [B, L, d_model]."""

    cfg: T5Config

    @nn.compact
    def __call__(self, input_ids_BxL: jax.Array, attention_mask_BxL: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        x = hf.embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), cfg.dtype, cfg.param_dtype,
                     "shared")(input_ids_BxL)
        mask = None if attention_mask_BxL is None else attention_mask_BxL.astype(bool)[:, None, None, :]
        return Stack(cfg, name="encoder")(x, mask)


def init_params(cfg: T5Config, rng: jax.Array, seq_len: int = 8) -> dict[str, Any]:
    """Randomly initialised params (boxed with logical axis names; `nn.meta.unbox` strips them)."""
    return T5Encoder(cfg).init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]


def stored_keys(keys: Collection[str]) -> dict[str, str]:
    """Our key -> stored key: `shared.weight` may be stored only as its tied copy, which is otherwise ignored."""
    out = {k: k for k in keys if k != TIED_KEY}
    if "shared.weight" not in keys and TIED_KEY in keys:
        out["shared.weight"] = TIED_KEY
    return out
