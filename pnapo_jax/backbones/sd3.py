"""Stable Diffusion 3 / 3.5 as a backbone (pnapo_jax.backbones.interface): the Flax port (pnapo_jax.models.sd3) with its
diffusers and single-file weights (pnapo_jax.convert.sd3), configured by config.model and config.lora. Records are
FLUX's packed 2x2 latent tokens; the text states are SD3's joined CLIP-L + CLIP-G + T5 sequence."""

import functools
from typing import Any

import jax
import ml_collections

from pnapo_jax import convert
from pnapo_jax.backbones.interface import (
    DTYPES,
    Backbone,
    EveryName,
    adapter_layer_names,
    field_problems,
    model_config_from,
)
from pnapo_jax.convert import sd3 as convert_sd3
from pnapo_jax.data.schema import SextupleSpec
from pnapo_jax.errors import UserError
from pnapo_jax.models import sd3
from pnapo_jax.models.layers import ATTENTION_IMPLS, check_attention_impl

PRETRAINED_FORMATS = ("diffusers", "single_file")  # a diffusers folder / hub id / gs://, Stability's single file
SAVE_FORMATS = PRETRAINED_FORMATS


def model_config(config: ml_collections.ConfigDict) -> sd3.SD3Config:
    """The model config: config.model's SD3Config fields plus config.lora."""
    return model_config_from(config, sd3.SD3Config)


def init(cfg: sd3.SD3Config, rng: jax.Array) -> dict[str, Any]:
    """Boxed variables {"params", "lora"?} (parameter shapes do not depend on the token grid)."""
    return sd3.SD3Transformer(cfg).init(rng, **sd3.dummy_inputs(cfg))


def record_spec(config: ml_collections.ConfigDict) -> SextupleSpec:
    """Packed latents (in_channels x 2 x 2 per token) of config.data's grid, the joined text states, pooled."""
    d, m = config.data, config.model
    return SextupleSpec(d.latent_h_tokens * d.latent_w_tokens, m.in_channels * m.patch_size ** 2, d.text_len,
                        m.joint_attention_dim, m.pooled_projection_dim)


def dummy_inputs(cfg: sd3.SD3Config, h_tokens: int, w_tokens: int, text_len: int, batch: int = 1
                 ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    zeros = sd3.dummy_inputs(cfg, batch, h_tokens, w_tokens, text_len)
    return (zeros["hidden_states"], zeros["timestep"],
            sd3.conditioning(zeros["encoder_hidden_states"], zeros["pooled_projections"]))


def check_platform(cfg: sd3.SD3Config, platform: str) -> None:
    check_attention_impl(cfg.attention_impl, platform)


def load_pretrained(config: ml_collections.ConfigDict, cfg: sd3.SD3Config, shardings: Any) -> Any:
    """config.model.pretrained placed straight into `shardings`; the file's architecture must match the config."""
    m = config.model
    if m.pretrained_format == "single_file":
        return convert_sd3.load_sd3_single_file(m.pretrained, cfg, dtype=cfg.param_dtype, shardings=shardings)
    loaded_cfg, params = convert_sd3.load_sd3_transformer(m.pretrained, dtype=cfg.param_dtype, shardings=shardings,
                                                          scan_layers=cfg.scan_layers)
    ours = cfg.to_diffusers()
    mismatch = {k: (v, ours[k]) for k, v in loaded_cfg.to_diffusers().items() if v != ours[k]}
    if mismatch:
        raise UserError(f"{m.pretrained}: config.json differs from config.model (file, config): {mismatch}")
    return params


def save(cfg: sd3.SD3Config, params: Any, out: str, fmt: str) -> None:
    """diffusers: an SD3Transformer2DModel folder; single_file: Stability's layout in one .safetensors file."""
    if fmt not in SAVE_FORMATS:
        raise UserError(f"--format must be one of {SAVE_FORMATS}, got {fmt!r}")
    (convert_sd3.save_sd3_transformer if fmt == "diffusers" else convert_sd3.save_sd3_single_file)(cfg, params, out)


ENUMS = {"model.remat_policy": sd3.REMAT_POLICIES, "model.attention_impl": tuple(ATTENTION_IMPLS),
         "model.pretrained_format": PRETRAINED_FORMATS, "model.dtype": DTYPES, "model.param_dtype": DTYPES,
         "model.qk_norm": sd3.QK_NORMS, "model.patch_size": (2,)}  # records are 2x2-packed tokens
MINIMA = {"model.num_layers": (1, True), "model.num_attention_heads": (1, True), "model.attention_head_dim": (1, True)}
# What a resume may not change: the saved parameters would not fit, or it would silently train another model.
RESUME_FIXED = ("model.sample_size", "model.patch_size", "model.in_channels", "model.out_channels", "model.num_layers",
                "model.attention_head_dim", "model.num_attention_heads", "model.joint_attention_dim",
                "model.caption_projection_dim", "model.pooled_projection_dim", "model.pos_embed_max_size",
                "model.dual_attention_layers", "model.qk_norm", "model.param_dtype", "model.scan_layers")


def config_problems(config: ml_collections.ConfigDict) -> list[str]:
    """config.model's SD3 fields: enums, sizes, the caption width and the dual-attention layers' range."""
    m = config.model
    out = field_problems(config, ENUMS, MINIMA)
    if out:
        return out
    if m.caption_projection_dim != m.num_attention_heads * m.attention_head_dim:
        out.append(f"config.model.caption_projection_dim={m.caption_projection_dim} must equal num_attention_heads "
                   f"x attention_head_dim = {m.num_attention_heads * m.attention_head_dim}")
    wrong = [i for i in m.dual_attention_layers if not 0 <= i < m.num_layers]
    if wrong:
        out.append(f"config.model.dual_attention_layers {wrong} are not among the {m.num_layers} layers")
    if max(config.data.latent_h_tokens, config.data.latent_w_tokens) > m.pos_embed_max_size:
        out.append(f"config.data's {config.data.latent_h_tokens} x {config.data.latent_w_tokens} token grid exceeds "
                   f"config.model.pos_embed_max_size={m.pos_embed_max_size}")
    return out


def lora_layer_names(config: ml_collections.ConfigDict) -> frozenset[str]:
    """The Dense layers config.lora.targets may name."""
    return _lora_layer_names()


@functools.cache
def _lora_layer_names() -> frozenset[str]:
    """Names of the layers that take adapters, from the shapes of a small model with a dual-attention block, a
    plain one and the last (eval_shape: nothing is computed) with adapters on every layer that can have them."""
    probe = sd3.SD3Config(in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=1,
                          joint_attention_dim=4, caption_projection_dim=8, pooled_projection_dim=4, out_channels=4,
                          pos_embed_max_size=4, dual_attention_layers=(0,), qk_norm="rms_norm", lora_rank=1,
                          lora_targets=EveryName())
    return adapter_layer_names(jax.eval_shape(lambda: init(probe, jax.random.key(0))))


BACKBONE = Backbone(
    name="sd3", config_class=sd3.SD3Config, model_config=model_config,
    init=init, velocity=sd3.Velocity, conditioning=sd3.conditioning,
    record_spec=record_spec, dummy_inputs=dummy_inputs, check_platform=check_platform,
    load_pretrained=load_pretrained, save_formats=SAVE_FORMATS, save=save, merge_lora=convert.merge_lora,
    save_lora=convert.save_lora, config_problems=config_problems, resume_fixed=RESUME_FIXED,
    lora_layer_names=lora_layer_names, single_file_formats=("single_file",))
