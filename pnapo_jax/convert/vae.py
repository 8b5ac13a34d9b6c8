"""diffusers `AutoencoderKL` folders (config.json + safetensors) -> (VAEConfig, Flax params).

Our param paths are diffusers' keys with `.N` list indices folded into the names (`resnets.1` ->
`resnets_1`); a conv's `weight` [out, in, kh, kw] is our `kernel` [kh, kw, in, out], a Linear's `weight` is
our `kernel` transposed, a GroupNorm's `weight` is our `scale`.
"""

import dataclasses
import os
import pathlib
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pnapo_jax.convert import files, layout
from pnapo_jax.errors import UserError
from pnapo_jax.models.vae import VAEConfig, init_params

VAE_SUBFOLDER = "vae"
_OURS = ("dtype", "param_dtype", "attention_impl")  # VAEConfig fields that are not in diffusers' config.json
_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
_INDEXED_RE = re.compile(r"^(.+)_(\d+)$")
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}

Path = tuple[str, ...]


def config_from_diffusers(config: dict[str, Any], **overrides: Any) -> VAEConfig:
    """VAEConfig from a diffusers AutoencoderKL config.json dict; missing fields take diffusers' defaults."""
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"expected an AutoencoderKL config, got _class_name {config['_class_name']!r}")
    if config.get("act_fn", "silu") != "silu":
        raise ValueError(f"only act_fn 'silu' is supported, got {config['act_fn']!r}")
    fields = {f.name: config[f.name] for f in dataclasses.fields(VAEConfig) if f.name not in _OURS
              and f.name in config}
    if "block_out_channels" in fields:
        fields["block_out_channels"] = tuple(fields["block_out_channels"])
    cfg = VAEConfig(**{**fields, **overrides})
    for field, block in _BLOCK_TYPES.items():
        types = list(config.get(field, [block] * len(cfg.block_out_channels)))
        if types != [block] * len(cfg.block_out_channels):
            raise ValueError(f"{field} must be {len(cfg.block_out_channels)} x {block!r}, got {types}")
    return cfg


def resolve_vae_dir(path: str | os.PathLike) -> pathlib.Path:
    """A local diffusers `vae/` folder from itself, a pipeline folder holding it, or a hub id."""
    path = str(path)
    if "://" in path:
        raise ValueError(f"{path}: remote folders are not read directly; copy the vae/ folder to local disk")
    if not os.path.exists(path):
        path = files.hub_snapshot(path, [VAE_SUBFOLDER])
    for folder in (pathlib.Path(path), pathlib.Path(path) / VAE_SUBFOLDER):
        if (folder / files.CONFIG_NAME).exists():
            return folder
    raise UserError(f"no {files.CONFIG_NAME} in {path} nor in {pathlib.Path(path) / VAE_SUBFOLDER}")


def diffusers_key(path: Path) -> str:
    """Our param path -> its diffusers state-dict key."""
    *modules, leaf = path
    return ".".join([_INDEXED_RE.sub(r"\1.\2", m) for m in modules] + [_LEAVES[leaf]])


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Our leaf's shape -> diffusers': conv [kh, kw, in, out] -> [out, in, kh, kw], Linear [in, out] -> [out, in]."""
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]


def _flax_layout(x: np.ndarray) -> np.ndarray:
    """A diffusers tensor in our layout (the inverse of `_torch_shape`)."""
    return x.transpose(2, 3, 1, 0) if x.ndim == 4 else x.T


def vae_layout(cfg: VAEConfig) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """diffusers key -> (our param path, the tensor's shape in diffusers' layout), from our own param tree."""
    shapes = jax.eval_shape(lambda: nn.meta.unbox(init_params(cfg, jax.random.key(0))))
    return {diffusers_key(path): (path, _torch_shape(leaf.shape))
            for path, leaf in traverse_util.flatten_dict(shapes).items()}


def load_vae(path: str | os.PathLike, dtype: Any = None, **config_overrides: Any) -> tuple[VAEConfig, dict]:
    """(config, params) from a diffusers `vae/` folder, a pipeline folder holding one, or a hub id.

    `dtype` is the params' and the computation's dtype (default: float32); `config_overrides` are VAEConfig
    fields and win over it, e.g. `param_dtype="float32"` with `dtype="bfloat16"` keeps fp32 weights.
    Weights that do not match the config are one UserError line naming the folder and the tensors.
    """
    folder = resolve_vae_dir(path)
    if dtype is not None:
        config_overrides = {"dtype": jnp.dtype(dtype).name, "param_dtype": jnp.dtype(dtype).name,
                            **config_overrides}
    cfg = config_from_diffusers(files.read_json(folder / files.CONFIG_NAME), **config_overrides)
    entries = vae_layout(cfg)
    where = files.keys_by_file([str(folder / name) for name in files.weight_files(folder)])
    layout.check_keys({key: shape for key, (_, shape) in entries.items()}, files.header_shapes(where),
                      f"VAE folder {folder}", where)
    params = {}
    for key, x, _ in files.iter_tensors(where):
        params[entries[key][0]] = jnp.asarray(_flax_layout(x), cfg.param_dtype)
    return cfg, traverse_util.unflatten_dict(params)
