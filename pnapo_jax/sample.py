"""Text -> image with FLUX or SD3 / SD3.5 in JAX, from a local diffusers pipeline folder (FluxPipeline or
StableDiffusion3Pipeline, as its model_index.json says) or a training checkpoint's policy.

    python -m pnapo_jax.sample --pipeline=DIR --prompt="a red fox" --out=fox.png
    python -m pnapo_jax.sample --pipeline=DIR --prompts=prompts.txt --out=OUT_DIR [--workdir=RUN [--step=N]]
    python -m pnapo_jax.sample --prompt="a red circle" --out=circle.png [--workdir=DEMO_RUN]   # the demo world

A FLUX DIR holds transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/ and scheduler/; an
SD3 one also text_encoder_3/ and tokenizer_3/ (pnapo_jax.pipelines: what differs between the two). With
--workdir the policy of a training checkpoint (default: the latest) replaces the folder's transformer: its
params, or for a LoRA run the base the run was trained from with its adapters.

The embedded demo world (pnapo_jax.world) has no pipeline folder: its text encoder is a fixed table and its
latents are the 32x32 pixels (x 2 - 1), so a bare transformer folder of either backbone (default: the shipped
FLUX base, pnapo_jax/assets/demo_base; SD3's: pnapo_jax/assets/demo_base_sd3; or a demo run's export) or a demo
run's workdir samples with those, through its backbone's velocity and conditioning, on FLUX's default schedule
without classifier-free guidance as the world samples (or the run's generate.shift_mu); images are 32x32 unless
--height/--width say otherwise.

Given the same initial noise (the pipeline's `latents=`), this computes what diffusers' pipeline computes: the
prompt encoding, the Euler schedule of the folder's scheduler config, the guidance (SD3: classifier-free, against
--negative_prompt, "" by default), VAE decoding and its postprocessing
(x / 2 + 0.5 clipped to [0, 1]; PNG pixels round(255 x)). Only the noise rule is ours, JAX's instead of
torch's: image i (0-based, in prompt order) starts from
    normal(fold_in(PRNGKey(seed), i), [C, H / f, W / f])  packed into [(H / 2f)(W / 2f), 4C] tokens
(C: the VAE's latent channels, f: its downsampling, 16 and 8 for FLUX and SD3), so an image does not depend on the
batch it was drawn in, and image i of a prompts file is reproduced alone with the same seed. --noise=FILE.npy
gives the noise explicitly, [N, C, H/f, W/f] or packed [N, I, 4C], e.g. to match a diffusers run.
"""

import dataclasses
import math
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from pnapo_jax import backbones, flow, pipelines
from pnapo_jax.convert import files
from pnapo_jax.convert.vae import load_vae
from pnapo_jax.errors import UserError
from pnapo_jax.models import flux, vae
from pnapo_jax.pipelines import schedule_mu  # noqa: F401  (FLUX's schedule; long exported from here)


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """Everything sampling needs, loaded once: text encoders, transformer, VAE and the scheduler's config."""

    encoders: Any  # text.TextEncoders, sd3_text.SD3TextEncoders, or None: the demo world's fixed text table
    transformer: Any  # the backbone's model config (flux.FluxConfig, sd3.SD3Config)
    variables: dict[str, Any]  # {"params": ...}, plus "lora" for a LoRA policy
    vae: vae.VAEConfig | None  # None: the latents are the pixels (the demo world)
    vae_params: Any
    scheduler: dict[str, Any]  # scheduler/scheduler_config.json
    timestep_scale: float  # the transformer's t as FluxPipeline passes it: sigma * num_train_timesteps / 1000
    size: int = 1024  # default image height and width in pixels
    kind: pipelines.PipelineKind = pipelines.FLUX  # the backbone's way (the demo world samples as FLUX)


def checkpoint_policy(workdir: str, step: int | None = None, backbone: str | None = None
                      ) -> tuple[Any, dict[str, Any]]:
    """(model config, policy variables) of a training checkpoint (default: the latest step). A LoRA run's base
    is rebuilt as training built it (config.model.pretrained, or the seeded init): checkpoints never hold it.
    `backbone`: the one the checkpoint must be of (the pipeline folder's)."""
    from pnapo_jax import export  # orbax and the mesh only when a checkpoint is sampled
    from pnapo_jax import setup as setup_lib

    setup = setup_lib.make_setup(export.load_config(workdir))
    if backbone is not None and setup.backbone.name != backbone:
        raise UserError(f"--workdir={workdir} trained a {setup.backbone.name} model; the pipeline folder is "
                        f"{backbone}'s")
    _, trained = export.restore_params(setup, workdir, step)
    frozen = {"base": setup_lib.base_params(setup)} if setup.lora else {}
    return setup.model_cfg, setup_lib.policy_variables(setup, trained, frozen)


def load_pipeline(path: str | os.PathLike, workdir: str | None = None, step: int | None = None,
                  dtype: str = "float32", transformer_shardings: Callable[[Any], Any] | None = None) -> Pipeline:
    """A local FLUX or SD3 pipeline folder; with `workdir` the checkpoint's policy replaces its transformer.

    `dtype` is every model's parameter and compute dtype; images come back in float32 whatever it is.
    `transformer_shardings` (config -> {"params": shardings}) places the folder's transformer straight into them,
    so no device ever holds all of it.
    """
    if step is not None and workdir is None:
        raise UserError("--step: a checkpoint step needs the training workdir it belongs to (--workdir)")
    if path is None or not is_pipeline_folder(path):
        return load_demo_pipeline(path, workdir, step, dtype)
    path = pathlib.Path(path)
    kind = pipelines.pipeline_kind(path, need_transformer=workdir is None)
    if workdir is None:
        cfg, params = kind.load_placed_transformer(path, dtype, transformer_shardings)
        variables = {"params": params}
    else:
        cfg, variables = checkpoint_policy(workdir, step, kind.backbone)
        variables = jax.tree.map(lambda x: x.astype(dtype), variables)
    cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
    encoders = kind.load_text_encoders(path, dtype)
    vae_cfg, vae_params = load_vae(path, dtype)
    kind.check_fits(cfg, encoders, vae_cfg)
    scheduler = files.read_json(path / pipelines.SCHEDULER_CONFIG)
    return Pipeline(encoders, cfg, variables, vae_cfg, vae_params, scheduler, timestep_scale(scheduler), kind=kind)


def is_pipeline_folder(path: str | os.PathLike) -> bool:
    """A diffusers pipeline folder (model_index.json or text encoders), not a bare transformer folder."""
    path = pathlib.Path(path)
    return (path / pipelines.MODEL_INDEX).is_file() or (path / "text_encoder").is_dir()


def load_demo_pipeline(path: str | os.PathLike | None = None, workdir: str | None = None, step: int | None = None,
                       dtype: str = "float32") -> Pipeline:
    """The demo world's sampling: a bare transformer folder (default: the shipped base), or with `workdir` a
    demo run's checkpoint policy, with the world's text table and pixel latents."""
    from pnapo_jax.world import demo_base, latents

    if workdir is None:
        folder = demo_base.DEFAULT_BASE if path is None else pathlib.Path(path)
        if not (folder / "config.json").exists():
            raise UserError(f"--pipeline={folder}: neither a FLUX pipeline folder (no text_encoder/) nor a "
                             "transformer folder (no config.json)")
        where = f"--pipeline={folder}"
        _check_world_model(demo_base.base_config(folder), where)  # before the weights load
        cfg, params = demo_base.load_base(folder, dtype)
        variables, mu = {"params": params}, None
    else:
        from pnapo_jax import export

        cfg, variables = checkpoint_policy(workdir, step)
        variables = jax.tree.map(lambda x: x.astype(dtype), variables)
        mu, where = export.load_config(workdir).generate.shift_mu, f"--workdir={workdir}"
        _check_world_model(cfg, where)
    cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
    # FLUX's default scheduler (the resolution shift generate and the sampling eval use), or the run's fixed mu.
    scheduler = {"use_dynamic_shifting": True} if mu is None else {"shift": math.exp(mu)}
    return Pipeline(None, cfg, variables, None, None, scheduler, 1.0,
                    size=latents.LATENT_H_TOKENS * latents.PATCH_PIXELS)


def _check_world_model(cfg: Any, where: str) -> None:
    """The demo world feeds its text table and pixel latents: a transformer of other widths than its base's on that
    backbone (FLUX or SD3) is refused, naming them."""
    from pnapo_jax.world import demo_base

    base = demo_base.demo_model_config(cfg.backbone)
    expected = {k: getattr(base, k) for k in ("in_channels", "joint_attention_dim", "pooled_projection_dim")}
    wrong = {k: getattr(cfg, k) for k, v in expected.items() if getattr(cfg, k) != v}
    if wrong:
        raise UserError(f"{where}: not the demo world's transformer ({wrong}, the world's {cfg.backbone} base has "
                        f"{expected}); a {cfg.backbone.upper()} model samples from its pipeline folder (--pipeline=DIR "
                        "with text_encoder/ and vae/)")


def _encode(pipeline: Pipeline, prompts: Sequence[str], max_sequence_length: int | None
            ) -> tuple[jax.Array, jax.Array]:
    """(prompt embeds [B, T, D], pooled [B, P]); the demo world's table has its own fixed T."""
    if pipeline.encoders is None:
        from pnapo_jax.world import text as world_text

        return world_text.encode_prompts(prompts)
    return pipeline.kind.encode(prompts, pipeline.encoders, max_sequence_length)


def timestep_scale(scheduler: dict[str, Any]) -> float:
    """The transformer's timestep as FluxPipeline passes it is sigma * num_train_timesteps / 1000 (the scheduler's
    timesteps are sigma * N, the pipeline divides by 1000): sigma times this, 1 for FLUX's N = 1000."""
    return scheduler.get("num_train_timesteps", 1000) / 1000


def _noise_tokens(noise: np.ndarray, n: int, shape_CxHxW: tuple[int, int, int]) -> jax.Array:
    """Explicit noise as packed tokens [n, I, 4C], from the unpacked or the packed layout."""
    C, H, W = shape_CxHxW
    packed = (n, (H // 2) * (W // 2), 4 * C)
    if noise.shape not in ((n, *shape_CxHxW), packed):
        raise UserError(f"--noise has shape {noise.shape}; expected {(n, *shape_CxHxW)} or packed {packed}")
    noise = jnp.asarray(noise, jnp.float32)
    return flux.pack_latents(noise) if noise.ndim == 4 else noise


def _negatives(negative_prompt: str | Sequence[str] | None, n: int) -> list[str] | None:
    """One negative prompt per prompt: a single one is repeated."""
    if negative_prompt is None or isinstance(negative_prompt, str):
        return None if negative_prompt is None else [negative_prompt] * n
    if len(negative_prompt) != n:
        raise UserError(f"{len(negative_prompt)} negative prompts for {n} prompts")
    return list(negative_prompt)


def iter_images(pipeline: Pipeline, prompts: str | Sequence[str], noise: np.ndarray | None = None, *,
                height: int | None = None, width: int | None = None, num_steps: int = 28,
                guidance_scale: float | None = None, true_cfg_scale: float = 1.0,
                negative_prompt: str | Sequence[str] | None = None, seed: int = 0,
                max_sequence_length: int | None = None, batch_size: int | None = None,
                place: Callable[[jax.Array], jax.Array] | None = None,
                fetch: Callable[[jax.Array], np.ndarray] = np.asarray) -> Iterator[np.ndarray]:
    """Images [b, H, W, 3] in [0, 1] for `prompts`, `batch_size` at a time (default: all at once).

    `noise`: the initial noises of all prompts (see the module docstring), default `flow.seeded_noise(seed, ...)`.
    FLUX: `guidance_scale` (default 3.5) is the guidance-distilled model's input; `true_cfg_scale` > 1 needs
    `negative_prompt` (one for all, or one per prompt; "" is the empty prompt). SD3: `guidance_scale` (default 7)
    is the classifier-free guidance scale, against `negative_prompt` (default ""); `true_cfg_scale` is refused.
    `max_sequence_length`: T5 tokens, default the pipeline's (FLUX 512, SD3 256).
    `height` and `width` default to the pipeline's size (1024 for FLUX, 32 for the demo world).
    `place` puts each batch's noise and prompt embeddings where the batch runs (e.g. sharded over a mesh's data
    axis; the computation follows them), default: where they are; `fetch` brings the images back to the host
    (a multi-host run: this process's rows of the global batch).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    kind = pipeline.kind
    guidance_scale = kind.guidance_scale if guidance_scale is None else guidance_scale
    negatives = _negatives(negative_prompt, len(prompts))
    if kind.guidance_is_cfg:  # the scale is classifier-free guidance; the model takes no guidance input
        if true_cfg_scale != 1:
            raise UserError(f"--true_cfg_scale is FLUX's; {kind.pipeline_class}'s classifier-free guidance scale is "
                            "--guidance_scale")
        cfg_scale, model_guidance = guidance_scale, None
        negatives = [""] * len(prompts) if negatives is None else negatives
    else:
        cfg_scale, model_guidance = true_cfg_scale, guidance_scale
        if true_cfg_scale > 1 and negatives is None:
            raise UserError("--true_cfg_scale > 1 needs --negative_prompt (\"\" for the empty one)")
    height, width = height or pipeline.size, width or pipeline.size
    f = 1 if pipeline.vae is None else pipeline.vae.downsample_factor
    if height % (2 * f) or width % (2 * f):
        raise UserError(f"--height and --width must be multiples of {2 * f}, got {height} x {width}")
    h_tokens, w_tokens = height // (2 * f), width // (2 * f)
    grid = getattr(pipeline.transformer, "pos_embed_max_size", None)  # SD3's position table; FLUX's RoPE has none
    if grid is not None and max(h_tokens, w_tokens) > grid:
        raise UserError(f"--height and --width: {height} x {width} is a {h_tokens} x {w_tokens} token grid, beyond "
                        f"the transformer's position table ({grid} x {grid} tokens, pos_embed_max_size)")
    if pipeline.vae is None:  # the demo world: its model through its backbone, sampled as the world samples it
        from pnapo_jax.world import latents  # (FLUX's schedule and guidance input, whatever the backbone)

        channels = latents.IN_CHANNELS // latents.PATCH_PIXELS ** 2  # its latents are the RGB pixels
        model = backbones.BACKBONES[pipeline.transformer.backbone]
        velocity, conditioning = model.velocity(pipeline.transformer, h_tokens, w_tokens), model.conditioning
    else:
        channels = pipeline.vae.latent_channels
        velocity = kind.velocity(pipeline.transformer, h_tokens, w_tokens, pipeline.timestep_scale)
        conditioning = kind.conditioning
    shape_CxHxW = (channels, height // f, width // f)
    tokens = _noise_tokens(np.asarray(noise), len(prompts), shape_CxHxW) if noise is not None else None
    sigmas = kind.sigmas(pipeline.scheduler, num_steps, h_tokens * w_tokens)
    step = batch_size or len(prompts)
    for start in range(0, len(prompts), step):
        stop = min(start + step, len(prompts))
        x1 = tokens[start:stop] if tokens is not None else flux.pack_latents(
            flow.seeded_noise(seed, range(start, stop), shape_CxHxW))
        cond = conditioning(*_encode(pipeline, prompts[start:stop], max_sequence_length), model_guidance)
        negative = None if cfg_scale <= 1 else conditioning(
            *_encode(pipeline, negatives[start:stop], max_sequence_length), model_guidance)
        if place is not None:
            x1, cond, negative = place(x1), jax.tree.map(place, cond), jax.tree.map(place, negative)
        x0 = flow.euler_sample(velocity, pipeline.variables, x1, cond, num_steps, cfg_scale, negative, sigmas=sigmas)
        images = flux.unpack_latents(x0, *shape_CxHxW[1:])  # the demo world's latents are its pixels
        if pipeline.vae is not None:
            images = vae.decode(pipeline.vae_params, pipeline.vae, images)
        yield fetch(jnp.clip(images / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1))


def sample_images(pipeline: Pipeline, prompts: str | Sequence[str], noise: np.ndarray | None = None,
                  **kwargs: Any) -> np.ndarray:
    """Images [B, H, W, 3] float32 in [0, 1], as the diffusers pipeline (output_type="np") gives them from the same
    noise; `kwargs` are `iter_images`' (height, width, num_steps, guidance_scale, true_cfg_scale, ...)."""
    return np.concatenate(list(iter_images(pipeline, prompts, noise, **kwargs)))


def save_png(image_HxWx3: np.ndarray, path: str | os.PathLike) -> None:
    """uint8 PNG, pixels round(255 x) as diffusers' numpy_to_pil."""
    Image.fromarray((image_HxWx3 * 255).round().astype(np.uint8)).save(path, format="PNG")


def run() -> None:
    """The command; flags are defined here, not at import (every command does so)."""
    from absl import flags

    from pnapo_jax import cli, sampling

    _PIPELINE = flags.DEFINE_string("pipeline", None, "Local diffusers FLUX or SD3 pipeline folder; or a bare "
                                    "transformer folder of the demo world, FLUX or SD3 (default: the shipped FLUX "
                                    "demo base).")
    _PROMPT = flags.DEFINE_string("prompt", None, "One prompt; --out is then the PNG file.")
    _PROMPTS = flags.DEFINE_string("prompts", None, "Text file, one prompt a line; --out is then a folder "
                                   "receiving 00000.png, 00001.png, ... (the 0-based line number).")
    _OUT = flags.DEFINE_string("out", None, "PNG file (--prompt) or folder (--prompts).")
    _WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir whose policy replaces the transformer.")
    _STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).")
    _HEIGHT = flags.DEFINE_integer("height", None, "Image height in pixels (a multiple of 16 for FLUX); default "
                                   "1024 for FLUX, 32 for the demo world.")
    _WIDTH = flags.DEFINE_integer("width", None, "Image width in pixels; default as --height.")
    _NUM_STEPS = flags.DEFINE_integer("num_steps", 28, "Euler steps.")
    _GUIDANCE = flags.DEFINE_float("guidance_scale", None, "FLUX: guidance input of guidance-distilled models "
                                   "(default 3.5); SD3: classifier-free guidance scale (default 7).")
    _TRUE_CFG = flags.DEFINE_float("true_cfg_scale", 1.0, "FLUX's classifier-free guidance scale (> 1 needs "
                                   "--negative_prompt).")
    _NEGATIVE = flags.DEFINE_string("negative_prompt", None, "Negative prompt of classifier-free guidance, for "
                                    "every prompt (SD3's default: \"\").")
    _SEED = flags.DEFINE_integer("seed", 0, "Noise seed (rule in the module docstring).")
    _NOISE = flags.DEFINE_string("noise", None, ".npy of every image's initial noise, instead of --seed's.")
    _MAX_SEQ = flags.DEFINE_integer("max_sequence_length", None, "T5 tokens (default: FLUX 512, SD3 256).")
    _BATCH = flags.DEFINE_integer("batch_size", 1, "Images sampled together.")
    _DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Params and compute dtype.")
    flags.mark_flags_as_required(["out"])
    flags.mark_flags_as_mutual_exclusive(["prompt", "prompts"], required=True)

    def _check_flags() -> None:
        """What the flags alone say is wrong, before anything loads."""
        if _PIPELINE.value is not None:  # None: the demo world's shipped base (or --workdir's demo run)
            pipeline = pathlib.Path(_PIPELINE.value)
            if not pipeline.is_dir():
                raise UserError(f"--pipeline={pipeline} is not a folder (a diffusers FLUX or SD3 pipeline folder, or "
                                "a demo world transformer folder)")
            if is_pipeline_folder(pipeline):  # without model_index.json or text encoders: a demo transformer folder
                try:
                    pipelines.pipeline_kind(pipeline, need_transformer=_WORKDIR.value is None)
                except UserError as e:
                    raise UserError(f"--pipeline={e}") from None
        for flag in (_NUM_STEPS, _BATCH, _MAX_SEQ, _HEIGHT, _WIDTH):
            if flag.value is not None and flag.value < 1:
                raise UserError(f"--{flag.name}={flag.value}: must be >= 1")

    def _load_noise() -> np.ndarray | None:
        if _NOISE.value is None:
            return None
        try:
            return np.load(_NOISE.value, allow_pickle=False)
        except (OSError, ValueError) as e:  # missing, unreadable, not .npy, or pickled objects
            raise UserError(f"--noise={_NOISE.value}: cannot load it as .npy ({e})") from None

    def _main(argv: list[str]) -> None:
        prompts = [_PROMPT.value] if _PROMPTS.value is None else sampling.read_prompts(_PROMPTS.value)
        _check_flags()
        noise = _load_noise()
        out = pathlib.Path(_OUT.value)
        paths = [out] if _PROMPTS.value is None else [out / f"{i:05d}.png" for i in range(len(prompts))]
        try:
            paths[0].parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out={out}: cannot create {paths[0].parent} ({e.strerror or e})") from None
        pipeline = load_pipeline(_PIPELINE.value, _WORKDIR.value, _STEP.value, _DTYPE.value)
        batches = iter_images(pipeline, prompts, noise, height=_HEIGHT.value, width=_WIDTH.value,
                              num_steps=_NUM_STEPS.value, guidance_scale=_GUIDANCE.value,
                              true_cfg_scale=_TRUE_CFG.value, negative_prompt=_NEGATIVE.value, seed=_SEED.value,
                              max_sequence_length=_MAX_SEQ.value, batch_size=_BATCH.value)
        images = (image for batch in batches for image in batch)
        for done, (image, path) in enumerate(zip(images, paths, strict=True), 1):
            save_png(image, path)
            print(f"wrote {done}/{len(paths)}: {path}", flush=True)

    cli.run(_main)


if __name__ == "__main__":
    run()
