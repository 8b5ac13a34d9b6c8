"""LoRA adapters are FSDP-sharded at rest (no adapter whole on every chip), and a LoRA step on the mesh is the
one-device step."""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import PartitionSpec as P

from pnapo_jax import sharding, train
from pnapo_jax.data.pipeline import global_batch
from pnapo_jax.setup import base_params, init_state, make_setup
from pnapo_jax.step import jit_steps

sys.path.insert(0, str(epath.Path(__file__).parent.parent / "configs"))
import tiny  # noqa: E402


def _lora_step(devices):
    config = tiny.get_config("lora")
    config.optim.warmup_steps = 0  # warmup starts at lr 0, which would leave step 0's adapters unchanged
    setup = make_setup(config, devices=devices)
    state, frozen = init_state(setup, base_params(setup))
    loader = train.make_train_loader(config, train.make_source(config, ""))
    batch = global_batch(next(loader), sharding.batch_sharding(setup.mesh))
    loader.close()
    step_fn, _ = jit_steps(setup)
    before = jax.device_get(state["params"])  # the step donates the state
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        new_state, metrics = step_fn(state, frozen, batch)
    return before, new_state, metrics


def _bytes_on(device, tree) -> int:
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


def test_adapters_and_their_optimizer_state_are_fsdp_sharded_and_the_step_matches_one_device():
    devices = jax.devices()[:8]
    before, new_state, metrics = _lora_step(devices)
    adapters = jax.tree_util.tree_leaves_with_path(new_state["params"])
    assert len(adapters) == 20  # 10 adapted layers (4 in the double block, 5 in the single, proj_out) x (a, b)
    for path, x in adapters:
        assert "fsdp" in jax.tree.leaves(tuple(x.sharding.spec)), (jax.tree_util.keystr(path), x.sharding.spec)
    # Per chip: an eighth of the adapters and of their AdamW moments, where today lora_b of to_q holds all of it.
    trainable = {"params": new_state["params"], "opt_state": new_state["opt_state"]}
    total = sum(x.nbytes for x in jax.tree.leaves(trainable) if x.size > 1)
    on_one = sum(_bytes_on(devices[0], x) for x in jax.tree.leaves(trainable) if x.size > 1)
    assert on_one == total // 8

    one_before, one_new, one_metrics = _lora_step(jax.devices()[:1])
    jax.tree.map(np.testing.assert_array_equal, before, one_before)
    np.testing.assert_allclose(metrics["loss"], one_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], one_metrics["grad_norm"], rtol=1e-5)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), jax.device_get(new_state["params"]), before)
    assert max(jax.tree.leaves(moved)) > 1e-4  # the step did update the adapters
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 jax.device_get(new_state["params"]), jax.device_get(one_new["params"]))


def test_an_adapter_dimension_the_mesh_does_not_divide_stays_whole():
    mesh = sharding.make_mesh(tiny.get_config().mesh, jax.devices()[:8])
    boxed = lambda names, shape: nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names)
    tree = {"fits": boxed((None, "adapter"), (4, 16)), "does_not": boxed((None, "adapter"), (4, 12)),
            "embed": boxed(("embed", None), (16, 4)), "plain": jax.ShapeDtypeStruct((3,), jnp.float32)}
    specs = jax.tree.map(lambda s: s.spec, sharding.logical_shardings(tree, mesh, sharding.rules_from_config(
        tiny.get_config().logical_axis_rules)))
    assert specs == {"fits": P(None, "fsdp"), "does_not": P(None, None), "embed": P("fsdp", None), "plain": P()}
