"""The reference-error cache (pnapo_jax/ref_cache.py): the cached step trains as the uncached one, the cache
resumes and is refused for another setup, and training with it resumes exactly."""

import json
import sys

import jax
import numpy as np
import pytest
from etils import epath

from pnapo_jax import config_check, flow, ref_cache, sharding, train
from pnapo_jax.data.pipeline import global_batch
from pnapo_jax.errors import UserError
from pnapo_jax.setup import base_params, init_state, make_setup
from pnapo_jax.step import grid_t, jit_steps

ROOT = epath.Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "configs"))
import tiny  # noqa: E402

GRID = 4


def _config(cached: bool):
    c = tiny.get_config()
    c.t_sampling.kind, c.t_sampling.grid_size = "grid", GRID
    c.pnapo.ref_cache = cached
    c.train.eval_every = 0
    return c


def test_grid_sampler_draws_cell_midpoints():
    u = np.array([0.0, 0.1, 0.25, 0.49, 0.5, 0.99, 1.0], np.float32)
    np.testing.assert_allclose(flow.t_from_uniform(u, kind="grid", grid_size=4),
                               [0.125, 0.125, 0.375, 0.375, 0.625, 0.875, 0.875])
    np.testing.assert_array_equal(flow.grid_index(u, 4), [0, 0, 1, 1, 2, 3, 3])
    setup = make_setup(_config(False), jax.devices()[:1])
    np.testing.assert_allclose(grid_t(setup), [0.125, 0.375, 0.625, 0.875])


def test_config_check_refuses_the_cache_without_recorded_noise_and_grid():
    c = _config(True)
    config_check.check(c)
    c.pnapo.noise_mode = "independent"
    with pytest.raises(UserError, match="config.pnapo.ref_cache needs"):
        config_check.check(c)
    c = _config(True)
    c.t_sampling.kind = "uniform"
    with pytest.raises(UserError, match="config.pnapo.ref_cache needs"):
        config_check.check(c)


def _perturbed(state, scale=3e-2):
    """The policy moved off the reference, so the loss and its gradient depend on the reference's errors."""
    leaves, treedef = jax.tree.flatten(state["params"])
    keys = jax.random.split(jax.random.key(9), len(leaves))
    moved = [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys, strict=True)]
    return {**state, "params": jax.tree.unflatten(treedef, moved)}


def test_cached_step_equals_uncached_step(tmp_path):
    """Same state, same records, same t draw: the step with cached reference errors gives the loss, metrics and
    update of the step that runs the reference forward, to float tolerance."""
    out = {}
    for cached in (False, True):
        config = _config(cached)
        setup = make_setup(config, jax.devices()[:1])
        state, frozen = init_state(setup, base_params(setup))
        source = train.make_source(config, "")
        cache = ref_cache.load_or_build(config, setup, frozen, source, "", tmp_path) if cached else None
        loader = train.make_train_loader(config, source, per_record=cache)
        batch = global_batch(next(loader), sharding.batch_sharding(setup.mesh))
        loader.close()
        assert ("ref_err_w" in batch) == cached
        if cached:
            assert batch["ref_err_w"].shape == (config.train.global_batch_size, GRID)
            assert np.isfinite(np.asarray(batch["ref_err_w"])).all()
        step_fn, _ = jit_steps(setup)
        with setup.scope():
            new_state, metrics = step_fn(_perturbed(state), frozen, batch)
        out[cached] = jax.device_get((new_state["params"], metrics))
    (p0, m0), (p1, m1) = out[False], out[True]
    assert abs(m0["loss"] - np.log(2)) > 1e-3  # the policy is off the reference: the ref errors matter
    for k in ("loss", "mse/ref_w", "mse/ref_l", "mse/policy_w", "rewards/margins", "grad_norm", "err/ref_l_t2"):
        np.testing.assert_allclose(m1[k], m0[k], rtol=1e-5, atol=1e-7, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p1, p0)


def test_cache_resumes_by_chunk_and_refuses_another_setup(tmp_path, monkeypatch):
    monkeypatch.setattr(ref_cache, "CHUNK_RECORDS", 16)  # 64 synthetic records: 4 chunks
    config = _config(True)
    setup = make_setup(config, jax.devices()[:1])
    _, frozen = init_state(setup, base_params(setup))
    source = train.make_source(config, "")
    full = ref_cache.load_or_build(config, setup, frozen, source, "", tmp_path)
    assert full["ref_err_w"].shape == (64, GRID) and np.isfinite(full["ref_err_l"]).all()
    chunks = sorted((tmp_path / "ref_cache").glob("errors_*.npy"))
    assert [c.name for c in chunks] == [f"errors_{i:09d}.npy" for i in (0, 16, 32, 48)]
    # an interrupted pass: one chunk missing (and a torn temporary file) is computed again, the others are read
    chunks[2].unlink()
    (tmp_path / "ref_cache" / "errors_000000032.npy.tmp").write_bytes(b"torn")
    kept = {c: c.stat().st_mtime_ns for c in chunks if c != chunks[2]}
    lines = []
    again = ref_cache.load_or_build(config, setup, frozen, source, "", tmp_path, lines.append)
    assert lines == [f"reference-error cache: records 32..47 of 64 at {GRID} t"]
    assert {c: c.stat().st_mtime_ns for c in kept} == kept
    for k in full:
        np.testing.assert_allclose(again[k], full[k], rtol=1e-6)
    # the reference's errors at each grid t, against a direct computation for a few records
    direct = ref_cache.compute(setup, frozen, source, 5, 8, np.asarray(grid_t(setup)), 3)
    np.testing.assert_allclose(full["ref_err_w"][5:8], direct[..., 0], rtol=1e-5)
    # another grid, other guidance: refused, the stored cache untouched
    before = (tmp_path / "ref_cache" / "meta.json").read_text()
    other = _config(True)
    other.t_sampling.grid_size = 8
    with pytest.raises(UserError, match="another setup.*grid_t"):
        ref_cache.load_or_build(other, make_setup(other, jax.devices()[:1]), frozen, source, "", tmp_path)
    other = _config(True)
    other.pnapo.guidance = 3.5
    with pytest.raises(UserError, match="another setup.*guidance"):
        ref_cache.load_or_build(other, setup, frozen, source, "", tmp_path)
    assert (tmp_path / "ref_cache" / "meta.json").read_text() == before
    assert json.loads(before)["records"] == 64


def _losses(workdir) -> dict[int, float]:
    lines = [json.loads(s) for s in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {d["step"]: d["loss"] for d in lines if "loss" in d}


def test_cached_training_resumes_exactly(tmp_path):
    """4 steps straight == 2 steps, a restart, 2 more, the cache read back, not rebuilt (the cached step equals
    the uncached one: test_cached_step_equals_uncached_step)."""
    config = _config(True)
    config.train.num_steps, config.checkpoint.every_steps, config.train.log_every = 4, 2, 1
    train.train_and_evaluate(config, str(tmp_path / "straight"), show_progress=False)
    half = _config(True)
    half.train.num_steps, half.checkpoint.every_steps, half.train.log_every = 2, 2, 1
    train.train_and_evaluate(half, str(tmp_path / "resumed"), show_progress=False)
    chunk = tmp_path / "resumed" / "ref_cache" / "errors_000000000.npy"
    mtime = chunk.stat().st_mtime_ns
    train.train_and_evaluate(config, str(tmp_path / "resumed"), show_progress=False)
    assert chunk.stat().st_mtime_ns == mtime
    losses = _losses(tmp_path / "straight")
    assert sorted(losses) == [1, 2, 3, 4] and _losses(tmp_path / "resumed") == losses


def test_aot_compiles_the_cached_step_with_the_cached_errors_in_its_batch():
    from pnapo_jax import aot

    batch = aot.abstract_batch(make_setup(_config(True), jax.devices()[:1]))
    assert batch["ref_err_w"].shape == batch["ref_err_l"].shape == (8, GRID)
    assert "ref_err_w" not in aot.abstract_batch(make_setup(_config(False), jax.devices()[:1]))
