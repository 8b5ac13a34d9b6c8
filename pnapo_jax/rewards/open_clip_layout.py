"""open_clip's CLIP (HPSv2's ViT-H-14) loaded into the transformers-layout Flax CLIPModel: one model, two layouts.

A folder holds `open_clip_config.json` (`{"model_cfg": <an open_clip model config such as ViT-H-14.json>}`
as open_clip writes for the hub, whose preprocessing fields are not read, or the model config alone) and
`open_clip_model.safetensors`, an open_clip state dict (`python -m pnapo_jax.rewards.convert_open_clip` turns
a .pt checkpoint into one).

The mapping: `visual.conv1` is the patch embedding, `resblocks.N` are `layers.N` with `ln_1/2` as
`layer_norm1/2`, `mlp.c_fc/c_proj` as `mlp.fc1/fc2` and `attn.in_proj_*` the stacked q, k, v projections;
`visual.proj` and `text_projection` are stored [in, out] where a Linear's weight is [out, in]. open_clip's
text tower pools at argmax(input ids), the end-of-text token, as transformers' legacy configs do.
"""

import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import transformers
from flax import traverse_util

from pnapo_jax.convert import files, hf
from pnapo_jax.errors import UserError
from pnapo_jax.models import clip, clip_vision
from pnapo_jax.rewards.clip_model import CLIPConfig, init_params

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
VIT_H_14 = {"embed_dim": 1024,
            "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}}
# open_clip's defaults for the fields we read, and fields accepted only at the value our modules implement.
_VISION = dict(image_size=224, layers=12, width=768, head_width=64, mlp_ratio=4.0, patch_size=16)
_TEXT = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12, mlp_ratio=4.0)
_FIXED = dict(ls_init_value=None, patch_dropout=0.0, no_ln_pre=False, final_ln_after_pool=False,
              attentional_pool=False, embed_cls=False, no_causal_mask=False, proj_bias=False, pad_id=0)
_POOL = {"vision_cfg": "tok", "text_cfg": "argmax"}
_RENAMES = (
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual.conv1."),
    (r"^vision_model\.embeddings\.class_embedding$", "visual.class_embedding"),
    (r"^vision_model\.embeddings\.position_embedding\.weight$", "visual.positional_embedding"),
    (r"^vision_model\.pre_layrnorm\.", "visual.ln_pre."),
    (r"^vision_model\.post_layernorm\.", "visual.ln_post."),
    (r"^vision_model\.encoder\.layers\.", "visual.transformer.resblocks."),
    (r"^visual_projection\.weight$", "visual.proj"),
    (r"^text_model\.embeddings\.token_embedding\.", "token_embedding."),
    (r"^text_model\.embeddings\.position_embedding\.weight$", "positional_embedding"),
    (r"^text_model\.final_layer_norm\.", "ln_final."),
    (r"^text_model\.encoder\.layers\.", "transformer.resblocks."),
    (r"^text_projection\.weight$", "text_projection"),
    (r"\.layer_norm([12])\.", r".ln_\1."),
    (r"\.self_attn\.out_proj\.", ".attn.out_proj."),
    (r"\.self_attn\.[qkv]_proj\.(weight|bias)$", r".attn.in_proj_\1"),
    (r"\.mlp\.fc1\.", ".mlp.c_fc."),
    (r"\.mlp\.fc2\.", ".mlp.c_proj."),
)
_QKV_RE = re.compile(r"\.self_attn\.([qkv])_proj\.")
_TRANSPOSED = ("visual.proj", "text_projection")
_BUFFERS = ("attn_mask",)  # the causal mask, which older state dicts stored


def _fields(model_cfg: dict[str, Any], tower: str, read: dict[str, Any]) -> dict[str, Any]:
    """`read`'s fields with the config's values; a ValueError for any other field not at `_FIXED`'s value."""
    given = dict(model_cfg.get(tower, {}))
    pool = given.pop("pool_type", _POOL[tower])
    bad = [k for k, v in given.items() if k not in read and (k not in _FIXED or v != _FIXED[k])]
    if pool != _POOL[tower]:
        bad.append("pool_type")
    if bad:
        raise ValueError(f"open_clip {tower} fields not supported (or not at the supported value): {sorted(bad)}")
    return {**read, **{k: v for k, v in given.items() if k in read}}


def config_from_open_clip(model_cfg: dict[str, Any], **dtypes: Any) -> CLIPConfig:
    """Our config for an open_clip model config (the contents of e.g. open_clip's ViT-H-14.json)."""
    extra = set(model_cfg) - {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}
    if extra:
        raise ValueError(f"open_clip model config fields not supported: {sorted(extra)}")
    if "embed_dim" not in model_cfg:
        raise ValueError("open_clip model config: embed_dim is required")
    v, t = _fields(model_cfg, "vision_cfg", _VISION), _fields(model_cfg, "text_cfg", _TEXT)
    if not isinstance(v["image_size"], int) or not isinstance(v["patch_size"], int):
        raise ValueError("only square images and patches (int image_size, patch_size) are supported")
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    vision = clip_vision.CLIPVisionConfig(
        hidden_size=v["width"], intermediate_size=int(v["width"] * v["mlp_ratio"]), num_hidden_layers=v["layers"],
        num_attention_heads=v["width"] // v["head_width"], image_size=v["image_size"], patch_size=v["patch_size"],
        hidden_act=act, **dtypes)
    text = clip.CLIPTextConfig(
        vocab_size=t["vocab_size"], hidden_size=t["width"], intermediate_size=int(t["width"] * t["mlp_ratio"]),
        num_hidden_layers=t["layers"], num_attention_heads=t["heads"], max_position_embeddings=t["context_length"],
        hidden_act=act, eos_token_id=clip.LEGACY_EOS_TOKEN_ID, **dtypes)
    return CLIPConfig(text, vision, model_cfg["embed_dim"])


def open_clip_key(hf_key: str) -> tuple[str, int | None]:
    """transformers key -> (open_clip key, which third of it for a q / k / v projection, else None)."""
    key = hf_key
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    qkv = _QKV_RE.search(hf_key)
    return key, "qkv".index(qkv.group(1)) if qkv else None


def tokenize(tokenizer: transformers.PreTrainedTokenizerBase, prompts: Sequence[str], context_length: int
             ) -> np.ndarray:
    """open_clip's token ids [B, context_length]: start, BPE tokens (the first context_length - 2 if more),
    end, zeros. `tokenizer`: a transformers CLIPTokenizer over the same BPE vocabulary; open_clip's extra text
    cleaning (ftfy, HTML unescaping) is not applied, which only matters for mis-encoded or HTML-escaped text."""
    out = tokenizer(list(prompts), padding="max_length", max_length=context_length, truncation=True,
                    return_tensors="np")
    return np.where(out.attention_mask, out.input_ids, 0).astype(np.int32)


def _stored_shape(key: str, part: int | None, hf_shape: tuple[int, ...]) -> tuple[int, ...]:
    if part is not None:
        return (3 * hf_shape[0], *hf_shape[1:])
    return hf_shape[::-1] if key in _TRANSPOSED else hf_shape


def load(folder: str | os.PathLike, dtype: Any = None, param_dtype: Any = None) -> tuple[CLIPConfig, dict[str, Any]]:
    """(config, params) from an open_clip folder; missing, unexpected and mis-shaped keys are one UserError line."""
    folder = pathlib.Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise UserError(f"no {name} in {folder} (see pnapo_jax.rewards.convert_open_clip)")
    config = files.read_json(folder / CONFIG_NAME)
    cfg = config_from_open_clip(config.get("model_cfg", config), **hf.dtypes(dtype, param_dtype))
    file = str(folder / WEIGHTS_NAME)
    with files.open_safetensors(file, "flax") as f:
        keys = [k for k in f.keys() if k not in _BUFFERS]
        sources = {k: (open_clip_key(k), path, shape) for k, (path, shape) in hf.param_keys(init_params, cfg).items()}
        expected = {key: _stored_shape(key, part, shape) for (key, part), _, shape in sources.values()}
        hf.check_keys(folder, dict.fromkeys(keys, file), {k: k for k in keys}, expected)
        out = {}
        for (key, part), path, _ in sources.values():
            x = f.get_tensor(key)
            files.check_finite(key, file, x)
            x = jnp.split(x, 3)[part] if part is not None else x.T if key in _TRANSPOSED else x
            out[path] = jnp.asarray(x.T if path[-1] == "kernel" else x, cfg.param_dtype)
    return cfg, traverse_util.unflatten_dict(out)
