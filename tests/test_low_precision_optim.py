"""The memory options of issue 14: AdamW's first moment stored in bf16 (`optim.mu_dtype`) and the gradients kept
in bf16 until the update (`optim.grad_dtype`), each against a float64 NumPy reference of the same arithmetic;
the step's gradients and updates with them; resume stays bit-exact with both on."""

import json
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from etils import epath

from pnapo_jax import checkpoint, fused_adamw, sharding, step, train
from pnapo_jax.config_check import check
from pnapo_jax.data.pipeline import global_batch
from pnapo_jax.errors import UserError
from pnapo_jax.setup import base_params, init_state, make_setup

ROOT = epath.Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "configs"))
import tiny  # noqa: E402

HP = dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, grad_clip=1.0)
LR = 1e-2
BF16_ULP = 2.0**-7  # bf16 spacing relative to a value (8 significant bits): twice its rounding error, at most


def _bf16(x: np.ndarray) -> np.ndarray:
    """float64 -> the nearest bf16 -> float64 (round to nearest even, as XLA's convert)."""
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def _numpy_adamw(params, grads_seq, mu_bf16: bool):
    """float64 AdamW with global-norm clipping, over a sequence of gradient trees (lists of arrays); with mu_bf16
    the first moment is rounded to bf16 when stored and the update reads the stored moment (clip_adamw's order)."""
    p = [np.asarray(x, np.float64) for x in params]
    mu = [np.zeros_like(x) for x in p]
    nu = [np.zeros_like(x) for x in p]
    b1, b2, eps, wd, clip = HP["b1"], HP["b2"], HP["eps"], HP["weight_decay"], HP["grad_clip"]
    for count, grads in enumerate(grads_seq, 1):
        g = [np.asarray(x, np.float64) for x in grads]
        norm = np.sqrt(sum(np.sum(x**2) for x in g))
        scale = 1.0 if norm < clip else clip / norm
        g = [x * scale for x in g]
        mu = [(1 - b1) * x + b1 * m for x, m in zip(g, mu, strict=True)]
        mu = [_bf16(m) for m in mu] if mu_bf16 else mu
        nu = [(1 - b2) * x**2 + b2 * v for x, v in zip(g, nu, strict=True)]
        p = [q - LR * ((m / (1 - b1**count)) / (np.sqrt(v / (1 - b2**count)) + eps) + wd * q)
             for q, m, v in zip(p, mu, nu, strict=True)]
    return p, mu, nu


def _problem(seed: int = 0, steps: int = 3):
    """Params and gradient trees whose norms straddle the clip (the first step is clipped, the others not)."""
    rng = np.random.default_rng(seed)
    shapes = [(16, 24), (24,), (3, 8, 8)]
    params = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [[(rng.normal(size=s) * (0.3 if i else 2.0) / np.sqrt(np.prod(s))).astype(np.float32) for s in shapes]
             for i in range(steps)]
    return params, grads


def _run(tx, params, grads_seq, grad_dtype=jnp.float32):
    p = [jnp.asarray(x) for x in params]
    state = tx.init(p)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p))
    for grads in grads_seq:
        u, state = update([jnp.asarray(g).astype(grad_dtype) for g in grads], state, p)
        p = optax.apply_updates(p, u)
    adam = state.inner_state[-1][0]
    return [np.asarray(x, np.float64) for x in p], adam


def _deltas(p, params):
    return np.concatenate([(np.asarray(a, np.float64) - b).ravel() for a, b in zip(p, params, strict=True)])


def test_bf16_mu_matches_a_float64_reference():
    """mu_dtype=bfloat16: the stored moment is bf16 and equals the float64 reference's (fp32-computed, rounded
    once when stored) to one bf16 ulp, bit for bit almost everywhere; the updates match the reference's."""
    params, grads = _problem()
    tx = fused_adamw.clip_adamw(optax.constant_schedule(LR), **HP, mu_dtype="bfloat16")
    p, adam = _run(tx, params, grads)
    assert all(m.dtype == jnp.bfloat16 for m in adam.mu) and all(v.dtype == jnp.float32 for v in adam.nu)
    ref_p, ref_mu, ref_nu = _numpy_adamw(params, grads, mu_bf16=True)
    mu = [np.asarray(m, np.float64) for m in adam.mu]
    for m, r in zip(mu, ref_mu, strict=True):
        np.testing.assert_allclose(m, r, rtol=BF16_ULP, atol=1e-30)
    same = np.concatenate([(m == r).ravel() for m, r in zip(mu, ref_mu, strict=True)])
    assert same.mean() > 0.99, same.mean()  # bit-equal moments but for rare double-rounding ties
    for v, r in zip(adam.nu, ref_nu, strict=True):
        np.testing.assert_allclose(np.asarray(v, np.float64), r, rtol=1e-5)
    d, ref_d = _deltas(p, params), _deltas(ref_p, params)
    np.testing.assert_allclose(d, ref_d, rtol=3 * BF16_ULP, atol=1e-7)  # every element, over 3 steps
    assert np.mean(np.abs(d - ref_d) <= 1e-5 * np.abs(ref_d) + 1e-7) > 0.95

    # What the option changes: against fp32 moments (the default) the updates move by the moments' rounding,
    # carried over the steps (measured: at most 0.5% of the largest update over these 3 steps, median 0.17%)
    p32, _ = _run(fused_adamw.clip_adamw(optax.constant_schedule(LR), **HP), params, grads)
    d32 = _deltas(p32, params)
    assert 0 < np.max(np.abs(d - d32)) <= BF16_ULP * np.max(np.abs(d32))
    assert np.median(np.abs(d - d32) / np.abs(d32)) <= BF16_ULP / 2
    # optax's own mu_dtype also rounds b1 * mu to bf16 and updates from the moment before its rounding: its
    # moments are within two bf16 ulps of the largest moment of these, its updates within the same bound
    pop, adam_op = _run(fused_adamw.reference(optax.constant_schedule(LR), **HP, mu_dtype="bfloat16"), params, grads)
    assert np.max(np.abs(_deltas(pop, params) - d)) <= BF16_ULP * np.max(np.abs(d32))
    for a, b in zip(adam_op.mu, adam.mu, strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.max(np.abs(a - b)) <= 2 * BF16_ULP * np.max(np.abs(b))


def test_bf16_gradients_are_upcast_element_by_element():
    """bf16 gradients into clip_adamw give the update of the same values in fp32 to fp32 rounding (nothing is
    computed in bf16: norm, moments and update upcast per element; XLA fuses the two programs differently), and
    match the float64 reference of those values."""
    params, grads = _problem(seed=1)
    tx = fused_adamw.clip_adamw(optax.constant_schedule(LR), **HP)
    p16, adam16 = _run(tx, params, grads, jnp.bfloat16)
    rounded = [[_bf16(g).astype(np.float32) for g in step_grads] for step_grads in grads]
    p32, adam32 = _run(tx, params, rounded)
    fp32_rounding = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.max(np.abs(b)))
    jax.tree.map(fp32_rounding, (p16, adam16.mu, adam16.nu), (p32, adam32.mu, adam32.nu))
    ref_p, _, _ = _numpy_adamw(params, rounded, mu_bf16=False)
    np.testing.assert_allclose(_deltas(p16, params), _deltas(ref_p, params), rtol=1e-4, atol=4e-7)  # fp32 ulps of p


def _tiny(**optim):
    c = tiny.get_config()
    c.model.dtype = "bfloat16"  # bf16 matmuls with fp32 params, as on TPU
    c.model.scan_layers = True  # the stacked weights' gradients, as on TPU
    c.model.dense_input_barrier = False  # the TPU configs' Dense (the CPU weight-gradient rule rounds elsewhere)
    c.optim.update(optim)
    return c


def _step_once(config):
    setup = make_setup(config, jax.devices()[:1])
    state, frozen = init_state(setup, base_params(setup))
    loader = train.make_train_loader(config, train.make_source(config, ""))
    batch = global_batch(next(loader), sharding.batch_sharding(setup.mesh))
    loader.close()
    train_step = step.with_rules(setup, step.jit_steps(setup)[0])
    grads = step.with_rules(setup, jax.jit(lambda s: jax.grad(lambda p: step._loss_fn(setup, frozen)(
        p, batch, jnp.full((8,), 0.4), jax.random.PRNGKey(1), 0)[0])(step.differentiated(setup, s["params"]))))
    g = grads(state)
    state, metrics = train_step(state, frozen, batch)
    return g, jax.device_get(state), jax.device_get(metrics)


@pytest.mark.slow  # compiles two train steps of the bf16 model (280 s on the shared box at load 13)
def test_bf16_gradients_in_the_train_step():
    """grad_dtype=bfloat16 differentiates the Dense weights as their bf16 copy: those gradients are bf16 and equal
    the fp32 path's (which XLA computes in bf16 and upcasts) exactly; the rest (RMSNorm scales) stay fp32. A train
    step with it gives the fp32-gradient run's loss and params, moments and grad norm to fp32 rounding."""
    g32, s32, m32 = _step_once(_tiny())
    g16, s16, m16 = _step_once(_tiny(grad_dtype="bfloat16"))
    dtypes = {jax.tree_util.keystr(k): v.dtype for k, v in jax.tree_util.tree_leaves_with_path(g16)}
    assert all((v == jnp.bfloat16) == ("'scale'" not in k) for k, v in dtypes.items()), dtypes
    assert sum(v == jnp.bfloat16 for v in dtypes.values()) > 0.8 * len(dtypes)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), b), g16, g32)
    fp32_rounding = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.max(np.abs(b)))
    jax.tree.map(fp32_rounding, (s16["params"], s16["opt_state"]), (s32["params"], s32["opt_state"]))
    assert m16["loss"] == m32["loss"] and m16["grad_norm"] == pytest.approx(m32["grad_norm"], rel=1e-6)


def test_grad_dtype_needs_the_model_dtype():
    c = tiny.get_config()  # model.dtype float32
    c.optim.grad_dtype = "bfloat16"
    with pytest.raises(UserError, match=r"config.optim.grad_dtype='bfloat16' needs config.model.dtype='bfloat16'"):
        check(c)
    c.optim.grad_dtype, c.optim.mu_dtype = "", "int8"
    with pytest.raises(UserError, match=r"config.optim.mu_dtype"):
        check(c)


@pytest.mark.slow  # three short trainings
def test_resume_is_bit_exact_with_both_options(tmp_path):
    """2N steps straight == N steps, a restart from the checkpoint (bf16 mu restored as bf16), N more."""
    def config(steps):
        c = _tiny(mu_dtype="bfloat16", grad_dtype="bfloat16")
        c.train.num_steps, c.checkpoint.every_steps, c.train.eval_every = steps, 4, 0
        return c

    train.train_and_evaluate(config(8), str(tmp_path / "straight"), show_progress=False)
    train.train_and_evaluate(config(4), str(tmp_path / "resumed"), show_progress=False)
    train.train_and_evaluate(config(8), str(tmp_path / "resumed"), show_progress=False)

    def restored(workdir):
        setup = make_setup(config(8))
        ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), config(8).checkpoint)
        state = ckpt.restore(8, setup.abstract_state, None)
        ckpt.close()
        return jax.device_get(state)

    a, b = restored(tmp_path / "straight"), restored(tmp_path / "resumed")
    assert {m.dtype for m in jax.tree.leaves(a["opt_state"].inner_state[-1][0].mu)} == {np.dtype(jnp.bfloat16)}
    jax.tree.map(np.testing.assert_array_equal, (a["params"], a["opt_state"]), (b["params"], b["opt_state"]))
    losses = lambda w: {d["step"]: d["loss"] for d in map(json.loads, (w / "metrics.jsonl").read_text().splitlines())
                        if "loss" in d}
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed") and len(losses(tmp_path / "straight")) == 4
