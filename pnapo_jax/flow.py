"""Rectified-flow math for FLUX: interpolation, velocity target, t-samplers, resolution shift, packing, Euler.

Conventions (diffusers / FLUX): t = 0 is data, t = 1 is noise, x_t = (1 - t) x0 + t x1, and the model
predicts the velocity v = x1 - x0. Sampling integrates from t = 1 down to t = 0 on FluxPipeline's schedule.
"""

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri

T_KINDS = ("uniform", "logit_normal", "mode")


def _expand(t_B: jax.Array, x: jax.Array) -> jax.Array:
    """[B] -> [B, 1, ..., 1] so a per-example t broadcasts over x's trailing axes."""
    t_B = jnp.asarray(t_B)
    return t_B.reshape(t_B.shape + (1,) * (x.ndim - t_B.ndim))


def interpolate(x0: jax.Array, x1: jax.Array, t_B: jax.Array) -> jax.Array:
    """The straight-line state x_t = (1 - t) x0 + t x1 between data x0 and its noise x1."""
    t = _expand(t_B, x0)
    return (1 - t) * x0 + t * x1


def velocity_target(x0: jax.Array, x1: jax.Array) -> jax.Array:
    """d x_t / dt along the straight line: what the model is trained to predict."""
    return x1 - x0


def resolution_mu(image_seq_len: float, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                  max_shift: float = 1.15) -> float:
    """FLUX's shift mu, linear in the number of image tokens: more tokens keep more noise longer."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + m * (image_seq_len - base_seq_len)


def time_shift(mu: float | jax.Array, t: jax.Array) -> jax.Array:
    """e^mu / (e^mu + (1/t - 1)): monotone, fixes 0 and 1, mu > 0 moves t toward noise, mu = 0 is the identity."""
    e = jnp.exp(mu)
    return e / (e + (1 / jnp.asarray(t) - 1))


def t_from_uniform(u_B: jax.Array, kind: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                   mode_scale: float = 1.29, shift_mu: float | None = None) -> jax.Array:
    """Map u ~ U(0, 1) to a training t. One transform of one uniform draw, so that samplers can be compared
    on identical draws (and stratified u can be used): logit-normal is sigmoid(mean + std * Phi^-1(u)),
    mode is SD3's u -> 1 - u - scale (cos^2(pi u / 2) - 1 + u). `shift_mu` then applies `time_shift`."""
    if kind == "uniform":
        t = u_B
    elif kind == "logit_normal":
        t = jax.nn.sigmoid(logit_mean + logit_std * ndtri(u_B))
    elif kind == "mode":
        t = 1 - u_B - mode_scale * (jnp.cos(math.pi * u_B / 2) ** 2 - 1 + u_B)
    else:
        raise ValueError(f"t sampler kind must be one of {T_KINDS}, got {kind!r}")
    return t if shift_mu is None else time_shift(shift_mu, t)


def sample_t(rng: jax.Array, batch: int, **kwargs: Any) -> jax.Array:
    """[batch] training times; kwargs are `t_from_uniform`'s (kind, logit_mean, ...), e.g. a config section."""
    return t_from_uniform(jax.random.uniform(rng, (batch,)), **kwargs)


def seeded_noise(seed: int, seeds_N: Any, shape_IxC: tuple[int, int]) -> jax.Array:
    """[N, I, C] N(0, I) noises, one per integer seed under the run's `seed`: each is reproducible on its own,
    whatever batch it was drawn in, so a record's seed names its noise."""
    key = jax.random.PRNGKey(seed)
    keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.asarray(seeds_N, jnp.uint32))
    return jax.vmap(lambda k: jax.random.normal(k, shape_IxC, jnp.float32))(keys)


def t_bucket(t_B: jax.Array, num_buckets: int) -> jax.Array:
    """Index of t's bin among `num_buckets` equal bins of [0, 1] (t = 1 in the last), for per-t metrics."""
    return jnp.clip(jnp.floor(t_B * num_buckets), 0, num_buckets - 1).astype(jnp.int32)


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


def flux_sigmas(num_steps: int, image_seq_len: int, mu: float | jax.Array | None = None) -> jax.Array:
    """[num_steps + 1] noise levels from 1 to 0, FluxPipeline's: linspace(1, 1/n, n) shifted by `time_shift`
    with mu = `resolution_mu(image_seq_len)` unless given (0 disables the shift), then a terminal 0."""
    mu = resolution_mu(image_seq_len) if mu is None else mu
    sigmas = time_shift(mu, jnp.linspace(1.0, 1.0 / num_steps, num_steps, dtype=jnp.float32))
    return jnp.append(sigmas, 0.0)


@functools.partial(jax.jit, static_argnames=("apply_fn", "num_steps", "true_cfg_scale", "return_trajectory"))
def euler_sample(apply_fn: Callable[..., jax.Array], variables: Any, noise_BxIxC: jax.Array,
                 prompt_embeds_BxTxE: jax.Array, pooled_BxP: jax.Array, num_steps: int, guidance_scale: float,
                 img_ids_Ix3: jax.Array, txt_ids_Tx3: jax.Array, true_cfg_scale: float = 1.0,
                 negative_prompt_embeds_BxTxE: jax.Array | None = None, negative_pooled_BxP: jax.Array | None = None,
                 mu: float | None = None, return_trajectory: bool = False) -> jax.Array:
    """Integrate dx/dt = v(x, t) from the given noise at t = 1 to t = 0 with FluxPipeline's Euler schedule.

    `apply_fn` is e.g. `FluxTransformer(cfg).apply`, called as apply_fn(variables, hidden_states=...,
    ..., guidance=[B]); models without guidance embeds ignore `guidance`. With true_cfg_scale > 1 and a
    negative prompt, v = v_neg + scale (v_pos - v_neg), both halves in one doubled batch. The latent is kept
    in the noise's dtype. Returns the final latent [B, I, C], or with `return_trajectory` every state
    [num_steps + 1, B, I, C] from the noise to the final latent, at the noise levels of `flux_sigmas`.
    Keep one `apply_fn` object across calls: it is a static argument, a new one recompiles.
    """
    B = noise_BxIxC.shape[0]
    do_cfg = true_cfg_scale > 1 and negative_prompt_embeds_BxTxE is not None
    if do_cfg:
        prompt_embeds_BxTxE = jnp.concatenate([prompt_embeds_BxTxE, negative_prompt_embeds_BxTxE])
        pooled_BxP = jnp.concatenate([pooled_BxP, negative_pooled_BxP])
    n = prompt_embeds_BxTxE.shape[0]
    guidance_n = jnp.full((n,), guidance_scale, jnp.float32)

    def velocity(x_BxIxC, sigma):
        v = apply_fn(variables, hidden_states=jnp.concatenate([x_BxIxC, x_BxIxC]) if do_cfg else x_BxIxC,
                     encoder_hidden_states=prompt_embeds_BxTxE, pooled_projections=pooled_BxP,
                     timestep=jnp.full((n,), sigma), img_ids=img_ids_Ix3, txt_ids=txt_ids_Tx3, guidance=guidance_n)
        return v[B:] + true_cfg_scale * (v[:B] - v[B:]) if do_cfg else v

    def step(x_BxIxC, sigma_pair):
        sigma, sigma_next = sigma_pair  # the update is computed in fp32 whatever the latent dtype, as diffusers
        x_BxIxC = (x_BxIxC + (sigma_next - sigma) * velocity(x_BxIxC, sigma)).astype(x_BxIxC.dtype)
        return x_BxIxC, x_BxIxC if return_trajectory else None

    sigmas = flux_sigmas(num_steps, noise_BxIxC.shape[1], mu)
    x_BxIxC, states = jax.lax.scan(step, noise_BxIxC, (sigmas[:-1], sigmas[1:]))
    return jnp.concatenate([noise_BxIxC[None], states]) if return_trajectory else x_BxIxC
