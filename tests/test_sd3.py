"""The Flax SD3 / SD3.5 transformer against diffusers' SD3Transformer2DModel (torch, CPU, fp32)."""

import dataclasses

import jax
import numpy as np
import pytest
from sd3_testing import TINY, params_from_torch, random_inputs, scan_params, torch_forward, torch_sd3, unscan_params

from pnapo_jax.models import sd3

CPU_FAST = dict(attention_impl="head_major", dense_input_barrier=True)  # the CPU configs' options
SPLASH = dict(attention_impl="splash_interpret", attention_block=128)  # the TPU kernel, interpreted


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name,compute", [*((n, {}) for n in TINY), ("sd35_medium", CPU_FAST),
                                          ("sd35_medium", SPLASH)])
@pytest.mark.parametrize("shape", [(2, 4, 4, 8), (3, 3, 5, 7)])  # batch, token rows, token columns, text tokens
def test_matches_diffusers(name, compute, shape):
    batch, h, w, txt = shape
    model = torch_sd3(name, seed=1)
    cfg = sd3.SD3Config.from_diffusers(dict(model.config), **compute)
    params = params_from_torch(model, cfg)
    inputs = random_inputs(cfg, batch, h, w, txt, seed=2)
    ours = np.asarray(jax.jit(sd3.SD3Transformer(cfg).apply, static_argnames=("h_tokens", "w_tokens"))(
        {"params": params}, **inputs))
    ref = torch_forward(model, inputs)
    assert ours.shape == ref.shape == (batch, h * w, cfg.out_dim)
    assert _rel_err(ours, ref) <= 1e-4, _rel_err(ours, ref)


def test_position_table_is_diffusers_crop():
    """The crop of a grid at the table's edge (odd offsets, non-square) equals diffusers' cropped_pos_embed."""
    model = torch_sd3("sd3_medium")
    cfg = sd3.SD3Config.from_diffusers(dict(model.config))
    for h, w in [(3, 5), (12, 12), (1, 11)]:
        ref = model.pos_embed.cropped_pos_embed(2 * h, 2 * w)[0].numpy()
        np.testing.assert_allclose(sd3.position_table(cfg, h, w), ref, atol=1e-7)
    with pytest.raises(ValueError, match="pos_embed_max_size 12"):
        sd3.position_table(cfg, 13, 2)


def test_diffusers_config_round_trip_and_runs():
    cfg = sd3.SD3Config.from_diffusers(TINY["sd35_medium"], **CPU_FAST)
    exported = cfg.to_diffusers()
    assert set(exported) == {"_class_name", *sd3.DIFFUSERS_FIELDS}
    assert sd3.SD3Config.from_diffusers(exported) == sd3.SD3Config.from_diffusers(TINY["sd35_medium"])
    runs = sd3.block_runs(cfg)
    assert [(r.start, r.stop, r.dual, r.last) for r in runs] == [(0, 3, True, False), (3, 4, False, False),
                                                                 (4, 5, False, True)]
    assert list(sd3.scanned_stacks(cfg)) == ["blocks_0_3", "blocks_3_4"]


@pytest.mark.parametrize("name,variant", [
    ("sd35_medium", dict(scan_layers=True)),  # runs: 3 dual blocks, 1 plain block, the last block
    pytest.param("sd35_medium", dict(remat_policy="full"), marks=pytest.mark.slow),  # ~2 min: compile-bound
    pytest.param("sd35_medium", dict(CPU_FAST, remat_policy="save_named", scan_layers=True), marks=pytest.mark.slow),
    ("sd3_medium", dict(remat_policy="save_named", scan_layers=True)),  # runs: 2 plain blocks, the last block
])
def test_scan_and_remat_equal_plain(name, variant):
    cfg = sd3.SD3Config.from_diffusers(TINY[name])
    params = params_from_torch(torch_sd3(name), cfg)
    inputs = random_inputs(cfg, 2, 3, 4, 6)
    vcfg = dataclasses.replace(cfg, **variant)
    vparams = scan_params(params, cfg) if vcfg.scan_layers else params

    def loss(p, c):
        return (sd3.SD3Transformer(c).apply({"params": p}, **inputs) ** 2).mean()

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    l0, g0 = value_and_grad(params, cfg)
    l1, g1 = value_and_grad(vparams, vcfg)
    if vcfg.scan_layers:
        g1 = unscan_params(g1, cfg)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max() + 1e-12), g1, g0)


def test_scanned_init_layout_and_round_trip():
    cfg = sd3.SD3Config.from_diffusers(TINY["sd35_medium"], scan_layers=True)
    boxed = jax.jit(lambda key: sd3.init_params(cfg, key))(jax.random.key(0))
    p = sd3.nn.meta.unbox(boxed)
    assert sorted(k for k in p if "blocks" in k) == ["blocks_0_3", "blocks_3_4", "transformer_blocks_4"]
    assert p["blocks_0_3"]["attn2"]["to_q"]["kernel"].shape == (3, 16, 16)
    assert "attn2" not in p["blocks_3_4"] and "to_add_out" not in p["transformer_blocks_4"]["attn"]
    spec = sd3.nn.get_partition_spec(boxed)
    assert tuple(spec["blocks_0_3"]["attn"]["to_q"]["kernel"]) == ("layers", "embed", "heads")
    plain = unscan_params(p, cfg)
    jax.tree.map(np.testing.assert_array_equal, scan_params(plain, cfg), p)


def test_bf16_compute_close_to_fp32():
    cfg = sd3.SD3Config.from_diffusers(TINY["sd35_medium"])
    params = params_from_torch(torch_sd3("sd35_medium"), cfg)
    inputs = random_inputs(cfg, 2, 3, 4, 6)
    apply = lambda c: jax.jit(sd3.SD3Transformer(c).apply, static_argnames=("h_tokens", "w_tokens"))
    ref = apply(cfg)({"params": params}, **inputs)
    bf = apply(dataclasses.replace(cfg, dtype="bfloat16"))({"params": params}, **inputs)
    assert bf.dtype == jax.numpy.bfloat16
    assert _rel_err(np.asarray(bf, np.float32), np.asarray(ref)) < 5e-2


def test_velocity_scales_t_to_diffusers_timesteps():
    cfg = sd3.SD3Config.from_diffusers(TINY["sd3_medium"])
    model = torch_sd3("sd3_medium")
    params = params_from_torch(model, cfg)
    inputs = random_inputs(cfg, 2, 3, 4, 6)
    t = inputs["timestep"] / 1000.0
    cond = sd3.conditioning(inputs["encoder_hidden_states"], inputs["pooled_projections"])
    v = sd3.Velocity(cfg, 3, 4)({"params": params}, inputs["hidden_states"], t, cond)
    assert _rel_err(np.asarray(v), torch_forward(model, inputs)) <= 1e-4
    assert set(sd3.conditioning(inputs["encoder_hidden_states"], inputs["pooled_projections"], 3.5)) == set(cond)


def test_bad_configs_refused():
    with pytest.raises(ValueError, match="caption_projection_dim"):
        sd3.SD3Config.from_diffusers(dict(TINY["sd3_medium"], caption_projection_dim=24))
    with pytest.raises(ValueError, match="qk_norm"):
        sd3.SD3Config.from_diffusers(dict(TINY["sd3_medium"], qk_norm="layer_norm"))
    with pytest.raises(ValueError, match="dual_attention_layers"):
        sd3.SD3Config.from_diffusers(dict(TINY["sd3_medium"], dual_attention_layers=(3,)))


@pytest.mark.slow  # ~2 min on the shared 2-core box (two compiles of the scanned model)
def test_sharded_on_8_devices_equals_one_device():
    """Scanned SD3.5-Medium-style model on a data=2, fsdp=2, tensor=2 mesh with the default logical rules."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from pnapo_jax import config as config_lib
    from pnapo_jax import sharding

    cfg = sd3.SD3Config.from_diffusers(TINY["sd35_medium"], scan_layers=True)
    params = scan_params(params_from_torch(torch_sd3("sd35_medium"), dataclasses.replace(cfg, scan_layers=False)),
                             cfg)
    inputs = random_inputs(cfg, 4, 3, 4, 6)
    arrays = {k: v for k, v in inputs.items() if k not in ("h_tokens", "w_tokens")}
    apply = jax.jit(lambda p, a: sd3.SD3Transformer(cfg).apply({"params": p}, **a, h_tokens=3, w_tokens=4))
    ref = apply(params, arrays)
    mesh = sharding.make_mesh(sd3.nn.FrozenDict(data=2, fsdp=2, tensor=2))
    rules = config_lib.DEFAULT_RULES
    shardings = sharding.logical_shardings(jax.eval_shape(lambda: sd3.init_params(cfg, jax.random.key(0))), mesh,
                                           rules)
    sharded = jax.device_put(params, shardings)
    assert sharded["blocks_0_3"]["attn2"]["to_q"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    batched = jax.device_put(arrays, NamedSharding(mesh, P(sharding.BATCH_AXES)))
    with jax.set_mesh(mesh), sd3.nn.logical_axis_rules(rules):
        out = apply(sharded, batched)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5 * float(np.abs(ref).max()))
