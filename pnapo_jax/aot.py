"""Compile the real PNAPO train step ahead of time for a Cloud TPU topology on any machine with libtpu (no TPU):
per-chip HBM, FLOPs per step, a step-time lower bound, and the largest global batch that fits.

    python -m pnapo_jax.aot --config=configs/flux_tpu.py --topology=v5p-8
    python -m pnapo_jax.aot --config=configs/flux_tpu.py:lora --topology=v6e-8 --find_max_batch
    python -m pnapo_jax.aot --config=configs/flux_tpu.py --topology=v5p-16 --config.train.global_batch_size=32
    python -m pnapo_jax.aot --config=configs/flux_tpu.py --topology=v5p-8 --generation   # sampler, T5, VAE

The step is `step.jit_steps(setup)[0]` traced on abstract inputs with training's shardings, so what fits here
is what `pnapo_jax.main` runs. The last stdout line is one JSON object; the exit status is 1 when the step does
not fit. Needs libtpu (`pip install .[aot]`, or `.[tpu]`); runs on the CPU backend (JAX_PLATFORMS=cpu unless set).
"""

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from jax.experimental import topologies
from jax.extend import core as jcore
from ml_collections import config_flags

from pnapo_jax import cli, flow, sharding
from pnapo_jax.data.batch import REF_CACHE_KEYS, REWARD_KEYS
from pnapo_jax.data.pipeline import batch_keys
from pnapo_jax.errors import UserError
from pnapo_jax.models import t5, vae
from pnapo_jax.pipeline_world import DECODE_BATCH_CHUNK
from pnapo_jax.setup import Setup, make_setup
from pnapo_jax.step import jit_steps

GiB = 2**30
_GRIDS_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8"}  # the slice shapes Cloud TPU (and MaxText's accelerator_to_spec_map) use


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation: its per-chip HBM, peak bf16 rate and HBM bandwidth, and how Cloud's accelerator types
    count it."""

    hbm_gib: float
    peak_bf16_flops: float
    hbm_bytes_per_s: float
    cores_per_chip: int  # the N of Cloud's "v5p-N" counts TensorCores: 2 per v5p chip, 1 per v5e / v6e chip
    grids: dict[int, str]  # chips -> topology


CHIPS = {"v5p": Chip(95.0, 459e12, 2.765e12, 2, _GRIDS_3D), "v6e": Chip(32.0, 918e12, 1.64e12, 1, _GRIDS_2D),
         "v5e": Chip(16.0, 197e12, 0.819e12, 1, _GRIDS_2D)}
_ALIASES = {"v5litepod": "v5e"}
GENERATION_T5 = t5.T5Config()  # google/t5-v1_1-xxl, FLUX.1's text_encoder_2 (no pipeline folder is read)
GENERATION_VAE = vae.FLUX_VAE


def resolve_topology(name: str) -> tuple[str, Chip, str, int]:
    """'v5p-8' (Cloud accelerator type) or 'v5p:2x2x1' -> (generation, chip, get_topology_desc name, chips)."""
    if m := re.fullmatch(r"(\w+)-(\d+)", name):
        gen = _ALIASES.get(m[1], m[1])
        chip = CHIPS.get(gen)
        chips = int(m[2]) // chip.cores_per_chip if chip else 0
        if not chip or chips not in chip.grids:
            known = [f"{g}-{n * c.cores_per_chip}" for g, c in CHIPS.items() for n in c.grids]
            raise UserError(f"--topology: unknown TPU type {name!r}; known: {', '.join(known)}")
        return gen, chip, f"{gen}:{chip.grids[chips]}", chips
    if (m := re.fullmatch(r"(\w+):(\d+(?:x\d+)+)", name)) and _ALIASES.get(m[1], m[1]) in CHIPS:
        gen = _ALIASES.get(m[1], m[1])
        dims, example = [int(d) for d in m[2].split("x")], next(iter(CHIPS[gen].grids.values()))
        if len(dims) != len(example.split("x")) or min(dims) < 1:  # libtpu does not refuse it (ran > 150 s)
            raise UserError(f"--topology={name}: a {gen} slice has {len(example.split('x'))} dimensions, each >= 1 "
                            f"(e.g. {gen}:{example}); or give a Cloud TPU type such as v5p-8")
        return gen, CHIPS[gen], f"{gen}:{m[2]}", math.prod(dims)
    raise UserError(f"--topology must look like v5p-8, v6e-16, v5e-64 or v5p:2x2x1, got {name!r}")


def tpu_devices(desc_name: str) -> list:
    """Compile-only devices of a TPU slice (libtpu's topology description; no TPU needed)."""
    if importlib.util.find_spec("libtpu") is None:
        raise UserError("the AOT check compiles with libtpu, which is not installed: pip install -e '.[aot]'")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # else a second process (a job, a test) is refused
    return topologies.get_topology_desc(platform="tpu", topology_name=desc_name).devices


def abstract_batch(setup: Setup) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the loader feeds (pnapo_jax/data/batch.py), batch-sharded as in training."""
    c = setup.config
    trailing = {**setup.record_spec.array_shapes(), **dict.fromkeys(REWARD_KEYS, ())}
    sh = sharding.batch_sharding(setup.mesh)
    if c.pnapo.ref_cache:  # the cached reference errors at every grid t (pnapo_jax/ref_cache.py)
        trailing.update(dict.fromkeys(REF_CACHE_KEYS, (c.t_sampling.grid_size,)))
    keys = batch_keys(c.pnapo.noise_mode) + (REF_CACHE_KEYS if c.pnapo.ref_cache else ())
    return {k: jax.ShapeDtypeStruct((c.train.global_batch_size, *trailing[k]), jnp.float32, sharding=sh)
            for k in keys}


def matmul_flops(jaxpr: jcore.Jaxpr) -> int:
    """Matmul FLOPs of a jaxpr with every scan body times its trip count (XLA's cost_analysis counts it once).
    The backward pass's remat recompute is part of the jaxpr, so it is counted too; elementwise ops are not.
    A Pallas kernel (splash attention) counts its body's matmuls once per point of its grid, a shard_map body
    once per shard of the mesh axes its inputs are split over (replicated work is counted once). Convolutions
    (the VAE's) count as the matmuls they are."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
        elif eqn.primitive.name == "conv_general_dilated":  # each output: (kernel size x input features) MACs
            rhs = eqn.invars[1].aval.shape
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // out_features
        subs = [matmul_flops(j) for j in jcore.jaxprs_in_params(eqn.params)]
        if subs and eqn.primitive.name == "cond":
            total += max(subs)
        elif subs and eqn.primitive.name == "pallas_call":  # a kernel body runs once per grid point
            total += sum(subs) * math.prod(eqn.params["grid_mapping"].grid)
        elif subs and eqn.primitive.name == "shard_map":  # once per shard of the axes its inputs are split over
            split = {a for spec in eqn.params["in_specs"] for axes in spec for a in
                     ((axes,) if isinstance(axes, str) else axes or ())}
            total += sum(subs) * math.prod(eqn.params["mesh"].shape[a] for a in split)
        elif subs:
            total += sum(subs) * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
    return total


def forward_flops_per_image(setup: Setup) -> int:
    """Matmul FLOPs of one transformer forward on one image (the unit the step's count is a multiple of)."""
    d = setup.config.data
    inputs = setup.backbone.dummy_inputs(setup.model_cfg, d.latent_h_tokens, d.latent_w_tokens, d.text_len, 1)
    with setup.scope():
        jaxpr = jax.make_jaxpr(setup.velocity)(setup.abstract_variables, *inputs)
    return matmul_flops(jaxpr.jaxpr)


def _per_chip_bytes(tree: Any) -> int:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _hbm(compile_fn: Callable[[], Any], args: tuple) -> tuple[Any, dict[str, float | None], str | None]:
    """(compiled or None, per-chip GiB by kind, XLA's out-of-memory message or None)."""
    try:
        compiled = compile_fn()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        message = str(e).strip().splitlines()[0]
        temps = re.search(r"HLO temporaries \(([\d.]+)G\)", message)  # XLA:TPU writes GiB as "G"
        return None, {"arguments": _per_chip_bytes(args) / GiB, "temporaries": temps and float(temps[1])}, message
    ma = compiled.memory_analysis()
    sizes = {"arguments": ma.argument_size_in_bytes, "temporaries": ma.temp_size_in_bytes,
             "outputs": ma.output_size_in_bytes - ma.alias_size_in_bytes, "code": ma.generated_code_size_in_bytes}
    return compiled, {k: v / GiB for k, v in sizes.items()}, None


def analyze(config: ml_collections.ConfigDict, topology: str, hbm_gib: float | None = None) -> dict[str, Any]:
    """Compile the train step of `config` for `topology`; the figures as a JSON-able dict."""
    gen, chip, desc, chips = resolve_topology(topology)
    capacity = chip.hbm_gib if hbm_gib is None else hbm_gib
    setup = make_setup(config, devices=tpu_devices(desc))
    args = (setup.abstract_state, setup.abstract_frozen, abstract_batch(setup))
    start = time.perf_counter()
    with setup.scope():
        traced = jit_steps(setup)[0].trace(*args)
    compiled, hbm, oom = _hbm(lambda: traced.lower().compile(), args)
    compile_s = time.perf_counter() - start
    total = None if None in hbm.values() else sum(hbm.values())
    flops = matmul_flops(traced.jaxpr.jaxpr)
    xla_flops = compiled.cost_analysis().get("flops", 0.0) * chips if compiled else None  # per chip in XLA
    ma = compiled and compiled.memory_analysis()
    return {
        "topology": topology, "topology_desc": desc, "chip": gen, "chips": chips, "mesh": dict(setup.mesh.shape),
        "global_batch_size": config.train.global_batch_size, "grad_accum_steps": config.train.grad_accum_steps,
        "lora": setup.lora, "image_tokens": setup.image_tokens,
        "fits": compiled is not None and total <= capacity,
        "hbm_per_chip_gib": total and round(total, 2), "hbm_capacity_gib": capacity,
        "hbm_breakdown_gib": {k: v and round(v, 2) for k, v in hbm.items()},
        # what is live at once at XLA's peak (arguments included): the temporaries above are the allocation
        # the compiled program reserves, which is larger on TPU; host memory: remat_policy="offload"'s saves
        "hbm_peak_live_gib": ma and round(ma.peak_memory_in_bytes / GiB, 2),
        "host_temporaries_per_chip_gib": ma and float(f"{ma.host_temp_size_in_bytes / GiB:.3g}"),
        "flops_per_step": flops,
        "flops_source": "jaxpr matmul count: scan trip counts and remat recompute included (used for the bound)",
        "xla_cost_analysis_flops_per_step": xla_flops,  # counts each scanned block once: shown, not used
        "forward_flops_per_image": forward_flops_per_image(setup),
        "peak_bf16_flops_per_chip": chip.peak_bf16_flops,
        "step_time_lower_bound_s": float(f"{flops / (chips * chip.peak_bf16_flops):.3g}"),
        "compile_s": round(compile_s, 1), "compile_error": oom,
    }


def batch_unit(config: ml_collections.ConfigDict, topology: str) -> int:
    """The global batch step: data-parallel devices x grad_accum_steps, so every micro-batch splits evenly."""
    data, fsdp, _ = sharding.mesh_shape(config.mesh, resolve_topology(topology)[3])
    return data * fsdp * config.train.grad_accum_steps


def find_max_batch(config: ml_collections.ConfigDict, topology: str, hbm_gib: float | None = None,
                   log: Callable[[dict[str, Any]], None] = lambda r: None) -> dict[str, Any]:
    """The report at the largest global batch that fits (doubling, then bisection over multiples of
    `batch_unit`), with "max_global_batch_size" (0 and the smallest batch's report when none fits)."""
    unit = batch_unit(config, topology)

    def probe(multiple: int) -> dict[str, Any]:
        c = config.copy_and_resolve_references()
        c.train.global_batch_size = multiple * unit
        report = analyze(c, topology, hbm_gib)
        log(report)
        return report

    best = probe(1)
    lo, hi = (1, 2) if best["fits"] else (0, 1)
    while lo and (report := probe(hi))["fits"]:
        best, lo, hi = report, hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        report = probe(mid)
        best, lo, hi = (report, mid, hi) if report["fits"] else (best, lo, mid)
    return {**best, "max_global_batch_size": lo * unit}


def _generation_programs(config: ml_collections.ConfigDict, setup: Setup
                         ) -> dict[str, Callable[[int], tuple[Any, tuple, int, int, Callable]]]:
    """Pair generation's programs as pnapo_jax.generate runs them, each as batch -> (jitted fn, abstract args,
    batch, images the call serves, the context to trace it in): the sampler (config.generate.num_steps Euler
    steps of the FLUX transformer in its param_dtype, FSDP over the slice, as sampling.Sampler) and T5-XXL's
    encoder and FLUX's VAE decode in config.model.dtype on one chip, as pipeline_world runs them (T5 per prompt;
    K = images_per_prompt images each)."""
    gen, d, dtype = config.generate, config.data, jnp.dtype(config.model.dtype).name
    one_chip = jax.sharding.NamedSharding(jax.sharding.Mesh(setup.mesh.devices.flat[:1], ("one",)),
                                          jax.sharding.PartitionSpec())
    on_chip = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_chip), tree)
    t5_cfg = dataclasses.replace(GENERATION_T5, dtype=dtype, param_dtype=dtype)
    vae_cfg = dataclasses.replace(GENERATION_VAE, dtype=dtype, param_dtype=dtype)

    def sampler(batch: int) -> tuple[Any, tuple, int, int, Callable]:
        sh = sharding.batch_sharding(setup.mesh)
        arg = lambda *shape: jax.ShapeDtypeStruct((batch, *shape), jnp.float32, sharding=sh)
        spec = setup.record_spec  # the latents and prompt embeddings a record holds: what the sampler takes
        args = ({"params": setup.abstract_variables["params"]}, arg(spec.image_tokens, spec.channels),
                arg(spec.text_len, spec.text_dim), arg(spec.pooled_dim))
        run = lambda v, x, e, p: flow.euler_sample(setup.velocity, v, x, setup.backbone.conditioning(
            e, p, gen.guidance_scale), gen.num_steps, mu=gen.shift_mu)
        return jax.jit(run), args, batch, batch, setup.scope  # the mesh: splash runs per device (shard_map)

    def t5_encoder(batch: int) -> tuple[Any, tuple, int, int, Callable]:
        params = on_chip(nn.meta.unbox(jax.eval_shape(lambda: t5.init_params(t5_cfg, jax.random.key(0)))))
        ids = jax.ShapeDtypeStruct((batch, d.text_len), jnp.int32, sharding=one_chip)
        encode = lambda p, i: t5.T5Encoder(t5_cfg).apply({"params": p}, i)
        return jax.jit(encode), (params, ids), batch, batch * gen.images_per_prompt, contextlib.nullcontext

    def vae_decode(batch: int) -> tuple[Any, tuple, int, int, Callable]:
        params = on_chip(nn.meta.unbox(jax.eval_shape(lambda: vae.init_params(vae_cfg, jax.random.key(0)))))
        z = jax.ShapeDtypeStruct((batch, vae_cfg.latent_channels, 2 * d.latent_h_tokens, 2 * d.latent_w_tokens),
                                 jnp.float32, sharding=one_chip)
        run = lambda p, z: vae.decode(p, vae_cfg, z, batch_chunk=DECODE_BATCH_CHUNK)
        return jax.jit(run), (params, z), batch, batch, contextlib.nullcontext

    return {"sampler": sampler, "t5_encoder": t5_encoder, "vae_decode": vae_decode}


def _generation_report(name: str, builds: list[tuple[Any, tuple, int, int, Callable]], setup: Setup, chip: Chip,
                       capacity: float, chips: int) -> dict[str, Any]:
    """One generation program compiled at a batch and at twice it (`builds`): its figures at the first."""
    compiled = []
    for fn, args, _, _, scope in builds:
        start = time.perf_counter()
        with scope():
            traced = fn.trace(*args)
        compiled.append((traced, *_hbm(traced.lower().compile, args), time.perf_counter() - start))
    (traced, _, hbm, oom, compile_s), (_, _, hbm2, _, _) = compiled
    (_, args, batch, images, _), (_, _, batch2, _, _) = builds
    flops = matmul_flops(traced.jaxpr.jaxpr)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(args[0]))  # all read on each chip
    reads = setup.config.generate.num_steps if name == "sampler" else 1  # the weights, once per forward
    seconds = max(flops / (chips * chip.peak_bf16_flops), reads * weight_bytes / chip.hbm_bytes_per_s)
    total, total2 = (None if None in h.values() else sum(h.values()) for h in (hbm, hbm2))
    per_element = None if None in (total, total2) else (total2 - total) / (batch2 - batch)  # GiB per element
    return {"batch": batch, "images_per_call": images, "chips": chips, "fits": oom is None and total <= capacity,
            "hbm_per_chip_gib": total and round(total, 2),
            "hbm_breakdown_gib": {k: v and round(v, 2) for k, v in hbm.items()},
            "hbm_per_chip_at_twice_the_batch_gib": total2 and round(total2, 2),
            # linear in the batch between the two compiles; None where HBM does not grow with it (chunked)
            "max_batch_estimate": (None if per_element is None or per_element <= 1e-6 else
                                   max(0, int(batch + (capacity - total) / per_element))),
            "flops_per_call": flops, "weight_bytes": weight_bytes,
            "seconds_per_call_lower_bound": float(f"{seconds:.3g}"),
            "images_per_s_upper_bound": float(f"{images / seconds:.3g}"),
            "uses_splash": "pallas_call" in str(traced.jaxpr), "compile_s": round(compile_s, 1),
            "compile_error": oom}


def analyze_generation(config: ml_collections.ConfigDict, topology: str, hbm_gib: float | None = None,
                       batch: int = 0, log: Callable[[str, dict[str, Any]], None] = lambda n, r: None
                       ) -> dict[str, Any]:
    """Compile pair generation's programs for `topology` at `batch` images (default: prompts_per_batch x
    images_per_prompt; T5 gets batch / images_per_prompt prompts) and at twice that: per-chip HBM, FLOPs, the
    largest batch extrapolated from the two compiles' temporaries, and a roofline bound in images/s (an
    estimate: peak bf16 FLOPs, and every weight read from HBM once per call). The sampler runs on every chip;
    T5 and the VAE on one, as generate runs them today (the others idle meanwhile). `log(name, report)` is
    called as each program's compiles finish."""
    generation, chip, desc, chips = resolve_topology(topology)
    capacity = chip.hbm_gib if hbm_gib is None else hbm_gib
    setup = make_setup(config, devices=tpu_devices(desc))
    gen = config.generate
    data_parallel = setup.mesh.shape["data"] * setup.mesh.shape["fsdp"]
    unit = math.lcm(data_parallel, gen.images_per_prompt)
    batch = batch or -(-gen.prompts_per_batch * gen.images_per_prompt // unit) * unit
    if batch % unit:
        raise UserError(f"--generation_batch={batch} must divide by the data x fsdp chips ({data_parallel}) and by "
                        f"config.generate.images_per_prompt ({gen.images_per_prompt})")
    reports = {}
    for name, build in _generation_programs(config, setup).items():
        per_call = batch // gen.images_per_prompt if name == "t5_encoder" else batch
        reports[name] = _generation_report(name, [build(b) for b in (per_call, 2 * per_call)], setup, chip,
                                           capacity, chips if name == "sampler" else 1)
        if name == "sampler" and reports[name]["max_batch_estimate"]:  # whole batch shards
            reports[name]["max_batch_estimate"] -= reports[name]["max_batch_estimate"] % data_parallel
        log(name, reports[name])
    per_image_s = sum(r["seconds_per_call_lower_bound"] / r["images_per_call"] for r in reports.values())
    return {"topology": topology, "topology_desc": desc, "chip": generation, "chips": chips,
            "mesh": dict(setup.mesh.shape), "hbm_capacity_gib": capacity, "image_tokens": setup.image_tokens,
            "num_steps": gen.num_steps, "images_per_prompt": gen.images_per_prompt, "programs": reports,
            "fits": all(r["fits"] for r in reports.values()),
            "images_per_s_upper_bound": float(f"{1 / per_image_s:.3g}"),
            "bound": "roofline estimate: peak bf16 FLOPs and HBM bandwidth, programs run one after another"}


def summary(r: dict[str, Any]) -> str:
    hbm = ", ".join(f"{k} {v}" for k, v in r["hbm_breakdown_gib"].items())
    verdict = "fits" if r["fits"] else "does NOT fit"
    return (f"{r['topology']} ({r['chips']} chips, mesh {r['mesh']}), global batch {r['global_batch_size']}: "
            f"HBM/chip {r['hbm_per_chip_gib']} of {r['hbm_capacity_gib']} GiB ({hbm}) {verdict}; "
            f"{r['flops_per_step']:.3g} FLOPs/step -> >= {r['step_time_lower_bound_s']} s/step at peak bf16; "
            + (f"XLA: {r['compile_error']}" if r["compile_error"] else f"compiled in {r['compile_s']} s"))


def generation_summary(name: str, r: dict[str, Any]) -> str:
    hbm = ", ".join(f"{k} {v}" for k, v in r["hbm_breakdown_gib"].items())
    return (f"{name} on {r['chips']} chip(s), batch {r['batch']}: HBM/chip {r['hbm_per_chip_gib']} GiB ({hbm}) "
            f"{'fits' if r['fits'] else 'does NOT fit'}, largest batch ~{r['max_batch_estimate']}; "
            f"{r['flops_per_call']:.3g} FLOPs -> <= {r['images_per_s_upper_bound']} images/s (roofline estimate); "
            + (f"XLA: {r['compile_error']}" if r["compile_error"] else f"compiled in {r['compile_s']} s"))


def main(argv: list[str]) -> None:
    f = flags.FLAGS
    if f.hbm_gib is not None and f.hbm_gib <= 0:
        raise UserError(f"--hbm_gib={f.hbm_gib}: must be > 0")
    if f.generation_batch < 0 or (f.generation_batch and not f.generation):
        raise UserError(f"--generation_batch={f.generation_batch}: must be >= 0, and goes with --generation")
    if f.generation and f.find_max_batch:
        raise UserError("--find_max_batch searches the train step's batch; --generation estimates its programs' "
                        "largest batches from two compiles each: pass one of them")
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")  # the local backend only traces; a local TPU stays free
    show = lambda r: print(summary(r), flush=True)
    if f.generation:
        report = analyze_generation(f.config, f.topology, f.hbm_gib, f.generation_batch,
                                    log=lambda name, r: print(generation_summary(name, r), flush=True))
        print(f"pair generation: <= {report['images_per_s_upper_bound']} images/s on {f.topology} "
              "(roofline estimate, the programs one after another)")
    elif f.find_max_batch:
        report = find_max_batch(f.config, f.topology, f.hbm_gib, log=show)
        print(f"largest global batch that fits: {report['max_global_batch_size']}")
    else:
        report = analyze(f.config, f.topology, f.hbm_gib)
        show(report)
    print(json.dumps(report))
    sys.exit(0 if report["fits"] else 1)


def run() -> None:
    """The command; flags are defined here, not at import (every command does so)."""
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).", lock_config=True)
    flags.DEFINE_string("topology", None, "Cloud TPU type (v5p-8, v6e-16, v5e-64) or a slice (v5p:2x2x1).")
    flags.DEFINE_bool("find_max_batch", False, "Search the largest global batch that fits.")
    flags.DEFINE_float("hbm_gib", None, "Per-chip HBM to fit into, GiB (default: the chip's).")
    flags.DEFINE_bool("generation", False, "Compile pair generation (the sampler, T5-XXL's encoder, the VAE "
                      "decode) instead of the train step.")
    flags.DEFINE_integer("generation_batch", 0, "Images per sampler call with --generation (0: "
                         "generate.prompts_per_batch x images_per_prompt, rounded up to the chips).")
    flags.mark_flags_as_required(["config", "topology"])
    cli.run(main)


if __name__ == "__main__":
    run()
