"""The fused clip + AdamW + skip-if-not-finite update against optax's own chain (the ground truth)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pnapo_jax import fused_adamw

LR = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 8)


def _params():
    rng = np.random.default_rng(0)
    return {"a": {"kernel": jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)},
            "b": jnp.asarray(rng.normal(size=(11,)), jnp.float32)}


def _grads(i, params, scale):
    rng = np.random.default_rng(100 + i)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * scale, jnp.float32), params)


def _run(tx, grads_list):
    params = _params()
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: (lambda u, s2: (optax.apply_updates(p, u), u, s2))(*tx.update(g, s, p)))
    out = []
    for g in grads_list:
        params, updates, state = step(g, state, params)
        out.append((params, updates, state))
    return out


def _assert_same(got, want):
    for (p, u, s), (p_ref, u_ref, s_ref) in zip(got, want, strict=True):
        assert jax.tree.structure(s) == jax.tree.structure(s_ref)
        for a, b in zip(jax.tree.leaves((p, u, s)), jax.tree.leaves((p_ref, u_ref, s_ref)), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("weight_decay,grad_clip", [(0.0, 1.0), (1e-2, 1.0), (1e-2, 0.0)])
def test_same_updates_and_state_as_optax_including_skipped_steps(weight_decay, grad_clip):
    params = _params()
    nan = jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan), _grads(9, params, 1.0))
    inf = jax.tree.map(lambda p: jnp.full_like(p, jnp.inf), params)
    huge = _grads(10, params, 1e20)  # finite, but the squared norm overflows: not skipped, clipped to ~0
    # small (unclipped) and large (clipped) norms, two non-finite steps in a row, then training goes on
    grads_list = [_grads(0, params, 0.01), _grads(1, params, 3.0), nan, inf, _grads(2, params, 0.05), huge,
                  _grads(3, params, 2.0)]
    kw = dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, grad_clip=grad_clip)
    got = _run(fused_adamw.clip_adamw(LR, **kw), grads_list)
    _assert_same(got, _run(fused_adamw.reference(LR, **kw), grads_list))
    skipped = got[3][2]
    assert int(skipped.total_notfinite) == 2 and int(skipped.notfinite_count) == 2
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(got[2][1]))  # a skipped step moves nothing
    assert int(got[-1][2].notfinite_count) == 0 and int(got[-1][2].total_notfinite) == 2


def test_gives_up_skipping_after_max_consecutive_errors_like_optax():
    params = _params()
    nan = jax.tree.map(lambda p: p.at[0].set(jnp.nan), _grads(5, params, 1.0))
    grads_list = [_grads(0, params, 1.0), nan, nan, nan]
    kw = dict(b1=0.9, b2=0.99, eps=1e-6, weight_decay=0.0, grad_clip=1.0, max_consecutive_errors=1)
    got = _run(fused_adamw.clip_adamw(LR, **kw), grads_list)
    _assert_same(got, _run(fused_adamw.reference(LR, **kw), grads_list))
    assert np.isnan(np.asarray(got[-1][0]["b"])).any()  # the third NaN step was applied, as optax does
