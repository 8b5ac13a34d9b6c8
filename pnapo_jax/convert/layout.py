"""Where each diffusers tensor lives in our params, and moving tensors in and out one at a time.

The key list comes from our model's own param tree (`jax.eval_shape` of `flux.init_params`), so no
parameter name is written down twice: `keys.py` holds only the per-leaf naming rules.
"""

import collections
import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pnapo_jax.convert import keys
from pnapo_jax.models import flux

Path = tuple[str, ...]
_LAYER_RE = re.compile(rf"^({'|'.join(flux.STACKS)})_(\d+)$")
_BLOCK_KEY_RE = re.compile(r"^([a-z_]+)\.(\d+)\.(.+)$")  # `transformer_blocks.3.rest`, `double_blocks.3.rest`
_MAX_LISTED = 8


@dataclasses.dataclass(frozen=True)
class Entry:
    """One diffusers tensor: our leaf holding it, its index on that leaf's layer axis (scanned layout
    only), whether the leaf holds it transposed (torch Linear [out, in] vs Flax kernel [in, out])."""

    path: Path
    layer: int | None
    transpose: bool
    shape: tuple[int, ...]  # in diffusers (torch) layout


@dataclasses.dataclass(frozen=True)
class Layout:
    entries: dict[str, Entry]  # diffusers key -> where it lives
    leaves: dict[Path, tuple[int, ...]]  # our leaf -> its shape (layer axis first when stacked)


def layout(cfg: flux.FluxConfig, scanned: bool) -> Layout:
    """The diffusers <-> Flax correspondence for `cfg`, per-layer or scanned."""
    per_layer = dataclasses.replace(cfg, scan_layers=False)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(flux.init_params(per_layer, jax.random.key(0))))
    depth = dict(zip(flux.STACKS, (cfg.num_layers, cfg.num_single_layers), strict=True))
    entries, leaves = {}, {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        key, transpose = keys.flax_to_diffusers(path)
        layer, leaf_shape = None, leaf.shape
        match = _LAYER_RE.match(path[0]) if scanned else None
        if match:
            path, layer, leaf_shape = (match[1], *path[1:]), int(match[2]), (depth[match[1]], *leaf.shape)
        entries[key] = Entry(path, layer, transpose, leaf.shape[::-1] if transpose else leaf.shape)
        leaves[path] = leaf_shape
    return Layout(entries, leaves)


def _listed(names: list[str]) -> str:
    more = f" ... ({len(names)} in all)" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def check_keys(expected: Iterable[str], found: Iterable[str] | Mapping[str, str], source: str) -> None:
    """Raise one ValueError naming the missing and unexpected keys; a mapping `found` gives each key's file."""
    expected, where = set(expected), found if isinstance(found, Mapping) else None
    found = set(found)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if where is not None:
        unexpected = [f"{k} (in {where[k]})" for k in unexpected]
    problems = [f"{what} keys: {_listed(names)}" for what, names in (("missing", missing), ("unexpected", unexpected))
                if names]
    if problems:
        raise ValueError(f"{source} does not match the FLUX config: " + "; ".join(problems))


def check_shape(key: str, source: str, expected: tuple[int, ...], found: tuple[int, ...]) -> None:
    if tuple(found) != tuple(expected):
        raise ValueError(f"{key} in {source}: expected shape {tuple(expected)}, found {tuple(found)}")


def by_leaf(key: str) -> tuple[str, int]:
    """Sort key (diffusers or BFL keys) putting one parameter's layers side by side, so that each stacked
    leaf of the scanned layout completes and leaves the host before the next one is started."""
    match = _BLOCK_KEY_RE.match(key)
    return (f"{match[1]}.{match[3]}", int(match[2])) if match else (key, -1)


def assemble(lay: Layout, tensors: Iterable[tuple[str, np.ndarray, str]], dtype: Any,
             shardings: Any = None) -> dict[str, Any]:
    """Our params from a stream of (diffusers key, tensor, source file) whose keys were checked.

    Each leaf is cast and placed (with its sharding, if given) as soon as it is complete, so the host
    holds only the stacked leaves still being filled: one leaf's stack when the stream comes in
    `by_leaf` order, about one model copy in any order, never two.
    """
    dtype = jnp.dtype(dtype)
    placement = _flat_shardings(shardings, lay)
    unfilled = collections.Counter(e.path for e in lay.entries.values() if e.layer is not None)
    stacks: dict[Path, np.ndarray] = {}
    out = {}
    for key, x, source in tensors:
        e = lay.entries[key]
        check_shape(key, source, e.shape, x.shape)
        x = x.T if e.transpose else x
        if e.layer is None:
            out[e.path] = _place(x.astype(dtype, copy=False), placement.get(e.path))
            continue
        if e.path not in stacks:
            stacks[e.path] = np.empty(lay.leaves[e.path], dtype)
        stacks[e.path][e.layer] = x
        unfilled[e.path] -= 1
        if not unfilled[e.path]:
            out[e.path] = _place(stacks.pop(e.path), placement.get(e.path))
    return traverse_util.unflatten_dict(out)


def _place(x: np.ndarray, sharding: Any) -> jax.Array:
    # Waiting for the transfer lets the host buffer go now; an async transfer would hold it a while longer.
    return jax.device_put(x, sharding).block_until_ready()


def _flat_shardings(shardings: Any, lay: Layout) -> dict[Path, Any]:
    if shardings is None:
        return {}
    flat = traverse_util.flatten_dict(shardings)
    check_keys(map("/".join, lay.leaves), map("/".join, flat), "the shardings tree")
    return flat


def export_layout(cfg: flux.FluxConfig, params: Any) -> tuple[Layout, dict[Path, Any]]:
    """The layout of `params` (scanned or per-layer, boxed or not) and its flat leaves, checked against `cfg`."""
    flat = traverse_util.flatten_dict(nn.meta.unbox(params))
    lay = layout(cfg, scanned=any(path[0] in flux.STACKS for path in flat))
    check_keys(map("/".join, lay.leaves), map("/".join, flat), "the params tree")
    for path, shape in lay.leaves.items():
        check_shape("/".join(path), "params", shape, flat[path].shape)
    return lay, flat


def tensor(flat: dict[Path, Any], e: Entry) -> np.ndarray:
    """One diffusers tensor (torch layout) on the host; a jax leaf is sliced and transposed on its device."""
    x = flat[e.path] if e.layer is None else flat[e.path][e.layer]
    return np.ascontiguousarray(x.T if e.transpose else x)

