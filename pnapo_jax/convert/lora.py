"""LoRA adapters (our `lora` collection) -> a diffusers LoRA file, or merged into the base weights.

Our Dense adds (alpha / r) x A B with `lora_a` [in, r], `lora_b` [r, out]; PEFT adds (lora_alpha / r) B A x
with `lora_A.weight` [r, in], `lora_B.weight` [out, r]. diffusers sets lora_alpha = r when a file has no
alphas, so the scale is folded into lora_B and the file is plain PEFT keys under the `transformer.` prefix.
"""

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from pnapo_jax.convert import files, layout
from pnapo_jax.models import flux

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # the file `load_lora_weights(folder)` looks for
_PREFIX = "transformer"  # FluxPipeline's component the adapters belong to


def lora_state_dict(cfg: flux.FluxConfig, lora: Any) -> dict[str, Any]:
    """PEFT-style tensors (torch layout, scale folded into lora_B) of adapters in either param layout."""
    flat = traverse_util.flatten_dict(nn.meta.unbox(lora))
    lay = layout.layout(cfg, scanned=layout.is_scanned(cfg, flat))
    out, used = {}, set()
    for key, e in lay.entries.items():
        if e.path[-1] != "kernel" or (*e.path[:-1], "lora_a") not in flat:
            continue
        paths = [(*e.path[:-1], leaf) for leaf in ("lora_a", "lora_b")]
        a, b = (layout.tensor(flat, dataclasses.replace(e, path=path)) for path in paths)
        module = f"{_PREFIX}.{key.removesuffix('.weight')}"
        out[f"{module}.lora_A.weight"] = a
        out[f"{module}.lora_B.weight"] = (b * cfg.lora_scale).astype(b.dtype)
        used.update("/".join(path) for path in paths)
    layout.check_tree(used, map("/".join, flat), "the LoRA params tree")
    return out


def save_lora(cfg: flux.FluxConfig, lora: Any, folder: str | os.PathLike) -> None:
    """Write `folder/pytorch_lora_weights.safetensors`, which `FluxPipeline.load_lora_weights(folder)` reads."""
    files.write_safetensors(lora_state_dict(cfg, lora), os.path.join(folder, LORA_WEIGHTS_NAME))


def merge_lora(cfg: flux.FluxConfig, params: Any, lora: Any) -> dict[str, Any]:
    """Base params with W + (alpha / r) A B in each adapted kernel: a plain transformer computing the policy.

    `params` and `lora` share a layout; stacked (scanned) adapters merge layer by layer through the batched
    matmul. The product is taken in fp32 at full precision (TPU matmuls default to bf16 passes).
    """
    flat = traverse_util.flatten_dict(nn.meta.unbox(params))
    adapters = traverse_util.flatten_dict(nn.meta.unbox(lora))
    for path in [p for p in adapters if p[-1] == "lora_a"]:
        kernel = (*path[:-1], "kernel")
        a, b = (adapters[(*path[:-1], leaf)].astype(jnp.float32) for leaf in ("lora_a", "lora_b"))
        delta = cfg.lora_scale * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
        flat[kernel] = (flat[kernel].astype(jnp.float32) + delta).astype(flat[kernel].dtype)
    return traverse_util.unflatten_dict(flat)
