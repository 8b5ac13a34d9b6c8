"""Stable Diffusion 3 / 3.5 MMDiT in Flax linen, computing what diffusers' `SD3Transformer2DModel` computes.

Module and parameter names follow diffusers' state dict (`transformer_blocks_3/attn2/to_q/kernel` is
`transformer_blocks.3.attn2.to_q.weight` transposed), as in `pnapo_jax.models.flux`, whose building blocks
(adaLN modulation, feed-forward, LoRA-capable Dense, remat) this reuses.

The latents come in and go out as FLUX's packed tokens `[B, h * w, C * p * p]` (2x2 patches, channel-major:
`flux.pack_latents`), so records, the flow math, the loss and the samplers are shared with FLUX. diffusers'
stride-p patch convolution is then a Dense on the packed tokens (its kernel reshaped), and the output
projection's columns are in packed order (the converter permutes diffusers' (ph, pw, c) rows).

Blocks differ (dual-attention MMDiT-X blocks, plain joint blocks, the last block whose text stream ends): with
`scan_layers` each maximal run of equal blocks before the last is one nn.scan (`blocks_{start}_{stop}`, layer
axis first) and the last block stays `transformer_blocks_{n-1}` (`scanned_stacks`).
"""

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from pnapo_jax.models.flux import REMAT_POLICIES, AdaLNModulation, FeedForward, _constrain, _dense, _remat
from pnapo_jax.models.layers import Dense, MLPEmbedder, RMSNorm, attention, layer_norm, timestep_sinusoid

# diffusers config.json fields we read and write; the rest of SD3Config is ours.
DIFFUSERS_FIELDS = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                    "num_attention_heads", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim",
                    "out_channels", "pos_embed_max_size", "dual_attention_layers", "qk_norm")
CLASS_NAME = "SD3Transformer2DModel"
QK_NORMS = (None, "rms_norm")


@dataclasses.dataclass(frozen=True)
class SD3Config:
    """Architecture (diffusers config.json names; defaults: SD3-Medium) plus how to compute it."""

    backbone: ClassVar[str] = "sd3"

    sample_size: int = 128  # latent side the position table is scaled for (base size = sample_size / patch_size)
    patch_size: int = 2  # p x p latent patches per token (the packed layout is 2x2)
    in_channels: int = 16  # VAE latent channels (a token holds in_channels * p * p values)
    num_layers: int = 24  # joint (MMDiT) blocks; the last one ends the text stream (context_pre_only)
    attention_head_dim: int = 64
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096  # width of the text states (CLIP-L + CLIP-G padded, joined with T5)
    caption_projection_dim: int = 1536  # context_embedder's width; must equal heads x head_dim
    pooled_projection_dim: int = 2048  # CLIP-L + CLIP-G pooled outputs
    out_channels: int = 16
    pos_embed_max_size: int = 192  # side of the sin-cos position table, cropped to the latent's centre
    dual_attention_layers: tuple[int, ...] = ()  # MMDiT-X blocks with a second, image-only attention (SD3.5-M)
    qk_norm: str | None = None  # "rms_norm" (SD3.5): RMSNorm on each head's queries and keys
    dtype: str = "float32"  # compute dtype ("bfloat16" on TPU)
    param_dtype: str = "float32"  # storage dtype of the parameters
    scan_layers: bool = False  # nn.scan over each run of equal blocks (faster compiles, stacked params)
    remat_policy: str = "none"  # none | full | save_named
    remat_saved_names: tuple[str, ...] = ("qkv", "attn_out")  # kept by save_named
    lora_rank: int = 0  # > 0: LoRA adapters (collection "lora") on the Dense layers named in lora_targets
    lora_alpha: float = 0.0  # LoRA scale is alpha / rank; 0 means alpha = rank
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out_0")  # module names; attn2's match too
    attention_impl: str = "xla"  # layers.ATTENTION_IMPLS: "xla", "head_major" (CPU), "splash" (TPU), "cudnn" (GPU)
    attention_block: int = 512  # splash attention's tile, in tokens (a multiple of 128)
    dense_input_barrier: bool = False  # optimization_barrier on every Dense input (see FluxConfig)

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(f"caption_projection_dim {self.caption_projection_dim} must equal num_attention_heads x "
                             f"attention_head_dim = {self.inner_dim}")
        if self.inner_dim % 4:
            raise ValueError(f"the 2-D sin-cos table needs heads x head_dim ({self.inner_dim}) divisible by 4")
        wrong = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if wrong:
            raise ValueError(f"dual_attention_layers {wrong} are not among the {self.num_layers} layers")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def lora_scale(self) -> float:
        """alpha / rank, the factor of the low-rank update (alpha 0 means alpha = rank: scale 1)."""
        return (self.lora_alpha or self.lora_rank) / self.lora_rank if self.lora_rank else 1.0

    @property
    def token_dim(self) -> int:
        """Values per packed input token: in_channels x p x p."""
        return self.in_channels * self.patch_size ** 2

    @property
    def out_dim(self) -> int:
        """Values per packed output token: out_channels x p x p."""
        return (self.out_channels or self.in_channels) * self.patch_size ** 2

    @classmethod
    def from_diffusers(cls, config: dict[str, Any], **overrides: Any) -> "SD3Config":
        """From a diffusers config.json dict; unknown keys (`_class_name`, ...) are ignored."""
        fields = {k: config[k] for k in DIFFUSERS_FIELDS if k in config and (config[k] is not None or k == "qk_norm")}
        if "dual_attention_layers" in fields:
            fields["dual_attention_layers"] = tuple(fields["dual_attention_layers"])
        return cls(**{**fields, **overrides})

    def to_diffusers(self) -> dict[str, Any]:
        out = {"_class_name": CLASS_NAME}
        for k in DIFFUSERS_FIELDS:
            v = getattr(self, k)
            out[k] = list(v) if isinstance(v, tuple) else v
        return out


@dataclasses.dataclass(frozen=True)
class Run:
    """Consecutive blocks of one kind: layers [start, stop), scanned as one module `name` in the scanned layout."""

    start: int
    stop: int
    dual: bool  # MMDiT-X: a second, image-only attention
    last: bool  # the final block: its text stream ends (context_pre_only), never scanned

    @property
    def name(self) -> str:
        return f"transformer_blocks_{self.start}" if self.last else f"blocks_{self.start}_{self.stop}"


def block_runs(cfg: SD3Config) -> tuple[Run, ...]:
    """The blocks grouped into maximal runs of equal kind, the last block alone."""
    runs: list[Run] = []
    for i in range(cfg.num_layers):
        dual, last = i in cfg.dual_attention_layers, i == cfg.num_layers - 1
        if runs and not last and not runs[-1].last and runs[-1].dual == dual and runs[-1].stop == i:
            runs[-1] = dataclasses.replace(runs[-1], stop=i + 1)
        else:
            runs.append(Run(i, i + 1, dual, last))
    return tuple(runs)


def scanned_stacks(cfg: SD3Config) -> dict[str, tuple[str, int, int]]:
    """Scanned stack name -> (per-layer name prefix, first layer, depth): how the converter places each layer."""
    return {r.name: ("transformer_blocks", r.start, r.stop - r.start) for r in block_runs(cfg) if not r.last}


def diffusers_rows(cfg: SD3Config) -> np.ndarray:
    """For each packed output value (c, ph, pw), the row of diffusers' proj_out holding it ((ph, pw, c) order)."""
    p, C = cfg.patch_size, cfg.out_channels or cfg.in_channels
    c, ph, pw = np.meshgrid(np.arange(C), np.arange(p), np.arange(p), indexing="ij")
    return ((ph * p + pw) * C + c).reshape(-1)


def _project(cfg: SD3Config, x_BxLxD: jax.Array, names: tuple[str, str, str], norms: tuple[str, str]
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k, v as [B, L, N, H], with RMSNorm on q and k when the config has qk_norm."""
    B, L, _ = x_BxLxD.shape
    N, H = cfg.num_attention_heads, cfg.attention_head_dim
    q, k, v = (_dense(cfg, cfg.inner_dim, ("embed", "heads"), n)(x_BxLxD).reshape(B, L, N, H) for n in names)
    if cfg.qk_norm == "rms_norm":
        q = RMSNorm(cfg.dtype, cfg.param_dtype, name=norms[0])(q)
        k = RMSNorm(cfg.dtype, cfg.param_dtype, name=norms[1])(k)
    return q, k, v


def _attend(cfg: SD3Config, q, k, v) -> jax.Array:
    q, k, v = (checkpoint_name(a, "qkv") for a in (q, k, v))
    out_BxLxNxH = attention(q, k, v, cfg.attention_impl, cfg.attention_block)
    B, L = out_BxLxNxH.shape[:2]
    return checkpoint_name(out_BxLxNxH.reshape(B, L, cfg.inner_dim), "attn_out")


class JointAttention(nn.Module):
    """Image and text project separately and attend jointly ([image; text], as diffusers' JointAttnProcessor2_0);
    the last block has no text output projection."""

    cfg: SD3Config
    last: bool

    @nn.compact
    def __call__(self, img_BxIxD, txt_BxTxD) -> tuple[jax.Array, jax.Array | None]:
        cfg = self.cfg
        qi, ki, vi = _project(cfg, img_BxIxD, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
        qt, kt, vt = _project(cfg, txt_BxTxD, ("add_q_proj", "add_k_proj", "add_v_proj"),
                              ("norm_added_q", "norm_added_k"))
        cat = lambda a, b: jnp.concatenate([a, b], axis=1)
        out = _attend(cfg, cat(qi, qt), cat(ki, kt), cat(vi, vt))
        I = img_BxIxD.shape[1]
        img = _dense(cfg, cfg.inner_dim, ("heads", "embed"), "to_out_0")(out[:, :I])
        if self.last:
            return img, None
        return img, _dense(cfg, cfg.inner_dim, ("heads", "embed"), "to_add_out")(out[:, I:])


class SelfAttention(nn.Module):
    """The image-only second attention of an MMDiT-X block (diffusers `attn2`)."""

    cfg: SD3Config

    @nn.compact
    def __call__(self, x_BxLxD) -> jax.Array:
        cfg = self.cfg
        out = _attend(cfg, *_project(cfg, x_BxLxD, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k")))
        return _dense(cfg, cfg.inner_dim, ("heads", "embed"), "to_out_0")(out)


class JointBlock(nn.Module):
    """diffusers JointTransformerBlock: AdaLayerNormZero (SD35AdaLayerNormZeroX when dual) on the image stream,
    AdaLayerNormZero on the text stream (AdaLayerNormContinuous in the last block, which returns no text).
    Carry (img, txt) so runs of blocks scan."""

    cfg: SD3Config
    dual: bool = False
    last: bool = False

    @nn.compact
    def __call__(self, carry, temb_BxD):
        cfg = self.cfg
        img, txt = carry
        mod = AdaLNModulation(cfg, 9 if self.dual else 6, name="norm1")(temb_BxD)
        shift, scale, gate, shift2, scale2, gate2 = mod[:6]
        img_normed = layer_norm(img)
        if self.last:
            t_scale, t_shift = AdaLNModulation(cfg, 2, name="norm1_context")(temb_BxD)
        else:
            t_shift, t_scale, t_gate, t_shift2, t_scale2, t_gate2 = AdaLNModulation(
                cfg, 6, name="norm1_context")(temb_BxD)
        img_attn, txt_attn = JointAttention(cfg, self.last, name="attn")(
            img_normed * (1 + scale) + shift, layer_norm(txt) * (1 + t_scale) + t_shift)
        img = img + gate * img_attn
        if self.dual:
            shift_x, scale_x, gate_x = mod[6:]
            img = img + gate_x * SelfAttention(cfg, name="attn2")(img_normed * (1 + scale_x) + shift_x)
        img = img + gate2 * FeedForward(cfg, name="ff")(layer_norm(img) * (1 + scale2) + shift2)
        if self.last:
            return (_constrain(img), None), None
        txt = txt + t_gate * txt_attn
        txt = txt + t_gate2 * FeedForward(cfg, name="ff_context")(layer_norm(txt) * (1 + t_scale2) + t_shift2)
        return (_constrain(img), _constrain(txt)), None


def _run_blocks(cfg: SD3Config, run: Run, carry, temb_BxD):
    """One run: a Python loop (params `transformer_blocks_{i}`) or one nn.scan (params `run.name`, stacked)."""
    block = _remat(JointBlock, cfg)
    if cfg.scan_layers and not run.last:
        scanned = nn.scan(block, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True},
                          in_axes=(nn.broadcast,), length=run.stop - run.start,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        carry, _ = scanned(cfg, run.dual, run.last, name=run.name)(carry, temb_BxD)
        return carry
    for i in range(run.start, run.stop):
        carry, _ = block(cfg, run.dual, run.last, name=f"transformer_blocks_{i}")(carry, temb_BxD)
    return carry


def position_table(cfg: SD3Config, h_tokens: int, w_tokens: int) -> np.ndarray:
    """[h * w, D] fp32: the centre crop of diffusers' pos_embed_max_size^2 2-D sin-cos table (PatchEmbed).

    Token (row r, col c) gets [sin, cos](col position x freqs) then [sin, cos](row position x freqs); positions
    are arange(M) / (M / base_size) rounded to fp32, the products taken in fp64, as diffusers builds its buffer.
    """
    M = cfg.pos_embed_max_size
    if h_tokens > M or w_tokens > M:
        raise ValueError(f"a {h_tokens} x {w_tokens} token grid exceeds pos_embed_max_size {M}")
    base = cfg.sample_size // cfg.patch_size
    pos = (np.arange(M, dtype=np.float32) / np.float32(M / base)).astype(np.float64)
    quarter = cfg.inner_dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    ang_MxQ = np.outer(pos, omega)
    emb_MxD2 = np.concatenate([np.sin(ang_MxQ), np.cos(ang_MxQ)], axis=1)
    top, left = (M - h_tokens) // 2, (M - w_tokens) // 2
    rows = np.repeat(emb_MxD2[top:top + h_tokens], w_tokens, axis=0)
    cols = np.tile(emb_MxD2[left:left + w_tokens], (h_tokens, 1))
    return np.concatenate([cols, rows], axis=1).astype(np.float32)


def full_position_table(cfg: SD3Config) -> np.ndarray:
    """diffusers' `pos_embed.pos_embed` buffer, [1, M * M, D]: what checkpoints store and exports write."""
    M = cfg.pos_embed_max_size
    return position_table(cfg, M, M)[None]


class SD3Transformer(nn.Module):
    """SD3 / SD3.5 transformer: packed latent tokens + text states + pooled text + timestep -> packed velocity."""

    cfg: SD3Config

    @nn.compact
    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array, pooled_projections: jax.Array,
                 timestep: jax.Array, h_tokens: int, w_tokens: int) -> jax.Array:
        """Shapes: hidden_states [B, h_tokens * w_tokens, token_dim] (packed, row-major), encoder_hidden_states
        [B, T, joint_attention_dim], pooled_projections [B, pooled_projection_dim], timestep [B] in diffusers'
        units (sigma x 1000). h_tokens, w_tokens: the token grid (Python ints). Returns [B, I, out_dim], packed."""
        cfg = self.cfg
        B, I, _ = hidden_states.shape
        if I != h_tokens * w_tokens:
            raise ValueError(f"{I} image tokens are not a {h_tokens} x {w_tokens} grid")
        dt = jnp.dtype(cfg.dtype)
        D = cfg.inner_dim

        img = _PatchEmbed(cfg, name="pos_embed")(hidden_states.astype(dt))
        img = img + jnp.asarray(position_table(cfg, h_tokens, w_tokens), dt)
        temb_BxD = _TimeTextEmbed(cfg, name="time_text_embed")(timestep, pooled_projections)
        txt = _dense(cfg, D, ("text_in", "embed"), "context_embedder")(encoder_hidden_states.astype(dt))
        carry = (_constrain(img), _constrain(txt))
        for run in block_runs(cfg):
            carry = _run_blocks(cfg, run, carry, temb_BxD)
        img = carry[0]

        scale, shift = AdaLNModulation(cfg, 2, name="norm_out")(temb_BxD)
        img = layer_norm(img) * (1 + scale) + shift
        return Dense(cfg.out_dim, ("embed", "latent"), dt, cfg.param_dtype, input_barrier=cfg.dense_input_barrier,
                     name="proj_out")(img)


class _PatchEmbed(nn.Module):
    """Holds the patch projection under diffusers' `pos_embed.proj` name (a stride-p conv = a Dense on packed
    tokens). Neither it nor proj_out takes LoRA: their torch layouts are not Linear's."""

    cfg: SD3Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        return Dense(cfg.inner_dim, ("latent", "embed"), cfg.dtype, cfg.param_dtype,
                     input_barrier=cfg.dense_input_barrier, name="proj")(x)


class _TimeTextEmbed(nn.Module):
    """timestep sinusoid -> MLP plus pooled text -> MLP (diffusers CombinedTimestepTextProjEmbeddings)."""

    cfg: SD3Config

    @nn.compact
    def __call__(self, timestep_B, pooled_BxP) -> jax.Array:
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        emb = lambda name: MLPEmbedder(cfg.inner_dim, dt, cfg.param_dtype, cfg.dense_input_barrier, name=name)
        t = jnp.broadcast_to(jnp.asarray(timestep_B, jnp.float32), (pooled_BxP.shape[0],))
        return emb("timestep_embedder")(timestep_sinusoid(t).astype(dt)) + emb("text_embedder")(pooled_BxP.astype(dt))


def dummy_inputs(cfg: SD3Config, batch: int = 1, h_tokens: int = 4, w_tokens: int = 4, txt_len: int = 8
                 ) -> dict[str, Any]:
    """Zero inputs of the right shapes, for init / eval_shape."""
    return dict(
        hidden_states=jnp.zeros((batch, h_tokens * w_tokens, cfg.token_dim), jnp.float32),
        encoder_hidden_states=jnp.zeros((batch, txt_len, cfg.joint_attention_dim), jnp.float32),
        pooled_projections=jnp.zeros((batch, cfg.pooled_projection_dim), jnp.float32),
        timestep=jnp.zeros((batch,), jnp.float32), h_tokens=h_tokens, w_tokens=w_tokens)


@dataclasses.dataclass(frozen=True)
class Velocity:
    """The transformer as the velocity function v(variables, x_t [B, I, C], t [B], conditioning) of an h x w token
    grid (see flux.Velocity). SD3's pipeline feeds the transformer timestep = sigma x num_train_timesteps, so t is
    scaled by 1000 x `timestep_scale`."""

    cfg: SD3Config
    h_tokens: int
    w_tokens: int
    timestep_scale: float = 1.0

    def __call__(self, variables: Any, x_BxIxC: jax.Array, t_B: jax.Array, cond: dict[str, jax.Array]) -> jax.Array:
        return SD3Transformer(self.cfg).apply(variables, hidden_states=x_BxIxC,
                                              timestep=t_B * (1000.0 * self.timestep_scale),
                                              h_tokens=self.h_tokens, w_tokens=self.w_tokens, **cond)


def conditioning(prompt_embeds_BxTxD: jax.Array, pooled_BxP: jax.Array, guidance: float | None = None
                 ) -> dict[str, jax.Array]:
    """SD3's conditioning of B images: the joined CLIP + T5 states and both CLIP pooled outputs, each [B, ...].
    SD3 has no guidance input (its classifier-free guidance runs the model twice): `guidance` is ignored, as the
    backbone contract asks of models without one."""
    del guidance
    return {"encoder_hidden_states": prompt_embeds_BxTxD, "pooled_projections": pooled_BxP}


def init_params(cfg: SD3Config, rng: jax.Array) -> dict[str, Any]:
    """Randomly initialised params (boxed with logical axis names; `nn.meta.unbox` strips them)."""
    return SD3Transformer(cfg).init(rng, **dummy_inputs(cfg))["params"]
