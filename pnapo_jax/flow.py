"""Rectified-flow math: interpolation, velocity target, t-samplers, FLUX's resolution shift, Euler on its schedule.

Conventions (diffusers / FLUX): t = 0 is data, t = 1 is noise, x_t = (1 - t) x0 + t x1, and the model
predicts the velocity v = x1 - x0. Sampling integrates from t = 1 down to t = 0 on FluxPipeline's schedule.
"""

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

T_KINDS = ("uniform", "logit_normal", "mode", "grid")


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


def grid_index(u_B: jax.Array, grid_size: int) -> jax.Array:
    """The cell of u in [0, 1) among `grid_size` equal cells: the "grid" t sampler's point index."""
    return jnp.clip(jnp.floor(u_B * grid_size), 0, grid_size - 1).astype(jnp.int32)


def t_from_uniform(u_B: jax.Array, kind: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                   mode_scale: float = 1.29, shift_mu: float | None = None, grid_size: int = 8) -> jax.Array:
    """Map u ~ U(0, 1) to a training t. One transform of one uniform draw, so that samplers can be compared
    on identical draws (and stratified u can be used): logit-normal is sigmoid(mean + std * Phi^-1(u)),
    mode is SD3's u -> 1 - u - scale (cos^2(pi u / 2) - 1 + u), grid is the midpoint (j + 1/2) / grid_size of
    u's cell j (a fixed set of t, so the reference's errors can be cached per record). `shift_mu` then applies
    `time_shift`."""
    if kind == "grid":
        t = (grid_index(u_B, grid_size) + 0.5) / grid_size
    elif kind == "uniform":
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


def seeded_keys(seed: int, seeds_N: Any) -> jax.Array:
    """[N] PRNG keys fold_in(PRNGKey(seed), seeds_N[n]): what `seeded_noise` draws from, and the stochastic
    sampler's per-image step-noise stream (`euler_sample`'s step_keys)."""
    key = jax.random.PRNGKey(seed)
    return jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.asarray(seeds_N, jnp.uint32))


def seeded_noise(seed: int, seeds_N: Any, shape: tuple[int, ...]) -> jax.Array:
    """[N, *shape] N(0, I) noises, that of n being normal(fold_in(PRNGKey(seed), seeds_N[n]), shape): each is
    reproducible on its own, whatever batch it was drawn in, so a record's seed names its noise. The one noise
    rule of the package (pair generation, the sampling eval, `python -m pnapo_jax.sample`, the benchmark)."""
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(seeded_keys(seed, seeds_N))


def t_bucket(t_B: jax.Array, num_buckets: int) -> jax.Array:
    """Index of t's bin among `num_buckets` equal bins of [0, 1] (t = 1 in the last), for per-t metrics."""
    return jnp.clip(jnp.floor(t_B * num_buckets), 0, num_buckets - 1).astype(jnp.int32)


def flux_sigmas(num_steps: int, image_seq_len: int, mu: float | jax.Array | None = None) -> jax.Array:
    """[num_steps + 1] noise levels from 1 to 0, FluxPipeline's: linspace(1, 1/n, n) shifted by `time_shift`
    with mu = `resolution_mu(image_seq_len)` unless given (0 disables the shift), then a terminal 0."""
    mu = resolution_mu(image_seq_len) if mu is None else mu
    sigmas = time_shift(mu, jnp.linspace(1.0, 1.0 / num_steps, num_steps, dtype=jnp.float32))
    return jnp.append(sigmas, 0.0)


def default_sigmas(num_steps: int, shift: float = 1.0, mu: float | None = None, num_train_timesteps: int = 1000
                   ) -> np.ndarray:
    """[num_steps + 1] float32 noise levels of FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps) when the
    pipeline passes no sigmas (StableDiffusion3Pipeline): linspace from 1 to the scheduler's smallest training
    sigma (1/N, through the static `shift` unless `mu` is given), shifted by `shift` (or by `time_shift(mu)`,
    dynamic shifting), then a terminal 0. Computed as diffusers computes it: the smallest sigma in float32, the
    rest in float64."""
    N = num_train_timesteps
    train_sigma = np.float32(1.0) / N  # diffusers: float32 timesteps / N, shifted in float32 when static
    if mu is None:
        train_sigma = np.float32(shift) * train_sigma / (1 + (np.float32(shift) - 1) * train_sigma)
    sigmas = np.linspace(N, float(train_sigma) * N, num_steps) / N
    sigmas = np.exp(mu) / (np.exp(mu) + (1 / sigmas - 1)) if mu is not None else shift * sigmas / (
        1 + (shift - 1) * sigmas)
    return np.append(sigmas.astype(np.float32), np.float32(0.0))


# velocity(variables, x_t [N, I, C], t [N], conditioning) -> v [N, I, C]: a model as the samplers call it
# (pnapo_jax.models.flux.Velocity); the conditioning is a pytree of [N, ...] arrays.
VelocityFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]


def stochastic_step(x_BxIxC: jax.Array, v_BxIxC: jax.Array, sigma: jax.Array, sigma_next: jax.Array,
                    eta: float | jax.Array, eps_BxIxC: jax.Array) -> jax.Array:
    """DDIM's eta step (Song et al. 2021, eq. 12) for rectified flow, x_t = a_t x0 + s_t x1 with a_t = 1 - t,
    s_t = t: from the model's estimates x0^ = x - t v and x1^ = x + (1 - t) v, the state at s < t is
    a_s x0^ + sqrt(s^2 - c^2) x1^ + c eps, c = eta (s / t) sqrt(t^2 - (a_t s / a_s)^2) (the forward posterior's
    std at eta 1: ancestral sampling; c shrinks with the step, so the chain tends to an SDE, not to re-noising).
    eta 0 is the Euler step x + (s - t) v; the last step (s = 0) adds no noise."""
    t, s = sigma, sigma_next
    x0_hat, x1_hat = x_BxIxC - t * v_BxIxC, x_BxIxC + (1 - t) * v_BxIxC
    c = eta * s / t * jnp.sqrt(jnp.maximum(t**2 - ((1 - t) * s / (1 - s)) ** 2, 0.0))
    return (1 - s) * x0_hat + jnp.sqrt(jnp.maximum(s**2 - c**2, 0.0)) * x1_hat + c * eps_BxIxC


@functools.partial(jax.jit, static_argnames=("velocity", "num_steps", "true_cfg_scale", "return_trajectory"))
def euler_sample(velocity: VelocityFn, variables: Any, noise_BxIxC: jax.Array, cond: Any, num_steps: int,
                 true_cfg_scale: float = 1.0, negative_cond: Any = None, mu: float | None = None,
                 return_trajectory: bool = False, sigmas: jax.Array | None = None, eta: float | jax.Array = 0.0,
                 step_keys: jax.Array | None = None) -> jax.Array:
    """Integrate dx/dt = v(x, t) from the given noise at t = 1 to t = 0 with FluxPipeline's Euler schedule.

    With true_cfg_scale > 1 and a negative conditioning, v = v_neg + scale (v_pos - v_neg), both halves in one
    doubled batch. The latent is kept in the noise's dtype. Returns the final latent [B, I, C], or with
    `return_trajectory` every state [num_steps + 1, B, I, C] from the noise to the final latent, at the noise
    levels of `flux_sigmas` (or of `sigmas` [num_steps + 1] when given, e.g. `default_sigmas`, SD3's schedule).
    `velocity` is a static argument: an equal one reuses the compilation.

    With `step_keys` ([B] keys, e.g. `seeded_keys`) each step is `stochastic_step` at `eta`, image b's step j
    drawing its fresh noise from normal(fold_in(step_keys[b], j)): images from one noise differ, and each is
    reproducible from its noise and its key.
    """
    B = noise_BxIxC.shape[0]
    do_cfg = true_cfg_scale > 1 and negative_cond is not None
    if do_cfg:
        cond = jax.tree.map(lambda pos, neg: jnp.concatenate([pos, neg]), cond, negative_cond)

    def v(x_BxIxC, sigma):
        x = jnp.concatenate([x_BxIxC, x_BxIxC]) if do_cfg else x_BxIxC
        out = velocity(variables, x, jnp.full((x.shape[0],), sigma), cond)
        return out[B:] + true_cfg_scale * (out[:B] - out[B:]) if do_cfg else out

    def step(x_BxIxC, inputs):
        sigma, sigma_next, j = inputs  # the update is computed in fp32 whatever the latent dtype, as diffusers
        v_BxIxC = v(x_BxIxC, sigma)
        if step_keys is None:
            x_new = x_BxIxC + (sigma_next - sigma) * v_BxIxC
        else:
            eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, j), x_BxIxC.shape[1:]))(step_keys)
            x_new = stochastic_step(x_BxIxC, v_BxIxC, sigma, sigma_next, eta, eps)
        x_BxIxC = x_new.astype(x_BxIxC.dtype)
        return x_BxIxC, x_BxIxC if return_trajectory else None

    sigmas = flux_sigmas(num_steps, noise_BxIxC.shape[1], mu) if sigmas is None else jnp.asarray(sigmas)
    x_BxIxC, states = jax.lax.scan(step, noise_BxIxC, (sigmas[:-1], sigmas[1:], jnp.arange(num_steps)))
    return jnp.concatenate([noise_BxIxC[None], states]) if return_trajectory else x_BxIxC
