"""Pretrain the world's base model with the rectified-flow objective on clean renderings of TRAIN prompts.

    python -m pnapo_jax.world.pretrain --out=pnapo_jax/assets/demo_base --steps=1400
    python -m pnapo_jax.world.pretrain --backbone=sd3 --out=pnapo_jax/assets/demo_base_sd3 --steps=STEPS

The model is `demo_base.demo_model_config(--backbone)`, trained through the backbone's interface (init, velocity,
conditioning), so the same loop pretrains a FLUX or an SD3 base.

x_t = (1 - t) x0 + t x1 with x0 a rendering's latent, x1 ~ N(0, I), logit-normal t, target x1 - x0, AdamW
with warmup and cosine decay. Every random choice (init, prompts, rendering seeds, noise, t) derives from
--seed, so the same flags give the same weights on the same machine (XLA's CPU kernels are deterministic;
another CPU, XLA version or change to the model code may differ). Only pretrain.json's timing varies.
"""

import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import linen as nn

from pnapo_jax import backbones, cli, flow
from pnapo_jax.errors import UserError
from pnapo_jax.flow import VelocityFn
from pnapo_jax.world import demo_base, grammar, latents, render, text
from pnapo_jax.world.demo_base import ModelConfig

T_SAMPLER = {"kind": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0}


def make_optimizer(lr: float, steps: int) -> optax.GradientTransformation:
    warmup = min(100, steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr / 10)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))


def data_batch(rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
    """Clean latents of random (train prompt, seed) renderings and their prompt embeddings."""
    train = grammar.prompts("train")
    texts = [train[i] for i in rng.integers(len(train), size=batch)]
    x0 = latents.encode(render.render(texts, rng.integers(2**31, size=batch)))
    embeds, pooled = text.encode_prompts(texts)
    return {"x0": x0, "embeds": embeds, "pooled": pooled}


@functools.partial(jax.jit, static_argnames=("velocity", "conditioning", "tx"),
                   donate_argnames=("params", "opt_state"))
def train_step(velocity: VelocityFn, conditioning: Callable, tx: optax.GradientTransformation, params: Any,
               opt_state: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[Any, Any, jax.Array]:
    """One AdamW step on the mean squared velocity error of the backbone's `velocity` (with its `conditioning` of
    the batch's embeddings, no guidance input). x1 is the batch's "x1" when it has one (a coupling, as reflow
    trains on), else fresh N(0, I) noise independent of x0."""
    x0 = batch["x0"]
    noise_key, t_key = jax.random.split(rng)
    x1 = batch["x1"] if "x1" in batch else jax.random.normal(noise_key, x0.shape)
    t_B = flow.sample_t(t_key, x0.shape[0], **T_SAMPLER)
    cond = conditioning(batch["embeds"], batch["pooled"], None)

    def loss_fn(p):
        v = velocity({"params": p}, flow.interpolate(x0, x1, t_B), t_B, cond)
        return jnp.mean((v - flow.velocity_target(x0, x1)) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def fit(cfg: ModelConfig, params: Any, next_batch: Callable[[], dict[str, np.ndarray]], steps: int, lr: float,
        seed: int, log_every: int = 50) -> tuple[Any, dict[str, Any]]:
    """`steps` of `train_step` from `params` on batches from `next_batch`; (params, final loss and seconds)."""
    backbone, tx = backbones.BACKBONES[cfg.backbone], make_optimizer(lr, steps)
    velocity = backbone.velocity(cfg, latents.LATENT_H_TOKENS, latents.LATENT_W_TOKENS)
    opt_state = tx.init(params)
    step_key = jax.random.key(seed + 1)
    start, losses = time.time(), []
    for step in range(steps):
        params, opt_state, loss = train_step(velocity, backbone.conditioning, tx, params, opt_state, next_batch(),
                                             jax.random.fold_in(step_key, step))
        losses.append(float(loss))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"step {step + 1}/{steps}  loss {np.mean(losses[-log_every:]):.4f}  "
                  f"{time.time() - start:.0f}s", flush=True)
    return params, {"final_loss": float(np.mean(losses[-log_every:])), "seconds": round(time.time() - start)}


def pretrain(cfg: ModelConfig, steps: int, batch: int, lr: float, seed: int, log_every: int = 50
             ) -> tuple[Any, dict[str, Any]]:
    """Trained params and a record of how they were made."""
    params = nn.meta.unbox(backbones.BACKBONES[cfg.backbone].init(cfg, jax.random.key(seed)))["params"]
    data_rng = np.random.default_rng(seed)
    params, fit_info = fit(cfg, params, lambda: data_batch(data_rng, batch), steps, lr, seed, log_every)
    return params, {"backbone": cfg.backbone, "steps": steps, "batch": batch, "lr": lr, "seed": seed,
                    "t_sampler": T_SAMPLER, **fit_info}


def _main(argv: list[str]) -> None:
    f = flags.FLAGS
    for name in ("steps", "batch", "log_every"):
        if f[name].value < 1:
            raise UserError(f"--{name}={f[name].value}: must be >= 1")
    cfg = demo_base.demo_model_config(f.backbone)
    out = f.out or str(demo_base.BASES[f.backbone])
    params, info = pretrain(cfg, f.steps, f.batch, f.lr, f.seed, f.log_every)
    demo_base.save_base(out, cfg, params, info)
    print(f"wrote {out}", flush=True)


def run() -> None:
    flags.DEFINE_enum("backbone", "flux", list(backbones.BACKBONES), "The base model's family.")
    flags.DEFINE_string("out", None, "Output folder (a diffusers transformer folder); default: the backbone's "
                        "shipped base (demo_base.BASES).")
    flags.DEFINE_integer("steps", 1400, "Training steps.")
    flags.DEFINE_integer("batch", 16, "Renderings per step.")
    flags.DEFINE_float("lr", 1e-3, "Peak AdamW learning rate.")
    flags.DEFINE_integer("seed", 0, "Seeds init, data and noise.")
    flags.DEFINE_integer("log_every", 50, "Steps between loss lines.")
    cli.run(_main)


if __name__ == "__main__":
    run()
