"""Paired, resumable sampling: every model draws image k of prompt p from the same noise, and every image is a
file named by its prompt and seed, under its model's folder:

    OUT/images/MODEL/PPPPP_KK.png     prompt p (0-based, in the prompt set's order), seed k of N

The noise of that image is `flow.seeded_noise` of index p * N + k with --seed (embedded world: packed, as pair
generation draws it; FLUX: over unpacked latents, as `python -m pnapo_jax.sample` draws it), so it depends on
neither the batch nor the other prompts. A file is written to a temporary name and renamed, and existing files
are skipped: a killed run continues without redoing or losing an image. With several JAX processes, process i
samples the prompts p with p % count == i.

Both samplers shard each batch over a mesh of the process's devices (the batch axis; the weights replicated). A
batch that the device count does not divide is padded with copies of its last row, which are dropped: the
images do not depend on the padding (each row's noise is its own), only the wasted rows do, so a --batch_size
that is a multiple of the device count wastes none but the last batch's.
"""

import dataclasses
import functools
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from pnapo_jax import flow
from pnapo_jax.models import flux

Generator = Callable[[Sequence[str], np.ndarray], np.ndarray]  # (prompts, noise indices) -> images [B, H, W, 3]


def image_path(out: pathlib.Path, model: str, prompt_index: int, seed_index: int) -> pathlib.Path:
    return out / "images" / model / f"{prompt_index:05d}_{seed_index:02d}.png"


def save_png(image_HxWx3: np.ndarray, path: pathlib.Path) -> None:
    """uint8 PNG (round(255 x), as diffusers), written whole or not at all."""
    tmp = path.with_name(f".tmp_{os.getpid()}_{path.name}")
    Image.fromarray((np.clip(image_HxWx3, 0, 1) * 255).round().astype(np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)


def load_png(path: pathlib.Path) -> np.ndarray:
    """[H, W, 3] float32 in [0, 1]: what the scorers see, the same for a fresh and a resumed run."""
    return np.asarray(Image.open(path).convert("RGB"), np.float32) / 255


def _data_mesh() -> tuple[Mesh, NamedSharding, NamedSharding]:
    """(this process's devices on one "batch" axis, batch-sharded, replicated)."""
    mesh = Mesh(np.asarray(jax.local_devices()), ("batch",))
    return mesh, NamedSharding(mesh, PartitionSpec("batch")), NamedSharding(mesh, PartitionSpec())


def _padded(prompts: Sequence[str], noise_ids_B: np.ndarray, multiple: int) -> tuple[list[str], np.ndarray]:
    """Prompts and noise indices padded with their last row to a multiple of `multiple` rows."""
    pad = -len(prompts) % multiple
    return list(prompts) + [prompts[-1]] * pad, np.concatenate([noise_ids_B, np.repeat(noise_ids_B[-1:], pad)])


@dataclasses.dataclass
class WorldGenerator:
    """The embedded world's sampler for one transformer: Euler on a mesh of this process's devices."""

    cfg: Any  # FluxConfig
    variables: Any
    num_steps: int
    seed: int

    def __post_init__(self):
        from pnapo_jax.world import latents, text

        self._text, self._latents = text, latents
        self._velocity = flux.Velocity(self.cfg, latents.LATENT_H_TOKENS, latents.LATENT_W_TOKENS)
        self._mesh, self._batch, replicated = _data_mesh()
        self.variables = jax.device_put(self.variables, replicated)
        self._shape = (latents.LATENT_H_TOKENS * latents.LATENT_W_TOKENS, latents.IN_CHANNELS)

    def __call__(self, prompts: Sequence[str], noise_ids_B: np.ndarray) -> np.ndarray:
        B = len(prompts)
        prompts, ids = _padded(prompts, noise_ids_B, self._mesh.size)
        embeds, pooled = self._text.encode_prompts(prompts)
        noise = flow.seeded_noise(self.seed, ids, self._shape)
        put = lambda x: jax.device_put(np.asarray(x, np.float32), self._batch)
        cond = flux.conditioning(put(embeds), put(pooled), 0.0)
        x0 = flow.euler_sample(self._velocity, self.variables, put(noise), cond, self.num_steps)
        return self._latents.decode(np.asarray(x0)[:B])


@dataclasses.dataclass
class FluxGenerator:
    """FLUX through `pnapo_jax.sample` (FluxPipeline's computation), a pipeline whose transformer is the model's;
    each call is one batch, sharded over this process's devices (the transformer and VAE replicated)."""

    pipeline: Any  # sample.Pipeline
    seed: int
    options: dict[str, Any]  # sample.iter_images' keywords: height, width, num_steps, guidance_scale, ...

    def __post_init__(self):
        self._mesh, self._batch, replicated = _data_mesh()
        put = functools.partial(jax.device_put, device=replicated)
        self.pipeline = dataclasses.replace(self.pipeline, variables=put(self.pipeline.variables),
                                            vae_params=put(self.pipeline.vae_params))

    def __call__(self, prompts: Sequence[str], noise_ids_B: np.ndarray) -> np.ndarray:
        from pnapo_jax import sample

        B = len(prompts)
        prompts, ids = _padded(prompts, noise_ids_B, self._mesh.size)
        f = self.pipeline.vae.downsample_factor
        shape = (self.pipeline.vae.latent_channels, self.options["height"] // f, self.options["width"] // f)
        noise = np.asarray(flow.seeded_noise(self.seed, ids, shape))
        images = sample.sample_images(self.pipeline, prompts, noise, seed=self.seed,
                                      place=lambda x: jax.device_put(x, self._batch), **self.options)
        return images[:B]


def my_prompts(num_prompts: int) -> list[int]:
    """This process's prompt indices."""
    return [p for p in range(num_prompts) if p % jax.process_count() == jax.process_index()]


def sample_all(out: pathlib.Path, models: dict[str, Callable[[], Generator]], prompts: Sequence[str],
               seeds_per_prompt: int, batch_size: int, show_progress: bool = True) -> dict[str, int]:
    """Sample every missing image of this process's prompts for every model (`models`: name -> a function that
    loads its generator, called only when the model has images to draw). Returns images drawn per model."""
    N = seeds_per_prompt
    items = [(p, k) for p in my_prompts(len(prompts)) for k in range(N)]
    todo = {m: [(p, k) for p, k in items if not image_path(out, m, p, k).exists()] for m in models}
    drawn = {}
    total, done = len(items) * len(models), len(items) * len(models) - sum(map(len, todo.values()))
    with tqdm.tqdm(total=total, initial=done, unit="img", disable=not show_progress, dynamic_ncols=True) as bar:
        for name, load in models.items():
            drawn[name] = len(todo[name])
            if not todo[name]:
                continue
            bar.set_description(f"loading {name}")
            generate = load()
            bar.set_description(name)
            (out / "images" / name).mkdir(parents=True, exist_ok=True)
            for s in range(0, len(todo[name]), batch_size):
                batch = todo[name][s:s + batch_size]
                images = generate([prompts[p] for p, _ in batch], np.array([p * N + k for p, k in batch]))
                for (p, k), image in zip(batch, images, strict=True):
                    save_png(image, image_path(out, name, p, k))
                bar.update(len(batch))
            del generate
    return drawn
