"""Compile the real PNAPO train step ahead of time for a Cloud TPU topology on any machine with libtpu (no TPU):
per-chip HBM, FLOPs per step, a step-time lower bound, and the largest global batch that fits.

    python -m pnapo_jax.aot --config=configs/flux_tpu.py --topology=v5p-8
    python -m pnapo_jax.aot --config=configs/flux_tpu.py:lora --topology=v6e-8 --find_max_batch
    python -m pnapo_jax.aot --config=configs/flux_tpu.py --topology=v5p-16 --config.train.global_batch_size=32

The step is `step.jit_steps(setup)[0]` traced on abstract inputs with training's shardings, so what fits here
is what `pnapo_jax.main` runs. The last stdout line is one JSON object; the exit status is 1 when the step does
not fit. Needs libtpu (`pip install .[aot]`, or `.[tpu]`); runs on the CPU backend (JAX_PLATFORMS=cpu unless set).
"""

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

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from jax.experimental import topologies
from jax.extend import core as jcore
from ml_collections import config_flags

from pnapo_jax import cli, sharding
from pnapo_jax.data.batch import REWARD_KEYS
from pnapo_jax.data.pipeline import batch_keys
from pnapo_jax.errors import UserError
from pnapo_jax.setup import Setup, make_setup
from pnapo_jax.step import jit_steps

GiB = 2**30
_GRIDS_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8"}  # the slice shapes Cloud TPU (and MaxText's accelerator_to_spec_map) use


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation: its per-chip HBM and peak bf16 rate, and how Cloud's accelerator types count it."""

    hbm_gib: float
    peak_bf16_flops: float
    cores_per_chip: int  # the N of Cloud's "v5p-N" counts TensorCores: 2 per v5p chip, 1 per v5e / v6e chip
    grids: dict[int, str]  # chips -> topology


CHIPS = {"v5p": Chip(95.0, 459e12, 2, _GRIDS_3D), "v6e": Chip(32.0, 918e12, 1, _GRIDS_2D),
         "v5e": Chip(16.0, 197e12, 1, _GRIDS_2D)}
_ALIASES = {"v5litepod": "v5e"}


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
        return gen, CHIPS[gen], f"{gen}:{m[2]}", math.prod(int(d) for d in m[2].split("x"))
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
    return {k: jax.ShapeDtypeStruct((c.train.global_batch_size, *trailing[k]), jnp.float32, sharding=sh)
            for k in batch_keys(c.pnapo.noise_mode)}


def matmul_flops(jaxpr: jcore.Jaxpr) -> int:
    """Matmul FLOPs of a jaxpr with every scan body times its trip count (XLA's cost_analysis counts it once).
    The backward pass's remat recompute is part of the jaxpr, so it is counted too; elementwise ops are not.
    A Pallas kernel (splash attention) counts its body's matmuls once per point of its grid, a shard_map body
    once per shard of the mesh axes its inputs are split over (replicated work is counted once)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
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
    return {
        "topology": topology, "topology_desc": desc, "chip": gen, "chips": chips, "mesh": dict(setup.mesh.shape),
        "global_batch_size": config.train.global_batch_size, "grad_accum_steps": config.train.grad_accum_steps,
        "lora": setup.lora, "image_tokens": setup.image_tokens,
        "fits": compiled is not None and total <= capacity,
        "hbm_per_chip_gib": total and round(total, 2), "hbm_capacity_gib": capacity,
        "hbm_breakdown_gib": {k: v and round(v, 2) for k, v in hbm.items()},
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


def summary(r: dict[str, Any]) -> str:
    hbm = ", ".join(f"{k} {v}" for k, v in r["hbm_breakdown_gib"].items())
    verdict = "fits" if r["fits"] else "does NOT fit"
    return (f"{r['topology']} ({r['chips']} chips, mesh {r['mesh']}), global batch {r['global_batch_size']}: "
            f"HBM/chip {r['hbm_per_chip_gib']} of {r['hbm_capacity_gib']} GiB ({hbm}) {verdict}; "
            f"{r['flops_per_step']:.3g} FLOPs/step -> >= {r['step_time_lower_bound_s']} s/step at peak bf16; "
            + (f"XLA: {r['compile_error']}" if r["compile_error"] else f"compiled in {r['compile_s']} s"))


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "Cloud TPU type (v5p-8, v6e-16, v5e-64) or a slice (v5p:2x2x1).")
_FIND = flags.DEFINE_bool("find_max_batch", False, "Search the largest global batch that fits.")
_HBM = flags.DEFINE_float("hbm_gib", None, "Per-chip HBM to fit into, GiB (default: the chip's).")
flags.mark_flags_as_required(["config", "topology"])


def main(argv: list[str]) -> None:
    if _HBM.value is not None and _HBM.value <= 0:
        raise UserError(f"--hbm_gib={_HBM.value}: must be > 0")
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")  # the local backend only traces; a local TPU stays free
    show = lambda r: print(summary(r), flush=True)
    if _FIND.value:
        report = find_max_batch(_CONFIG.value, _TOPOLOGY.value, _HBM.value, log=show)
        print(f"largest global batch that fits: {report['max_global_batch_size']}")
    else:
        report = analyze(_CONFIG.value, _TOPOLOGY.value, _HBM.value)
        show(report)
    print(json.dumps(report))
    sys.exit(0 if report["fits"] else 1)


if __name__ == "__main__":
    cli.run(main)
