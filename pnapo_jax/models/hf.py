"""What the Flax ports of transformers' text encoders (t5.py, clip.py) share: layers, activations by
transformers' names, attention with a bias and a mask, and loading a transformers safetensors folder.

Module names follow the transformers state dict, with `.N` list indices folded into the name
(`block.3.layer.0` -> `block_3/layer_0`); a Linear's `weight` is our `kernel` transposed, an Embedding's
is our `embedding`, a norm's is our `scale`. So the key of every tensor comes from our own param tree.
"""

import contextlib
import functools
import os
import pathlib
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from pnapo_jax.convert import files
from pnapo_jax.errors import UserError

Dtype = Any
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = f"{WEIGHTS_NAME}.index.json"
_INDEXED_RE = re.compile(r"^(block|layer|layers)_(\d+)$")
_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight"}
_MAX_LISTED = 8

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


def _listed(names: Collection[str]) -> str:
    names = sorted(names)
    more = f" ... ({len(names)} in all)" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


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
    None). Missing, unexpected and mis-shaped keys raise a ValueError naming them.
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
    """One ValueError naming every missing, unexpected and mis-shaped key (shapes read from the headers).

    `where`: stored key -> its file; `stored`: our key -> stored key; `expected`: our key -> stored shape.
    """
    found = {}
    for file in set(where.values()):
        with files.open_safetensors(file, "flax") as f:
            found.update((k, tuple(f.get_slice(k).get_shape())) for k in f.keys())
    missing = set(expected) - set(stored)
    unexpected = [f"{k} (stored as {stored[k]} in {where[stored[k]]})" for k in set(stored) - set(expected)]
    misshaped = [f"{stored[k]} in {where[stored[k]]}: expected {tuple(shape)}, found {found[stored[k]]}"
                 for k, shape in expected.items() if k in stored and found[stored[k]] != tuple(shape)]
    problems = [f"{what}: {_listed(names)}" for what, names in (
        ("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", misshaped)) if names]
    if problems:
        raise ValueError(f"{folder} does not match the model config: " + "; ".join(problems))
