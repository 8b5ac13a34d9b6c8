"""Memory-efficient attention on TPU: jax's Pallas splash attention kernel, for any sequence length and mesh.

Splash attention computes softmax(q k^T / sqrt(H)) v block by block (fp32 accumulation, online softmax) and
holds no [L, L] scores, forward or backward: per image and block it keeps q, k, v, the output and an fp32
log-sum-exp. The kernel needs sequence lengths that are multiples of its block size, so the sequence is padded
and the padded keys masked out with segment ids (padded queries attend only to padded keys, so no softmax row
is empty). The kernel is a Pallas call, which XLA's partitioner cannot split, so under a mesh it runs inside
`shard_map` on each device's part of the batch and heads. `interpret=True` runs the same kernel on any backend
(slowly): that is how CPU tests check it against the XLA path.
"""

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from pnapo_jax import sharding

LANES = 128  # TPU vector lanes: block sizes are multiples of it


def padded_length(length: int, block: int) -> tuple[int, int]:
    """(block actually used, padded length): the block shrinks to the lane-rounded length for short sequences."""
    block = min(block, -(-length // LANES) * LANES)
    return block, -(-length // block) * block


def _kernel(heads: int, length: int, block: int, interpret: bool) -> Callable[..., jax.Array]:
    """A splash kernel for (heads, padded length, block). Built per trace, not cached: it holds its mask tables
    as arrays of the trace that built it (under shard_map, tracers)."""
    b = block
    sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = sa.MultiHeadMask([sa.FullMask((length, length))] * heads)
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q_BxLxNxH: jax.Array, k_BxLxNxH: jax.Array, v_BxLxNxH: jax.Array, block: int, interpret: bool
           ) -> jax.Array:
    """Splash attention on one device's arrays (no mesh axes inside)."""
    _, L, N, H = q_BxLxNxH.shape
    block, Lp = padded_length(L, block)
    scale = 1.0 / math.sqrt(H)
    q_BxLxNxH = (q_BxLxNxH.astype(jnp.float32) * scale).astype(q_BxLxNxH.dtype)  # the kernel does not scale

    def heads_first(x_BxLxNxH: jax.Array) -> jax.Array:
        x_BxNxLxH = jnp.transpose(x_BxLxNxH, (0, 2, 1, 3))
        return jnp.pad(x_BxNxLxH, ((0, 0), (0, 0), (0, Lp - L), (0, 0)))

    segments = None
    if Lp != L:
        ids_L = (jnp.arange(Lp) >= L).astype(jnp.int32)  # 0: real token, 1: padding
        segments = sa.SegmentIds(q=ids_L, kv=ids_L)
    kernel = _kernel(N, Lp, block, interpret)
    out_BxNxLxH = jax.vmap(kernel, in_axes=(0, 0, 0, None))(
        heads_first(q_BxLxNxH), heads_first(k_BxLxNxH), heads_first(v_BxLxNxH), segments)
    return jnp.transpose(out_BxNxLxH[:, :, :L], (0, 2, 1, 3))


def splash_attention(q_BxLxNxH: jax.Array, k_BxLxNxH: jax.Array, v_BxLxNxH: jax.Array, block: int = 512,
                     interpret: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(H)) v, [B, L, N, H] in and out, with no [L, L] scores held.

    Under a mesh (`jax.set_mesh`) each device attends its batch and head shard (logical axes `batch`, `heads`
    mapped by the active rules); with no mesh it runs on the arrays as they are.
    """
    run = functools.partial(_local, block=block, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return run(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH)
    spec = sharding.divisible_spec(q_BxLxNxH.shape, nn.logical_to_mesh_axes(("batch", "length", "heads", None)), mesh)
    return jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
        q_BxLxNxH, k_BxLxNxH, v_BxLxNxH)
