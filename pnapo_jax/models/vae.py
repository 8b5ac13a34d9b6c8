"""FLUX's VAE in Flax linen, computing what diffusers' `AutoencoderKL` computes.

Module and parameter names follow diffusers' state dict (`decoder/up_blocks_0/resnets_1/conv1/kernel` is
`decoder.up_blocks.0.resnets.1.conv1.weight` as [kh, kw, in, out]), so loading is a mechanical mapping
(pnapo_jax/convert/vae.py). The module works on NHWC; `encode` / `decode` take and return NCHW like diffusers, with
FluxPipeline's latent normalisation (z - shift) * scale. GroupNorm statistics are computed in fp32. Channel
axes carry the logical names `vae_in` / `vae_out` / `vae_norm`, which no default rule shards: the VAE is
replicated.
"""

import collections
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pnapo_jax.models.layers import Dense, attention

Dtype = jnp.dtype
TILE_OVERLAP = 0.25  # diffusers' tile_overlap_factor


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture (diffusers config.json names and defaults; `FLUX_VAE` is FLUX.1's) plus how to compute it."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of the parameters
    attention_impl: str = "xla"  # mid-block attention: jax.nn.dot_product_attention implementation, or "dot"

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.block_out_channels) - 1)


FLUX_VAE = VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                     scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


class Conv(nn.Module):
    """Conv2d on NHWC with torch's padding: `padding` on every side, or explicit ((top, bottom), (left, right))."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int | tuple[tuple[int, int], tuple[int, int]] = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        dt, pdt, k = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype), self.kernel_size
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                   (None, None, "vae_in", "vae_out")),
                            (k, k, x_BxHxWxC.shape[-1], self.features), pdt)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vae_out",)),
                          (self.features,), pdt)
        pad = ((self.padding,) * 2,) * 2 if isinstance(self.padding, int) else self.padding
        y = jax.lax.conv_general_dilated(x_BxHxWxC.astype(dt), kernel.astype(dt), (self.stride,) * 2, pad,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias.astype(dt)


class GroupNorm(nn.Module):
    """torch GroupNorm (affine) on NHWC; statistics and affine in fp32, output in the compute dtype."""

    groups: int
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        B, H, W, C = x_BxHxWxC.shape
        param = lambda name, init: self.param(name, nn.with_logical_partitioning(init, ("vae_norm",)), (C,),
                                              jnp.dtype(self.param_dtype)).astype(jnp.float32)
        scale, bias = param("scale", nn.initializers.ones_init()), param("bias", nn.initializers.zeros_init())
        x_BxNxGxD = x_BxHxWxC.astype(jnp.float32).reshape(B, H * W, self.groups, C // self.groups)
        mean = x_BxNxGxD.mean((1, 3), keepdims=True)
        var = jnp.square(x_BxNxGxD - mean).mean((1, 3), keepdims=True)
        x32 = ((x_BxNxGxD - mean) * jax.lax.rsqrt(var + self.eps)).reshape(B, H, W, C)
        return (x32 * scale + bias).astype(jnp.dtype(self.dtype))


def _conv(cfg: VAEConfig, features: int, name: str, **kwargs: Any) -> Conv:
    return Conv(features, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name, **kwargs)


def _norm(cfg: VAEConfig, name: str) -> GroupNorm:
    return GroupNorm(cfg.norm_num_groups, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D without time embedding: x + conv2(silu(norm2(conv1(silu(norm1(x))))))."""

    cfg: VAEConfig
    features: int

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        cfg = self.cfg
        h = _conv(cfg, self.features, "conv1")(nn.silu(_norm(cfg, "norm1")(x_BxHxWxC)))
        h = _conv(cfg, self.features, "conv2")(nn.silu(_norm(cfg, "norm2")(h)))
        if x_BxHxWxC.shape[-1] != self.features:
            x_BxHxWxC = _conv(cfg, self.features, "conv_shortcut", kernel_size=1, padding=0)(x_BxHxWxC)
        return x_BxHxWxC.astype(h.dtype) + h


class AttentionBlock(nn.Module):
    """The mid-block's single-head self-attention over the H*W positions, with a residual connection."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        cfg = self.cfg
        B, H, W, C = x_BxHxWxC.shape
        h_BxLxC = _norm(cfg, "group_norm")(x_BxHxWxC).reshape(B, H * W, C)
        dense = lambda name: Dense(C, ("vae_in", "vae_out"), cfg.dtype, cfg.param_dtype, name=name)
        q, k, v = (dense(n)(h_BxLxC)[:, :, None, :] for n in ("to_q", "to_k", "to_v"))
        out_BxLxC = dense("to_out_0")(attention(q, k, v, cfg.attention_impl)[:, :, 0, :])
        return x_BxHxWxC.astype(out_BxLxC.dtype) + out_BxLxC.reshape(B, H, W, C)


class MidBlock(nn.Module):
    """diffusers UNetMidBlock2D: resnet, attention (unless disabled), resnet."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        cfg, C = self.cfg, x_BxHxWxC.shape[-1]
        x_BxHxWxC = ResnetBlock(cfg, C, name="resnets_0")(x_BxHxWxC)
        if cfg.mid_block_add_attention:
            x_BxHxWxC = AttentionBlock(cfg, name="attentions_0")(x_BxHxWxC)
        return ResnetBlock(cfg, C, name="resnets_1")(x_BxHxWxC)


class Resample(nn.Module):
    """Holds the `conv` of diffusers' Downsample2D (pad right/bottom by 1, 3x3 stride 2) or Upsample2D
    (nearest x2, 3x3)."""

    cfg: VAEConfig
    up: bool

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        C = x_BxHxWxC.shape[-1]
        if self.up:
            x_BxHxWxC = jnp.repeat(jnp.repeat(x_BxHxWxC, 2, axis=1), 2, axis=2)
            return _conv(self.cfg, C, "conv")(x_BxHxWxC)
        return _conv(self.cfg, C, "conv", stride=2, padding=((0, 1), (0, 1)))(x_BxHxWxC)


class ResampleBlock(nn.Module):
    """diffusers DownEncoderBlock2D / UpDecoderBlock2D: `num_layers` resnets, then an optional resampler."""

    cfg: VAEConfig
    features: int
    num_layers: int
    up: bool
    resample: bool

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x_BxHxWxC = ResnetBlock(self.cfg, self.features, name=f"resnets_{i}")(x_BxHxWxC)
        if self.resample:
            name = "upsamplers_0" if self.up else "downsamplers_0"
            x_BxHxWxC = Resample(self.cfg, self.up, name=name)(x_BxHxWxC)
        return x_BxHxWxC


class Encoder(nn.Module):
    """Image [B, H, W, in_channels] -> posterior moments [B, H/f, W/f, 2 * latent_channels] (mean; logvar)."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        cfg, channels = self.cfg, self.cfg.block_out_channels
        x = _conv(cfg, channels[0], "conv_in")(x_BxHxWxC)
        for i, features in enumerate(channels):
            x = ResampleBlock(cfg, features, cfg.layers_per_block, up=False, resample=i < len(channels) - 1,
                              name=f"down_blocks_{i}")(x)
        x = MidBlock(cfg, name="mid_block")(x)
        return _conv(cfg, 2 * cfg.latent_channels, "conv_out")(nn.silu(_norm(cfg, "conv_norm_out")(x)))


class Decoder(nn.Module):
    """Latent [B, h, w, latent_channels] -> image [B, h f, w f, out_channels]."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, z_BxHxWxC: jax.Array) -> jax.Array:
        cfg, channels = self.cfg, self.cfg.block_out_channels[::-1]
        x = _conv(cfg, channels[0], "conv_in")(z_BxHxWxC)
        x = MidBlock(cfg, name="mid_block")(x)
        for i, features in enumerate(channels):
            x = ResampleBlock(cfg, features, cfg.layers_per_block + 1, up=True, resample=i < len(channels) - 1,
                              name=f"up_blocks_{i}")(x)
        return _conv(cfg, cfg.out_channels, "conv_out")(nn.silu(_norm(cfg, "conv_norm_out")(x)))


class AutoencoderKL(nn.Module):
    """diffusers AutoencoderKL on NHWC: `encode` gives the posterior moments, `decode` the image; no latent
    normalisation (that is `encode` / `decode` below). Calling it (for init) decodes the encoded mean."""

    cfg: VAEConfig

    def setup(self):
        cfg = self.cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = _conv(cfg, 2 * cfg.latent_channels, "quant_conv", kernel_size=1, padding=0)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = _conv(cfg, cfg.latent_channels, "post_quant_conv", kernel_size=1, padding=0)

    def encode(self, x_BxHxWxC: jax.Array) -> jax.Array:
        moments = self.encoder(x_BxHxWxC)
        return self.quant_conv(moments) if self.cfg.use_quant_conv else moments

    def decode(self, z_BxHxWxC: jax.Array) -> jax.Array:
        return self.decoder(self.post_quant_conv(z_BxHxWxC) if self.cfg.use_post_quant_conv else z_BxHxWxC)

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        return self.decode(self.encode(x_BxHxWxC)[..., :self.cfg.latent_channels])


def init_params(cfg: VAEConfig, rng: jax.Array) -> dict[str, Any]:
    """Randomly initialised params (boxed with logical axis names; `nn.meta.unbox` strips them)."""
    f = cfg.downsample_factor
    return AutoencoderKL(cfg).init(rng, jnp.zeros((1, 2 * f, 2 * f, cfg.in_channels), jnp.float32))["params"]


def _map_batch(f: Callable[[jax.Array], jax.Array], x_BxHxWxC: jax.Array, batch_chunk: int | None) -> jax.Array:
    """f over the batch in sequential chunks of `batch_chunk` examples (all at once when None)."""
    if batch_chunk is None or batch_chunk >= x_BxHxWxC.shape[0]:
        return f(x_BxHxWxC)
    return jax.lax.map(lambda x: f(x[None])[0], x_BxHxWxC, batch_size=batch_chunk)


def _nchw(x_BxHxWxC: jax.Array) -> jax.Array:
    return x_BxHxWxC.transpose(0, 3, 1, 2)


def _nhwc(x_BxCxHxW: jax.Array) -> jax.Array:
    return x_BxCxHxW.transpose(0, 2, 3, 1)


@functools.partial(jax.jit, static_argnames=("cfg", "batch_chunk"))
def encode(params: Any, cfg: VAEConfig, images_BxCxHxW: jax.Array, rng: jax.Array | None = None,
           batch_chunk: int | None = None) -> jax.Array:
    """Images in [-1, 1] -> FLUX latents [B, latent_channels, H/f, W/f] in fp32, (z - shift) * scale as
    FluxPipeline normalises them; z is the posterior mode (mean), or with `rng` a sample mean + std * N(0, 1)
    with the noise drawn in the NCHW shape. `batch_chunk` encodes that many images at a time."""
    apply = lambda x: AutoencoderKL(cfg).apply({"params": params}, x, method=AutoencoderKL.encode)
    moments = _nchw(_map_batch(apply, _nhwc(images_BxCxHxW), batch_chunk)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=1)
    z = mean if rng is None else mean + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * jax.random.normal(
        rng, mean.shape)
    return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


@functools.partial(jax.jit, static_argnames=("cfg", "batch_chunk", "tile_latent_size"))
def decode(params: Any, cfg: VAEConfig, latents_BxCxHxW: jax.Array, batch_chunk: int | None = None,
           tile_latent_size: int | None = None) -> jax.Array:
    """FLUX latents (as `encode` gives) -> images [B, out_channels, H f, W f] in [-1, 1] (unclipped), fp32.

    Latents are un-normalised (z / scale + shift) first. `batch_chunk` decodes that many images at a time.
    With `tile_latent_size` a latent larger than that on either side is decoded as diffusers' `tiled_decode`
    does (its `tile_latent_min_size`; the image tile is f times that), overlapping tiles blended over a quarter
    tile, each tile decoded separately so memory is that of one tile."""
    z = _nhwc(latents_BxCxHxW).astype(jnp.float32) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
    apply = lambda z: AutoencoderKL(cfg).apply({"params": params}, z, method=AutoencoderKL.decode)
    if tile_latent_size is not None and max(z.shape[1:3]) > tile_latent_size:
        apply = functools.partial(_tiled, apply, tile_latent_size, tile_latent_size * cfg.downsample_factor)
    return _nchw(_map_batch(apply, z, batch_chunk).astype(jnp.float32))


def _tiled(decode_fn: Callable[[jax.Array], jax.Array], tile_latent: int, tile_sample: int,
           z_BxHxWxC: jax.Array) -> jax.Array:
    """diffusers' tiled_decode on NHWC. Tiles of one shape are decoded by one lax.map (at most four shapes:
    full tiles and the bottom / right remainders); each tile is blended in place with its already blended upper
    and left neighbours, then cropped, as diffusers' loop does."""
    stride = int(tile_latent * (1 - TILE_OVERLAP))
    extent = int(tile_sample * TILE_OVERLAP)
    limit = tile_sample - extent
    H, W = z_BxHxWxC.shape[1:3]
    tiles = {(i, j): z_BxHxWxC[:, y:y + tile_latent, x:x + tile_latent]
             for i, y in enumerate(range(0, H, stride)) for j, x in enumerate(range(0, W, stride))}
    by_shape = collections.defaultdict(list)
    for ij, tile in tiles.items():
        by_shape[tile.shape].append(ij)
    decoded = {}
    for group in by_shape.values():
        out = jax.lax.map(decode_fn, jnp.stack([tiles[ij] for ij in group])).astype(jnp.float32)
        decoded.update((ij, out[n]) for n, ij in enumerate(group))
    rows = []
    for i, j in tiles:  # row-major, as inserted
        tile = decoded[i, j]
        if i > 0:
            tile = _blend(decoded[i - 1, j], tile, extent, axis=1)
        if j > 0:
            tile = _blend(decoded[i, j - 1], tile, extent, axis=2)
        decoded[i, j] = tile
        if j == 0:
            rows.append([])
        rows[-1].append(tile[:, :limit, :limit])
    return jnp.concatenate([jnp.concatenate(row, axis=2) for row in rows], axis=1)


def _blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
    """b's first n rows (axis 1) or columns (axis 2) ramped from a's last n to b's, n = min(sizes, extent)."""
    n = min(a.shape[axis], b.shape[axis], extent)
    if n == 0:
        return b
    w = (jnp.arange(n, dtype=jnp.float32) / n).reshape((n,) + (1,) * (b.ndim - 1 - axis))
    head = jax.lax.slice_in_dim(a, a.shape[axis] - n, a.shape[axis], axis=axis) * (1 - w) + \
        jax.lax.slice_in_dim(b, 0, n, axis=axis) * w
    return jnp.concatenate([head, jax.lax.slice_in_dim(b, n, b.shape[axis], axis=axis)], axis=axis)

