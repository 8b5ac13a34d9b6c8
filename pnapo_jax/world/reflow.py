"""Reflow the world's base model once: fine-tune it on its own noise-to-sample couplings, for straighter paths.

    python -m pnapo_jax.world.reflow --out=pnapo_jax/assets/demo_base_reflow     # as shipped; 13 min on 2 busy cores

Coupling j is train prompt j mod 135 and noise x1_j = `flow.seeded_noise(seed, j)`, paired with the base's
ODE sample x0_j from that noise (Euler, --num_steps, FluxPipeline schedule). The base is then trained with
pretrain's rectified-flow step on x_t = (1 - t) x0_j + t x1_j with target x1_j - x0_j (Liu et al., "Flow
Straight and Fast"): where the base's paths cross, the couplings' straight lines average into a field whose
paths bend less. Everything derives from --seed; reflow.json beside the weights records the run.
"""

import pathlib
import time
from typing import Any

import numpy as np
from absl import flags

from pnapo_jax import cli
from pnapo_jax.errors import UserError
from pnapo_jax.world import demo_base, grammar, pretrain, text
from pnapo_jax.world.demo_base import ModelConfig

REFLOW_INFO = "reflow.json"


def couplings(cfg: ModelConfig, params: Any, pairs: int, seed: int, num_steps: int, batch: int = 64
              ) -> dict[str, np.ndarray]:
    """The base's couplings: x1 (noise) and x0 (its ODE sample) [pairs, I, C], with the prompt embeddings."""
    train = grammar.prompts("train")
    prompts = [train[j % len(train)] for j in range(pairs)]
    x1, x0 = demo_base.sample_seeded(cfg, params, prompts, np.arange(pairs), seed, num_steps, batch=batch)
    embeds, pooled = text.encode_prompts(prompts)
    return {"x0": x0, "x1": x1, "embeds": embeds, "pooled": pooled}


def reflow(cfg: ModelConfig, params: Any, pairs: int, steps: int, batch: int, lr: float, seed: int, num_steps: int,
           log_every: int = 50) -> tuple[Any, dict[str, Any]]:
    """Reflowed params and a record of how they were made."""
    start = time.time()
    data = couplings(cfg, params, pairs, seed, num_steps)
    seconds_couplings = round(time.time() - start)
    print(f"{pairs} couplings in {seconds_couplings}s", flush=True)
    data_rng = np.random.default_rng(seed)

    def next_batch() -> dict[str, np.ndarray]:
        idx = data_rng.integers(pairs, size=batch)
        return {k: v[idx] for k, v in data.items()}

    params, fit_info = pretrain.fit(cfg, params, next_batch, steps, lr, seed, log_every)
    info = {"pairs": pairs, "coupling_prompts": "grammar.prompts('train')[j % 135]",
            "coupling_noise": "flow.seeded_noise(seed, j)", "coupling_num_steps": num_steps, "steps": steps,
            "batch": batch, "lr": lr, "seed": seed, "t_sampler": pretrain.T_SAMPLER,
            "seconds_couplings": seconds_couplings, **fit_info}
    return params, info


def _main(argv: list[str]) -> None:
    f = flags.FLAGS
    if not pathlib.Path(f.base).is_dir():
        raise UserError(f"--base={f.base} is not a folder (a diffusers transformer folder)")
    for name in ("pairs", "num_steps", "steps", "batch", "log_every"):
        if f[name].value < 1:
            raise UserError(f"--{name}={f[name].value}: must be >= 1")
    cfg, params = demo_base.load_base(f.base)
    params, info = reflow(cfg, params, f.pairs, f.steps, f.batch, f.lr, f.seed, f.num_steps, f.log_every)
    name = demo_base.MODEL_ID if f.base == str(demo_base.DEFAULT_BASE) else f.base
    demo_base.save_base(f.out, cfg, params, {"base": name, **info}, info_name=REFLOW_INFO)
    print(f"wrote {f.out}", flush=True)


def run() -> None:
    flags.DEFINE_string("base", str(demo_base.DEFAULT_BASE), "The model to reflow (a diffusers transformer folder).")
    flags.DEFINE_string("out", None, "Output folder (a diffusers transformer folder).", required=True)
    flags.DEFINE_integer("pairs", 540, "Couplings (4 noises per train prompt).")
    flags.DEFINE_integer("num_steps", 16, "Euler steps of the couplings' ODE samples (the world's sampling setting).")
    flags.DEFINE_integer("steps", 120, "Training steps.")
    flags.DEFINE_integer("batch", 32, "Couplings per step.")
    flags.DEFINE_float("lr", 2e-4, "Peak AdamW learning rate.")
    flags.DEFINE_integer("seed", 0, "Seeds the couplings' noises, the batches and t.")
    flags.DEFINE_integer("log_every", 50, "Steps between loss lines.")
    cli.run(_main)


if __name__ == "__main__":
    run()
