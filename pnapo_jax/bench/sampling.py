"""Paired, resumable sampling: every model draws image k of prompt p from the same noise, and every image is a
file named by its prompt and seed, under its model's folder (local or gs://):

    OUT/images/MODEL/PPPPP_KK.png     prompt p (0-based, in the prompt set's order), seed k of N; the PNG's text
                                      holds the model, the prompt, p, k and the noise index

The noise of that image is `flow.seeded_noise` of index p * N + k with --seed (embedded world: packed, as pair
generation draws it; FLUX and SD3 pipelines: over unpacked latents, as `python -m pnapo_jax.sample` draws it), so
it depends on neither the batch nor the other prompts. A local file is written to a temporary name and renamed (a
gs:// object appears whole or not at all), and existing files are skipped: a killed run continues without redoing
or losing an image.

Every process of a multi-host run takes part in every sampling step: the mesh spans all devices (data x fsdp, the
training config's default), the transformer's weights are FSDP-sharded over it by the model's logical axis rules
(a 12B FLUX needs no chip to hold all of it), and each global batch is the processes' own rows side by side.
Process i owns prompts p with p % count == i: it draws, writes and scores only their images, so no two processes
write one file. Each process skips its own finished images; a process with fewer left pads its rows (dropped) so
that all run the same number of steps. Text encoders and the VAE are small beside the transformer: they stay whole
(the encoders on each process's first device; the VAE replicated).
"""

import contextlib
import dataclasses
import functools
import io
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import tqdm
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image, PngImagePlugin

from pnapo_jax import backbones, flow, sharding
from pnapo_jax import config as config_lib
from pnapo_jax.models import flux

Generator = Callable[[Sequence[str], np.ndarray], np.ndarray]  # (prompts, noise indices) -> images [B, H, W, 3]


def image_path(out: epath.PathLike, model: str, prompt_index: int, seed_index: int) -> epath.Path:
    return epath.Path(out) / "images" / model / f"{prompt_index:05d}_{seed_index:02d}.png"


def write_whole(path: epath.PathLike, data: bytes) -> None:
    """`data` into `path`, whole or not at all: a local file is written to a temporary name and renamed; a gs://
    object appears whole when its upload finishes."""
    path = epath.Path(path)
    if "://" in os.fspath(path):
        path.write_bytes(data)
        return
    tmp = path.with_name(f".tmp_{os.getpid()}_{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_png(image_HxWx3: np.ndarray, path: epath.PathLike, text: dict[str, str] | None = None) -> None:
    """uint8 PNG (round(255 x), as diffusers), written whole or not at all; `text` goes into its tEXt chunks."""
    buf = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    Image.fromarray((np.clip(image_HxWx3, 0, 1) * 255).round().astype(np.uint8)).save(buf, format="PNG", pnginfo=info)
    write_whole(path, buf.getvalue())


def load_png(path: epath.PathLike) -> np.ndarray:
    """[H, W, 3] float32 in [0, 1]: what the scorers see, the same for a fresh and a resumed run."""
    return np.asarray(Image.open(io.BytesIO(epath.Path(path).read_bytes())).convert("RGB"), np.float32) / 255


@dataclasses.dataclass(frozen=True)
class SamplingMesh:
    """The sampling mesh over every process's devices and the logical axis rules the weights are sharded by."""

    mesh: Mesh
    rules: tuple

    @functools.cached_property
    def batch(self) -> PartitionSpec:
        return PartitionSpec(sharding.BATCH_AXES)

    def weight_shardings(self, cfg: Any) -> Any:
        """NamedShardings of the variables {"params", "lora"?} of the model `cfg` configures (FluxConfig,
        SD3Config): FSDP over the mesh, as training's."""
        boxed = jax.eval_shape(lambda: backbones.BACKBONES[cfg.backbone].init(cfg, jax.random.key(0)))
        return sharding.logical_shardings(boxed, self.mesh, self.rules)

    def shard(self, cfg: Any, variables: Any) -> Any:
        """`variables` (host, one device, or another mesh's) placed in `weight_shardings`."""
        shardings = self.weight_shardings(cfg)
        return {k: jax.device_put(v, shardings[k]) for k, v in variables.items()}

    def to_global(self, local_B: Any) -> jax.Array:
        """This process's rows -> the global batch (every process's rows, split over data x fsdp)."""
        return multihost_utils.host_local_array_to_global_array(np.asarray(local_B), self.mesh, self.batch)

    def to_local(self, global_B: jax.Array) -> np.ndarray:
        """The global batch -> this process's rows."""
        return np.asarray(multihost_utils.global_array_to_host_local_array(global_B, self.mesh, self.batch))

    @contextlib.contextmanager
    def scope(self):
        """The mesh and the rules, which tracing the model's activation constraints needs."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield


@functools.cache
def eval_mesh() -> SamplingMesh:
    """data x fsdp x tensor over all devices, as the default training config lays it out (fsdp takes them all)."""
    c = config_lib.defaults()
    return SamplingMesh(sharding.make_mesh(c.mesh), sharding.rules_from_config(c.logical_axis_rules))


def _padded(prompts: Sequence[str], noise_ids_B: np.ndarray, multiple: int) -> tuple[list[str], np.ndarray]:
    """Prompts and noise indices padded with their last row to a multiple of `multiple` rows."""
    pad = -len(prompts) % multiple
    return list(prompts) + [prompts[-1]] * pad, np.concatenate([noise_ids_B, np.repeat(noise_ids_B[-1:], pad)])


@dataclasses.dataclass
class WorldGenerator:
    """The embedded world's sampler for one transformer: Euler on the global mesh, weights FSDP-sharded."""

    cfg: Any  # FluxConfig
    variables: Any
    num_steps: int
    seed: int

    def __post_init__(self):
        from pnapo_jax.world import latents, text

        self._text, self._latents = text, latents
        self._velocity = flux.Velocity(self.cfg, latents.LATENT_H_TOKENS, latents.LATENT_W_TOKENS)
        self._mesh = eval_mesh()
        self.variables = self._mesh.shard(self.cfg, self.variables)
        self._shape = (latents.LATENT_H_TOKENS * latents.LATENT_W_TOKENS, latents.IN_CHANNELS)

    def __call__(self, prompts: Sequence[str], noise_ids_B: np.ndarray) -> np.ndarray:
        """This process's images; every process calls it together, with as many rows."""
        B = len(prompts)
        prompts, ids = _padded(prompts, noise_ids_B, jax.local_device_count())
        embeds, pooled = self._text.encode_prompts(prompts)
        noise = flow.seeded_noise(self.seed, ids, self._shape)
        cond = flux.conditioning(np.asarray(embeds, np.float32), np.asarray(pooled, np.float32), 0.0)
        put = self._mesh.to_global
        with self._mesh.scope():
            x0 = flow.euler_sample(self._velocity, self.variables, put(np.asarray(noise, np.float32)),
                                   jax.tree.map(put, cond), self.num_steps)
        return self._latents.decode(self._mesh.to_local(x0)[:B])


@dataclasses.dataclass
class PipelineGenerator:
    """FLUX or SD3 through `pnapo_jax.sample` (FluxPipeline's or StableDiffusion3Pipeline's computation), a
    pipeline whose transformer is the model's; each call is one global batch over the mesh (the transformer
    FSDP-sharded, the VAE replicated)."""

    pipeline: Any  # sample.Pipeline
    seed: int
    options: dict[str, Any]  # sample.iter_images' keywords: height, width, num_steps, guidance_scale, ...

    def __post_init__(self):
        self._mesh = eval_mesh()
        replicated = NamedSharding(self._mesh.mesh, PartitionSpec())
        self.pipeline = dataclasses.replace(
            self.pipeline, variables=self._mesh.shard(self.pipeline.transformer, self.pipeline.variables),
            vae_params=jax.device_put(self.pipeline.vae_params, replicated))

    def __call__(self, prompts: Sequence[str], noise_ids_B: np.ndarray) -> np.ndarray:
        """This process's images; every process calls it together, with as many rows."""
        from pnapo_jax import sample

        B = len(prompts)
        prompts, ids = _padded(prompts, noise_ids_B, jax.local_device_count())
        f = self.pipeline.vae.downsample_factor
        shape = (self.pipeline.vae.latent_channels, self.options["height"] // f, self.options["width"] // f)
        noise = np.asarray(flow.seeded_noise(self.seed, ids, shape))
        with self._mesh.scope():
            images = sample.sample_images(self.pipeline, prompts, noise, seed=self.seed, place=self._mesh.to_global,
                                          fetch=self._mesh.to_local, **self.options)
        return images[:B]


def my_prompts(num_prompts: int) -> list[int]:
    """This process's prompt indices."""
    return [p for p in range(num_prompts) if p % jax.process_count() == jax.process_index()]


def local_batch_size(batch_size: int) -> int:
    """Rows each process contributes to a global batch of about `batch_size`: a multiple of its device count."""
    per_process = math.ceil(batch_size / jax.process_count())
    return math.ceil(per_process / jax.local_device_count()) * jax.local_device_count()


def _max_over_processes(counts: list[int]) -> np.ndarray:
    """Elementwise max of every process's `counts` (all processes call it together)."""
    if jax.process_count() == 1:
        return np.asarray(counts)
    return np.asarray(multihost_utils.process_allgather(np.asarray(counts, np.int64))).max(axis=0)


def sample_all(out: epath.PathLike, models: dict[str, Callable[[], Generator]], prompts: Sequence[str],
               seeds_per_prompt: int, batch_size: int, show_progress: bool = True) -> dict[str, int]:
    """Sample every missing image of this process's prompts for every model (`models`: name -> a function that
    loads its generator, called only when some process has images of the model to draw; every process calls
    this together). Returns images this process drew per model."""
    N, out = seeds_per_prompt, epath.Path(out)
    items = [(p, k) for p in my_prompts(len(prompts)) for k in range(N)]
    todo = {m: [(p, k) for p, k in items if not image_path(out, m, p, k).exists()] for m in models}
    rows = local_batch_size(batch_size)
    steps = dict(zip(models, _max_over_processes([math.ceil(len(t) / rows) for t in todo.values()]), strict=True))
    drawn = {}
    total, done = len(items) * len(models), len(items) * len(models) - sum(map(len, todo.values()))
    quiet = not show_progress or jax.process_index() != 0
    with tqdm.tqdm(total=total, initial=done, unit="img", disable=quiet, dynamic_ncols=True) as bar:
        for name, load in models.items():
            drawn[name] = len(todo[name])
            if not steps[name]:
                continue
            bar.set_description(f"loading {name}")
            generate = load()
            bar.set_description(name)
            (out / "images" / name).mkdir(parents=True, exist_ok=True)
            for step in range(steps[name]):
                batch = todo[name][step * rows:(step + 1) * rows]
                filler = batch[-1:] or [(0, 0)]  # rows of a process with fewer left: drawn and dropped
                padded = batch + filler * (rows - len(batch))
                images = generate([prompts[p] for p, _ in padded], np.array([p * N + k for p, k in padded]))
                for (p, k), image in zip(batch, images[:len(batch)], strict=True):
                    save_png(image, image_path(out, name, p, k), {"model": name, "prompt": prompts[p],
                                                                  "prompt_index": str(p), "seed_index": str(k),
                                                                  "noise_index": str(p * N + k)})
                bar.update(len(batch))
            del generate
    return drawn
