"""The pipeline world (config.generate.world="flux"): a `pnapo_jax.sampling.World` for the backbone of
config.model.backbone, FLUX.1 or SD3 / SD3.5, from a diffusers pipeline folder's text encoders and VAE and a reward
(PickScore, HPSv2, CLIP score, the LAION aesthetic predictor or ImageReward, pnapo_jax.rewards).

Prompts are encoded once as the backbone's pipeline encodes them (pnapo_jax.pipelines), config.data.text_len tokens:
FLUX's records hold T5's states (max_sequence_length = text_len) and CLIP's pooled output, SD3's the CLIP-L and CLIP-G
states (77 tokens) joined with T5's (max_sequence_length = text_len - 77) and both CLIP projections; the records carry
the embeddings: training never runs T5. Samples are decoded as the pipeline decodes them and scored by the reward. The
transformer is not loaded here: generation samples with training's base (config.model.pretrained). Text encoders and VAE
compute in config.model.dtype, the reward in float32 (its winner-loser gaps, ~1e-2 for HPSv2, decide the pairs).
Everything loads on first use, so asking for prompts alone (data.source=generate) loads nothing.

There is no `fidelity` (a text-to-image model has no ground-truth image manifold to measure the distance to) and no
built-in prompt set: `prompts(split)` reads config.generate.prompts_file.
"""

import dataclasses
import functools
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pnapo_jax import backbones, pipelines, rewards, sampling
from pnapo_jax.convert import files
from pnapo_jax.convert.vae import load_vae
from pnapo_jax.errors import UserError
from pnapo_jax.models import flux, vae

DECODE_BATCH_CHUNK = 2  # images the VAE decodes at a time: at 1024 px its activations are GBs per image


def pipeline_kind(config: ml_collections.ConfigDict) -> pipelines.PipelineKind:
    """The pipeline kind of config.model.backbone (a config without one is FLUX's)."""
    name = config.model.get("backbone", "flux")
    if name not in pipelines.BY_BACKBONE:
        raise UserError(f"config.model.backbone={name!r}: the flux world reads pipeline folders of "
                        f"{', '.join(pipelines.BY_BACKBONE)}")
    return pipelines.BY_BACKBONE[name]


def world_subfolders(kind: pipelines.PipelineKind) -> list[str]:
    """What the world reads of a pipeline folder: text encoders, tokenizers, VAE; SD3's scheduler config too."""
    return [*kind.subfolders, *["scheduler"] * kind.guidance_is_cfg]


def pipeline_dir(config: ml_collections.ConfigDict) -> pathlib.Path:
    """The local folder holding the backbone's text encoders, tokenizers and VAE: config.generate.pipeline, else
    config.model.pretrained (a hub id is fetched, those subfolders only)."""
    kind = pipeline_kind(config)
    path = config.generate.pipeline or config.model.pretrained
    if "://" in path:
        raise ValueError(f"{path}: remote folders are not read directly; copy the pipeline's "
                         f"{', '.join(world_subfolders(kind))} to local disk and set config.generate.pipeline")
    if path and not os.path.exists(path):
        path = files.hub_snapshot(path, world_subfolders(kind))
    indexed = pipelines.indexed_kind(pathlib.Path(path)) if path else None
    if indexed is not None and indexed is not kind:
        raise UserError(f"{path} is a {indexed.pipeline_class} folder (model_index.json) but "
                        f"config.model.backbone={kind.backbone!r}; set config.model.backbone={indexed.backbone!r} "
                        f"or config.generate.pipeline to a {kind.pipeline_class} folder")
    missing = [sub for sub in world_subfolders(kind) if not path or not (pathlib.Path(path) / sub).is_dir()]
    if missing:
        raise FileNotFoundError(f"the flux world needs a {kind.backbone.upper()} pipeline folder: {path!r} "
                                f"(config.generate.pipeline, else config.model.pretrained) has no {', '.join(missing)}")
    return pathlib.Path(path)


@dataclasses.dataclass
class PipelineWorld:  # a pnapo_jax.sampling.World
    """The backbone's prompt encoding and decoding, and a reward, for `config` (see the module docstring)."""

    config: ml_collections.ConfigDict
    latent_h_tokens: int = dataclasses.field(init=False)
    latent_w_tokens: int = dataclasses.field(init=False)
    model_id: str = dataclasses.field(init=False)  # names the base that sampled, in every record

    def __post_init__(self):
        gen = self.config.generate
        if gen.reward not in rewards.KINDS:
            raise ValueError(f"config.generate.reward={gen.reward!r}: choose from {rewards.KINDS}")
        if not gen.reward_path:
            raise ValueError(f"config.generate.reward_path is required by the flux world: a local {gen.reward} "
                             "folder (layouts in pnapo_jax.rewards)")
        self.latent_h_tokens = self.config.data.latent_h_tokens
        self.latent_w_tokens = self.config.data.latent_w_tokens
        self.model_id = self.config.model.pretrained or f"random-init(seed={self.config.seed})"

    @functools.cached_property
    def _loaded(self) -> tuple[Any, vae.VAEConfig, Any]:
        """(text encoders, VAE config, VAE params), checked to fit the transformer config.model describes."""
        folder, dtype, kind = pipeline_dir(self.config), self.config.model.dtype, pipeline_kind(self.config)
        encoders = kind.load_text_encoders(folder, dtype)
        vae_cfg, vae_params = load_vae(folder, dtype)
        kind.check_fits(backbones.backbone_of(self.config).model_config(self.config), encoders, vae_cfg)
        return encoders, vae_cfg, vae_params

    @functools.cached_property
    def reward(self) -> rewards.Reward:
        """callable(images [B, H, W, 3] in [0, 1], prompts) -> scores [B]."""
        return rewards.load_reward(self.config.generate.reward, self.config.generate.reward_path, "float32")

    @property
    def patch_pixels(self) -> int:
        """Image pixels per token side: a token is 2 x 2 latent pixels (16 for FLUX and SD3)."""
        return 2 * self._loaded[1].downsample_factor

    @functools.cached_property
    def guide(self) -> sampling.Guide | None:
        """SD3 samples as its pipeline does: classifier-free guidance at config.generate.guidance_scale against the
        empty negative prompt, on the folder scheduler's noise levels. None for FLUX (guidance is a model input;
        config.generate.shift_mu or the resolution rule shift the schedule)."""
        kind = pipeline_kind(self.config)
        if not kind.guidance_is_cfg:
            return None
        scheduler = files.read_json(pipeline_dir(self.config) / pipelines.SCHEDULER_CONFIG)
        embeds, pooled = self.encode_prompts([""])
        return sampling.Guide(self.config.generate.guidance_scale, embeds[0], pooled[0],
                              functools.partial(kind.sigmas, scheduler))

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(prompt embeds [B, config.data.text_len, 4096], pooled [B, P]) in float32, as the records hold them: FLUX
        T5's states and CLIP's pooled output (P = 768), SD3 the CLIPs' 77 states then T5's and both CLIP
        projections (P = 2048)."""
        kind, encoders = pipeline_kind(self.config), self._loaded[0]
        embeds, pooled = kind.encode(prompts, encoders, kind.t5_tokens(self.config.data.text_len, encoders))
        return np.asarray(embeds, np.float32), np.asarray(pooled, np.float32)

    def decode(self, latents_BxIxC: jax.Array) -> np.ndarray:
        """Packed latents -> images [B, H, W, 3] in [0, 1], the pipelines' postprocessing. The latents come to the
        host first: the sampler leaves them sharded over the mesh, the VAE's params are on one device."""
        _, vae_cfg, vae_params = self._loaded
        z = flux.unpack_latents(jnp.asarray(np.asarray(latents_BxIxC)), 2 * self.latent_h_tokens,
                                2 * self.latent_w_tokens)
        images = vae.decode(vae_params, vae_cfg, z, batch_chunk=DECODE_BATCH_CHUNK)
        return np.asarray(jnp.clip(images / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1))

    def prompts(self, split: str) -> list[str]:
        """The prompts of `split` (train for data.source=generate, config.eval.split for the sampling eval)."""
        path = self.config.generate.prompts_file
        if not path:
            raise ValueError("the flux world has no built-in prompts: set config.generate.prompts_file (one prompt "
                             "a line; '{split}' in the path is replaced by the split)")
        return sampling.read_prompts(path.replace("{split}", split))
