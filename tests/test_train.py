"""The train step and loop on the tiny config: it learns, resumes exactly, and is layout-independent."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from pnapo_jax import checkpoint, sharding, train
from pnapo_jax.data.pipeline import global_batch
from pnapo_jax.errors import UserError
from pnapo_jax.setup import base_params, init_state, make_setup
from pnapo_jax.step import jit_steps

ROOT = epath.Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "configs"))
import tiny  # noqa: E402


def _lines(workdir) -> list[dict]:
    return [json.loads(s) for s in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _train_losses(workdir) -> dict[int, float]:
    return {d["step"]: d["loss"] for d in _lines(workdir) if "loss" in d}


def _restored_params(config, workdir, step):
    setup = make_setup(config)
    ckpt = checkpoint.Checkpointer(str(epath.Path(workdir) / "checkpoints"), config.checkpoint)
    state = ckpt.restore(step, setup.abstract_state, None)
    ckpt.close()
    return jax.device_get(state["params"])


def _one_batch(config, setup):
    loader = train.make_train_loader(config, train.make_source(config, ""))
    batch = global_batch(next(loader), sharding.batch_sharding(setup.mesh))
    loader.close()
    return batch


def test_tiny_config_learns_the_preference(tmp_path):
    config = tiny.get_config()
    config.train.num_steps = 24
    last = train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1], show_progress=False)
    lines = _lines(tmp_path)
    train_lines = [d for d in lines if "loss" in d]
    evals = [d for d in lines if "eval/loss" in d]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "beta_eff",
                "loss/t_bucket_0", "grad_norm", "lr", "skipped_updates", "skipped_records"):
        assert key in last, key
    assert [d["step"] for d in evals] == [8, 16, 24]
    assert train_lines[0]["loss"] == pytest.approx(np.log(2), abs=0.02)  # policy == reference at the start
    # Synthetic pairs carry no preference that generalises (the embedded world does): the policy learns its
    # training pairs, and eval lines report held-out pairs.
    assert np.mean([d["loss"] for d in train_lines[-3:]]) < np.log(2) - 0.01
    assert np.mean([d["rewards/margins"] for d in train_lines[-3:]]) > 0
    assert (tmp_path / "tensorboard").exists()


def test_resume_equals_straight_run(tmp_path):
    """2N steps straight == N steps, a new process-like restart from the checkpoint, N more."""
    config = tiny.get_config()
    config.train.num_steps, config.checkpoint.every_steps, config.train.eval_every = 8, 4, 0
    train.train_and_evaluate(config, str(tmp_path / "straight"), show_progress=False)
    half = tiny.get_config()
    half.train.num_steps, half.checkpoint.every_steps, half.train.eval_every = 4, 4, 0
    train.train_and_evaluate(half, str(tmp_path / "resumed"), show_progress=False)
    train.train_and_evaluate(config, str(tmp_path / "resumed"), show_progress=False)
    assert _train_losses(tmp_path / "resumed") == _train_losses(tmp_path / "straight")
    a = _restored_params(config, tmp_path / "straight", 8)
    b = _restored_params(config, tmp_path / "resumed", 8)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_sigterm_saves_and_resumes_exactly(tmp_path):
    """A real preemption: SIGTERM mid-run saves a checkpoint and exits 75; rerunning finishes identically."""
    args = ["--config=" + str(ROOT / "configs/tiny.py"), "--config.train.num_steps=40",
            "--config.train.log_every=1", "--config.train.eval_every=0", "--config.checkpoint.every_steps=1000",
            "--progress=false"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "pnapo_jax.main"]
    subprocess.run([*cmd, f"--workdir={tmp_path / 'straight'}", *args], env=env, check=True, capture_output=True)
    proc = subprocess.Popen([*cmd, f"--workdir={tmp_path / 'preempted'}", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = tmp_path / "preempted" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == train.Stopped.EXIT_CODE, err.decode()[-2000:]  # 75: stopped early, not finished
    saved = sorted(int(p.name) for p in (tmp_path / "preempted" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] < 40, saved  # stopped early, with a checkpoint
    assert out.decode().strip().splitlines()[-1].startswith(f"stopped at step {saved[-1]} on SIGTERM; the checkpoint "
                                                            "is saved; resume with: ")
    resumed = subprocess.run([*cmd, f"--workdir={tmp_path / 'preempted'}", *args], env=env, check=True,
                             capture_output=True, text=True)
    assert f"resuming from step {saved[-1]}" in resumed.stdout
    straight, resumed = _train_losses(tmp_path / "straight"), _train_losses(tmp_path / "preempted")
    assert straight == resumed


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_same_losses_on_1_2_4_8_devices(tmp_path, lora):
    losses = {}
    for n in (1, 2, 4, 8):
        config = tiny.get_config("lora" if lora else "")
        config.train.num_steps, config.train.eval_every = 6, 0
        train.train_and_evaluate(config, str(tmp_path / f"d{n}"), devices=jax.devices()[:n], show_progress=False)
        losses[n] = _train_losses(tmp_path / f"d{n}")
    for n in (2, 4, 8):
        assert losses[n].keys() == losses[1].keys()
        np.testing.assert_allclose(list(losses[n].values()), list(losses[1].values()), rtol=2e-5)


def test_data_fsdp_tensor_mesh_trains_like_one_device(tmp_path):
    """(2, 2, 2): the layout where XLA's partitioner once swapped batch shards (see models/layers._gathered)."""
    losses = {}
    for name, mesh, devices in [("one", (1, -1, 1), jax.devices()[:1]), ("cube", (2, 2, 2), jax.devices())]:
        config = tiny.get_config()
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
        config.train.num_steps, config.train.eval_every, config.train.log_every = 4, 0, 1
        train.train_and_evaluate(config, str(tmp_path / name), devices=devices, show_progress=False)
        losses[name] = _train_losses(tmp_path / name)
    np.testing.assert_allclose(list(losses["cube"].values()), list(losses["one"].values()), rtol=2e-5)


def test_mesh_with_data_fsdp_and_tensor_axes(tmp_path):
    config = tiny.get_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    config.train.num_steps, config.train.eval_every = 2, 0
    setup = make_setup(config)
    state, _ = init_state(setup, base_params(setup))
    kernel = state["params"]["transformer_blocks_0"]["attn"]["to_q"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    mu = state["opt_state"].inner_state[1][0].mu["transformer_blocks_0"]["attn"]["to_q"]["kernel"]
    assert mu.sharding.spec == kernel.sharding.spec  # optimizer state sharded like its params


def _step(config, batch_edit=None):
    setup = make_setup(config)
    state, frozen = init_state(setup, base_params(setup))
    batch = _one_batch(config, setup)
    if batch_edit:
        batch = batch_edit(batch)
    step_fn, _ = jit_steps(setup)
    with setup.scope():
        before = jax.device_get(state["params"])
        new_state, metrics = step_fn(state, frozen, batch)
    return before, jax.device_get(new_state["params"]), jax.device_get(metrics), jax.device_get(frozen)


def test_gradient_accumulation_equals_one_big_batch():
    one = tiny.get_config()
    two = tiny.get_config()
    two.train.grad_accum_steps = 4
    _, p1, m1, _ = _step(one)
    _, p2, m2, _ = _step(two)
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), p2, p1)


def test_non_finite_batch_skips_the_update():
    config = tiny.get_config()
    bad = lambda b: {**b, "x0_w": b["x0_w"].at[0, 0, 0].set(jnp.nan)}
    before, after, metrics, _ = _step(config, bad)
    assert int(metrics["skipped_updates"]) == 1
    jax.tree.map(np.testing.assert_array_equal, before, after)


def test_lora_trains_only_adapters_and_reference_is_base():
    config = tiny.get_config("lora")
    config.optim.warmup_steps = 0  # warmup starts at lr 0, which would leave step 0's adapters unchanged
    before, after, metrics, frozen = _step(config)
    # Targets match by layer name as PEFT's target_modules do: "proj_out" is also FLUX's final projection.
    assert set(before) == {"single_transformer_blocks_0", "transformer_blocks_0", "proj_out"}
    leaves = jax.tree_util.tree_leaves_with_path(after)
    assert all(str(path[-1].key).startswith("lora_") for path, _ in leaves)
    assert float(metrics["loss"]) == pytest.approx(np.log(2), abs=1e-6)  # B = 0: policy == reference
    changed = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), before, after)
    assert max(jax.tree.leaves(changed)) > 0
    assert "ref" not in frozen and "base" in frozen  # no second copy of the weights


def test_unfinished_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    config = tiny.get_config()
    config.train.num_steps, config.checkpoint.every_steps, config.train.eval_every = 4, 4, 0
    train.train_and_evaluate(config, str(tmp_path), show_progress=False)
    (tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-123" / "state").mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), config.checkpoint)
    assert ckpt.latest_step() == 4
    ckpt.close()
    assert any("unfinished checkpoint" in r.message for r in caplog.records)


def test_bad_mesh_and_batch_configs_fail_clearly():
    config = tiny.get_config()
    config.mesh.data, config.mesh.fsdp = 3, -1
    with pytest.raises(UserError, match="do not divide"):
        make_setup(config)
    config = tiny.get_config()
    config.train.grad_accum_steps = 3
    with pytest.raises(UserError, match="grad_accum_steps"):
        make_setup(config)
