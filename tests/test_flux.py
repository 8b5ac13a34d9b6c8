"""The Flax FLUX transformer against diffusers' FluxTransformer2DModel (torch, CPU, fp32)."""

import dataclasses
import re

import jax
import numpy as np
import pytest
from flux_testing import TINY, params_from_torch, random_inputs, torch_flux, torch_forward, unscan_params

from pnapo_jax.models import flux

CASES = {
    "guidance": dict(),
    "no_guidance": dict(guidance_embeds=False),
    "deeper_wider_heads": dict(num_layers=3, num_single_layers=1, attention_head_dim=32,
                               num_attention_heads=3, axes_dims_rope=(8, 12, 12)),
    "single_only": dict(num_layers=0, num_single_layers=3, in_channels=16),
    "out_channels": dict(out_channels=4, patch_size=2),
}
# How to compute it: the default, and the CPU configs' options (configs/tiny.py, configs/demo_cpu.py).
CPU_FAST = dict(attention_impl="head_major", dense_input_barrier=True)
# The TPU kernel (configs/flux_tpu.py), interpreted: sequence lengths far below one 128-token block get padded.
SPLASH = dict(attention_impl="splash_interpret", attention_block=128)


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name,compute", [*((n, {}) for n in CASES), ("guidance", CPU_FAST),
                                          ("deeper_wider_heads", CPU_FAST), ("guidance", SPLASH),
                                          ("single_only", SPLASH)])
@pytest.mark.parametrize("shape", [(2, 4, 4, 8), (3, 3, 5, 7)])
def test_matches_diffusers(name, compute, shape):
    batch, h, w, txt = shape
    model = torch_flux(seed=1, **CASES[name])
    cfg = flux.FluxConfig.from_diffusers(dict(model.config), **compute)
    params = params_from_torch(model, cfg)
    inputs = random_inputs(cfg, batch, h, w, txt, seed=2)
    ours = np.asarray(jax.jit(flux.FluxTransformer(cfg).apply)({"params": params}, **inputs))
    ref = torch_forward(model, inputs)
    assert ours.shape == ref.shape
    assert _rel_err(ours, ref) <= 1e-4, _rel_err(ours, ref)


def test_diffusers_config_round_trip_leaves_compute_options_out():
    cfg = flux.FluxConfig.from_diffusers(TINY, **CPU_FAST)
    exported = cfg.to_diffusers()
    assert set(exported) == {"_class_name", *flux.DIFFUSERS_FIELDS}
    assert flux.FluxConfig.from_diffusers(exported) == flux.FluxConfig.from_diffusers(TINY)


def test_batched_ids_equal_shared_ids():
    cfg = flux.FluxConfig.from_diffusers(TINY)
    params = params_from_torch(torch_flux(), cfg)
    inputs = random_inputs(cfg, 2, 4, 4, 8)
    model = flux.FluxTransformer(cfg)
    a = model.apply({"params": params}, **inputs)
    batched = dict(inputs, img_ids=np.broadcast_to(inputs["img_ids"], (2, 16, 3)),
                   txt_ids=np.broadcast_to(inputs["txt_ids"], (2, 8, 3)))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(model.apply({"params": params}, **batched)))


def test_guidance_required_when_embedded():
    cfg = flux.FluxConfig.from_diffusers(TINY)
    inputs = random_inputs(cfg, 1, 2, 2, 4)
    del inputs["guidance"]
    with pytest.raises(ValueError, match="guidance"):
        flux.FluxTransformer(cfg).init(jax.random.key(0), **inputs)


@pytest.mark.parametrize("variant", [dict(scan_layers=True), dict(remat_policy="full"),
                                     dict(remat_policy="save_named", scan_layers=True), CPU_FAST,
                                     dict(CPU_FAST, remat_policy="save_named", scan_layers=True),
                                     dict(remat_policy="offload", scan_layers=True), dict(remat_policy="offload"),
                                     pytest.param(dict(SPLASH, remat_policy="save_named", scan_layers=True),
                                                  marks=pytest.mark.slow)])  # ~2 min interpreted, idle box
def test_scan_and_remat_equal_plain(variant):
    cfg = flux.FluxConfig.from_diffusers(TINY)
    params = params_from_torch(torch_flux(), cfg)
    inputs = random_inputs(cfg, 2, 4, 4, 8)
    vcfg = dataclasses.replace(cfg, **variant)
    vparams = flux.scan_params(params, cfg) if vcfg.scan_layers else params

    def loss(p, c):
        return (flux.FluxTransformer(c).apply({"params": p}, **inputs) ** 2).mean()

    l0, g0 = jax.value_and_grad(loss)(params, cfg)
    l1, g1 = jax.value_and_grad(loss)(vparams, vcfg)
    if vcfg.scan_layers:
        g1 = unscan_params(g1, cfg)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max() + 1e-12), g1, g0)


def test_offload_keeps_block_inputs_on_host(capsys):
    """remat_policy="offload" saves each scanned block's input (the carry) in host memory, not in device memory:
    the backward pass's residuals stacked over the layers are the block inputs, all host-resident."""
    cfg = flux.FluxConfig.from_diffusers(TINY, scan_layers=True, num_single_layers=3)
    params = flux.init_params(cfg, jax.random.key(0))
    inputs = random_inputs(cfg, 2, 4, 4, 8)
    stacked = {}
    for policy in ("full", "offload"):
        c = dataclasses.replace(cfg, remat_policy=policy)
        loss = lambda p, c=c: (flux.FluxTransformer(c).apply({"params": p}, **inputs) ** 2).mean()
        jax.ad_checkpoint.print_saved_residuals(loss, params)  # one line each: "bf16<host>[2,2,24,32] output of..."
        lines = capsys.readouterr().out.splitlines()
        stacked[policy] = sorted(ln.split()[0] for ln in lines if re.match(r"\w+(<host>)?\[[23],2,", ln))
    assert stacked["full"] == ["f32[2,2,16,32]", "f32[2,2,8,32]", "f32[3,2,24,32]"]  # (img, txt); the joint one
    assert stacked["offload"] == [s.replace("[", "<host>[", 1) for s in stacked["full"]]


def test_scan_roundtrip_and_init_layout():
    cfg = flux.FluxConfig.from_diffusers(TINY, scan_layers=True)
    boxed = flux.init_params(cfg, jax.random.key(0))
    p = flux.nn.meta.unbox(boxed)
    assert p["transformer_blocks"]["attn"]["to_q"]["kernel"].shape == (2, 32, 32)
    spec = flux.nn.get_partition_spec(boxed)
    assert tuple(spec["transformer_blocks"]["attn"]["to_q"]["kernel"]) == ("layers", "embed", "heads")
    plain = unscan_params(p, cfg)
    back = flux.scan_params(plain, cfg)
    jax.tree.map(np.testing.assert_array_equal, back, p)


def test_bf16_compute_close_to_fp32():
    cfg = flux.FluxConfig.from_diffusers(TINY)
    params = params_from_torch(torch_flux(), cfg)
    inputs = random_inputs(cfg, 2, 4, 4, 8)
    ref = flux.FluxTransformer(cfg).apply({"params": params}, **inputs)
    bf = flux.FluxTransformer(dataclasses.replace(cfg, dtype="bfloat16")).apply({"params": params}, **inputs)
    assert bf.dtype == jax.numpy.bfloat16
    assert _rel_err(np.asarray(bf, np.float32), np.asarray(ref)) < 5e-2


@pytest.mark.parametrize("scan", [False, True])
def test_lora_adapters_equal_merged_weights(scan):
    """Applied with adapters the model equals the base model whose kernels are W + (alpha/r) A B;
    applied without the `lora` collection it is exactly the base model (the frozen reference)."""
    cfg = flux.FluxConfig.from_diffusers(TINY, lora_rank=3, lora_alpha=6.0, scan_layers=scan,
                                         lora_targets=("to_q", "to_v", "proj_mlp"))
    plain_cfg = dataclasses.replace(cfg, lora_rank=0, scan_layers=False)
    base = params_from_torch(torch_flux(), plain_cfg)
    params = flux.scan_params(base, cfg) if scan else base
    variables = flux.nn.meta.unbox(flux.FluxTransformer(cfg).init(jax.random.key(0), **flux.dummy_inputs(cfg)))
    lora = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape) * 0.1, variables["lora"])
    inputs = random_inputs(cfg, 2, 4, 4, 8)
    model = flux.FluxTransformer(cfg)
    with_lora = model.apply({"params": params, "lora": lora}, **inputs)
    without = model.apply({"params": params}, **inputs)
    no_lora_model = flux.FluxTransformer(dataclasses.replace(cfg, lora_rank=0))
    np.testing.assert_array_equal(np.asarray(without), np.asarray(no_lora_model.apply({"params": params}, **inputs)))
    merged = jax.tree.map(lambda x: x, base)
    flat_lora = lora if not scan else unscan_params(lora, cfg)
    for blk, mods in flat_lora.items():
        stack = [(mods, merged[blk])]
        while stack:
            lo, pa = stack.pop()
            if "lora_a" in lo:
                pa["kernel"] = pa["kernel"] + 2.0 * lo["lora_a"] @ lo["lora_b"]
            else:
                stack.extend((lo[k], pa[k]) for k in lo)
    ref = flux.FluxTransformer(plain_cfg).apply({"params": merged}, **inputs)
    assert _rel_err(np.asarray(with_lora), np.asarray(ref)) < 1e-5
    assert _rel_err(np.asarray(with_lora), np.asarray(without)) > 1e-3


@pytest.mark.parametrize("scan", [False, True])
def test_sharded_on_8_devices_equals_one_device(scan):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from pnapo_jax import config as config_lib
    from pnapo_jax import sharding

    cfg = flux.FluxConfig.from_diffusers(TINY, scan_layers=scan)
    params = params_from_torch(torch_flux(), cfg)
    params = flux.scan_params(params, cfg) if scan else params
    inputs = random_inputs(cfg, 4, 4, 4, 8)
    ref = jax.jit(flux.FluxTransformer(cfg).apply)({"params": params}, **inputs)

    mesh = sharding.make_mesh(flux.nn.FrozenDict(data=2, fsdp=2, tensor=2))
    rules = config_lib.DEFAULT_RULES
    shardings = sharding.logical_shardings(
        jax.eval_shape(lambda: flux.init_params(cfg, jax.random.key(0))), mesh, rules)
    sharded = jax.device_put(params, shardings)
    assert sharded["x_embedder"]["kernel"].sharding.spec == P(None, "fsdp")
    batched = {k: jax.device_put(v, NamedSharding(mesh, P(sharding.BATCH_AXES)) if k not in ("img_ids", "txt_ids")
                                 else sharding.replicated(mesh)) for k, v in inputs.items()}
    with jax.set_mesh(mesh), flux.nn.logical_axis_rules(rules):
        out = jax.jit(flux.FluxTransformer(cfg).apply)({"params": sharded}, **batched)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5 * float(np.abs(ref).max()))
