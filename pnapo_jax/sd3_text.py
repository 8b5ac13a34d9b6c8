"""SD3 / SD3.5 prompt encoding, as diffusers' `StableDiffusion3Pipeline.encode_prompt`.

CLIP-L and CLIP-G (`CLIPTextModelWithProjection`) each give their penultimate layer's states and their projected
pooled output; the two state sequences are concatenated on features and zero-padded to T5's width, then joined with
T5's sequence on the token axis: prompt embeds [B, 77 + max_sequence_length, 4096]. The pooled conditioning is both
projections concatenated, [B, 768 + 1280]. As in diffusers, no encoder sees an attention mask: the CLIPs pad to
their tokenizer's `model_max_length` (77), T5 to `max_sequence_length`, all truncating longer prompts.
"""

import dataclasses
import functools
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import transformers

from pnapo_jax import text
from pnapo_jax.convert import hf
from pnapo_jax.models import clip, t5

# Subfolders of a diffusers StableDiffusion3Pipeline folder.
CLIP_L_SUBFOLDER, CLIP_G_SUBFOLDER, T5_SUBFOLDER = "text_encoder", "text_encoder_2", "text_encoder_3"
TOKENIZER_SUBFOLDERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
DEFAULT_MAX_SEQUENCE_LENGTH = 256  # the pipeline's default T5 length


@dataclasses.dataclass(frozen=True)
class SD3TextEncoders:
    """SD3's three text encoders (configs + params) and their tokenizers."""

    clip_l_config: clip.CLIPTextConfig
    clip_l_params: Any
    clip_g_config: clip.CLIPTextConfig
    clip_g_params: Any
    t5_config: t5.T5Config
    t5_params: Any
    tokenizer: transformers.PreTrainedTokenizerBase  # CLIPTokenizer (CLIP-L)
    tokenizer_2: transformers.PreTrainedTokenizerBase  # CLIPTokenizer (CLIP-G)
    tokenizer_3: transformers.PreTrainedTokenizerBase  # T5TokenizerFast

    @property
    def text_dim(self) -> int:
        """Width of the prompt embeds: T5's."""
        return self.t5_config.d_model

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled conditioning: both CLIP projections."""
        return self.clip_l_config.projection_dim + self.clip_g_config.projection_dim


def load_text_encoders(path: str | os.PathLike, dtype: Any = None, param_dtype: Any = None) -> SD3TextEncoders:
    """The three encoders and tokenizers from a local diffusers SD3 pipeline folder.

    `dtype` is the compute dtype (default float32), `param_dtype` the storage dtype (default `dtype`).
    """
    path = pathlib.Path(path)
    clip_l = hf.load_clip_text_with_projection(path / CLIP_L_SUBFOLDER, dtype, param_dtype)
    clip_g = hf.load_clip_text_with_projection(path / CLIP_G_SUBFOLDER, dtype, param_dtype)
    t5_config, t5_params = hf.load_t5(path / T5_SUBFOLDER, dtype, param_dtype)
    tok_l, tok_g, tok_t5 = TOKENIZER_SUBFOLDERS
    return SD3TextEncoders(*clip_l, *clip_g, t5_config, t5_params,
                           transformers.CLIPTokenizer.from_pretrained(path / tok_l),
                           transformers.CLIPTokenizer.from_pretrained(path / tok_g),
                           transformers.T5TokenizerFast.from_pretrained(path / tok_t5))


@functools.partial(jax.jit, static_argnums=0)
def clip_penultimate(cfg: clip.CLIPTextConfig, params: Any, input_ids_BxL: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    """(penultimate layer's states [B, L, D], projected pooled output [B, P]): what SD3 takes from a CLIP."""
    _, pooled, states = clip.CLIPTextModel(cfg).apply({"params": params}, input_ids_BxL, output_hidden_states=True)
    return states[-2], pooled


def encode_prompts(prompts: str | Sequence[str], encoders: SD3TextEncoders,
                   max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> tuple[jax.Array, jax.Array]:
    """(prompt_embeds [B, 77 + max_sequence_length, T5 width], pooled [B, P_L + P_G]) for SD3: every prompt goes
    to all three encoders (diffusers' prompt, with prompt_2 and prompt_3 unset)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    clip_len = encoders.tokenizer.model_max_length
    states_l, pooled_l = clip_penultimate(encoders.clip_l_config, encoders.clip_l_params,
                                          text.tokenize(encoders.tokenizer, prompts, clip_len))
    states_g, pooled_g = clip_penultimate(encoders.clip_g_config, encoders.clip_g_params,
                                          text.tokenize(encoders.tokenizer_2, prompts, clip_len))
    t5_states = text.t5_hidden(encoders.t5_config, encoders.t5_params,
                               text.tokenize(encoders.tokenizer_3, prompts, max_sequence_length))
    clip_states = jnp.concatenate([states_l, states_g], axis=-1)
    clip_states = jnp.pad(clip_states, [(0, 0), (0, 0), (0, t5_states.shape[-1] - clip_states.shape[-1])])
    return (jnp.concatenate([clip_states, t5_states.astype(clip_states.dtype)], axis=1),
            jnp.concatenate([pooled_l, pooled_g], axis=-1))
