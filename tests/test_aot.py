"""pnapo_jax.aot: TPU type names, the FLOP count, the batch search, and the CLI compiling the tiny config's real
train step for a TPU slice through libtpu (those tests skip only where libtpu is not installed)."""

import importlib.util
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from etils import epath

from pnapo_jax import aot
from pnapo_jax.errors import UserError
from pnapo_jax.setup import make_setup

ROOT = epath.Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "configs"))
import tiny  # noqa: E402

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")


@pytest.mark.parametrize("name, desc, chips", [
    ("v5p-8", "v5p:2x2x1", 4), ("v5p-16", "v5p:2x2x2", 8), ("v5p-64", "v5p:2x4x4", 32), ("v6e-8", "v6e:2x4", 8),
    ("v6e-64", "v6e:8x8", 64), ("v5e-16", "v5e:4x4", 16), ("v5litepod-64", "v5e:8x8", 64),
    ("v5p:2x2x4", "v5p:2x2x4", 16)])
def test_topology_names(name, desc, chips):
    assert aot.resolve_topology(name)[2:] == (desc, chips)


@pytest.mark.parametrize("name", ["v5p-6", "v4-8", "tpu", "v6e:2x"])
def test_unknown_topology_names_are_refused(name):
    with pytest.raises(UserError, match="v5p-8"):
        aot.resolve_topology(name)


def test_matmul_flops_count_scan_trips_and_remat_recompute():
    w, x = jnp.ones((8, 8)), jnp.ones((4, 8))
    layer = 2 * 4 * 8 * 8

    def loss(w):
        body = lambda c, _: (jax.checkpoint(lambda c: jnp.tanh(c @ w))(c), None)
        return jax.lax.scan(body, x, None, length=5)[0].sum()

    assert aot.matmul_flops(jax.make_jaxpr(loss)(w).jaxpr) == 5 * layer
    # forward, its recompute in the backward pass, and the two backward matmuls (dx, dw)
    assert aot.matmul_flops(jax.make_jaxpr(jax.grad(loss))(w).jaxpr) == 4 * 5 * layer


def test_forward_flops_do_not_depend_on_scanning():
    flops = {}
    for scan in (True, False):
        config = tiny.get_config()
        config.model.scan_layers = scan
        flops[scan] = aot.forward_flops_per_image(make_setup(config))
    assert flops[True] == flops[False] > 0


def test_find_max_batch_doubles_then_bisects(monkeypatch):
    probes = []

    def fake_analyze(config, topology, hbm_gib):
        probes.append(config.train.global_batch_size)
        return {"fits": config.train.global_batch_size <= 40, "global_batch_size": config.train.global_batch_size}

    monkeypatch.setattr(aot, "analyze", fake_analyze)
    config = tiny.get_config()
    config.train.grad_accum_steps = 2
    report = aot.find_max_batch(config, "v5p-8")  # unit: 4 chips x 2 micro-batches
    assert probes == [8, 16, 32, 64, 48, 40]
    assert report["max_global_batch_size"] == report["global_batch_size"] == 40
    probes.clear()
    monkeypatch.setattr(aot, "analyze", lambda c, t, h: probes.append(1) or {"fits": False})
    assert aot.find_max_batch(config, "v5p-8")["max_global_batch_size"] == 0 and len(probes) == 1


def _cli(*args: str) -> tuple[int, dict]:
    cmd = [sys.executable, "-m", "pnapo_jax.aot", f"--config={ROOT / 'configs' / 'tiny.py'}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.stdout, proc.stderr[-3000:]
    return proc.returncode, json.loads(proc.stdout.splitlines()[-1])


def test_cli_reports_a_mistyped_override_in_one_line():
    cmd = [sys.executable, "-m", "pnapo_jax.aot", f"--config={ROOT / 'configs' / 'tiny.py'}", "--topology=v5p-8",
           "--config.train.global_batch_sise=8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "error: unknown config field 'global_batch_sise' (did you mean 'global_batch_size'?) in --config.* overrides")


@needs_libtpu
def test_cli_compiles_the_tiny_step_for_v5p_8():
    rc, r = _cli("--topology=v5p-8")
    assert rc == 0 and r["fits"] and r["compile_error"] is None
    assert (r["topology_desc"], r["chips"], r["mesh"]) == ("v5p:2x2x1", 4, {"data": 1, "fsdp": 4, "tensor": 1})
    assert r["global_batch_size"] == 8 and r["hbm_capacity_gib"] == 95.0
    assert r["hbm_per_chip_gib"] == pytest.approx(sum(r["hbm_breakdown_gib"].values()), abs=0.03)
    assert r["xla_cost_analysis_flops_per_step"] > 0
    # policy forward + backward (2 forwards' worth) and the reference forward, on 2B images; no remat here
    assert 3.5 < r["flops_per_step"] / (2 * 8 * r["forward_flops_per_image"]) <= 4
    assert r["step_time_lower_bound_s"] == pytest.approx(r["flops_per_step"] / 4 / 459e12, rel=0.01)


@needs_libtpu
def test_cli_exits_nonzero_when_the_step_does_not_fit():
    # 4096 image tokens x 64 images per v5e chip: XLA runs out of HBM for the attention temporaries at once
    rc, r = _cli("--topology=v5e-4", "--config.data.latent_h_tokens=64", "--config.data.latent_w_tokens=64",
                 "--config.train.global_batch_size=256")
    assert rc == 1 and not r["fits"] and "RESOURCE_EXHAUSTED" in r["compile_error"]
    assert r["hbm_per_chip_gib"] > r["hbm_capacity_gib"] == 16.0 and r["chips"] == 4


@needs_libtpu
def test_cli_exits_nonzero_when_arguments_and_temporaries_outgrow_the_hbm():
    # XLA checks only temporaries against the HBM; the total is ours to check
    rc, r = _cli("--topology=v5p-8", "--hbm_gib=0.01")
    assert rc == 1 and not r["fits"] and r["compile_error"] is None and r["hbm_per_chip_gib"] > 0.01
