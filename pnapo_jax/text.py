"""FLUX prompt encoding: CLIP's pooled output and T5's hidden states, as diffusers' `FluxPipeline.encode_prompt`.

Tokenization runs on the host with transformers' tokenizers; both encoders run jitted. As in diffusers, the
encoders see only the padded input ids (no attention mask): CLIP pads to its tokenizer's `model_max_length`
(77), T5 to `max_sequence_length`, both truncating longer prompts.
"""

import dataclasses
import functools
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import transformers

from pnapo_jax.convert import hf
from pnapo_jax.models import clip, t5

# Subfolders of a diffusers FLUX pipeline folder.
CLIP_SUBFOLDER, T5_SUBFOLDER = "text_encoder", "text_encoder_2"
CLIP_TOKENIZER_SUBFOLDER, T5_TOKENIZER_SUBFOLDER = "tokenizer", "tokenizer_2"


@dataclasses.dataclass(frozen=True)
class TextEncoders:
    """FLUX's two text encoders (configs + params) and their tokenizers."""

    clip_config: clip.CLIPTextConfig
    clip_params: Any
    t5_config: t5.T5Config
    t5_params: Any
    tokenizer: transformers.PreTrainedTokenizerBase  # CLIPTokenizer
    tokenizer_2: transformers.PreTrainedTokenizerBase  # T5TokenizerFast


def load_text_encoders(path: str | os.PathLike, dtype: Any = None, param_dtype: Any = None) -> TextEncoders:
    """Both encoders and tokenizers from a local diffusers FLUX pipeline folder.

    `dtype` is the compute dtype (default float32), `param_dtype` the storage dtype (default `dtype`).
    """
    path = pathlib.Path(path)
    clip_config, clip_params = hf.load_clip_text(path / CLIP_SUBFOLDER, dtype, param_dtype)
    t5_config, t5_params = hf.load_t5(path / T5_SUBFOLDER, dtype, param_dtype)
    return TextEncoders(clip_config, clip_params, t5_config, t5_params,
                        transformers.CLIPTokenizer.from_pretrained(path / CLIP_TOKENIZER_SUBFOLDER),
                        transformers.T5TokenizerFast.from_pretrained(path / T5_TOKENIZER_SUBFOLDER))


def tokenize(tokenizer: transformers.PreTrainedTokenizerBase, prompts: Sequence[str], max_length: int) -> np.ndarray:
    """Input ids [B, max_length]: padded to max_length, truncated, as the pipeline tokenizes."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np").input_ids
    return ids.astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def clip_pooled(cfg: clip.CLIPTextConfig, params: Any, input_ids_BxL: jax.Array) -> jax.Array:
    return clip.CLIPTextModel(cfg).apply({"params": params}, input_ids_BxL)[1]


@functools.partial(jax.jit, static_argnums=0)
def t5_hidden(cfg: t5.T5Config, params: Any, input_ids_BxL: jax.Array) -> jax.Array:
    return t5.T5Encoder(cfg).apply({"params": params}, input_ids_BxL)


def encode_prompts(prompts: str | Sequence[str], encoders: TextEncoders, prompts_2: str | Sequence[str] | None = None,
                   max_sequence_length: int = 512) -> tuple[jax.Array, jax.Array]:
    """(prompt_embeds [B, max_sequence_length, 4096], pooled_prompt_embeds [B, 768]) for FLUX.

    `prompts` go to CLIP and, unless `prompts_2` is given, to T5 as well (diffusers' prompt / prompt_2).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    prompts_2 = prompts if prompts_2 is None else [prompts_2] if isinstance(prompts_2, str) else list(prompts_2)
    clip_ids = tokenize(encoders.tokenizer, prompts, encoders.tokenizer.model_max_length)
    t5_ids = tokenize(encoders.tokenizer_2, prompts_2, max_sequence_length)
    pooled = clip_pooled(encoders.clip_config, encoders.clip_params, clip_ids)
    return t5_hidden(encoders.t5_config, encoders.t5_params, t5_ids), pooled
