"""Step time with and without the reference-error cache (pnapo_jax/ref_cache.py) on the demo model, CPU fp32.

The uncached step runs the policy forward + backward and the frozen reference's forward on [w; l]; the cached one
reads the reference's errors from the batch (3 model passes instead of 4). Both are configs/demo_cpu.py's step
(the shipped base, 16 pairs) with t on a grid, timed run by run in turn after warm-up (bench_train_step's
`interleaved`), medians of wall and process CPU seconds.

    python benchmarks/bench_ref_cache.py [--runs 15] [--batch 16]
"""

import argparse
import importlib.util
import os
import statistics
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench_train_step import _load, _med, interleaved  # noqa: E402
from machine import describe  # noqa: E402

from pnapo_jax.data.batch import REF_CACHE_KEYS, REWARD_KEYS  # noqa: E402
from pnapo_jax.data.pipeline import batch_keys  # noqa: E402
from pnapo_jax.setup import base_params, init_state, make_setup  # noqa: E402
from pnapo_jax.step import jit_steps  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def demo_config(cached: bool, batch: int):
    spec = importlib.util.spec_from_file_location("demo_cpu", ROOT / "configs" / "demo_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.t_sampling.kind, c.t_sampling.grid_size = "grid", 8
    c.pnapo.ref_cache = cached
    c.train.global_batch_size = batch
    return c


def random_batch(setup, cached: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of the demo's record shapes (values do not change the step's cost)."""
    rng = np.random.default_rng(seed)
    c = setup.config
    trailing = {**setup.record_spec.array_shapes(), **dict.fromkeys(REWARD_KEYS, ())}
    if cached:
        trailing.update(dict.fromkeys(REF_CACHE_KEYS, (c.t_sampling.grid_size,)))
    keys = batch_keys(c.pnapo.noise_mode) + (REF_CACHE_KEYS if cached else ())
    batch = {k: rng.standard_normal((c.train.global_batch_size, *trailing[k])).astype(np.float32) for k in keys}
    batch["reward_gap"] = np.abs(batch["reward_gap"])
    for k in REF_CACHE_KEYS if cached else ():
        batch[k] = np.abs(batch[k])
    return batch


class Stepper:
    """One jitted train step of a config, called again and again on its own (donated) state."""

    def __init__(self, cached: bool, batch: int):
        self.setup = make_setup(demo_config(cached, batch), jax.devices()[:1])
        self.state, self.frozen = init_state(self.setup, base_params(self.setup))
        self.batch = random_batch(self.setup, cached)
        self.step_fn, _ = jit_steps(self.setup)

    def __call__(self) -> None:
        with self.setup.scope():
            self.state, metrics = self.step_fn(self.state, self.frozen, self.batch)
        jax.block_until_ready(metrics)


def main(args: argparse.Namespace) -> None:
    print(describe())
    print(f"load before: {_load()}")
    steps = {"uncached (reference forward)": Stepper(False, args.batch), "cached": Stepper(True, args.batch)}
    times = interleaved(steps, args.runs, args.warmup)
    print(f"load after: {_load()}; {args.runs} runs each, {args.batch} pairs a step")
    print("| step | wall s (median) | CPU s (median) |\n|---|---|---|")
    for k, t in times.items():
        print(f"| {k} | {_med(t, 0):.4f} | {_med(t, 1):.4f} |")
    (_, u), (_, c) = times.items()
    ratio = lambda i: statistics.median(a[i] / b[i] for a, b in zip(c, u, strict=True))
    print(f"cached / uncached, median of per-run ratios: wall {ratio(0):.3f}, CPU {ratio(1):.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    main(parser.parse_args())
