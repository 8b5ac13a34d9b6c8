"""Building blocks of the FLUX MMDiT: dense layers with logical axes, norms, embeddings, RoPE, attention.

Every parameter carries logical axis names; `pnapo_jax.sharding` maps them to mesh axes. Norm statistics,
the sinusoidal timestep embedding and RoPE are computed in fp32 whatever the compute dtype.
"""

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pnapo_jax.errors import UserError
from pnapo_jax.models.splash import splash_attention
from pnapo_jax.sharding import ADAPTER_AXIS

Dtype = jnp.dtype


def _gathered(w: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """`w` all-gathered over its FSDP (`embed`) dimension: the layout a matmul should use it in.

    FSDP keeps weights sharded at rest and gathers them for compute. Pinning that here, rather than leaving it
    to XLA's SPMD partitioner, avoids a partitioner miscompile (jaxlib 0.10.2, Shardy and GSPMD alike): with
    the batch split over (data, fsdp) and a tensor axis > 1, a matmul by a (tensor, fsdp)-sharded kernel could
    be partitioned with a collective-permute that swaps batch shards between devices and never swaps them back,
    so whole batch rows came out wrong on a data=2, fsdp=2, tensor=2 mesh.
    """
    return nn.with_logical_constraint(w, tuple("act_embed" if a == "embed" else a for a in axes))


@jax.custom_vjp
def matmul_wgrad_nt(x_NxK: jax.Array, kernel_KxO: jax.Array) -> jax.Array:
    """x @ kernel whose kernel gradient, for a widening layer (in < out), is x^T materialised, times dy.

    Left to itself XLA:CPU computes a weight gradient x^T dy by copying dy transposed, with the backward's norm /
    modulation chains fused (and duplicated) into the copy. Where dy is the wider side (q/k/v, MLP in: in <=
    out) transposing x instead moves fewer bytes, and the barrier keeps XLA from folding it back.
    """
    return x_NxK @ kernel_KxO


def _matmul_fwd(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return x @ kernel, (x, kernel)


def _matmul_bwd(res: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = res
    dx = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())))
    x_MxK, dy_MxO = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    if kernel.shape[0] <= kernel.shape[1]:
        dkernel = jax.lax.optimization_barrier(x_MxK.T) @ dy_MxO
    else:
        dkernel = jax.lax.dot_general(x_MxK, dy_MxO, (((0,), (0,)), ((), ())))
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


matmul_wgrad_nt.defvjp(_matmul_fwd, _matmul_bwd)


DENSE_WEIGHTS = ("kernel", "bias", "lora_a", "lora_b")  # Dense's variables: each cast to its dtype at use


class Dense(nn.Module):
    """y = x W + b with logical axes on W and b, plus an optional low-rank update (LoRA).

    Params are named as nn.Dense's (`kernel` [in, out], `bias`). With lora_rank > 0 the adapters `lora_a`
    [in, r] and `lora_b` [r, out] live in the separate `lora` collection and add lora_scale x A B (stored
    sharded on their feature dimension, `embed` or ADAPTER_AXIS, and gathered for the matmul). Applied
    without a `lora` collection the layer is the plain base layer: that is how the frozen reference shares the
    policy's base weights instead of holding a second copy. With input_barrier the input is materialised
    (an optimization barrier, which also materialises its gradient in the backward): on XLA:CPU that stops
    norm / modulation / residual-gradient chains being fused, and duplicated, into the transposes feeding the
    weight-gradient matmuls, and the matmul is `matmul_wgrad_nt`, whose weight gradient transposes the narrower
    operand (13% fewer CPU-s per train step on XLA:CPU, docs/benchmarks.md).
    """

    features: int
    axes: tuple[str, str]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    zero_init: bool = False
    lora_rank: int = 0
    lora_scale: float = 1.0  # alpha / rank
    input_barrier: bool = False  # jax.lax.optimization_barrier on x (FluxConfig.dense_input_barrier)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, pdt = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
        kernel_init = nn.initializers.zeros_init() if self.zero_init else nn.initializers.xavier_uniform()
        kernel = self.param("kernel", nn.with_logical_partitioning(kernel_init, self.axes),
                            (x.shape[-1], self.features), pdt)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axes[1],)),
                          (self.features,), pdt)
        kernel, bias = _gathered(kernel, self.axes), _gathered(bias, self.axes[1:])
        x = x.astype(dt)
        if self.input_barrier:
            x = jax.lax.optimization_barrier(x)
        matmul = matmul_wgrad_nt if self.input_barrier else jnp.matmul
        y = matmul(x, kernel.astype(dt)) + bias.astype(dt)
        if self.lora_rank and (self.is_initializing() or self.has_variable("lora", "lora_a")):
            def lora_init(name: str, init: Any, axes: tuple, shape: tuple[int, int]) -> nn.Variable:
                boxed = nn.with_logical_partitioning(init, axes)
                return self.variable("lora", name, lambda: boxed(self.make_rng("params"), shape, pdt))

            at_rest = lambda axis: axis if axis == "embed" else ADAPTER_AXIS  # both sides FSDP-sharded at rest
            a = lora_init("lora_a", nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                          (at_rest(self.axes[0]), None), (x.shape[-1], self.lora_rank))
            b = lora_init("lora_b", nn.initializers.zeros_init(), (None, at_rest(self.axes[1])),
                          (self.lora_rank, self.features))
            a = _gathered(nn.meta.unbox(a.value), (self.axes[0], None))
            b = _gathered(nn.meta.unbox(b.value), (None, self.axes[1]))
            y = y + self.lora_scale * ((x @ a.astype(dt)) @ b.astype(dt))
        return y


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters; statistics in fp32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learned scale (diffusers `.weight`, BFL `.scale`)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (x.shape[-1],), jnp.dtype(self.param_dtype))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return (x32 * scale.astype(jnp.float32)).astype(jnp.dtype(self.dtype))


def timestep_sinusoid(t_B: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`, always in fp32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args_BxH = t_B.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args_BxH), jnp.sin(args_BxH)], axis=-1)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (diffusers TimestepEmbedding / PixArtAlphaTextProjection)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    input_barrier: bool = False  # see Dense

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda axes, name: Dense(self.features, axes, self.dtype, self.param_dtype,
                                         input_barrier=self.input_barrier, name=name)
        x = dense(("cond_in", "embed"), "linear_1")(x)
        return dense(("embed", "embed_out"), "linear_2")(nn.silu(x))


def rope_cos_sin(ids_BxSx3: jax.Array, axes_dim: Sequence[int], theta: float = 10000.0
                 ) -> tuple[jax.Array, jax.Array]:
    """FLUX 3-axis RoPE tables, each [B, S, head_dim], interleaved pairs as diffusers' FluxPosEmbed."""
    cos, sin = [], []
    for i, d in enumerate(axes_dim):
        inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
        ang_BxSxF = ids_BxSx3[..., i].astype(jnp.float32)[..., None] * inv_freq
        cos.append(jnp.repeat(jnp.cos(ang_BxSxF), 2, axis=-1))
        sin.append(jnp.repeat(jnp.sin(ang_BxSxF), 2, axis=-1))
    return jnp.concatenate(cos, -1), jnp.concatenate(sin, -1)


def apply_rope(x_BxSxNxH: jax.Array, cos_BxSxH: jax.Array, sin_BxSxH: jax.Array) -> jax.Array:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the RoPE angle; computed in fp32."""
    x32 = x_BxSxNxH.astype(jnp.float32)
    pairs = x32.reshape(*x32.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x32.shape)
    out = x32 * cos_BxSxH[:, :, None, :] + rotated * sin_BxSxH[:, :, None, :]
    return out.astype(x_BxSxNxH.dtype)


ATTENTION_IMPLS = {  # attention_impl -> the backends it runs on ("splash_interpret": any, slowly; for tests)
    "xla": ("cpu", "gpu", "tpu"), "dot": ("cpu", "gpu", "tpu"), "head_major": ("cpu", "gpu", "tpu"),
    "cudnn": ("gpu",), "splash": ("tpu",), "splash_interpret": ("cpu", "gpu", "tpu"),
}


def check_attention_impl(impl: str, backend: str, field: str = "config.model.attention_impl") -> None:
    """Refuse, in one line, an attention implementation the backend ('cpu' | 'gpu' | 'tpu') cannot run."""
    if backend in ATTENTION_IMPLS.get(impl, ()):
        return
    works = [name for name, backends in ATTENTION_IMPLS.items() if backend in backends]
    known = "" if impl in ATTENTION_IMPLS else " (unknown)"
    raise UserError(f"{field}={impl!r}{known} cannot run on the {backend} backend; choose one of {works}")


def attention(q_BxSxNxH: jax.Array, k_BxSxNxH: jax.Array, v_BxSxNxH: jax.Array, impl: str, block: int = 512
              ) -> jax.Array:
    """Full (unmasked) multi-head attention; softmax in fp32. impl: a key of ATTENTION_IMPLS.

    'head_major' transposes to [B, N, L, H] itself and uses batched matmuls: on XLA:CPU these run faster than
    the layouts XLA picks for 'xla' or 'dot' (the CPU configs use it). 'splash' is the Pallas TPU kernel
    (`pnapo_jax.models.splash`, tiles of `block` tokens), which holds no [L, L] scores; 'splash_interpret' is the
    same kernel interpreted (any backend, slow: tests). 'cudnn' is cuDNN's fused flash attention (GPU).
    """
    if impl in ("splash", "splash_interpret"):
        return splash_attention(q_BxSxNxH, k_BxSxNxH, v_BxSxNxH, block, interpret=impl == "splash_interpret")
    if impl == "head_major":
        heads_first = lambda x: jnp.transpose(x, (0, 2, 1, 3))
        q_BxNxLxH = heads_first(q_BxSxNxH) / math.sqrt(q_BxSxNxH.shape[-1])
        k_BxNxLxH, v_BxNxLxH = heads_first(k_BxSxNxH), heads_first(v_BxSxNxH)
        logits_BxNxLxL = jnp.matmul(q_BxNxLxH, k_BxNxLxH.swapaxes(-1, -2), preferred_element_type=jnp.float32)
        probs_BxNxLxL = jax.nn.softmax(logits_BxNxLxL, axis=-1).astype(v_BxSxNxH.dtype)
        return heads_first(probs_BxNxLxL @ v_BxNxLxH)
    if impl == "dot":
        scale = 1.0 / math.sqrt(q_BxSxNxH.shape[-1])
        logits = jnp.einsum("bqnh,bknh->bnqk", q_BxSxNxH, k_BxSxNxH, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits * scale, axis=-1).astype(v_BxSxNxH.dtype)
        return jnp.einsum("bnqk,bknh->bqnh", probs, v_BxSxNxH)
    return jax.nn.dot_product_attention(q_BxSxNxH, k_BxSxNxH, v_BxSxNxH, implementation=impl)

