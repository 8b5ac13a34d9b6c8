"""FLUX.1 MMDiT in Flax linen, computing what diffusers' `FluxTransformer2DModel` computes.

Module and parameter names follow diffusers' state dict (`transformer_blocks_3/attn/to_q/kernel` is
`transformer_blocks.3.attn.to_q.weight` transposed), so weight conversion is a mechanical mapping. With
`scan_layers` the blocks are one scanned module (`transformer_blocks/...` with a leading layer axis);
`scan_params` stacks per-layer params into that layout (the converters place each tensor directly).
"""

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from pnapo_jax.models.layers import (
    Dense,
    MLPEmbedder,
    RMSNorm,
    apply_rope,
    attention,
    layer_norm,
    rope_cos_sin,
    timestep_sinusoid,
)

# diffusers config.json fields we read and write; the rest of FluxConfig is ours.
DIFFUSERS_FIELDS = ("patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers",
                    "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                    "pooled_projection_dim", "guidance_embeds", "axes_dims_rope")
CLASS_NAME = "FluxTransformer2DModel"  # config.json's _class_name
REMAT_POLICIES = ("none", "full", "save_named", "offload")
# "offload": full remat, but each block's input (the scan carry saved for the backward pass, BLOCK_INPUT) goes to
# host memory instead of HBM, as MaxText's/MaxDiffusion's offload policies do; docs/tpu_fit.md has the figures.
BLOCK_INPUT = "block_input"


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """Architecture (diffusers config.json names) plus how to compute it."""

    backbone: ClassVar[str] = "flux"  # config.model.backbone (pnapo_jax.backbones)
    patch_size: int = 1  # diffusers keeps 1: the 2x2 packing happens outside the model
    in_channels: int = 64  # packed latent channels (16 VAE channels x 2 x 2)
    out_channels: int | None = None  # defaults to in_channels
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38  # single-stream blocks
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096  # T5 hidden size
    pooled_projection_dim: int = 768  # CLIP pooled size
    guidance_embeds: bool = False  # True for FLUX.1-dev (guidance-distilled)
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    rope_theta: float = 10000.0
    dtype: str = "float32"  # compute dtype ("bfloat16" on TPU)
    param_dtype: str = "float32"  # storage dtype of the parameters
    scan_layers: bool = False  # nn.scan over each block stack (faster compiles, stacked params)
    remat_policy: str = "none"  # REMAT_POLICIES: none | full | save_named | offload
    remat_saved_names: tuple[str, ...] = ("qkv", "attn_out")  # kept by save_named
    lora_rank: int = 0  # > 0: LoRA adapters (collection "lora") on the Dense layers named in lora_targets
    lora_alpha: float = 0.0  # LoRA scale is alpha / rank; 0 means alpha = rank
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out_0")  # diffusers' default FLUX targets
    attention_impl: str = "xla"  # layers.ATTENTION_IMPLS: "xla", "head_major" (CPU), "splash" (TPU), "cudnn" (GPU)
    attention_block: int = 512  # splash attention's tile, in tokens (a multiple of 128)
    # optimization_barrier on every Dense input. On XLA:CPU this stops norm / modulation chains being fused into
    # the weight-gradient transposes (-10% step time, docs/benchmarks.md); unmeasured on TPU, where it may
    # block fusing the producer into the matmul and changes what remat saves.
    dense_input_barrier: bool = False

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                             f"{self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def lora_scale(self) -> float:
        """alpha / rank, the factor of the low-rank update (alpha 0 means alpha = rank: scale 1)."""
        return (self.lora_alpha or self.lora_rank) / self.lora_rank if self.lora_rank else 1.0

    @property
    def out_dim(self) -> int:
        return self.patch_size ** 2 * (self.out_channels or self.in_channels)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any], **overrides: Any) -> "FluxConfig":
        """From a diffusers config.json dict; unknown keys (`_class_name`, ...) are ignored."""
        fields = {k: config[k] for k in DIFFUSERS_FIELDS if k in config and config[k] is not None}
        if "axes_dims_rope" in fields:
            fields["axes_dims_rope"] = tuple(fields["axes_dims_rope"])
        return cls(**{**fields, **overrides})

    def to_diffusers(self) -> dict[str, Any]:
        out = {"_class_name": CLASS_NAME}
        for k in DIFFUSERS_FIELDS:
            v = getattr(self, k)
            out[k] = list(v) if isinstance(v, tuple) else v
        return out


def _dense(cfg: FluxConfig, features: int, axes: tuple[str, str], name: str, zero_init: bool = False) -> Dense:
    """A Dense in the config's dtypes, with LoRA when the config targets this layer's name."""
    rank = cfg.lora_rank if name in cfg.lora_targets else 0
    return Dense(features, axes, cfg.dtype, cfg.param_dtype, zero_init, rank, cfg.lora_scale,
                 cfg.dense_input_barrier, name=name)


def _remat(module_cls: type[nn.Module], cfg: FluxConfig) -> type[nn.Module]:
    if cfg.remat_policy == "none":
        return module_cls
    policy = None
    if cfg.remat_policy == "save_named":
        policy = jax.checkpoint_policies.save_only_these_names(*cfg.remat_saved_names)
    if cfg.remat_policy == "offload":
        policy = jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=(), names_which_can_be_offloaded=(BLOCK_INPUT,),
            offload_src="device", offload_dst="pinned_host")
    return nn.remat(module_cls, policy=policy, prevent_cse=not cfg.scan_layers)


def _constrain(x_BxLxD: jax.Array) -> jax.Array:
    return nn.with_logical_constraint(x_BxLxD, ("batch", "length", "act_embed"))


class AdaLNModulation(nn.Module):
    """`linear(silu(temb))` split into n chunks (diffusers AdaLayerNormZero*/Continuous `.linear`)."""

    cfg: FluxConfig
    n: int

    @nn.compact
    def __call__(self, temb_BxD: jax.Array) -> list[jax.Array]:
        cfg = self.cfg
        mod = _dense(cfg, self.n * cfg.inner_dim, ("embed", "mod"), "linear", zero_init=True)(nn.silu(temb_BxD))
        return [m[:, None, :] for m in jnp.split(mod, self.n, axis=-1)]


class FeedForward(nn.Module):
    """GELU(tanh) MLP with 4x hidden width (diffusers `ff.net.0.proj`, `ff.net.2`)."""

    cfg: FluxConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        h = _ProjOnly(cfg, 4 * cfg.inner_dim, name="net_0")(x_BxLxD)
        h = checkpoint_name(nn.gelu(h, approximate=True), "mlp_hidden")
        return _dense(cfg, cfg.inner_dim, ("mlp", "embed"), "net_2")(h)


class _ProjOnly(nn.Module):
    """Holds the `proj` Linear of diffusers' GELU module so the names line up."""

    cfg: FluxConfig
    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _dense(self.cfg, self.features, ("embed", "mlp"), "proj")(x)


def _project_qkv(cfg: FluxConfig, x_BxLxD: jax.Array, names: tuple[str, str, str, str, str]
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k, v (with RMSNorm on q, k) as [B, L, N, H]; `names` = (q, k, v, norm_q, norm_k) submodule names."""
    B, L, _ = x_BxLxD.shape
    N, H = cfg.num_attention_heads, cfg.attention_head_dim
    q, k, v = (_dense(cfg, cfg.inner_dim, ("embed", "heads"), n)(x_BxLxD)
               .reshape(B, L, N, H) for n in names[:3])
    q = RMSNorm(cfg.dtype, cfg.param_dtype, name=names[3])(q)
    k = RMSNorm(cfg.dtype, cfg.param_dtype, name=names[4])(k)
    return q, k, v


def _rope_attend(cfg: FluxConfig, q, k, v, cos, sin) -> jax.Array:
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k, v = (checkpoint_name(a, "qkv") for a in (q, k, v))
    out_BxLxNxH = attention(q, k, v, cfg.attention_impl, cfg.attention_block)
    B, L = out_BxLxNxH.shape[:2]
    return checkpoint_name(out_BxLxNxH.reshape(B, L, cfg.inner_dim), "attn_out")


class JointAttention(nn.Module):
    """Double-stream attention: text and image project separately, attend jointly (text first)."""

    cfg: FluxConfig

    @nn.compact
    def __call__(self, img_BxIxD, txt_BxTxD, cos, sin) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        qi, ki, vi = _project_qkv(cfg, img_BxIxD, ("to_q", "to_k", "to_v", "norm_q", "norm_k"))
        qt, kt, vt = _project_qkv(cfg, txt_BxTxD, ("add_q_proj", "add_k_proj", "add_v_proj",
                                                           "norm_added_q", "norm_added_k"))
        cat = lambda a, b: jnp.concatenate([a, b], axis=1)
        out = _rope_attend(cfg, cat(qt, qi), cat(kt, ki), cat(vt, vi), cos, sin)
        T = txt_BxTxD.shape[1]
        img = _dense(cfg, cfg.inner_dim, ("heads", "embed"), "to_out_0")(out[:, T:])
        txt = _dense(cfg, cfg.inner_dim, ("heads", "embed"), "to_add_out")(out[:, :T])
        return img, txt


class SelfAttention(nn.Module):
    """Single-stream attention over the joint sequence; no output projection (pre_only)."""

    cfg: FluxConfig

    @nn.compact
    def __call__(self, x_BxLxD, cos, sin) -> jax.Array:
        q, k, v = _project_qkv(self.cfg, x_BxLxD, ("to_q", "to_k", "to_v", "norm_q", "norm_k"))
        return _rope_attend(self.cfg, q, k, v, cos, sin)


class DoubleStreamBlock(nn.Module):
    """diffusers FluxTransformerBlock. Carry (img, txt) so the block scans."""

    cfg: FluxConfig

    @nn.compact
    def __call__(self, carry, temb_BxD, cos, sin):
        cfg = self.cfg
        img, txt = (checkpoint_name(a, BLOCK_INPUT) for a in carry)
        i_shift, i_scale, i_gate, i_shift2, i_scale2, i_gate2 = AdaLNModulation(cfg, 6, name="norm1")(temb_BxD)
        t_shift, t_scale, t_gate, t_shift2, t_scale2, t_gate2 = AdaLNModulation(
            cfg, 6, name="norm1_context")(temb_BxD)
        img_attn, txt_attn = JointAttention(cfg, name="attn")(
            layer_norm(img) * (1 + i_scale) + i_shift, layer_norm(txt) * (1 + t_scale) + t_shift, cos, sin)
        img = img + i_gate * img_attn
        img = img + i_gate2 * FeedForward(cfg, name="ff")(layer_norm(img) * (1 + i_scale2) + i_shift2)
        txt = txt + t_gate * txt_attn
        txt = txt + t_gate2 * FeedForward(cfg, name="ff_context")(layer_norm(txt) * (1 + t_scale2) + t_shift2)
        return (_constrain(img), _constrain(txt)), None


class SingleStreamBlock(nn.Module):
    """diffusers FluxSingleTransformerBlock on the joint [text; image] sequence: parallel attention + MLP."""

    cfg: FluxConfig

    @nn.compact
    def __call__(self, x_BxLxD, temb_BxD, cos, sin):
        cfg = self.cfg
        x_BxLxD = checkpoint_name(x_BxLxD, BLOCK_INPUT)
        shift, scale, gate = AdaLNModulation(cfg, 3, name="norm")(temb_BxD)
        h = layer_norm(x_BxLxD) * (1 + scale) + shift
        mlp = _dense(cfg, 4 * cfg.inner_dim, ("embed", "mlp"), "proj_mlp")(h)
        mlp = checkpoint_name(nn.gelu(mlp, approximate=True), "mlp_hidden")
        attn = SelfAttention(cfg, name="attn")(h, cos, sin)
        out = _dense(cfg, cfg.inner_dim, ("mlp", "embed"), "proj_out")(
            jnp.concatenate([attn, mlp], axis=-1))
        return _constrain(x_BxLxD + gate * out), None


def _run_stack(parent_cfg: FluxConfig, block_cls: type[nn.Module], n: int, name: str, carry, temb, cos, sin):
    """`n` blocks in order: a Python loop (params `{name}_{i}`) or one nn.scan (params `{name}`, stacked)."""
    block = _remat(block_cls, parent_cfg)
    if parent_cfg.scan_layers:
        scanned = nn.scan(block, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True},
                          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=n,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        carry, _ = scanned(parent_cfg, name=name)(carry, temb, cos, sin)
        return carry
    for i in range(n):
        carry, _ = block(parent_cfg, name=f"{name}_{i}")(carry, temb, cos, sin)
    return carry


class FluxTransformer(nn.Module):
    """FLUX.1 transformer: packed latents + text embeddings + timestep -> predicted velocity."""

    cfg: FluxConfig

    @nn.compact
    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array,
                 pooled_projections: jax.Array, timestep: jax.Array, img_ids: jax.Array, txt_ids: jax.Array,
                 guidance: jax.Array | None = None) -> jax.Array:
        """Shapes: hidden_states [B, I, in_channels], encoder_hidden_states [B, T, joint_attention_dim],
        pooled_projections [B, pooled_projection_dim], timestep [B] in [0, 1], img_ids [I, 3] or [B, I, 3],
        txt_ids [T, 3] or [B, T, 3], guidance [B] (raw scale) when guidance_embeds. Returns [B, I, out_dim]."""
        cfg = self.cfg
        B, I, _ = hidden_states.shape
        T = encoder_hidden_states.shape[1]
        dt = jnp.dtype(cfg.dtype)
        D = cfg.inner_dim

        temb_BxD = _TimeTextEmbed(cfg, name="time_text_embed")(timestep, guidance, pooled_projections)

        img = _dense(cfg, D, ("latent", "embed"), "x_embedder")(hidden_states.astype(dt))
        txt = _dense(cfg, D, ("text_in", "embed"), "context_embedder")(
            encoder_hidden_states.astype(dt))
        img, txt = _constrain(img), _constrain(txt)

        ids = jnp.concatenate([jnp.broadcast_to(txt_ids, (B, T, 3)), jnp.broadcast_to(img_ids, (B, I, 3))], 1)
        cos, sin = rope_cos_sin(ids, cfg.axes_dims_rope, cfg.rope_theta)

        img, txt = _run_stack(cfg, DoubleStreamBlock, cfg.num_layers, "transformer_blocks",
                              (img, txt), temb_BxD, cos, sin)
        x = _run_stack(cfg, SingleStreamBlock, cfg.num_single_layers, "single_transformer_blocks",
                       jnp.concatenate([txt, img], axis=1), temb_BxD, cos, sin)
        img = x[:, T:]

        scale, shift = AdaLNModulation(cfg, 2, name="norm_out")(temb_BxD)
        img = layer_norm(img) * (1 + scale) + shift
        return _dense(cfg, cfg.out_dim, ("embed", "latent"), "proj_out")(img)


class _TimeTextEmbed(nn.Module):
    """timestep (+ guidance) sinusoid -> MLP, plus pooled text -> MLP (diffusers `time_text_embed`)."""

    cfg: FluxConfig

    @nn.compact
    def __call__(self, timestep_B, guidance_B, pooled_BxP) -> jax.Array:
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        emb = lambda name: MLPEmbedder(cfg.inner_dim, dt, cfg.param_dtype, cfg.dense_input_barrier, name=name)
        B = pooled_BxP.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timestep_B, jnp.float32), (B,)) * 1000.0
        temb = emb("timestep_embedder")(timestep_sinusoid(t).astype(dt))
        if cfg.guidance_embeds:
            if guidance_B is None:
                raise ValueError("this FLUX config has guidance_embeds=True: pass guidance=[B] (e.g. 3.5)")
            g = jnp.broadcast_to(jnp.asarray(guidance_B, jnp.float32), (B,)) * 1000.0
            temb = temb + emb("guidance_embedder")(timestep_sinusoid(g).astype(dt))
        return temb + emb("text_embedder")(pooled_BxP.astype(dt))


# The token layout: VAE latents [B, C, H, W] become [B, (H/2)(W/2), 4C] tokens (2x2 patches), placed by RoPE ids.
def img_ids(h_tokens: int, w_tokens: int) -> jax.Array:
    """[h * w, 3] RoPE positions (0, row, col) of the packed image tokens, row-major like the packing."""
    rows, cols = jnp.meshgrid(jnp.arange(h_tokens), jnp.arange(w_tokens), indexing="ij")
    return jnp.stack([jnp.zeros_like(rows), rows, cols], -1).reshape(-1, 3).astype(jnp.float32)


def txt_ids(txt_len: int) -> jax.Array:
    """[T, 3] zeros: FLUX gives every text token the same (no) position."""
    return jnp.zeros((txt_len, 3), jnp.float32)


def pack_latents(x_BxCxHxW: jax.Array) -> jax.Array:
    """VAE latents -> transformer tokens [B, (H/2)(W/2), 4C]: each 2x2 patch becomes one token, channel-major."""
    B, C, H, W = x_BxCxHxW.shape
    x = x_BxCxHxW.reshape(B, C, H // 2, 2, W // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // 2) * (W // 2), 4 * C)


def unpack_latents(x_BxIxD: jax.Array, height: int, width: int) -> jax.Array:
    """Inverse of `pack_latents`; height and width are the latent's (pixels / 8), not the image's."""
    B, _, D = x_BxIxD.shape
    x = x_BxIxD.reshape(B, height // 2, width // 2, D // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // 4, height, width)


STACKS = ("transformer_blocks", "single_transformer_blocks")


def dummy_inputs(cfg: FluxConfig, batch: int = 1, img_len: int = 16, txt_len: int = 8) -> dict[str, jax.Array]:
    """Zero inputs of the right shapes, for init / eval_shape."""
    out = dict(
        hidden_states=jnp.zeros((batch, img_len, cfg.in_channels), jnp.float32),
        encoder_hidden_states=jnp.zeros((batch, txt_len, cfg.joint_attention_dim), jnp.float32),
        pooled_projections=jnp.zeros((batch, cfg.pooled_projection_dim), jnp.float32),
        timestep=jnp.zeros((batch,), jnp.float32),
        img_ids=jnp.zeros((img_len, 3), jnp.float32),
        txt_ids=jnp.zeros((txt_len, 3), jnp.float32),
    )
    if cfg.guidance_embeds:
        out["guidance"] = jnp.ones((batch,), jnp.float32)
    return out


@dataclasses.dataclass(frozen=True)
class Velocity:
    """The transformer as the velocity function v(variables, x_t [B, I, C], t [B], conditioning) of an h x w token
    grid, what the loss and the samplers call (pnapo_jax.objective, flow.euler_sample). Hashable by value: jitted
    samplers take it as a static argument, and an equal one reuses their compilation. `timestep_scale` multiplies t
    (a scheduler with num_train_timesteps != 1000, as FluxPipeline passes it)."""

    cfg: FluxConfig
    h_tokens: int
    w_tokens: int
    timestep_scale: float = 1.0

    def __call__(self, variables: Any, x_BxIxC: jax.Array, t_B: jax.Array, cond: dict[str, jax.Array]) -> jax.Array:
        T = cond["encoder_hidden_states"].shape[1]
        return FluxTransformer(self.cfg).apply(variables, hidden_states=x_BxIxC, timestep=t_B * self.timestep_scale,
                                               img_ids=img_ids(self.h_tokens, self.w_tokens), txt_ids=txt_ids(T),
                                               **cond)


def conditioning(prompt_embeds_BxTxD: jax.Array, pooled_BxP: jax.Array, guidance: float | None = None
                 ) -> dict[str, jax.Array]:
    """FLUX's conditioning of B images: T5 states, CLIP pooled output and (guidance-distilled models) the guidance
    input, each [B, ...]; None leaves guidance out (a model with guidance embeds then refuses it)."""
    cond = {"encoder_hidden_states": prompt_embeds_BxTxD, "pooled_projections": pooled_BxP}
    if guidance is not None:
        cond["guidance"] = jnp.full((pooled_BxP.shape[0],), guidance, jnp.float32)
    return cond


def init_params(cfg: FluxConfig, rng: jax.Array) -> dict[str, Any]:
    """Randomly initialised params (boxed with logical axis names; `nn.meta.unbox` strips them)."""
    return FluxTransformer(cfg).init(rng, **dummy_inputs(cfg))["params"]


def scan_params(params: dict[str, Any], cfg: FluxConfig) -> dict[str, Any]:
    """Per-layer layout (`transformer_blocks_{i}`) -> scanned layout (`transformer_blocks`, stacked on axis 0)."""
    out = {k: v for k, v in params.items() if not any(k.startswith(f"{s}_") for s in STACKS)}
    for stack, n in zip(STACKS, (cfg.num_layers, cfg.num_single_layers), strict=True):
        if n:
            out[stack] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"{stack}_{i}"] for i in range(n)])
    return out
