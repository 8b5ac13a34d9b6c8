"""Train-step time and per-device memory as the (fake-device) FSDP mesh grows, plus the FLUX.1-dev AOT compile.

For each model (configs/tiny.py, and the 36.5M-parameter FLUX-shaped model of bench_train_step.py) and each
device count N in --devices, a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N (the device
count is fixed per process) builds the real train step (`jit_steps`, mesh fsdp=N: weights, optimizer
state and the frozen reference sharded on their embed axis, the batch split N ways) and reports its compile
time, XLA's per-device memory analysis (arguments, temporaries, outputs not aliased to donated inputs) and the
median step time, wall and process CPU (all devices' threads). All N fake devices share this machine's cores:
the step times show what partitioning costs (collectives, smaller matmuls), not a speed-up. The models use
configs/tiny.py's CPU compute options (head-major attention, Dense input barriers). Last, the FLUX.1-dev train
step (configs/flux_tpu.py) is compiled ahead of time for a TPU slice (`python -m pnapo_jax.aot`, which needs
the `aot` extra) and its JSON line and wall time reported.

    python benchmarks/bench_scaling.py [--devices 1,2,4,8] [--models tiny,36m] [--runs 3] [--no-aot]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from machine import load

MiB = 2**20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLUX_36M = dict(in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=8,
                joint_attention_dim=256, pooled_projection_dim=128, guidance_embeds=True,
                axes_dims_rope=[16, 24, 24])  # bench_train_step.py's model


def make_config(name: str) -> Any:
    """tiny: configs/tiny.py as the tests train it; 36m: bench_train_step.py's model, 256 image + 64 text
    tokens. Both: global batch 8 pairs (so that 8 devices get one pair each), fsdp over all devices."""
    sys.path.insert(0, REPO)
    from configs import tiny

    c = tiny.get_config()
    if name == "36m":
        for k, v in FLUX_36M.items():
            c.model[k] = v
        c.data.latent_h_tokens, c.data.latent_w_tokens, c.data.text_len = 16, 16, 64
        c.pnapo.beta = 2000.0
    elif name != "tiny":
        raise ValueError(f"unknown model {name!r}: tiny or 36m")
    c.train.global_batch_size = 8
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return c


def worker(name: str, runs: int) -> dict[str, Any]:
    """Runs in the subprocess: one model on all (fake) devices; returns the figures."""
    import jax
    import numpy as np

    from pnapo_jax import sharding
    from pnapo_jax.data.pipeline import batch_keys
    from pnapo_jax.setup import base_params, init_state, make_setup
    from pnapo_jax.step import jit_steps

    config = make_config(name)
    setup = make_setup(config)
    state, frozen = init_state(setup, base_params(setup))
    m, d, b = config.model, config.data, config.train.global_batch_size
    image, text = (setup.image_tokens, m.in_channels), (d.text_len, m.joint_attention_dim)
    shapes = {"x0_w": image, "x0_l": image, "x1_w": image, "x1_l": image, "prompt_embeds": text,
              "pooled_prompt_embeds": (m.pooled_projection_dim,), "reward_w": (), "reward_l": (), "reward_gap": ()}
    rng = np.random.default_rng(0)
    batch = {k: rng.standard_normal((b, *shapes[k])).astype(np.float32) for k in batch_keys(config.pnapo.noise_mode)}
    batch["reward_gap"] = np.abs(batch["reward_gap"])
    batch = jax.device_put(batch, sharding.batch_sharding(setup.mesh))
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))

    start = time.perf_counter()
    with setup.scope():
        compiled = jit_steps(setup)[0].lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - start
    ma = compiled.memory_analysis()
    for _ in range(2):  # warm-up
        state, metrics = jax.block_until_ready(compiled(state, frozen, batch))
    times, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        state, metrics = jax.block_until_ready(compiled(state, frozen, batch))
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"model": name, "devices": jax.device_count(), "mesh": dict(setup.mesh.shape), "params": n_params,
            "global_batch": b, "compile_s": compile_s, "step_s": statistics.median(times),
            "cpu_s": statistics.median(cpu),
            "argument_bytes": ma.argument_size_in_bytes, "temp_bytes": ma.temp_size_in_bytes,
            "output_bytes": ma.output_size_in_bytes - ma.alias_size_in_bytes, "alias_bytes": ma.alias_size_in_bytes,
            "loss": float(metrics["loss"])}


def run_worker(name: str, devices: int, runs: int) -> dict[str, Any]:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--runs", str(runs)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{name} on {devices} devices failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def aot(args: argparse.Namespace) -> None:
    """Compile time of the FLUX.1-dev train step for a TPU slice, by pnapo_jax.aot."""
    cmd = [sys.executable, "-m", "pnapo_jax.aot", f"--config={args.aot_config}", f"--topology={args.aot_topology}",
           *args.aot_args.split()]
    print(f"\nFLUX.1-dev AOT compile: {' '.join(cmd[1:])} (load before: {load()})", flush=True)
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.aot_timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        print(f"  gave up after {args.aot_timeout} s (--aot_timeout)")
        return
    wall = time.perf_counter() - start
    lines = out.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("{"):
        print(f"  failed (exit {out.returncode}) after {wall:.0f} s:\n{out.stderr[-2000:]}")
        return
    report = json.loads(lines[-1])
    print(f"  wall {wall:.0f} s (process, incl. imports and tracing), compile_s {report.get('compile_s')} "
          f"(trace + lower + compile), exit {out.returncode} ({'fits' if report.get('fits') else 'does not fit'});"
          f" load after: {load()}")
    if len(lines) > 1:
        print(f"  summary: {lines[-2]}")
    print(f"  JSON: {lines[-1]}")


def main(args: argparse.Namespace) -> None:
    devices = [int(n) for n in args.devices.split(",")]
    print(f"train step vs fake-device FSDP mesh (XLA_FLAGS=--xla_force_host_platform_device_count=N, one "
          f"subprocess per N), CPU fp32, {os.cpu_count()} cores shared by all N devices, {args.runs} timed steps "
          f"after 2 warm-up; memory per device from compiled.memory_analysis()")
    header = (f"{'model':<6}{'params':>8}{'batch':>6}{'N':>3}{'mesh (d,f,t)':>14}{'compile s':>10}{'step s':>8}"
              f"{'CPU s':>7}{'args MiB':>10}{'temp MiB':>10}{'out MiB':>9}{'args x N':>9}{'loss':>9}  load")
    print(header)
    for name in filter(None, args.models.split(",")):
        for n in devices:
            r = run_worker(name, n, args.runs)
            mesh = ",".join(str(v) for v in r["mesh"].values())
            print(f"{name:<6}{r['params'] / 1e6:>7.2f}M{r['global_batch']:>6}{n:>3}{mesh:>14}{r['compile_s']:>10.1f}"
                  f"{r['step_s']:>8.3f}{r['cpu_s']:>7.2f}{r['argument_bytes'] / MiB:>10.2f}"
                  f"{r['temp_bytes'] / MiB:>10.2f}{r['output_bytes'] / MiB:>9.2f}"
                  f"{n * r['argument_bytes'] / MiB:>9.1f}{r['loss']:>9.5f}  {load()}", flush=True)
    if args.aot:
        aot(args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="1,2,4,8", help="comma-separated fake device counts")
    parser.add_argument("--models", default="tiny,36m", help="comma-separated: tiny, 36m ('': AOT only)")
    parser.add_argument("--runs", type=int, default=3, help="timed steps per configuration (median reported)")
    parser.add_argument("--aot", action=argparse.BooleanOptionalAction, default=True,
                        help="also time `python -m pnapo_jax.aot` on the FLUX.1-dev config")
    parser.add_argument("--aot_config", default="configs/flux_tpu.py")
    parser.add_argument("--aot_topology", default="v5p-8")
    parser.add_argument("--aot_args", default="", help="more pnapo_jax.aot flags, e.g. "
                        "'--config.train.global_batch_size=4'")
    parser.add_argument("--aot_timeout", type=int, default=1200, help="seconds before the AOT compile is abandoned")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.runs)))
    else:
        main(args)
