"""The optimizer update alone: optax's clip + AdamW + apply_if_finite chain vs pnapo_jax.fused_adamw, CPU fp32.

The parameters of bench_train_step.py's 36.5M-parameter FLUX-shaped model (140 arrays), random gradients, the
update plus `apply_updates` and the step's grad_norm metric jitted with the params and state donated, as the
train step does. The two alternate run by run; medians of wall and process CPU seconds, and of the per-run ratio.

    python benchmarks/bench_optimizer.py [--runs 9]
"""

import argparse
import os
import statistics
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from bench_train_step import GRAD_CLIP, IMG_HW, LR, MODEL, TXT_LEN, WEIGHT_DECAY, _load, _med, interleaved  # noqa: E402
from machine import describe  # noqa: E402

from pnapo_jax import fused_adamw  # noqa: E402
from pnapo_jax.backbones import flux as backbone_flux  # noqa: E402
from pnapo_jax.config import defaults  # noqa: E402
from pnapo_jax.models.flux import FluxTransformer, dummy_inputs  # noqa: E402


def param_shapes() -> Any:
    """The benchmark model's parameter shapes (ShapeDtypeStructs)."""
    c = defaults()
    for k, v in MODEL.items():
        c.model[k] = list(v) if isinstance(v, tuple) else v
    cfg = backbone_flux.model_config(c)
    inputs = dummy_inputs(cfg, 1, IMG_HW[0] * IMG_HW[1], TXT_LEN)
    variables = jax.eval_shape(lambda: FluxTransformer(cfg).init(jax.random.PRNGKey(0), **inputs))
    return nn.meta.unbox(variables["params"])


def runner(tx: optax.GradientTransformation, shapes: Any, grads: Any, seed: int):
    """A callable doing one donated update, keeping its own params and state."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32)), shapes)
    box = [params, tx.init(params)]

    def update(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, optax.tree.norm(g)

    step = jax.jit(update, donate_argnums=(0, 1))

    def run():
        box[0], box[1], _ = jax.block_until_ready(step(box[0], box[1], grads))
    return run


def main(args: argparse.Namespace) -> None:
    shapes = param_shapes()
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * 1e-3), shapes)
    lr = optax.constant_schedule(LR)
    kw = dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP)
    fns = {"optax chain": runner(fused_adamw.reference(lr, **kw), shapes, grads, 1),
           "fused_adamw": runner(fused_adamw.clip_adamw(lr, **kw), shapes, grads, 1)}
    times = interleaved(fns, args.runs, 2)
    print(f"optimizer update alone | {n / 1e6:.1f}M params in {len(jax.tree.leaves(shapes))} arrays | "
          f"clip {GRAD_CLIP} + AdamW (wd {WEIGHT_DECAY}) + skip-if-not-finite\nmachine: {describe()}")
    print(f"{'':<14}{'wall s':>8}{'CPU s':>8}{'fused/this wall':>17}{'CPU':>6}")
    for name, t in times.items():
        ratio = [statistics.median(a[i] / b[i] for a, b in zip(times["fused_adamw"], t, strict=True)) for i in (0, 1)]
        print(f"{name:<14}{_med(t, 0):>8.3f}{_med(t, 1):>8.3f}{ratio[0]:>17.2f}{ratio[1]:>6.2f}")
    print(f"{args.runs} interleaved runs after 2 warm-up; load average (1/5/15 min) after: {_load()} "
          f"on {os.cpu_count()} cores")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    main(parser.parse_args())
