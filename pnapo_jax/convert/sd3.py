"""SD3 / SD3.5 weights in and out: diffusers `SD3Transformer2DModel` folders and Stability's original single files
(`sd3_medium.safetensors`: `model.diffusion_model.joint_blocks.N.x_block.attn.qkv.weight` ...) <-> our params.

The folder and single-file machinery is FLUX's (`convert.diffusers`, `convert.bfl`); this holds SD3's key map,
the inverse of diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`: q, k, v fused on the output axis
into `qkv`, the final and last-block text modulations stored (shift, scale) where diffusers has (scale, shift).
LoRA export and merging are the shared `convert.lora` (the adapters live under `transformer.` as in FLUX).
"""

import os
import re
from typing import Any

from pnapo_jax.convert import bfl, diffusers
from pnapo_jax.models import sd3

PREFIX = "model.diffusion_model."  # Stability's files keep the model under this; loading also takes bare keys

_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "proj_out": "final_layer.linear",
}
_BLOCK = {  # diffusers module in transformer_blocks.N -> (module in joint_blocks.N, position in the fused tensor)
    "attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1), "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0), "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn.norm_q": ("x_block.attn.ln_q", 0), "attn.norm_k": ("x_block.attn.ln_k", 0),
    "attn.norm_added_q": ("context_block.attn.ln_q", 0), "attn.norm_added_k": ("context_block.attn.ln_k", 0),
    "attn.to_out.0": ("x_block.attn.proj", 0), "attn.to_add_out": ("context_block.attn.proj", 0),
    "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2), "attn2.norm_q": ("x_block.attn2.ln_q", 0),
    "attn2.norm_k": ("x_block.attn2.ln_k", 0), "attn2.to_out.0": ("x_block.attn2.proj", 0),
    "norm1.linear": ("x_block.adaLN_modulation.1", 0),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", 0),
    "ff.net.0.proj": ("x_block.mlp.fc1", 0), "ff.net.2": ("x_block.mlp.fc2", 0),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", 0), "ff_context.net.2": ("context_block.mlp.fc2", 0),
}
_BLOCK_RE = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")


def diffusers_to_single(key: str) -> tuple[str, int]:
    """diffusers key -> (Stability key without PREFIX, position of this tensor among those fused into it)."""
    if key == "pos_embed.pos_embed":  # the position table buffer (checked, not loaded)
        return "pos_embed", 0
    module, leaf = key.rsplit(".", 1)
    match = _BLOCK_RE.match(module)
    if match:
        inner, position = _BLOCK[match[2]]
        return f"joint_blocks.{match[1]}.{inner}.{leaf}", position
    return f"{_TOP[module]}.{leaf}", 0


def _swapped(cfg: sd3.SD3Config) -> tuple[str, ...]:
    """The single-file modules stored (shift, scale): the final norm and the last block's text norm."""
    return ("final_layer.adaLN_modulation.1", f"joint_blocks.{cfg.num_layers - 1}.context_block.adaLN_modulation.1")


def load_sd3_transformer(path: str | os.PathLike, dtype: Any = None, shardings: Any = None, *,
                         cache_dir: str | os.PathLike | None = None, **config_overrides: Any
                         ) -> tuple[sd3.SD3Config, dict[str, Any]]:
    """(config, params) from a diffusers SD3 transformer folder, a pipeline folder, a hub id or a gs:// folder
    (see `convert.load_diffusers_transformer`); FLUX weights are refused in one line."""
    return diffusers.load_diffusers_transformer(path, dtype, shardings, cache_dir=cache_dir, config_cls=sd3.SD3Config,
                                                **config_overrides)


def save_sd3_transformer(config: sd3.SD3Config, params: Any, path: str | os.PathLike,
                         max_shard_size: int | str = "10GB") -> None:
    """Write a folder that `SD3Transformer2DModel.from_pretrained` reads."""
    diffusers.save_diffusers_transformer(config, params, path, max_shard_size)


def load_sd3_single_file(file: str | os.PathLike, config: sd3.SD3Config, dtype: Any = None, shardings: Any = None
                         ) -> dict[str, Any]:
    """Our params (scanned if `config.scan_layers`) from Stability's single file, keys with or without PREFIX."""
    return bfl.load_single_file(file, config, diffusers_to_single, _swapped(config), prefix=PREFIX, dtype=dtype,
                                shardings=shardings)


def save_sd3_single_file(config: sd3.SD3Config, params: Any, file: str | os.PathLike) -> None:
    """Write our params as Stability's single file (keys under PREFIX), as `from_single_file` reads it."""
    bfl.save_single_file(config, params, file, diffusers_to_single, _swapped(config), prefix=PREFIX)

