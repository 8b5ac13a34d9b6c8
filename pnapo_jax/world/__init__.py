"""The embedded world: a small synthetic text-to-image world that runs the whole real pipeline on a laptop CPU.

Prompts come from a grammar (`grammar`), images are procedural renderings (`render`), latents are the pixels
(`latents`), the text encoder is a fixed table (`text`), the base model is a small transformer of a backbone
(FLUX or SD3) pretrained on the train prompts (`demo_base`, `pretrain`), and `reward` / `fidelity` score samples.
`straightness` measures how far the base's ODE paths bend away from the straight interpolation PNAPO assumes,
and `reflow` straightens them. `components()` is the world as generation sees one (a `pnapo_jax.sampling.World`),
plus the rest of it.
"""

import dataclasses
import functools
from collections.abc import Callable

from pnapo_jax.world import demo_base, fidelity, grammar, latents, render, reward, text


@dataclasses.dataclass(frozen=True)
class DemoWorld:
    """The world's functions (numpy in, numpy out) and the shapes a model config must match: a
    `pnapo_jax.sampling.World` with fidelity, plus its renderer, encoder and shipped base."""

    encode_prompts: Callable  # texts -> (prompt_embeds [B, text_len, text_dim], pooled [B, pooled_dim])
    encode: Callable  # images [B, 32, 32, 3] in [0, 1] -> packed latents [B, 256, 12]
    decode: Callable  # packed latents [B, 256, 12] -> images [B, 32, 32, 3] in [0, 1]
    render: Callable  # (texts, seeds) -> clean renderings [B, 32, 32, 3]
    reward: Callable  # (images, texts) -> [B], higher is better
    fidelity: Callable  # (images, texts) -> [B], distance to the data, lower is better
    prompts: Callable  # split ("train" | "heldout" | "all") -> texts
    load_base: Callable  # () -> (model config, params) of the shipped base
    model_id: str = demo_base.MODEL_ID  # names the shipped base in generated records
    latent_h_tokens: int = latents.LATENT_H_TOKENS
    latent_w_tokens: int = latents.LATENT_W_TOKENS
    patch_pixels: int = latents.PATCH_PIXELS
    in_channels: int = latents.IN_CHANNELS
    text_len: int = text.TEXT_LEN
    text_dim: int = text.TEXT_DIM
    pooled_dim: int = text.POOLED_DIM


def components(backbone: str = "flux") -> DemoWorld:
    """The world with the shipped base of `backbone` (config.model.backbone): only the base differs."""
    return DemoWorld(encode_prompts=text.encode_prompts, encode=latents.encode, decode=latents.decode,
                     render=render.render, reward=reward.reward, fidelity=fidelity.fidelity, prompts=grammar.prompts,
                     load_base=functools.partial(demo_base.load_base, demo_base.BASES[backbone]),
                     model_id=demo_base.MODEL_IDS[backbone])
