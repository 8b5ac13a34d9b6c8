"""The real jitted PNAPO step on FLUX.1-dev-shaped models with random weights, on whatever accelerator JAX finds.

Builds the model from configs/flux_tpu.py (TPU), configs/flux_gpu.py (GPU) or configs/flux_tpu.py with XLA
attention (CPU) with random weights (no download), runs `jit_steps(setup)[0]` (policy forward + backward
on winner and loser, frozen reference forward, AdamW) and prints, per run: the median step time, the step's
matmul FLOPs (`aot.matmul_flops` of the traced step: scan trips, remat recompute and the attention kernel
included), model FLOPs utilisation against the device's peak bf16 rate, and the peak device memory. Runs: the
full fine-tune on as many blocks as fit (all 57, halved on out-of-memory) and LoRA on all 57 blocks.

    python benchmarks/bench_accelerator.py                       # FLUX.1-dev width, 1024x1024, 1 pair per device
    python benchmarks/bench_accelerator.py --heads 1 --joint_dim 64 --image_hw 4,4 --text_len 8 --layers 1,1
        # a tiny width: what the tests run on CPU

The last stdout line is one JSON object {"device", "runs": [...]}.
"""

import argparse
import json
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np
from etils import epath

from pnapo_jax import aot
from pnapo_jax.setup import base_params, init_state, make_setup
from pnapo_jax.step import jit_steps

CONFIGS = epath.Path(__file__).parent.parent / "configs"
sys.path.insert(0, str(CONFIGS))
import flux_gpu  # noqa: E402
import flux_tpu  # noqa: E402

# Peak dense bf16 FLOP/s per device, by jax's device_kind (vendor data sheets); absent: MFU is not printed.
PEAK_BF16 = {"TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6e": 918e12, "TPU v6 lite": 918e12, "TPU v5 lite": 197e12,
             "TPU v5e": 197e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12,
             "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12}


def bench_config(args: argparse.Namespace, lora: bool, layers: tuple[int, int]) -> Any:
    """The accelerator's config at the requested shape; random weights (no `pretrained`)."""
    backend = jax.default_backend()
    c = (flux_gpu if backend == "gpu" else flux_tpu).get_config("lora" if lora else "")
    if backend not in ("tpu", "gpu"):
        c.model.attention_impl = "xla"
    c.model.pretrained = ""
    c.model.num_layers, c.model.num_single_layers = layers
    c.model.num_attention_heads = args.heads
    c.model.joint_attention_dim = args.joint_dim
    c.data.latent_h_tokens, c.data.latent_w_tokens = args.image_hw
    c.data.text_len = args.text_len
    c.train.global_batch_size = args.pairs_per_device * jax.device_count()
    c.train.grad_accum_steps = 1
    return c


def peak_memory_gib() -> float | None:
    """The largest peak_bytes_in_use over the devices, or None where the backend keeps no statistics (CPU)."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    peaks = [s["peak_bytes_in_use"] for s in stats if s and "peak_bytes_in_use" in s]
    return round(max(peaks) / 2**30, 2) if peaks else None


def run_step(config: Any, runs: int) -> dict[str, Any]:
    """Initialise on the devices, compile, warm up once, then time `runs` steps (each waited for)."""
    setup = make_setup(config)
    state, frozen = init_state(setup, base_params(setup))
    abstract = aot.abstract_batch(setup)
    rng = np.random.default_rng(0)
    batch = {k: jax.device_put(rng.standard_normal(s.shape).astype(np.float32), s.sharding)
             for k, s in abstract.items()}
    step = jit_steps(setup)[0]
    with setup.scope():
        flops = aot.matmul_flops(step.trace(state, frozen, batch).jaxpr.jaxpr)
        start = time.perf_counter()
        state, metrics = step(state, frozen, batch)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            state, metrics = step(state, frozen, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    peak = PEAK_BF16.get(jax.devices()[0].device_kind)
    return {"lora": setup.lora, "layers": [config.model.num_layers, config.model.num_single_layers],
            "attention_impl": config.model.attention_impl, "global_batch_pairs": config.train.global_batch_size,
            "image_tokens": setup.image_tokens, "text_len": config.data.text_len, "step_s": round(step_s, 4),
            "first_step_s": round(compile_s, 1), "flops_per_step": flops,
            "mfu": peak and round(flops / step_s / (peak * jax.device_count()), 3),
            "peak_memory_gib": peak_memory_gib(), "loss_finite": bool(np.isfinite(float(metrics["loss"])))}


def full_that_fits(args: argparse.Namespace) -> dict[str, Any]:
    """The full fine-tune on the requested blocks, halving both stacks while the device runs out of memory."""
    layers = args.layers
    while True:
        try:
            return run_step(bench_config(args, False, layers), args.runs)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e) or layers == (1, 1):
                raise
            print(f"full fine-tune with {layers} blocks is out of memory; halving", flush=True)
            layers = (max(1, layers[0] // 2), max(1, layers[1] // 2))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", type=int, default=24, help="attention heads of 128 (FLUX.1-dev: 24, width 3072)")
    p.add_argument("--joint_dim", type=int, default=4096, help="T5 width of the text input")
    p.add_argument("--image_hw", type=lambda s: tuple(int(x) for x in s.split(",")), default=(64, 64),
                   help="latent tokens h,w (64,64 = 1024x1024 images)")
    p.add_argument("--text_len", type=int, default=512)
    p.add_argument("--layers", type=lambda s: tuple(int(x) for x in s.split(",")), default=(19, 38),
                   help="double,single blocks of the full fine-tune (LoRA runs the same)")
    p.add_argument("--pairs_per_device", type=int, default=1)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--skip", choices=("full", "lora"), default=None)
    args = p.parse_args(argv)
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})"
    print(f"device: {device}", flush=True)
    runs = []
    if args.skip != "full":
        runs.append(full_that_fits(args))
    if args.skip != "lora":
        runs.append(run_step(bench_config(args, True, args.layers), args.runs))
    for r in runs:
        mfu = "n/a (no peak known for this device)" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"{'LoRA' if r['lora'] else 'full'} {r['layers']} blocks, {r['global_batch_pairs']} pairs, "
              f"{r['attention_impl']}: {r['step_s']} s/step, {r['flops_per_step']:.3g} FLOPs/step, MFU {mfu}, "
              f"peak memory {r['peak_memory_gib']} GiB", flush=True)
    report = {"device": device, "runs": runs}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
