"""transformers safetensors folders (config.json + model.safetensors, sharded or not) -> params of our Flax
ports of its models (models/t5.py, models/clip.py, rewards/clip_model.py).

Module names follow the transformers state dict, with `.N` list indices folded into the name
(`block.3.layer.0` -> `block_3/layer_0`); a Linear's `weight` is our `kernel` transposed, an Embedding's
is our `embedding`, a norm's is our `scale`. So the key of every tensor comes from our own param tree.
"""

import contextlib
import os
import pathlib
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import transformers
from flax import traverse_util

from pnapo_jax.convert import files
from pnapo_jax.errors import UserError
from pnapo_jax.models import clip, t5

Dtype = Any
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = f"{WEIGHTS_NAME}.index.json"
_INDEXED_RE = re.compile(r"^(block|layer|layers)_(\d+)$")
_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight"}


def hf_key(path: tuple[str, ...]) -> str:
    """Our param path -> its transformers state-dict key (a `kernel` is that key's tensor transposed)."""
    *mods, leaf = path
    parts = [".".join(m.groups()) if (m := _INDEXED_RE.match(x)) else x for x in mods]
    return ".".join([*parts, _LEAF_NAMES.get(leaf, leaf)])


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """A local folder's config.json as a dict (transformers' from_pretrained would take a missing folder for a
    hub id); `transformers.XConfig(**it)` is what `XConfig.from_json_file` builds."""
    path = pathlib.Path(folder) / files.CONFIG_NAME
    if not path.is_file():
        raise UserError(f"no {files.CONFIG_NAME} in {folder}")
    return files.read_json(path)


def weight_files(folder: pathlib.Path) -> list[str]:
    """The safetensors files of a transformers folder: those in `model.safetensors.index.json`, or the one file."""
    return [str(folder / name) for name in files.weight_files(folder, WEIGHTS_NAME, INDEX_NAME)]


def dtypes(dtype: Dtype = None, param_dtype: Dtype = None) -> dict[str, str]:
    """Config dtype fields: compute `dtype` (default float32) and storage `param_dtype` (default `dtype`)."""
    dtype = jnp.dtype(dtype or jnp.float32).name
    return dict(dtype=dtype, param_dtype=jnp.dtype(param_dtype or dtype).name)


def param_keys(init_params: Callable[[Any, jax.Array], Any], cfg: Any
               ) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Each of `init_params(cfg, rng)`'s params by transformers key: (its path, the shape transformers stores)."""
    shapes = traverse_util.flatten_dict(jax.eval_shape(lambda: nn.meta.unbox(init_params(cfg, jax.random.key(0)))))
    return {hf_key(p): (p, x.shape[::-1] if p[-1] == "kernel" else x.shape) for p, x in shapes.items()}


def load_params(folder: str | os.PathLike, init_params: Callable[[Any, jax.Array], Any], cfg: Any,
                stored_keys: Callable[[Collection[str]], Mapping[str, str]], shardings: Any = None
                ) -> dict[str, Any]:
    """`init_params(cfg, rng)`'s params, in `cfg.param_dtype`, from a transformers safetensors folder.

    `stored_keys(keys in the files)` gives, for each key our params expect, the key it is stored under
    (checkpoint conventions: prefixes, tied copies); stored keys it leaves out are ignored. Tensors are read
    one at a time (bf16 included), transposed, cast and placed with `shardings` (a tree like the params, or
    None). Missing, unexpected and mis-shaped keys are one UserError line naming them.
    """
    folder = pathlib.Path(folder)
    where = files.keys_by_file(weight_files(folder))
    stored = dict(stored_keys(where))
    expected = param_keys(init_params, cfg)
    check_keys(folder, where, stored, {k: shape for k, (_, shape) in expected.items()})
    placement = traverse_util.flatten_dict(shardings) if shardings is not None else {}
    out = {}
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(files.open_safetensors(f, "flax")) for f in set(where.values())}
        for key, (path, _) in expected.items():
            x = handles[where[stored[key]]].get_tensor(stored[key])
            files.check_finite(stored[key], where[stored[key]], x)
            x = (x.T if path[-1] == "kernel" else x).astype(cfg.param_dtype)
            out[path] = jax.device_put(x, placement.get(path)).block_until_ready()
    return traverse_util.unflatten_dict(out)


def check_keys(folder: pathlib.Path, where: Mapping[str, str], stored: Mapping[str, str],
               expected: Mapping[str, tuple[int, ...]]) -> None:
    """One UserError line naming every missing, unexpected and mis-shaped key (shapes read from the headers).

    `where`: stored key -> its file; `stored`: our key -> stored key; `expected`: our key -> stored shape.
    """
    found = files.header_shapes(where)
    unexpected = [f"{k} (stored as {stored[k]} in {where[stored[k]]})" for k in set(stored) - set(expected)]
    misshaped = [f"{stored[k]} in {where[stored[k]]}: expected {tuple(shape)}, found {found[stored[k]]}"
                 for k, shape in expected.items() if k in stored and found[stored[k]] != tuple(shape)]
    files.check_tensors(str(folder), set(expected) - set(stored), unexpected, misshaped)


def _load(folder: str | os.PathLike, hf_config_cls: type, config_cls: type, model: Any, dtype: Any,
          param_dtype: Any, shardings: Any, **overrides: Any) -> tuple[Any, dict[str, Any]]:
    """(config, params) of one of our ports (`model`: its module, with init_params and stored_keys); `overrides`
    take fields from the transformers config (`hf config -> our field value`)."""
    hf_config = hf_config_cls(**read_config(folder))
    fields = {k: get(hf_config) for k, get in overrides.items()}
    cfg = config_cls.from_hf(hf_config, **dtypes(dtype, param_dtype), **fields)
    return cfg, load_params(folder, model.init_params, cfg, model.stored_keys, shardings)


def load_t5(folder: str | os.PathLike, dtype: Any = None, param_dtype: Any = None, shardings: Any = None
            ) -> tuple[t5.T5Config, dict[str, Any]]:
    """(config, params) from a transformers `T5EncoderModel` folder (config.json + safetensors, sharded or not).

    `dtype` is the compute dtype, `param_dtype` the storage dtype (default: `dtype`, else float32).
    """
    return _load(folder, transformers.T5Config, t5.T5Config, t5, dtype, param_dtype, shardings)


def load_clip_text(folder: str | os.PathLike, dtype: Any = None, param_dtype: Any = None, shardings: Any = None
                   ) -> tuple[clip.CLIPTextConfig, dict[str, Any]]:
    """(config, params) from a transformers `CLIPTextModel` folder (config.json + safetensors, sharded or not).

    `dtype` is the compute dtype, `param_dtype` the storage dtype (default: `dtype`, else float32).
    """
    return _load(folder, transformers.CLIPTextConfig, clip.CLIPTextConfig, clip, dtype, param_dtype, shardings)


def load_clip_text_with_projection(folder: str | os.PathLike, dtype: Any = None, param_dtype: Any = None,
                                   shardings: Any = None) -> tuple[clip.CLIPTextConfig, dict[str, Any]]:
    """(config, params) from a transformers `CLIPTextModelWithProjection` folder (SD3's CLIP-L and CLIP-G): the
    text model and its `text_projection` (config.json's projection_dim)."""
    return _load(folder, transformers.CLIPTextConfig, clip.CLIPTextConfig, clip, dtype, param_dtype, shardings,
                 projection_dim=lambda c: c.projection_dim)
