"""Our jitted Euler sampler vs FluxPipeline's denoising loop (torch transformer + FlowMatchEulerDiscreteScheduler).

Same small FLUX-shaped transformer (~34M params, 128-dim heads), 256 image tokens, 64 text tokens, batch 1,
28 steps, CPU fp32. Runs alternate between the two so that machine noise hits both alike; the table gives the
median of each. Compilation is excluded from the steady-state figure and printed separately.

    python benchmarks/bench_sampling.py [--runs 5]
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flux_testing import params_from_torch, random_inputs, torch_flux  # noqa: E402
from machine import describe, load  # noqa: E402
from test_flow import diffusers_euler  # noqa: E402

from pnapo_jax import flow  # noqa: E402
from pnapo_jax.models import flux  # noqa: E402

MODEL = dict(in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128, num_attention_heads=4,
             joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
STEPS, GUIDANCE, LATENT_TOKENS_HW, TXT_LEN = 28, 3.5, (16, 16), 64


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(runs: int) -> None:
    model = torch_flux(seed=0, **MODEL)
    cfg = flux.FluxConfig.from_diffusers(dict(model.config))
    params = params_from_torch(model, cfg)
    x = random_inputs(cfg, 1, *LATENT_TOKENS_HW, TXT_LEN)
    args = (x["hidden_states"], x["encoder_hidden_states"], x["pooled_projections"], STEPS, GUIDANCE,
            x["img_ids"], x["txt_ids"])
    ours_args = (flux.Velocity(cfg, *LATENT_TOKENS_HW), {"params": params}, x["hidden_states"],
                 flux.conditioning(x["encoder_hidden_states"], x["pooled_projections"], GUIDANCE), STEPS)
    ours = lambda: jax.block_until_ready(flow.euler_sample(*ours_args))
    theirs = lambda: diffusers_euler(model, *(a if np.isscalar(a) else torch.from_numpy(a) for a in args))[-1]

    load_before = load()
    trace_s, lowered = _timed(lambda: flow.euler_sample.lower(*ours_args))
    compile_s, _ = _timed(lowered.compile)
    out_ours, out_theirs = ours(), theirs()  # warm-up; the jit call reuses the executable compiled above
    times = {"jax (ours, jit)": [], "diffusers loop (torch)": []}
    for _ in range(runs):
        times["jax (ours, jit)"].append(_timed(ours)[0])
        times["diffusers loop (torch)"].append(_timed(theirs)[0])
    med = {k: statistics.median(v) for k, v in times.items()}

    n_params = sum(p.numel() for p in model.parameters())
    print(f"FLUX-shaped transformer {n_params / 1e6:.1f}M params, {np.prod(LATENT_TOKENS_HW)} image + {TXT_LEN} "
          f"text tokens, batch 1, {STEPS} Euler steps, CPU fp32 ({jax.devices()[0].device_kind}, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cores), {runs} interleaved runs")
    print(f"machine: {describe()}")
    print(f"load average (1/5/15 min) before / after (other processes skew CPU timings): {load_before} / {load()}")
    print(f"{'sampler':<24}{'median s':>10}{'ms/step':>10}{'min s':>10}{'max s':>10}")
    for k, v in times.items():
        print(f"{k:<24}{med[k]:>10.3f}{1000 * med[k] / STEPS:>10.1f}{min(v):>10.3f}{max(v):>10.3f}")
    print(f"ratio torch / jax (median): {med['diffusers loop (torch)'] / med['jax (ours, jit)']:.2f}x")
    print(f"jax compile, excluded above: trace + lower {trace_s:.2f} s, XLA compile {compile_s:.2f} s")
    err = np.abs(np.asarray(out_ours) - out_theirs).max() / np.abs(out_theirs).max()
    print(f"final latents agree: max |diff| / max |ref| = {err:.1e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    main(parser.parse_args().runs)
