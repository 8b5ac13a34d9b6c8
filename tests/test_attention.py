"""Attention kernels: Pallas splash attention (interpreted on CPU) against the XLA path, forward and backward, at
FLUX's head dim and at sequence lengths that are not block multiples; and the startup check of
`config.model.attention_impl` against the backend."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from pnapo_jax import aot, sharding
from pnapo_jax.backbones import flux as backbone_flux
from pnapo_jax.config import DEFAULT_RULES
from pnapo_jax.errors import UserError
from pnapo_jax.models import layers, splash
from pnapo_jax.setup import make_setup

sys.path.insert(0, str(epath.Path(__file__).parent.parent / "configs"))
import flux_gpu  # noqa: E402
import flux_tpu  # noqa: E402


def _qkv_and_cotangent(shape, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    return [jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in keys]


def _value_and_grads(impl, q, k, v, g, block=128):
    """Attention output and d<out, g>/d(q, k, v): a random cotangent, so every output element matters."""
    def loss(q, k, v):
        return jnp.sum(layers.attention(q, k, v, impl, block).astype(jnp.float32) * g.astype(jnp.float32))

    out = layers.attention(q, k, v, impl, block)
    return [np.asarray(a, np.float32) for a in (out, *jax.grad(loss, (0, 1, 2))(q, k, v))]


@pytest.mark.parametrize("dtype, length, tol", [
    (jnp.float32, 300, 1e-5),  # 3 blocks of 128, the last one 84 tokens short: online softmax + padding mask
    (jnp.bfloat16, 200, 2e-2),  # bf16 inputs, fp32 accumulation: within bf16 rounding of the XLA path
])
def test_splash_matches_xla_forward_and_backward(dtype, length, tol):
    q, k, v, g = _qkv_and_cotangent((2, length, 2, 128), dtype)
    ref = _value_and_grads("xla", q, k, v, g)
    ours = _value_and_grads("splash_interpret", q, k, v, g)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref, strict=True):
        err = np.abs(a - b).max() / np.abs(b).max()
        assert err <= tol, (name, err)


def test_splash_pads_to_the_block_and_shrinks_short_blocks():
    assert splash.padded_length(4608, 512) == (512, 4608)  # 1024^2 image + 512 text tokens: no padding
    assert splash.padded_length(3584, 512) == (512, 3584)  # 1024x768 + 512
    assert splash.padded_length(1536, 1024) == (1024, 2048)
    assert splash.padded_length(22, 512) == (128, 128)  # short sequences: one lane-wide block


def test_splash_under_a_mesh_equals_one_device():
    """On a (data, fsdp, tensor) mesh the kernel runs per device on its batch and head shard (shard_map)."""
    q, k, v, _ = _qkv_and_cotangent((4, 130, 2, 128), jnp.float32, seed=1)
    ref = layers.attention(q, k, v, "splash_interpret", 128)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with jax.set_mesh(mesh), layers.nn.logical_axis_rules(DEFAULT_RULES):
        jaxpr = jax.make_jaxpr(lambda *a: layers.attention(*a, "splash_interpret", 128))(q, k, v)
        out = jax.jit(lambda *a: layers.attention(*a, "splash_interpret", 128))(q, k, v)
    assert "shard_map" in str(jaxpr)
    # the FLOP count is the whole mesh's, not one device's shard; work replicated over devices counts once
    attend = lambda *a: layers.attention(*a, "splash_interpret", 128)
    assert aot.matmul_flops(jaxpr.jaxpr) == aot.matmul_flops(jax.make_jaxpr(attend)(q, k, v).jaxpr)
    one = [x[:1] for x in (q, k, v)]  # batch 1 does not split over data x fsdp = 4: heads only
    with jax.set_mesh(mesh), layers.nn.logical_axis_rules(DEFAULT_RULES):
        sharded_one = aot.matmul_flops(jax.make_jaxpr(attend)(*one).jaxpr)
    assert sharded_one == aot.matmul_flops(jax.make_jaxpr(attend)(*one).jaxpr)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6)


def test_flops_count_the_kernel_grid():
    """aot.matmul_flops sees inside the Pallas kernel: the forward is the XLA path's 2 matmuls per head."""
    q = jnp.ones((2, 256, 2, 128), jnp.bfloat16)
    flops = {impl: aot.matmul_flops(jax.make_jaxpr(lambda q, i=impl: layers.attention(q, q, q, i, 128))(q).jaxpr)
             for impl in ("xla", "splash_interpret")}
    assert flops["splash_interpret"] == flops["xla"] == 2 * 2 * 2 * 256 * 256 * 128 * 2


@pytest.mark.parametrize("impl, backend", [("splash", "cpu"), ("splash", "gpu"), ("cudnn", "cpu"),
                                           ("cudnn", "tpu"), ("flash", "tpu")])
def test_an_impl_the_backend_cannot_run_is_one_line(impl, backend):
    with pytest.raises(UserError) as e:
        layers.check_attention_impl(impl, backend)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"config.model.attention_impl={impl!r}")
    assert f"on the {backend} backend" in message and "splash_interpret" in message
    choices = message.split("choose one of")[1]
    assert ("'splash'" in choices) == (backend == "tpu") and ("'cudnn'" in choices) == (backend == "gpu")


def test_impls_run_where_they_should():
    for impl, backend in [("splash", "tpu"), ("cudnn", "gpu"), ("xla", "cpu"), ("splash_interpret", "cpu")]:
        layers.check_attention_impl(impl, backend)


@pytest.mark.parametrize("config, impl", [(flux_tpu, "splash"), (flux_gpu, "cudnn")])
def test_accelerator_configs_stop_at_setup_on_cpu(config, impl):
    c = config.get_config("lora")
    assert c.model.attention_impl == impl
    with pytest.raises(UserError, match=f"config.model.attention_impl='{impl}' cannot run on the cpu backend"):
        make_setup(c, jax.devices("cpu"))


def test_flux_gpu_is_flux_tpu_but_the_kernel():
    for arg in ("", "lora", "lora,independent"):
        gpu, tpu = flux_gpu.get_config(arg), flux_tpu.get_config(arg)
        assert backbone_flux.model_config(gpu) == backbone_flux.model_config(tpu).__class__(
            **{**backbone_flux.model_config(tpu).__dict__, "attention_impl": "cudnn"})
        assert gpu.pnapo == tpu.pnapo and gpu.optim == tpu.optim and gpu.lora == tpu.lora
