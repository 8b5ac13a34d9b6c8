"""Names: our Flax param paths <-> diffusers state-dict keys <-> BFL (original FLUX) keys.

Our modules are named after diffusers', with `.N` list indices folded into the name (`to_out.0` ->
`to_out_0`); a Linear's `weight` is our `kernel` transposed and an RMSNorm's `weight` is our `scale`.
BFL fuses some diffusers tensors along the output axis (axis 0 of a torch weight): `img_attn.qkv` is
[to_q; to_k; to_v] and a single block's `linear1` is [to_q; to_k; to_v; proj_mlp].
"""

import re

_INDEXED = ("transformer_blocks", "single_transformer_blocks", "to_out", "net")
_INDEXED_RE = re.compile(rf"^({'|'.join(_INDEXED)})_(\d+)$")
_BLOCK_RE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")

# diffusers module -> (BFL module, position among the tensors fused into it).
_BFL_TOP = {
    "x_embedder": ("img_in", 0),
    "context_embedder": ("txt_in", 0),
    "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", 0),
    "time_text_embed.timestep_embedder.linear_2": ("time_in.out_layer", 0),
    "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", 0),
    "time_text_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", 0),
    "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer", 0),
    "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", 0),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", 0),
    "proj_out": ("final_layer.linear", 0),
}
_BFL_DOUBLE = {
    "norm1.linear": ("img_mod.lin", 0),
    "norm1_context.linear": ("txt_mod.lin", 0),
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.norm_q": ("img_attn.norm.query_norm", 0),
    "attn.norm_k": ("img_attn.norm.key_norm", 0),
    "attn.norm_added_q": ("txt_attn.norm.query_norm", 0),
    "attn.norm_added_k": ("txt_attn.norm.key_norm", 0),
    "attn.to_out.0": ("img_attn.proj", 0),
    "attn.to_add_out": ("txt_attn.proj", 0),
    "ff.net.0.proj": ("img_mlp.0", 0),
    "ff.net.2": ("img_mlp.2", 0),
    "ff_context.net.0.proj": ("txt_mlp.0", 0),
    "ff_context.net.2": ("txt_mlp.2", 0),
}
_BFL_SINGLE = {
    "norm.linear": ("modulation.lin", 0),
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "attn.norm_q": ("norm.query_norm", 0),
    "attn.norm_k": ("norm.key_norm", 0),
    "proj_out": ("linear2", 0),
}
_BFL_BLOCKS = {"transformer_blocks": ("double_blocks", _BFL_DOUBLE),
               "single_transformer_blocks": ("single_blocks", _BFL_SINGLE)}

# BFL's final modulation is (shift, scale); diffusers' (and ours) is (scale, shift).
BFL_SHIFT_SCALE_MODULE = "final_layer.adaLN_modulation.1"


def flax_to_diffusers(path: tuple[str, ...]) -> tuple[str, bool]:
    """(per-layer Flax path) -> (diffusers key, whether the tensor is transposed between the two)."""
    *mods, leaf = path
    parts = []
    for m in mods:
        match = _INDEXED_RE.match(m)
        parts.extend(match.groups() if match else (m,))
    if leaf == "kernel":
        return ".".join([*parts, "weight"]), True
    if leaf == "scale":
        return ".".join([*parts, "weight"]), False
    return ".".join([*parts, leaf]), False


def diffusers_to_bfl(key: str) -> tuple[str, int]:
    """diffusers key -> (BFL key, position of this tensor among those concatenated on axis 0 into it)."""
    module, leaf = key.rsplit(".", 1)
    match = _BLOCK_RE.match(module)
    if match:
        stack, index, inner = match.groups()
        prefix, table = _BFL_BLOCKS[stack]
        bfl_inner, position = table[inner]
        bfl_module = f"{prefix}.{index}.{bfl_inner}"
    else:
        bfl_module, position = _BFL_TOP[module]
    if bfl_module.endswith("_norm"):  # BFL's RMSNorm calls its weight `scale`
        leaf = "scale"
    return f"{bfl_module}.{leaf}", position
