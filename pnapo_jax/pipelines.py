"""diffusers pipeline folders of the two backbones, FLUX.1 (`FluxPipeline`) and SD3 / SD3.5
(`StableDiffusion3Pipeline`): which one a folder is, and the few things sampling from it does differently.

What differs: the text encoders (FLUX: CLIP pooled + T5; SD3: CLIP-L and CLIP-G states joined with T5), the
transformer, the schedule (FluxPipeline passes sigmas linspace(1, 1/n, n) to its scheduler; SD3's pipeline passes
none, so they span the scheduler's shifted training range, `flow.default_sigmas`), and the guidance (FLUX.1-dev's
scale is a model input, true CFG optional; SD3's is real classifier-free guidance against a negative prompt,
"" by default). Everything else (noise, Euler steps, VAE decoding and postprocessing) is shared.
"""

import dataclasses
import math
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from pnapo_jax import convert, flow, sd3_text, text
from pnapo_jax.backbones import flux as backbone_flux
from pnapo_jax.convert import files, layout
from pnapo_jax.convert import sd3 as convert_sd3
from pnapo_jax.errors import UserError
from pnapo_jax.models import flux, sd3, vae

MODEL_INDEX = "model_index.json"
TRANSFORMER_CONFIG = pathlib.Path("transformer") / files.CONFIG_NAME
SCHEDULER_CONFIG = pathlib.Path("scheduler") / "scheduler_config.json"
# FlowMatchEulerDiscreteScheduler options neither pipeline's schedule uses; refused rather than ignored.
_UNSUPPORTED_SCHEDULER = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                          "invert_sigmas", "stochastic_sampling")


@dataclasses.dataclass(frozen=True)
class PipelineKind:
    """One backbone's pipeline folder and how sampling from it differs."""

    backbone: str  # pnapo_jax.backbones name
    pipeline_class: str  # model_index.json's _class_name (transformer/'s class: convert.layout.class_backbone)
    subfolders: tuple[str, ...]  # besides transformer/ and scheduler/
    load_text_encoders: Callable[[pathlib.Path, Any], Any]  # (folder, dtype) -> encoders
    # (prompts, encoders, max_sequence_length) -> (prompt embeds [B, T, D], pooled [B, P])
    encode_prompts: Callable[[Sequence[str], Any, int], tuple[jax.Array, jax.Array]]
    max_sequence_length: int  # the pipeline's default T5 tokens
    guidance_scale: float  # the pipeline's default
    guidance_is_cfg: bool  # True: guidance_scale is real CFG (SD3); False: a model input (FLUX.1-dev)
    max_shift_default: float  # calculate_shift's max_shift when the scheduler config has none
    config_cls: type  # the transformer's config dataclass (from_diffusers)
    # (pipeline folder, dtype, params shardings or None) -> (cfg, params)
    load_transformer: Callable[[pathlib.Path, str, Any], tuple[Any, Any]]
    velocity: Callable[[Any, int, int, float], flow.VelocityFn]  # (cfg, grid rows, columns, timestep scale)
    # (prompt embeds, pooled, guidance input or None) -> the transformer's conditioning
    conditioning: Callable[[jax.Array, jax.Array, float | None], dict[str, jax.Array]]
    check_fits: Callable[[Any, Any, vae.VAEConfig], None]  # (transformer cfg, encoders, VAE cfg)

    def load_placed_transformer(self, path: str | os.PathLike, dtype: str,
                                shardings: Callable[[Any], Any] | None = None) -> tuple[Any, Any]:
        """(cfg, params) of a transformer or pipeline folder; `shardings` (config -> {"params": shardings}) places
        the weights straight into them, read from the folder's config first, so no device holds all of them."""
        placed = None
        if shardings is not None:
            config = files.read_json(files.resolve_transformer_dir(path) / files.CONFIG_NAME)
            placed = shardings(self.config_cls.from_diffusers(config, param_dtype=dtype))["params"]
        return self.load_transformer(path, dtype, placed)

    def encode(self, prompts: Sequence[str], encoders: Any, max_sequence_length: int | None = None
               ) -> tuple[jax.Array, jax.Array]:
        return self.encode_prompts(prompts, encoders, max_sequence_length or self.max_sequence_length)

    def t5_tokens(self, text_len: int, encoders: Any) -> int:
        """T5 tokens (the pipeline's max_sequence_length) of prompt embeds `text_len` tokens long: FLUX's are T5's
        alone, SD3's start with the CLIPs' (77)."""
        if self.backbone == "flux":
            return text_len
        clip_len = encoders.tokenizer.model_max_length
        if text_len <= clip_len:
            raise UserError(f"config.data.text_len={text_len}: SD3's prompt embeds are {clip_len} CLIP tokens, then "
                            f"T5's; set it to {clip_len} + max_sequence_length ({clip_len + 256} for the pipeline's "
                            "256)")
        return text_len - clip_len

    def sigmas(self, scheduler: dict[str, Any], num_steps: int, image_seq_len: int) -> np.ndarray:
        """[num_steps + 1] noise levels the pipeline's scheduler steps through, from its scheduler config."""
        if self.backbone == "flux":
            return np.asarray(flow.flux_sigmas(num_steps, image_seq_len, schedule_mu(scheduler, image_seq_len)))
        check_scheduler(scheduler)
        mu = _dynamic_mu(scheduler, image_seq_len, self.max_shift_default) if scheduler.get(
            "use_dynamic_shifting") else None
        return flow.default_sigmas(num_steps, scheduler.get("shift", 1.0), mu,
                                   scheduler.get("num_train_timesteps", 1000))


def check_scheduler(scheduler: dict[str, Any]) -> None:
    """FlowMatchEulerDiscreteScheduler options neither schedule implements are refused, not ignored."""
    unsupported = [k for k in _UNSUPPORTED_SCHEDULER if scheduler.get(k)]
    if scheduler.get("time_shift_type", "exponential") != "exponential":
        unsupported.append(f"time_shift_type={scheduler['time_shift_type']!r}")
    if unsupported:
        raise UserError(f"scheduler options not supported: {unsupported}")


def _dynamic_mu(scheduler: dict[str, Any], image_seq_len: int, max_shift_default: float) -> float:
    """The pipelines' calculate_shift with the scheduler config's constants."""
    return flow.resolution_mu(image_seq_len, scheduler.get("base_image_seq_len", 256),
                              scheduler.get("max_image_seq_len", 4096), scheduler.get("base_shift", 0.5),
                              scheduler.get("max_shift", max_shift_default))


def schedule_mu(scheduler: dict[str, Any], image_seq_len: int) -> float:
    """The `time_shift` mu that turns `flow.flux_sigmas` into the folder's FlowMatchEulerDiscreteScheduler
    schedule as FluxPipeline drives it: FLUX's resolution rule with the config's constants, or for a fixed
    shift s (use_dynamic_shifting off) mu = log s, since time_shift(log s, t) = s t / (1 + (s - 1) t)."""
    check_scheduler(scheduler)
    if not scheduler.get("use_dynamic_shifting"):
        return math.log(scheduler.get("shift", 1.0))
    return _dynamic_mu(scheduler, image_seq_len, FLUX_MAX_SHIFT)


def _check_sd3_fits(cfg: Any, encoders: sd3_text.SD3TextEncoders, vae_cfg: vae.VAEConfig) -> None:
    """A transformer of other sizes would fail deep inside the first call; say which sizes differ."""
    expected = {"in_channels": vae_cfg.latent_channels, "joint_attention_dim": encoders.text_dim,
                "pooled_projection_dim": encoders.pooled_dim}
    wrong = {k: (getattr(cfg, k), v) for k, v in expected.items() if getattr(cfg, k) != v}
    if wrong:
        raise UserError(f"the transformer does not fit the pipeline's VAE and text encoders (transformer's, "
                        f"expected): {wrong}")


FLUX_MAX_SHIFT = 1.15
FLUX = PipelineKind(
    backbone="flux", pipeline_class="FluxPipeline",
    subfolders=(text.CLIP_SUBFOLDER, text.T5_SUBFOLDER, text.CLIP_TOKENIZER_SUBFOLDER, text.T5_TOKENIZER_SUBFOLDER,
                "vae"),
    load_text_encoders=lambda folder, dtype: text.load_text_encoders(folder, dtype),
    encode_prompts=lambda p, e, n: text.encode_prompts(p, e, max_sequence_length=n),
    max_sequence_length=512, guidance_scale=3.5, guidance_is_cfg=False, max_shift_default=FLUX_MAX_SHIFT,
    config_cls=flux.FluxConfig, load_transformer=convert.load_diffusers_transformer,
    velocity=flux.Velocity, conditioning=flux.conditioning, check_fits=backbone_flux.check_fits)
SD3 = PipelineKind(
    backbone="sd3", pipeline_class="StableDiffusion3Pipeline",
    subfolders=(sd3_text.CLIP_L_SUBFOLDER, sd3_text.CLIP_G_SUBFOLDER, sd3_text.T5_SUBFOLDER,
                *sd3_text.TOKENIZER_SUBFOLDERS, "vae"),
    load_text_encoders=lambda folder, dtype: sd3_text.load_text_encoders(folder, dtype),
    encode_prompts=lambda p, e, n: sd3_text.encode_prompts(p, e, max_sequence_length=n),
    max_sequence_length=sd3_text.DEFAULT_MAX_SEQUENCE_LENGTH, guidance_scale=7.0, guidance_is_cfg=True,
    max_shift_default=1.16, config_cls=sd3.SD3Config,
    load_transformer=convert_sd3.load_sd3_transformer,
    velocity=sd3.Velocity, conditioning=sd3.conditioning, check_fits=_check_sd3_fits)
KINDS = (FLUX, SD3)
BY_BACKBONE = {k.backbone: k for k in KINDS}


def _class_name(path: pathlib.Path) -> str | None:
    return files.read_json(path).get("_class_name") if path.is_file() else None


def indexed_kind(folder: pathlib.Path) -> PipelineKind | None:
    """The kind model_index.json names (None: the folder has none); a pipeline of neither backbone is refused."""
    index_class = _class_name(folder / MODEL_INDEX)
    by_class = {k.pipeline_class: k for k in KINDS}
    if index_class is not None and index_class not in by_class:
        raise UserError(f"{folder}: {MODEL_INDEX} names {index_class!r}, neither a FLUX nor an SD3 pipeline "
                        f"({', '.join(by_class)})")
    return by_class.get(index_class)


def pipeline_kind(folder: str | os.PathLike, need_transformer: bool = True) -> PipelineKind:
    """The kind of a local diffusers pipeline folder, from model_index.json's class (a folder without one is FLUX's,
    as FluxPipeline folders written by hand are); with `need_transformer`, its transformer/ must be that backbone's.
    Anything else is one line naming the folder."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder (a diffusers FLUX or SD3 pipeline folder)")
    kind = indexed_kind(folder) or FLUX
    missing = [s for s in (*kind.subfolders, "scheduler", *["transformer"] * need_transformer)
               if not (folder / s).is_dir()]
    if missing:
        raise UserError(f"{folder} lacks {', '.join(missing)}: not a diffusers {kind.pipeline_class} folder")
    transformer_class = _class_name(folder / TRANSFORMER_CONFIG) if need_transformer else None
    holds = layout.class_backbone(transformer_class)
    if transformer_class is not None and holds != kind.backbone:
        looks = f"a {holds} transformer" if holds else "not a transformer this package knows"
        raise UserError(f"{folder}: {MODEL_INDEX} says {kind.pipeline_class} but transformer/ holds "
                        f"{transformer_class!r} ({looks}); the pipeline's parts must be one backbone's")
    return kind
