"""Image-text rewards in JAX behind one interface: `load_reward(kind, path)(images, prompts) -> scores [B]`.

- "pickscore": PickScore_v1, a transformers CLIPModel (ViT-H/14). Score = logit_scale.exp() * cosine(image,
  text embeds), as PickScore's code computes before its softmax over images.
  Folder: config.json + model.safetensors (yuvalkirstain/PickScore_v1) and the CLIP tokenizer files
  (vocab.json, merges.txt; PickScore's processor is laion/CLIP-ViT-H-14-laion2B-s32B-b79K's, the same BPE
  vocabulary as FLUX's `tokenizer/`). Pixels as transformers' CLIPImageProcessor makes them ("crop").
- "hpsv2": HPSv2 / HPSv2.1, an open_clip ViT-H-14. Score = cosine(image, text embeds), what `hpsv2.score`
  returns (papers usually report it x 100); logit_scale is loaded but not used. Folder:
  open_clip_config.json + open_clip_model.safetensors (see rewards/open_clip_layout.py; convert HPSv2's .pt
  once with `python -m pnapo_jax.rewards.convert_open_clip`) and the same CLIP tokenizer files. Pixels as
  HPSv2's preprocess_val makes them ("pad"), ids as open_clip's tokenizer.
- "clip_score": CLIP score as torchmetrics' CLIPScore computes it: 100 * cosine(image, text embeds) of a
  transformers CLIPModel folder (torchmetrics' default is openai/clip-vit-large-patch14), pixels as its
  CLIPProcessor makes them ("crop"). torchmetrics reports max(mean of these, 0): the same number whenever the
  mean is positive. One difference: a caption over 77 tokens is truncated here as the tokenizer (and OpenAI's
  clip.tokenize) does, keeping its end-of-text token, which CLIP pools; torchmetrics slices the ids instead and
  pools another token.
- "aesthetic": the LAION aesthetic predictor (rewards/aesthetic.py); the prompt is not used.
- "imagereward": ImageReward (rewards/image_reward.py): BLIP ViT-L/16 + BERT with cross-attention + its MLP.

Images are [B, H, W, 3] floats in [0, 1] (pnapo_jax.sampling.World.decode's output), prompts one per image. Scoring is
jitted and runs `batch_size` images at a time (the last batch padded), so one compilation serves each
image size.
"""

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from pnapo_jax import text
from pnapo_jax.rewards import clip_model, open_clip_layout
from pnapo_jax.rewards.batching import images_and_prompts, in_batches
from pnapo_jax.rewards.preprocess import preprocess

KINDS = ("pickscore", "hpsv2", "clip_score", "aesthetic", "imagereward")


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def scores(cfg: clip_model.CLIPConfig, mode: str, head: str, params: Any, images_BxHxWx3: jax.Array,
           input_ids_BxL: jax.Array) -> jax.Array:
    """cosine(image i, prompt i) [B] in fp32; times logit_scale.exp() for head "logit_scaled", times 100 for
    "clip_score"."""
    pixels = preprocess(images_BxHxWx3, mode, cfg.vision.image_size)
    image, prompt, logit_scale = clip_model.CLIPModel(cfg).apply({"params": params}, pixels, input_ids_BxL)
    unit = lambda x: x.astype(jnp.float32) / jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)
    cosine = jnp.sum(unit(image) * unit(prompt), axis=-1)
    if head == "logit_scaled":
        return cosine * jnp.exp(logit_scale.astype(jnp.float32))
    return 100 * cosine if head == "clip_score" else cosine


@dataclasses.dataclass(frozen=True)
class Reward:
    """A CLIP-based reward: callable(images [B, H, W, 3] in [0, 1], prompts [B]) -> np.ndarray scores [B]."""

    cfg: clip_model.CLIPConfig
    params: Any
    tokenize: Callable[[Sequence[str]], np.ndarray]  # prompts -> input ids [B, L]
    mode: str  # preprocessing recipe (rewards/preprocess.py)
    head: str  # cosine | logit_scaled (times logit_scale.exp()) | clip_score (times 100)
    batch_size: int = 16

    def __call__(self, images_BxHxWx3: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        images, prompts = images_and_prompts(images_BxHxWx3, prompts)
        if not prompts:
            return np.zeros(0, np.float32)
        score = functools.partial(scores, self.cfg, self.mode, self.head, self.params)
        return in_batches(score, self.batch_size, images, self.tokenize(prompts))


def load_reward(kind: str, path: str | os.PathLike, dtype: Any = None, batch_size: int = 16) -> Reward:
    """The `kind` reward from a local folder (layouts above); `dtype` is the compute and storage dtype."""
    tokenizer = functools.partial(transformers.CLIPTokenizer.from_pretrained, path)
    if kind == "pickscore":
        cfg, params = clip_model.load(path, dtype)
        tokenize = functools.partial(text.tokenize, tokenizer(), max_length=cfg.text.max_position_embeddings)
        return Reward(cfg, params, tokenize, "crop", "logit_scaled", batch_size)
    if kind == "hpsv2":
        cfg, params = open_clip_layout.load(path, dtype)
        tokenize = functools.partial(open_clip_layout.tokenize, tokenizer(),
                                     context_length=cfg.text.max_position_embeddings)
        return Reward(cfg, params, tokenize, "pad", "cosine", batch_size)
    if kind == "clip_score":
        cfg, params = clip_model.load(path, dtype)
        tokenize = functools.partial(text.tokenize, tokenizer(), max_length=cfg.text.max_position_embeddings)
        return Reward(cfg, params, tokenize, "crop", "clip_score", batch_size)
    if kind == "aesthetic":
        from pnapo_jax.rewards import aesthetic

        return aesthetic.load(path, dtype, batch_size)
    if kind == "imagereward":
        from pnapo_jax.rewards import image_reward

        return image_reward.load(path, dtype, batch_size)
    raise ValueError(f"reward kind {kind!r}: known kinds are {KINDS}")
