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
from pnapo_jax.models import t5, vae
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


@pytest.mark.parametrize("name", ["v5p-6", "v4-8", "tpu", "v6e:2x", "v5p:2x2", "v6e:2x2x1", "v5p:0x2x2"])
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


@pytest.mark.slow  # two compiles: 26 CPU-s each, 125 s wall on the shared box at load 30
@needs_libtpu
def test_offload_moves_the_saved_block_inputs_to_host_memory():
    """remat_policy=offload lowers for TPU: the block inputs the backward pass needs (one double-stream and one
    single-stream layer, 4 images x (16 + 8) tokens x 32 features per chip, fp32 here) go to host memory."""
    reports = {policy: _cli("--topology=v5p-8", "--config.model.scan_layers=True",
                            f"--config.model.remat_policy={policy}") for policy in ("full", "offload")}
    (rc_full, full), (rc, offload) = reports["full"], reports["offload"]
    assert rc_full == rc == 0 and full["fits"] and offload["fits"]
    assert full["host_temporaries_per_chip_gib"] == 0
    saved = 2 * 4 * (16 + 8) * 32 * 4 / 2**30
    assert offload["host_temporaries_per_chip_gib"] >= saved
    assert full["hbm_peak_live_gib"] <= full["hbm_per_chip_gib"] + 0.01
    assert offload["flops_per_step"] == full["flops_per_step"]  # the same recompute, only the saves move


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


@pytest.mark.slow  # six compiles: 90 s on the shared 2-core box
@needs_libtpu
def test_pair_generation_compiles_for_v5p_8_with_the_splash_kernel(monkeypatch):
    # T5-XXL and FLUX's VAE at a small width (their full size compiles for minutes; the code path is the same)
    small_t5 = t5.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    small_vae = vae.VAEConfig(block_out_channels=(32, 32), latent_channels=16, use_quant_conv=False,
                              use_post_quant_conv=False)
    monkeypatch.setattr(aot, "GENERATION_T5", small_t5)
    monkeypatch.setattr(aot, "GENERATION_VAE", small_vae)
    config = tiny.get_config()
    config.model.attention_impl = "splash"
    config.generate.prompts_per_batch, config.generate.images_per_prompt, config.generate.num_steps = 2, 2, 3
    r = aot.analyze_generation(config, "v5p-8")
    assert r["fits"] and r["chips"] == 4 and r["num_steps"] == 3
    sampler, encoder, decoder = (r["programs"][k] for k in ("sampler", "t5_encoder", "vae_decode"))
    assert sampler["uses_splash"] and not encoder["uses_splash"]  # the config's kernel, as sampling.Sampler
    assert (sampler["batch"], sampler["chips"], encoder["batch"], encoder["images_per_call"], decoder["chips"]) == (
        4, 4, 2, 4, 1)
    # 3 Euler steps of one forward each on 4 images; T5's matmuls on 2 prompts x 8 tokens; the VAE's convs
    setup = make_setup(config, devices=aot.tpu_devices("v5p:2x2x1"))
    assert sampler["flops_per_call"] == 3 * 4 * aot.forward_flops_per_image(setup)
    t5_flops = jax.jit(lambda p, i: t5.T5Encoder(small_t5).apply({"params": p}, i)).lower(
        t5.init_params(small_t5, jax.random.key(0)), jnp.zeros((2, 8), jnp.int32)).cost_analysis()["flops"]
    assert encoder["flops_per_call"] == pytest.approx(t5_flops, rel=0.2)  # XLA also counts elementwise ops
    params = vae.init_params(small_vae, jax.random.key(0))
    z = jnp.zeros((4, 16, 8, 8))
    vae_flops = jax.jit(lambda p, z: vae.decode(p, small_vae, z)).lower(params, z).cost_analysis()["flops"]
    assert decoder["flops_per_call"] == pytest.approx(vae_flops, rel=0.2)
    for p in (sampler, encoder, decoder):
        assert p["hbm_per_chip_at_twice_the_batch_gib"] >= p["hbm_per_chip_gib"]
        assert p["images_per_s_upper_bound"] > 0 and p["compile_error"] is None
    assert 1 / r["images_per_s_upper_bound"] == pytest.approx(
        sum(p["seconds_per_call_lower_bound"] / p["images_per_call"] for p in (sampler, encoder, decoder)), rel=0.01)


@pytest.mark.parametrize("args, message", [
    (["--generation", "--find_max_batch"], "error: --find_max_batch searches the train step's batch"),
    (["--generation_batch=8"], "error: --generation_batch=8: must be >= 0, and goes with --generation"),
    (["--generation", "--generation_batch=6"], "error: --generation_batch=6 must divide by the data x fsdp chips (4)"),
])
def test_cli_refuses_bad_generation_flags_in_one_line(args, message):
    if "--generation_batch=6" in args and importlib.util.find_spec("libtpu") is None:
        pytest.skip("the batch is checked against the slice, which needs libtpu")
    cmd = [sys.executable, "-m", "pnapo_jax.aot", f"--config={ROOT / 'configs' / 'tiny.py'}", "--topology=v5p-8",
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    last = proc.stderr.strip().splitlines()[-1]  # libtpu, where it loads, warns on stderr before
    assert proc.returncode == 1 and last.startswith(message), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
