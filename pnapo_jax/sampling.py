"""Sampling on the mesh, shared by pair generation, the sampling eval and the benchmark: the world protocol (text
in, latents out, images scored), the prompt reader, and the batched sampler. Image n's noise follows the one
seeded-noise rule, `flow.seeded_noise(seed, n, shape)`."""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from pnapo_jax import flow, sharding
from pnapo_jax.errors import UserError
from pnapo_jax.setup import Setup


class World(Protocol):
    """A text-to-image world: what generation, the sampling eval and the benchmark call. The embedded demo world
    (pnapo_jax.world.DemoWorld) and a pipeline folder's (pnapo_jax.pipeline_world.PipelineWorld) are the two; a world
    may also have `fidelity(images, prompts) -> [B]` (distance to the data, lower is better), which the sampling eval
    reports, and a `guide` (a `Guide`, or None): how its pipeline samples where that differs from FLUX's way."""

    latent_h_tokens: int
    latent_w_tokens: int
    patch_pixels: int  # image pixels per token side
    model_id: str  # names the base that sampled, in every record

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> (prompt_embeds [B, T, D], pooled [B, P])."""

    def decode(self, latents_BxIxC: jax.Array) -> np.ndarray:
        """Packed latents -> images [B, H, W, 3] in [0, 1]."""

    def reward(self, images_BxHxWx3: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """-> scores [B], higher is preferred."""

    def prompts(self, split: str) -> list[str]:
        """The prompts of a split ("train", "heldout", ...)."""


def read_prompts(path: str) -> list[str]:
    """One prompt a line (UTF-8); blank lines are refused (they would shift every later prompt's seed), and so
    is a file without prompts."""
    try:
        lines = epath.Path(path).read_text(encoding="utf-8").splitlines()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        raise UserError(f"prompts file {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise UserError(f"prompts file {path}: line {line} is not UTF-8 text ({e.reason})") from None
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise UserError(f"prompts file {path}: blank prompt on line(s) {blank[:5]}")
    if not lines:
        raise UserError(f"prompts file {path}: no prompts (one a line)")
    return [line.strip() for line in lines]


@dataclasses.dataclass(frozen=True)
class Guide:
    """Sampling as a pipeline with real classifier-free guidance does it (SD3): v = v(negative) + cfg_scale
    (v(prompt) - v(negative)), and its scheduler's noise levels instead of FLUX's schedule."""

    cfg_scale: float
    negative_embeds_TxD: np.ndarray  # the negative prompt's embeddings ("" as the pipeline's default)
    negative_pooled_P: np.ndarray
    sigmas: Callable[[int, int], np.ndarray]  # (num_steps, image tokens) -> [num_steps + 1] noise levels


def world_guide(world: World) -> Guide | None:
    """The world's `guide`, None for a world sampling FLUX's way (the demo world, FLUX pipeline folders)."""
    return getattr(world, "guide", None)


@dataclasses.dataclass
class Sampler:
    """Jitted, batched sampling on the mesh. `variables` = {"params": ...} (and "lora" for a LoRA policy); `gen`
    reads seed, num_steps, guidance_scale and shift_mu (config.generate's names). Without a `guide`
    guidance_scale is the model's guidance input and shift_mu the schedule's (FLUX); with one, the guide's CFG
    scale and noise levels are used."""

    setup: Setup
    variables: Any
    gen: ml_collections.ConfigDict
    guide: Guide | None = None

    def __post_init__(self):
        self.shape_IxC = (self.setup.image_tokens, self.setup.record_spec.channels)
        self.batch_sharding = sharding.batch_sharding(self.setup.mesh)

    def noises(self, seeds_N: np.ndarray) -> jax.Array:
        return flow.seeded_noise(self.gen.seed, seeds_N, self.shape_IxC)

    def __call__(self, noise_NxIxC: jax.Array, embeds_NxTxD: np.ndarray, pooled_NxP: np.ndarray,
                 step_seeds_N: np.ndarray | None = None) -> jax.Array:
        """Final latents [N, I, C]; N is padded up to a multiple of the mesh's batch shards and cut back. With
        `step_seeds_N` the sampler is stochastic at gen.eta (`flow.stochastic_step`), image n's step noises drawn
        from `flow.seeded_keys(gen.seed, step_seeds_N)[n]`."""
        N = noise_NxIxC.shape[0]
        shards = self.setup.mesh.shape["data"] * self.setup.mesh.shape["fsdp"]
        pad = -N % shards

        def put(x):
            x = jnp.asarray(x, jnp.float32)
            return jax.device_put(jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)), self.batch_sharding)

        conditioning, guide = self.setup.backbone.conditioning, self.guide
        cond = conditioning(put(embeds_NxTxD), put(pooled_NxP), self.gen.guidance_scale if guide is None else None)
        cfg_scale, negative, sigmas = 1.0, None, None
        if guide is not None:
            repeat = lambda x: np.broadcast_to(x, (N, *x.shape))
            negative = conditioning(put(repeat(guide.negative_embeds_TxD)), put(repeat(guide.negative_pooled_P)), None)
            cfg_scale, sigmas = guide.cfg_scale, guide.sigmas(self.gen.num_steps, noise_NxIxC.shape[1])
        stochastic = {}
        if step_seeds_N is not None:  # pad keys are never used: their rows are cut off
            keys = flow.seeded_keys(self.gen.seed, np.pad(np.asarray(step_seeds_N), (0, pad)))
            stochastic = dict(eta=self.gen.eta, step_keys=jax.device_put(keys, self.batch_sharding))
        with self.setup.scope():  # the mesh: the splash kernel runs per device on its batch shard (shard_map)
            x0 = flow.euler_sample(self.setup.velocity, self.variables, put(noise_NxIxC), cond, self.gen.num_steps,
                                   cfg_scale, negative, mu=self.gen.shift_mu, sigmas=sigmas, **stochastic)
        return x0[:N]
