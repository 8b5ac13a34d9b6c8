"""FLUX.1 as a backbone (pnapo_jax.backbones.interface): the Flax port (pnapo_jax.models.flux) with its diffusers and
BFL weights (pnapo_jax.convert), configured by config.model and config.lora."""

import functools
from typing import Any

import jax
import ml_collections

from pnapo_jax import convert, text
from pnapo_jax.backbones.interface import (
    DTYPES,
    Backbone,
    EveryName,
    adapter_layer_names,
    field_problems,
    model_config_from,
)
from pnapo_jax.data.schema import SextupleSpec
from pnapo_jax.errors import UserError
from pnapo_jax.models import flux, vae
from pnapo_jax.models.layers import ATTENTION_IMPLS, check_attention_impl


def model_config(config: ml_collections.ConfigDict) -> flux.FluxConfig:
    """The model config: config.model's FluxConfig fields plus config.lora."""
    return model_config_from(config, flux.FluxConfig)


def init(cfg: flux.FluxConfig, rng: jax.Array) -> dict[str, Any]:
    """Boxed variables {"params", "lora"?} (parameter shapes do not depend on the sequence lengths)."""
    return flux.FluxTransformer(cfg).init(rng, **flux.dummy_inputs(cfg))


def record_spec(config: ml_collections.ConfigDict) -> SextupleSpec:
    """Packed latents of config.data's token grid, T5 states of config.data.text_len tokens, CLIP pooled."""
    d, m = config.data, config.model
    return SextupleSpec(d.latent_h_tokens * d.latent_w_tokens, m.in_channels, d.text_len, m.joint_attention_dim,
                        m.pooled_projection_dim)


def dummy_inputs(cfg: flux.FluxConfig, h_tokens: int, w_tokens: int, text_len: int, batch: int = 1
                 ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    zeros = flux.dummy_inputs(cfg, batch, h_tokens * w_tokens, text_len)
    guidance = 1.0 if cfg.guidance_embeds else None
    return (zeros["hidden_states"], zeros["timestep"],
            flux.conditioning(zeros["encoder_hidden_states"], zeros["pooled_projections"], guidance))


def check_platform(cfg: flux.FluxConfig, platform: str) -> None:
    check_attention_impl(cfg.attention_impl, platform)


def load_pretrained(config: ml_collections.ConfigDict, cfg: flux.FluxConfig, shardings: Any) -> Any:
    """config.model.pretrained placed straight into `shardings`; the file's architecture must match the config."""
    m = config.model
    dtype = cfg.param_dtype
    if m.pretrained_format == "bfl":
        return convert.load_bfl_transformer(m.pretrained, cfg, dtype=dtype, shardings=shardings)
    if m.pretrained_format != "diffusers":
        raise ValueError(f"config.model.pretrained_format must be one of {PRETRAINED_FORMATS}, "
                         f"got {m.pretrained_format!r}")
    loaded_cfg, params = convert.load_diffusers_transformer(m.pretrained, dtype=dtype, shardings=shardings,
                                                            scan_layers=cfg.scan_layers)
    mismatch = {k: (v, getattr(cfg, k)) for k, v in loaded_cfg.to_diffusers().items()
                if k != "_class_name" and v != flux.FluxConfig.to_diffusers(cfg)[k]}
    if mismatch:
        raise UserError(f"{m.pretrained}: config.json differs from config.model (file, config): {mismatch}")
    return params


def save(cfg: flux.FluxConfig, params: Any, out: str, fmt: str) -> None:
    """diffusers: a FluxTransformer2DModel folder; bfl: one original-layout .safetensors file."""
    if fmt not in SAVE_FORMATS:
        raise UserError(f"--format must be one of {SAVE_FORMATS}, got {fmt!r}")
    (convert.save_diffusers_transformer if fmt == "diffusers" else convert.save_bfl_transformer)(cfg, params, out)


def check_fits(cfg: flux.FluxConfig, encoders: text.TextEncoders, vae_cfg: vae.VAEConfig) -> None:
    """A transformer from another model family would fail deep inside the first call; say which sizes differ."""
    expected = {"in_channels": 4 * vae_cfg.latent_channels, "joint_attention_dim": encoders.t5_config.d_model,
                "pooled_projection_dim": encoders.clip_config.hidden_size}
    wrong = {k: (getattr(cfg, k), v) for k, v in expected.items() if getattr(cfg, k) != v}
    if wrong:
        raise UserError(f"the transformer does not fit the pipeline's VAE and text encoders (transformer's, "
                         f"expected): {wrong}")


PRETRAINED_FORMATS = ("diffusers", "bfl")  # config.model.pretrained_format: a diffusers folder, BFL's single file
ENUMS = {"model.remat_policy": flux.REMAT_POLICIES, "model.attention_impl": tuple(ATTENTION_IMPLS),
         "model.pretrained_format": PRETRAINED_FORMATS, "model.dtype": DTYPES, "model.param_dtype": DTYPES}
# What a resume may not change: the saved parameters would not fit, or it would silently train another model.
RESUME_FIXED = ("model.patch_size", "model.in_channels", "model.out_channels", "model.num_layers",
                "model.num_single_layers", "model.attention_head_dim", "model.num_attention_heads",
                "model.joint_attention_dim", "model.pooled_projection_dim", "model.guidance_embeds",
                "model.axes_dims_rope", "model.rope_theta", "model.param_dtype", "model.scan_layers")


def config_problems(config: ml_collections.ConfigDict) -> list[str]:
    """config.model's FLUX fields: enums, and the rotary axes that must fill an attention head."""
    m = config.model
    out = field_problems(config, ENUMS, {})
    if sum(m.axes_dims_rope) != m.attention_head_dim:
        out.append(f"config.model.axes_dims_rope {tuple(m.axes_dims_rope)} must sum to "
                   f"config.model.attention_head_dim={m.attention_head_dim}")
    return out


def lora_layer_names(config: ml_collections.ConfigDict) -> frozenset[str]:
    """The Dense layers config.lora.targets may name (with or without the guidance embedder)."""
    return _lora_layer_names(bool(config.model.guidance_embeds))


@functools.cache
def _lora_layer_names(guidance: bool) -> frozenset[str]:
    """Names of the layers that take adapters, from the shapes of a one-block model (eval_shape: nothing is
    computed) with adapters on every layer that can have them."""
    probe = flux.FluxConfig(in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                            num_attention_heads=1, joint_attention_dim=4, pooled_projection_dim=4,
                            guidance_embeds=guidance, axes_dims_rope=(2, 2, 4), lora_rank=1,
                            lora_targets=EveryName())
    return adapter_layer_names(jax.eval_shape(lambda: init(probe, jax.random.key(0))))


SAVE_FORMATS = ("diffusers", "bfl")

BACKBONE = Backbone(
    name="flux", config_class=flux.FluxConfig, model_config=model_config,
    init=init, velocity=flux.Velocity, conditioning=flux.conditioning,
    record_spec=record_spec, dummy_inputs=dummy_inputs, check_platform=check_platform,
    load_pretrained=load_pretrained, save_formats=SAVE_FORMATS, save=save, merge_lora=convert.merge_lora,
    save_lora=convert.save_lora, config_problems=config_problems, resume_fixed=RESUME_FIXED,
    lora_layer_names=lora_layer_names, single_file_formats=("bfl",))
