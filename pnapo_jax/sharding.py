"""Device mesh, logical-axis rules and the shardings derived from them.

Parameters and activations carry logical axis names (see `pnapo_jax.models`); a short rules list in the
config maps each name to mesh axes (data, fsdp, tensor). Everything is derived with `jax.eval_shape`, so no
array is materialised to learn its sharding.
"""

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax._src import cloud_tpu_init, xla_bridge  # no public API tells a Cloud TPU VM or a started backend
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pnapo_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both: FSDP is data parallel with sharded weights
# The logical axis of a LoRA adapter's feature dimension where its base layer's is not `embed` (models.layers):
# sharded only where its size divides, since adapters' sizes (a rank, a latent width) need not fit the mesh.
ADAPTER_AXIS = "adapter"
Rules = Sequence[tuple[str, Any]]


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize()` where jax can find the other processes by itself: on a Cloud TPU VM (workers
    and coordinator come from the VM's metadata server, so every worker of a pod slice runs the same command, as
    launch/tpu.sh does), or when JAX_COORDINATOR_ADDRESS is set (count and index from a cluster jax detects).
    Elsewhere nothing is called: no metadata query, no wait for peers on a laptop."""
    if jax.distributed.is_initialized() or xla_bridge.backends_are_initialized():
        return  # too late to join others: this process already computes alone (a notebook, a test)
    if cloud_tpu_init.running_in_cloud_tpu_vm or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
        logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Sizes of (data, fsdp, tensor); one -1 takes whatever devices the others leave."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise UserError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes, strict=True))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise UserError(f"config.mesh: {num_devices} devices do not divide by the fixed axes' product {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise UserError(f"config.mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} "
                         f"devices, have {num_devices}")
    return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), laid out for the interconnect."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (AssertionError, NotImplementedError, ValueError):  # topology-unaware fallback (e.g. CPU)
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def rules_from_config(rules_cfg: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
    """Config rules (lists, possibly of lists) -> hashable tuples flax accepts."""
    out = []
    for name, axes in rules_cfg:
        out.append((name, tuple(axes) if isinstance(axes, list | tuple) else axes))
    return tuple(out)


def divisible_spec(shape: tuple[int, ...], spec: P, mesh: Mesh | jax.sharding.AbstractMesh) -> P:
    """`spec` without the mesh axes that do not divide their dimension (those dimensions stay whole)."""
    out = []
    for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        out.append(axes if size % math.prod(mesh.shape[a] for a in names) == 0 else None)
    return P(*out)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a pytree of nn.LogicallyPartitioned leaves (unboxed leaves are replicated).
    ADAPTER_AXIS dimensions stay whole where their mesh axes do not divide them."""
    def spec(leaf: Any) -> P:
        if not isinstance(leaf, nn.LogicallyPartitioned):
            return P()
        mesh_spec = nn.logical_to_mesh_axes(leaf.names, rules)
        fitted = divisible_spec(leaf.value.shape, mesh_spec, mesh)
        return P(*(f if name == ADAPTER_AXIS else m for name, m, f in zip(leaf.names, mesh_spec, fitted,
                                                                          strict=True)))

    specs = jax.tree.map(spec, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data and fsdp; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
