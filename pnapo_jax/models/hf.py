"""What the Flax ports of transformers' text encoders (t5.py, clip.py) share: layers, activations by
transformers' names, attention with a bias and a mask. Their weights load in pnapo_jax/convert/hf.py.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """transformers' ACT2FN[name] for the activations these encoders use."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def dense(features: int, axes: tuple[str, str], dtype: Dtype, param_dtype: Dtype, use_bias: bool,
          name: str) -> nn.Dense:
    """A torch-style Linear: `kernel` [in, out] (and `bias`) with logical axes."""
    return nn.Dense(features, use_bias=use_bias, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype),
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]), name=name)


def embed(num: int, features: int, axes: tuple[str | None, str], dtype: Dtype, param_dtype: Dtype,
          name: str) -> nn.Embed:
    """An Embedding table [num, features] with logical axes."""
    return nn.Embed(num, features, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype),
                    embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), axes), name=name)


def attention(q_BxQxNxH: jax.Array, k_BxKxNxH: jax.Array, v_BxKxNxH: jax.Array, scale: float,
              bias_BxNxQxK: jax.Array | None = None, mask_BxNxQxK: jax.Array | None = None) -> jax.Array:
    """softmax(scale q k^T + bias, masked) v with logits and softmax in fp32; bias and mask broadcast.

    Masked-out logits are set to the most negative float, as transformers' eager attention does, so a
    fully masked row attends uniformly instead of giving NaN.
    """
    logits = jnp.einsum("bqnh,bknh->bnqk", q_BxQxNxH, k_BxKxNxH, preferred_element_type=jnp.float32) * scale
    if bias_BxNxQxK is not None:
        logits = logits + bias_BxNxQxK.astype(jnp.float32)
    if mask_BxNxQxK is not None:
        logits = jnp.where(mask_BxNxQxK, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BxKxNxH.dtype)
    return jnp.einsum("bnqk,bknh->bqnh", probs, v_BxKxNxH)
