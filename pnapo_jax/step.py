"""The pure PNAPO step: the loss of a batch through the backbone's velocity function, one optimizer update (in
`grad_accum_steps` micro-batches), an eval step, and both jitted with training's shardings. `pnapo_jax.train`
loops over it; `pnapo_jax.aot` compiles it for a TPU topology."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from pnapo_jax import config_check, flow, fused_adamw, objective, sharding
from pnapo_jax.backbones import record_conditioning
from pnapo_jax.data.batch import REF_CACHE_KEYS
from pnapo_jax.models.layers import DENSE_WEIGHTS
from pnapo_jax.setup import Setup, State, ema_update, evaluated_params, learning_rate

Metrics = dict[str, jax.Array]


def reference_velocity(setup: Setup) -> objective.VelocityFn:
    """(frozen[setup.frozen_key], x, t, c) -> the reference's velocity (with LoRA: the base, adapters off)."""
    return lambda p, x, t, c: setup.velocity({"params": p}, x, t, c)


def _loss_fn(setup: Setup, frozen: Any, cached_reference: bool = False) -> Callable:
    """(trainable params, batch, t_B, rng, step) -> (loss, metrics): the policy and the frozen reference, or with
    `cached_reference` the reference errors the batch carries ([B] ref_err_w / ref_err_l, see `_cached_errors`)."""
    velocity = setup.velocity
    if setup.lora:
        policy = lambda lora, x, t, c: velocity({"params": frozen["base"], "lora": lora}, x, t, c)
    else:
        policy = lambda p, x, t, c: velocity({"params": p}, x, t, c)
    ref = reference_velocity(setup)
    cfg = setup.config.pnapo
    return lambda params, batch, t_B, rng, step: objective.pair_loss(
        params, batch, t_B, rng, step, policy_velocity=policy, ref_velocity=ref,
        ref_params=frozen[setup.frozen_key], cond=record_conditioning(setup.backbone, batch, cfg.guidance), cfg=cfg,
        ref_errors=tuple(batch[k] for k in REF_CACHE_KEYS) if cached_reference else None)


def _t_kwargs(setup: Setup) -> dict[str, Any]:
    t = setup.config.t_sampling
    mu = flow.resolution_mu(setup.image_tokens) if t.resolution_shift else None
    return dict(kind=t.kind, logit_mean=t.logit_mean, logit_std=t.logit_std, mode_scale=t.mode_scale, shift_mu=mu,
                grid_size=t.grid_size)


def _sample_t(setup: Setup, rng: jax.Array, batch: int) -> jax.Array:
    return flow.sample_t(rng, batch, **_t_kwargs(setup))


def grid_t(setup: Setup) -> jax.Array:
    """[G] the t of the "grid" sampler's points, in index order: what the reference-error cache is computed at."""
    g = setup.config.t_sampling.grid_size
    return flow.t_from_uniform((jnp.arange(g, dtype=jnp.float32) + 0.5) / g, **{**_t_kwargs(setup), "kind": "grid"})


def _cached_errors(batch: dict[str, jax.Array], u_B: jax.Array, grid_size: int) -> dict[str, jax.Array]:
    """The batch with its cached reference errors [B, G] narrowed to [B], each at its grid point of u."""
    j_Bx1 = flow.grid_index(u_B, grid_size)[:, None]
    return {**batch, **{k: jnp.take_along_axis(batch[k], j_Bx1, axis=1)[:, 0] for k in REF_CACHE_KEYS}}


def differentiated(setup: Setup, params: Any) -> Any:
    """The trained params as the loss is differentiated at: with optim.grad_dtype, the Dense weights as their copy
    in that dtype (= model.dtype, which Dense casts them to at use: the forward is unchanged), so their gradients
    stay in it until the optimizer upcasts them element by element (half the fp32 gradients' memory)."""
    dtype = setup.config.optim.grad_dtype
    cast = lambda path, x: x.astype(dtype) if dtype and getattr(path[-1], "key", None) in DENSE_WEIGHTS else x
    return jax.tree_util.tree_map_with_path(cast, params)


def _split_micro(x_BxN: jax.Array, k: int) -> jax.Array:
    """[B, ...] -> [k, B/k, ...] taking every k-th row, so each micro-batch keeps the batch sharding's layout."""
    return x_BxN.reshape(x_BxN.shape[0] // k, k, *x_BxN.shape[1:]).swapaxes(0, 1)


def batch_gradients(setup: Setup, params: Any, frozen: Any, batch: dict[str, jax.Array], rng: jax.Array,
                    step: jax.Array | int) -> tuple[Any, Metrics]:
    """(gradients, metrics) of the loss on a global batch (the mean over `grad_accum_steps` micro-batches), with the
    t and noise draws of `rng`: what `train_step` applies, and what benchmarks/grad_variance.py takes again and
    again to measure the variance of the gradient estimate."""
    t_rng, noise_rng = jax.random.split(rng)
    B = batch["x0_w"].shape[0]
    u_B = jax.random.uniform(t_rng, (B,))  # flow.sample_t's draw, kept for the cache's grid index
    t_B = flow.t_from_uniform(u_B, **_t_kwargs(setup))
    cached = setup.config.pnapo.ref_cache
    if cached:
        batch = _cached_errors(batch, u_B, setup.config.t_sampling.grid_size)
    grad_fn = jax.value_and_grad(_loss_fn(setup, frozen, cached), has_aux=True)
    k = setup.config.train.grad_accum_steps
    params = differentiated(setup, params)
    if k == 1:
        (_, metrics), grads = grad_fn(params, batch, t_B, noise_rng, step)
        return grads, metrics
    micro = (jax.tree.map(lambda x: _split_micro(x, k), batch), _split_micro(t_B, k), jax.random.split(noise_rng, k))

    def accumulate(acc, xs):
        (_, m), g = grad_fn(params, *xs, step)
        return jax.tree.map(jnp.add, acc, (g, m)), None

    shapes = jax.eval_shape(lambda: grad_fn(params, *jax.tree.map(lambda x: x[0], micro), step))
    # bf16 gradients (optim.grad_dtype) are summed in fp32: k roundings to bf16 would each lose precision
    fp32 = lambda dt: jnp.float32 if dt == jnp.bfloat16 else dt
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, fp32(s.dtype)), (shapes[1], shapes[0][1]))
    (grads, metrics), _ = jax.lax.scan(accumulate, zeros, micro)
    return jax.tree.map(lambda x: x / k, (grads, metrics))


def train_step(setup: Setup, state: State, frozen: Any, batch: dict[str, jax.Array]) -> tuple[State, Metrics]:
    """One optimizer update on a global batch of pairs (in `grad_accum_steps` micro-batches). Pure."""
    step = state["step"]
    grads, metrics = batch_gradients(setup, state["params"], frozen, batch, jax.random.fold_in(state["rng"], step),
                                     step)
    updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {**metrics, "grad_norm": optax.global_norm(fused_adamw.upcast(grads)),
               "lr": learning_rate(setup.config.optim, setup.config.train.num_steps)(step),
               "skipped_updates": opt_state.total_notfinite, "nonfinite_streak": opt_state.notfinite_count}
    ema = {"ema": ema_update(setup.config.train.ema_decay, state["ema"], params)} if setup.ema else {}
    return {"step": step + 1, "params": params, "opt_state": opt_state, "rng": state["rng"], **ema}, metrics


def eval_step(setup: Setup, state: State, frozen: Any, batch: dict[str, jax.Array]) -> Metrics:
    """Loss and reward metrics on held-out pairs, with a fixed t / noise draw so evals are comparable."""
    rng = jax.random.fold_in(jax.random.PRNGKey(setup.config.seed), 2**31 - 1)
    t_rng, noise_rng = jax.random.split(rng)
    t_B = _sample_t(setup, t_rng, batch["x0_w"].shape[0])
    _, metrics = _loss_fn(setup, frozen)(evaluated_params(setup, state), batch, t_B, noise_rng, state["step"])
    return metrics


def jit_steps(setup: Setup) -> tuple[Callable, Callable]:
    """(train_step, eval_step) jitted with in/out shardings; the train state is donated."""
    config_check.check(setup.config, setup.mesh.devices.size)  # the global batch against this mesh
    state_sh, frozen_sh = setup.state_shardings, setup.frozen_shardings
    batch_sh = sharding.batch_sharding(setup.mesh)
    rep = sharding.replicated(setup.mesh)
    step = jax.jit(lambda s, f, b: train_step(setup, s, f, b), in_shardings=(state_sh, frozen_sh, batch_sh),
                   out_shardings=(state_sh, rep), donate_argnums=0)
    evaluate = jax.jit(lambda s, f, b: eval_step(setup, s, f, b), in_shardings=(state_sh, frozen_sh, batch_sh),
                       out_shardings=rep)
    return step, evaluate


def with_rules(setup: Setup, fn: Callable) -> Callable:
    """Run `fn` (tracing included) under the mesh and the logical axis rules."""
    def wrapped(*args):
        with setup.scope():
            return fn(*args)
    return wrapped
