"""Where each diffusers tensor lives in our params, and moving tensors in and out one at a time.

The key list comes from our model's own param tree (`jax.eval_shape` of the model's `init_params`), so no
parameter name is written down twice: `keys.py` holds only the per-leaf naming rules. Both model families
(FLUX's `FluxConfig`, SD3's `SD3Config`) share this; SD3 adds two tensors whose torch layout is not a Linear's.
"""

import collections
import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pnapo_jax.convert import files, keys
from pnapo_jax.errors import UserError
from pnapo_jax.models import flux, sd3

Path = tuple[str, ...]
_PER_LAYER_RE = re.compile(r"^(.+)_(\d+)$")
_BLOCK_KEY_RE = re.compile(r"^([a-z_]+)\.(\d+)\.(.+)$")  # `transformer_blocks.3.rest`, `double_blocks.3.rest`


@dataclasses.dataclass(frozen=True)
class Entry:
    """One diffusers tensor: our leaf holding it, its index on that leaf's layer axis (scanned layout
    only), whether the leaf holds it transposed (torch Linear [out, in] vs Flax kernel [in, out]), and, for SD3's
    patch convolution and output projection, the reshape to 2-D and the row order (`rows[i]`: the stored row that
    is our row i, before transposing)."""

    path: Path
    layer: int | None
    transpose: bool
    shape: tuple[int, ...]  # in diffusers (torch) layout
    rows: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Layout:
    entries: dict[str, Entry]  # diffusers key -> where it lives
    leaves: dict[Path, tuple[int, ...]]  # our leaf -> its shape (layer axis first when stacked)


def scanned_stacks(cfg: Any) -> dict[str, tuple[str, int, int]]:
    """Scanned stack name -> (per-layer name prefix, first layer, depth) for either model family."""
    if isinstance(cfg, sd3.SD3Config):
        return sd3.scanned_stacks(cfg)
    return {s: (s, 0, n) for s, n in zip(flux.STACKS, (cfg.num_layers, cfg.num_single_layers), strict=True)}


def _init_params(cfg: Any) -> Callable[[Any, jax.Array], Any]:
    return sd3.init_params if isinstance(cfg, sd3.SD3Config) else flux.init_params


def _stored_forms(cfg: Any) -> dict[str, tuple[tuple[int, ...] | None, tuple[int, ...] | None]]:
    """diffusers key -> (its stored shape when not our leaf's, its row order) for the tensors that need them."""
    if not isinstance(cfg, sd3.SD3Config):
        return {}
    p, rows = cfg.patch_size, tuple(int(i) for i in sd3.diffusers_rows(cfg))
    return {"pos_embed.proj.weight": ((cfg.inner_dim, cfg.in_channels, p, p), None),
            "proj_out.weight": (None, rows), "proj_out.bias": (None, rows)}


def layout(cfg: Any, scanned: bool) -> Layout:
    """The diffusers <-> Flax correspondence for `cfg` (a FluxConfig or SD3Config), per-layer or scanned."""
    per_layer = dataclasses.replace(cfg, scan_layers=False)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(_init_params(cfg)(per_layer, jax.random.key(0))))
    placed = {(prefix, start + j): (name, j, n) for name, (prefix, start, n) in scanned_stacks(cfg).items()
              for j in range(n)}
    forms = _stored_forms(cfg)
    entries, leaves = {}, {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        key, transpose = keys.flax_to_diffusers(path)
        layer, leaf_shape = None, leaf.shape
        match = _PER_LAYER_RE.match(path[0]) if scanned else None
        if match and (match[1], int(match[2])) in placed:
            name, layer, depth = placed[match[1], int(match[2])]
            path, leaf_shape = (name, *path[1:]), (depth, *leaf.shape)
        stored, rows = forms.get(key, (None, None))
        entries[key] = Entry(path, layer, transpose, stored or (leaf.shape[::-1] if transpose else leaf.shape), rows)
        leaves[path] = leaf_shape
    return Layout(entries, leaves)


def is_scanned(cfg: Any, flat: Iterable[Path]) -> bool:
    """Whether a flat params tree is in the scanned layout."""
    names = scanned_stacks(cfg)
    return any(path[0] in names for path in flat)


def to_ours(e: Entry, x: np.ndarray) -> np.ndarray:
    """A stored (torch-layout) tensor as our leaf holds it."""
    if len(e.shape) > 2:  # a conv kernel [out, in, kh, kw] is a Linear's [out, in * kh * kw]
        x = x.reshape(e.shape[0], -1)
    if e.rows is not None:
        x = x[list(e.rows)]
    return x.T if e.transpose else x


def to_stored(e: Entry, x: Any) -> Any:
    """Our leaf as the stored (torch-layout) tensor; the inverse of `to_ours`."""
    x = x.T if e.transpose else x
    if e.rows is not None:
        x = x[np.argsort(e.rows)]
    return x.reshape(e.shape) if len(e.shape) > 2 else x


def buffers(cfg: Any) -> dict[str, np.ndarray]:
    """diffusers key -> the constant it must hold: tensors diffusers stores that we compute (SD3's position table)."""
    return {"pos_embed.pos_embed": sd3.full_position_table(cfg)} if isinstance(cfg, sd3.SD3Config) else {}


def check_buffer(key: str, source: str, expected: np.ndarray, x: np.ndarray) -> None:
    """A stored constant must be ours up to its storage rounding: we compute it, we do not load it."""
    check_shape(key, source, expected.shape, x.shape)
    atol = 2 * float(jnp.finfo(x.dtype).eps) + 1e-6
    err = float(np.abs(x.astype(np.float64) - expected).max())
    if err > atol:
        raise UserError(f"{key} in {source} differs from the 2-D sin-cos table of its sample_size and "
                        f"pos_embed_max_size by {err:.3g}: a position table this port does not compute")


# Backbone name -> (config class, diffusers class name, key prefixes only its checkpoints have).
_FAMILIES = {
    "flux": (flux.FluxConfig, flux.CLASS_NAME, ("single_transformer_blocks.", "double_blocks.", "single_blocks.")),
    "sd3": (sd3.SD3Config, sd3.CLASS_NAME, ("pos_embed.proj.", "joint_blocks.", "model.diffusion_model.joint_blocks.")),
}


def class_backbone(class_name: str | None) -> str | None:
    """The backbone whose diffusers transformer a config.json's `_class_name` names; None: no backbone's. The one
    map from a transformer folder's class to its backbone (weights loading, the demo world, pipelines, bench)."""
    return next((name for name, (_, cls, _) in _FAMILIES.items() if class_name == cls), None)


def looks_like(class_name: str | None, stored_keys: Iterable[str]) -> str | None:
    """The backbone a checkpoint is for: by its config's `_class_name`, else by its key names; None if neither."""
    if (name := class_backbone(class_name)) is not None:
        return name
    stored_keys = list(stored_keys)
    for name, (_, _, prefixes) in _FAMILIES.items():
        if any(k.startswith(prefixes) for k in stored_keys):
            return name
    return None


def check_backbone(config_cls: type, source: str, class_name: str | None, stored_keys: Iterable[str]) -> None:
    """Weights of the other model family: one line naming what they look like and the config field to change."""
    expected = next(name for name, (cls, _, _) in _FAMILIES.items() if cls is config_cls)
    found = looks_like(class_name, stored_keys)
    if found is not None and found != expected:
        what = f"_class_name {class_name}" if class_name else "its tensor names"
        raise UserError(f"{source} holds {found.upper()} weights ({what}) but the run builds {expected.upper()}: "
                        f"set config.model.backbone={found} (e.g. start from configs/{found}_tpu.py) or point "
                        f"config.model.pretrained at {expected.upper()} weights")


def check_keys(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], source: str,
               where: Mapping[str, str] | None = None) -> None:
    """A checkpoint's tensors (`found`: name -> shape, from the headers) against the model config's (`expected`:
    name -> stored shape): one UserError line naming `source` and the missing, unexpected and mis-shaped names
    with their counts; `where` (name -> file) names each unexpected or mis-shaped tensor's file."""
    named = (lambda k: f"{k} in {where[k]}") if where is not None else str
    misshaped = [f"{named(k)}: expected {tuple(shape)}, found {tuple(found[k])}" for k, shape in expected.items()
                 if k in found and tuple(found[k]) != tuple(shape)]
    files.check_tensors(source, set(expected) - set(found), [named(k) for k in set(found) - set(expected)],
                        misshaped)


def check_shape(key: str, source: str, expected: tuple[int, ...], found: tuple[int, ...]) -> None:
    """One tensor of a checkpoint file (`source`) against the shape the model config gives it."""
    if tuple(found) != tuple(expected):
        raise UserError(f"{key} in {source}: expected shape {tuple(expected)}, found {tuple(found)}")


def check_tree(expected: Iterable[str], found: Iterable[str], what: str, misshaped: Iterable[str] = ()) -> None:
    """A tree our code built (params, shardings, adapters) against the layout: a mismatch is a bug, a ValueError."""
    expected, found = set(expected), set(found)
    if problems := files.mismatch(expected - found, found - expected, list(misshaped)):
        raise ValueError(f"{what} does not match the model config: {problems}")


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
        x = to_ours(e, x)
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
    check_tree(map("/".join, lay.leaves), map("/".join, flat), "the shardings tree")
    return flat


def export_layout(cfg: Any, params: Any) -> tuple[Layout, dict[Path, Any]]:
    """The layout of `params` (scanned or per-layer, boxed or not) and its flat leaves, checked against `cfg`."""
    flat = traverse_util.flatten_dict(nn.meta.unbox(params))
    lay = layout(cfg, scanned=is_scanned(cfg, flat))
    misshaped = [f"{'/'.join(path)}: expected {tuple(shape)}, found {flat[path].shape}"
                 for path, shape in lay.leaves.items() if path in flat and tuple(flat[path].shape) != tuple(shape)]
    check_tree(map("/".join, lay.leaves), map("/".join, flat), "the params tree", misshaped)
    return lay, flat


def tensor(flat: dict[Path, Any], e: Entry) -> np.ndarray:
    """One diffusers tensor (torch layout) on the host; a jax leaf is sliced and transposed on its device."""
    x = flat[e.path] if e.layer is None else flat[e.path][e.layer]
    return np.ascontiguousarray(to_stored(e, x))

