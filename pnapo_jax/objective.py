"""The PNAPO objective: DPO on velocity errors, with each image re-noised by its own recorded prior noise.

For a pair (winner w, loser l) and one t shared by both images,

    e(θ, x0, x1) = mean over latent elements of ((x1 - x0) - v_θ((1 - t) x0 + t x1, t, c))^2
    s = [e(θ, w) - e(ref, w)] - [e(θ, l) - e(ref, l)]
    L = -log σ(-β_scale * s),   β_scale = β_eff (convention "beta") or β_eff / 2 (convention "half_beta")

PNAPO takes x1 = the recorded noise each image was generated from (`noise_mode="recorded"`); the
Diffusion-DPO / Flow-DPO baseline draws one fresh Gaussian shared by the pair (`noise_mode="independent"`);
`noise_mode="independent_unshared"` draws a fresh Gaussian for each image, so a comparison can tell the sharing
(common random numbers: the pair's noise terms cancel in s) from the independence of the trajectory.
β_eff = β f(reward gap) g(step) is PNAPO's dynamic regularisation (`dynamic_beta`).

The model is a velocity function v(params, x_t, t, conditioning) (pnapo_jax.backbones makes one per backbone): the
loss knows nothing of a model's inputs beyond the noisy latent and t. Every config argument is read by attribute
(`LossConfig`, an ml_collections ConfigDict, ...).
"""

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pnapo_jax import flow
from pnapo_jax.data.batch import NOISE_KEYS, NOISE_MODES

# β_scale / β: diffusers' research DPO script and PNAPO use β itself; Salesforce Diffusion-DPO writes
# `inside = -0.5 * beta * (model_diff - ref_diff)`, so its β is twice ours for the same loss.
SCALE_CONVENTIONS = {"beta": 1.0, "half_beta": 0.5}
# "dpo": -log σ(m) of the margin m = -β_scale s, which keeps falling as m grows (e.g. by pushing the loser's
# error up without bound); "ipo": (m - 1/2)^2, IPO's bounded objective (Azar et al. 2023, (h - 1/(2τ))^2 with
# h = -s, τ = β_scale) times β_scale^2, so its gradient at m = 0 is twice DPO's rather than β_scale^2 smaller.
OBJECTIVES = ("dpo", "ipo")

Metrics = dict[str, jax.Array]
# velocity(params, x_t [N, I, C], t [N], conditioning) -> predicted velocity [N, I, C]; the conditioning is a pytree
# of [N, ...] arrays (for FLUX: text embeddings and the guidance input, pnapo_jax.backbones.flux).
VelocityFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Every field the functions here read. τ, n1, n2 are not published: the defaults are guesses to tune."""

    beta: float = 2000.0  # the paper's β for FLUX (5000 for SD3-M), in the "beta" convention
    scale_convention: str = "beta"  # "beta" | "half_beta" (see SCALE_CONVENTIONS)
    noise_mode: str = "recorded"  # "recorded" (PNAPO) | "independent" (Flow-DPO) | "independent_unshared"
    use_gap: bool = True  # f(gap) = 2σ(gap/τ) - 1; False -> f = 1
    tau: float = 1.0  # reward-gap scale, in the reward's own units
    use_schedule: bool = True  # g(step): cosine from 1 (step <= n1) to 1/2 (step > n2); False -> g = 1
    n1: int = 200
    n2: int = 1000
    num_t_buckets: int = 4  # loss and the four velocity errors are also reported per t in [k/n, (k+1)/n)
    objective: str = "dpo"  # "dpo" | "ipo" (bounded; see OBJECTIVES)
    sft_weight: float = 0.0  # loss += sft_weight * the policy's winner error (an SFT term on the winners)


def preference_losses(err_w_B: jax.Array, err_l_B: jax.Array, ref_err_w_B: jax.Array, ref_err_l_B: jax.Array,
                      beta: jax.Array | float, scale_convention: str = "beta", objective: str = "dpo",
                      sft_weight: float = 0.0) -> tuple[jax.Array, Metrics]:
    """Per-example DPO losses -log σ(-β_scale s) [B] from per-example velocity errors [B] (their mean is the loss
    `pair_loss` returns), and the batch metrics; β scalar or [B]. `objective` "ipo" takes (-β_scale s - 1/2)^2
    instead; `sft_weight` adds that times err_w.

    Metrics use TRL DPOTrainer names: loss = the mean loss, rewards/chosen = mean(-β_scale (err_w - ref_err_w)),
    rewards/rejected likewise, rewards/accuracies = mean(chosen > rejected) (Diffusion-DPO's implicit_acc),
    rewards/margins; beta_eff is the mean β before the convention's scale; mse/* are the raw errors.
    """
    if scale_convention not in SCALE_CONVENTIONS:
        raise ValueError(f"scale_convention must be one of {tuple(SCALE_CONVENTIONS)}, got {scale_convention!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    beta_B = jnp.broadcast_to(jnp.asarray(beta, jnp.float32), err_w_B.shape)
    beta_scale_B = SCALE_CONVENTIONS[scale_convention] * beta_B
    chosen_B = -beta_scale_B * (err_w_B - ref_err_w_B)  # DPO implicit rewards
    rejected_B = -beta_scale_B * (err_l_B - ref_err_l_B)
    margin_B = chosen_B - rejected_B  # = -β_scale * s
    loss_B = -jax.nn.log_sigmoid(margin_B) if objective == "dpo" else jnp.square(margin_B - 0.5)
    extra = {}
    if sft_weight:
        extra = {"loss/preference": loss_B.mean(), "loss/sft": sft_weight * err_w_B.mean()}
        loss_B = loss_B + sft_weight * err_w_B
    metrics = {**extra,
        "loss": loss_B.mean(),
        "rewards/chosen": chosen_B.mean(),
        "rewards/rejected": rejected_B.mean(),
        "rewards/accuracies": (chosen_B > rejected_B).astype(jnp.float32).mean(),
        "rewards/margins": (chosen_B - rejected_B).mean(),
        "beta_eff": beta_B.mean(),
        "mse/policy_w": err_w_B.mean(),
        "mse/policy_l": err_l_B.mean(),
        "mse/ref_w": ref_err_w_B.mean(),
        "mse/ref_l": ref_err_l_B.mean(),
    }
    return loss_B, metrics


def dynamic_beta(beta: float, reward_gap_B: jax.Array, step: jax.Array | int, cfg: Any) -> jax.Array:
    """β_eff [B] = β f(gap) g(step): a tie (f(0) = 0) carries no gradient, and β halves over n1..n2 steps.

    f(gap) = 2σ(gap/τ) - 1 (= tanh(gap / 2τ)); g = 1 up to n1, 0.75 + 0.25 cos(π (step - n1) / (n2 - n1))
    up to n2, 0.5 after. `step` may be traced; cfg.use_gap / cfg.use_schedule = False set f / g to 1.
    """
    gap_B = jnp.asarray(reward_gap_B, jnp.float32)
    beta_B = jnp.full(gap_B.shape, beta, jnp.float32)
    if cfg.use_gap:
        beta_B = beta_B * (2.0 * jax.nn.sigmoid(gap_B / cfg.tau) - 1.0)
    if cfg.use_schedule:
        if cfg.n2 <= cfg.n1:
            raise ValueError(f"dynamic beta schedule needs n2 > n1, got n1={cfg.n1}, n2={cfg.n2}")
        frac = jnp.clip((jnp.asarray(step, jnp.float32) - cfg.n1) / (cfg.n2 - cfg.n1), 0.0, 1.0)
        beta_B = beta_B * (0.75 + 0.25 * jnp.cos(math.pi * frac))
    return beta_B


class PairInputs(NamedTuple):
    """Model inputs x_t and velocity targets x1 - x0 for the winner and the loser, each [B, I, C]."""

    xt_w: jax.Array
    xt_l: jax.Array
    target_w: jax.Array
    target_l: jax.Array


def make_pair_inputs(batch: Mapping[str, jax.Array], t_B: jax.Array, rng: jax.Array | None,
                     noise_mode: str) -> PairInputs:
    """x_t = (1 - t) x0 + t x1 and v = x1 - x0 for both images, with the same t for the pair.

    "recorded" (PNAPO): x1 is each image's own stored prior noise (batch x1_w / x1_l); `rng` is unused.
    "independent" (Diffusion-DPO / Flow-DPO): x1 is one Gaussian drawn from `rng`, shared by winner and loser.
    "independent_unshared": winner and loser each get their own Gaussian, from the two halves of `rng`'s split.
    """
    x0_w, x0_l = batch["x0_w"], batch["x0_l"]
    if noise_mode == "recorded":
        missing = [k for k in NOISE_KEYS if k not in batch]
        if missing:
            raise KeyError(f"noise_mode='recorded' (PNAPO) needs the recorded prior noises {missing} in the batch; "
                           "this data has none, so train with noise_mode='independent' (Diffusion-DPO baseline)")
        x1_w, x1_l = batch["x1_w"], batch["x1_l"]
    elif noise_mode in ("independent", "independent_unshared"):
        if rng is None:
            raise ValueError(f"noise_mode={noise_mode!r} draws a fresh noise each step: pass an rng key")
        if noise_mode == "independent":
            x1_w = x1_l = jax.random.normal(rng, x0_w.shape, jnp.float32)
        else:
            rng_w, rng_l = jax.random.split(rng)
            x1_w, x1_l = (jax.random.normal(k, x0_w.shape, jnp.float32) for k in (rng_w, rng_l))
    else:
        raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
    t_B = jnp.asarray(t_B, jnp.float32)
    return PairInputs(flow.interpolate(x0_w, x1_w, t_B), flow.interpolate(x0_l, x1_l, t_B),
                      flow.velocity_target(x0_w, x1_w), flow.velocity_target(x0_l, x1_l))


def stacked_inputs(pair: PairInputs, t_B: jax.Array, cond: Any) -> tuple[jax.Array, jax.Array, Any, jax.Array]:
    """(x_t [2B, I, C], t [2B], conditioning [2B, ...], target [2B, I, C]): winner rows, then loser rows, for one
    [2B] forward per model; `cond` is the pair's conditioning (a pytree of [B, ...] arrays)."""
    cat = lambda w, l: jnp.concatenate([w, l], axis=0)
    t_B = jnp.asarray(t_B, jnp.float32)
    return (cat(pair.xt_w, pair.xt_l), cat(t_B, t_B), jax.tree.map(lambda c: cat(c, c), cond),
            cat(pair.target_w, pair.target_l))


def velocity_errors(velocity: VelocityFn, params: Any, xt_2BxIxC: jax.Array, t_2B: jax.Array, cond_2B: Any,
                    target_2BxIxC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example mean squared velocity error (float32) of one [2B] forward, split into (winner, loser)."""
    v = velocity(params, xt_2BxIxC, t_2B, cond_2B).astype(jnp.float32)
    err_2B = jnp.mean(jnp.square(target_2BxIxC.astype(jnp.float32) - v), axis=tuple(range(1, v.ndim)))
    return tuple(jnp.split(err_2B, 2))


def _t_bucket_metrics(per_example: Mapping[str, jax.Array], t_B: jax.Array, num_buckets: int) -> Metrics:
    """Means of each [B] array per t bucket [k/n, (k+1)/n) as `{name}{k}` (0 when empty, never NaN), and the
    bucket counts as count/t_bucket_{k}."""
    bucket_B = flow.t_bucket(t_B, num_buckets)
    out = {}
    for k in range(num_buckets):
        mask_B = (bucket_B == k).astype(jnp.float32)
        count = mask_B.sum()
        out.update({f"{name}{k}": (x_B * mask_B).sum() / jnp.maximum(count, 1.0) for name, x_B in per_example.items()})
        out[f"count/t_bucket_{k}"] = count
    return out


def pair_loss(policy_params: Any, batch: Mapping[str, jax.Array], t_B: jax.Array, rng: jax.Array | None,
              step: jax.Array | int, *, policy_velocity: VelocityFn, ref_velocity: VelocityFn, ref_params: Any,
              cond: Any, cfg: Any, ref_errors: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, Metrics]:
    """The PNAPO loss of a batch of pairs and its metrics; differentiable in `policy_params` (first argument,
    for `jax.value_and_grad(pair_loss, has_aux=True)`).

    Winner and loser go through each model in one [2B] forward (winner rows first). The reference output is
    under stop_gradient. t_B [B] in [0, 1], rng feeds the independent noise, step the β schedule; `cond` is the
    pair's conditioning (a pytree of [B, ...] arrays, shared by winner and loser). `ref_errors` (winner, loser)
    [B], e.g. from the reference-error cache, replace the reference forward.
    """
    pair = make_pair_inputs(batch, t_B, rng, cfg.noise_mode)
    t_B = jnp.asarray(t_B, jnp.float32)
    inputs = stacked_inputs(pair, t_B, cond)  # built once for both models
    err_w_B, err_l_B = velocity_errors(policy_velocity, policy_params, *inputs)
    if ref_errors is None:
        ref_errors = velocity_errors(ref_velocity, ref_params, *inputs)
    ref_err_w_B, ref_err_l_B = jax.lax.stop_gradient(ref_errors)
    beta_B = dynamic_beta(cfg.beta, batch["reward_gap"], step, cfg)
    loss_B, metrics = preference_losses(err_w_B, err_l_B, ref_err_w_B, ref_err_l_B, beta_B, cfg.scale_convention,
                                        cfg.objective, cfg.sft_weight)
    # per t: where the loss falls, and whether by the winner's error going down or the loser's going up
    per_t = {"loss/t_bucket_": loss_B, "err/policy_w_t": err_w_B, "err/policy_l_t": err_l_B,
             "err/ref_w_t": ref_err_w_B, "err/ref_l_t": ref_err_l_B}
    return loss_B.mean(), {**metrics, **_t_bucket_metrics(per_t, t_B, cfg.num_t_buckets)}
