"""layers.Dense's CPU matmul (`matmul_wgrad_nt`, used with `input_barrier`) changes only how XLA lays out the
weight gradient (benchmarks/bench_train_step.py measures what that buys): values and gradients equal a plain
`x @ kernel` in float64, for widening and narrowing layers and batched inputs, and in bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pnapo_jax.models import layers


@pytest.mark.parametrize("shape_x, k_out", [((6, 4), 12), ((2, 5, 12), 4), ((2, 3, 5, 8), 8)])
def test_custom_gradient_equals_plain_matmul_in_float64(shape_x, k_out):
    with jax.enable_x64():
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=shape_x))
        w = jnp.asarray(rng.normal(size=(shape_x[-1], k_out)))
        dy = jnp.asarray(rng.normal(size=shape_x[:-1] + (k_out,)))
        ours_y, ours_vjp = jax.vjp(layers.matmul_wgrad_nt, x, w)
        plain_y, plain_vjp = jax.vjp(jnp.matmul, x, w)
        np.testing.assert_allclose(ours_y, plain_y, rtol=1e-12)
        for ours, plain in zip(ours_vjp(dy), plain_vjp(dy), strict=True):
            assert ours.dtype == plain.dtype and ours.shape == plain.shape
            np.testing.assert_allclose(ours, plain, rtol=1e-12, atol=1e-12)


def test_bf16_gradients_keep_their_dtypes_and_values():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 16, 32)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(32, 96)), jnp.bfloat16)
    loss = lambda f: lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) ** 2)
    ours = jax.grad(loss(layers.matmul_wgrad_nt), argnums=(0, 1))(x, w)
    plain = jax.grad(loss(jnp.matmul), argnums=(0, 1))(x, w)
    for a, b in zip(ours, plain, strict=True):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=0.5)

