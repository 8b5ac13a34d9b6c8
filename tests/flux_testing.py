"""Shared test helpers: tiny random diffusers FLUX models and their weights as our params."""

import jax.numpy as jnp
import numpy as np
import torch
from diffusers import FluxTransformer2DModel
from flax import traverse_util

from pnapo_jax.convert.keys import flax_to_diffusers
from pnapo_jax.models import flux

TINY = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))


def torch_flux(seed: int = 0, **overrides) -> FluxTransformer2DModel:
    """A tiny diffusers FLUX with random (not zero) weights everywhere, adaLN included."""
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def params_from_torch(model: FluxTransformer2DModel, cfg: flux.FluxConfig) -> dict:
    """Our per-layer params from a torch model's state dict, through the key map under test."""
    sd = model.state_dict()
    shapes = flux.jax.eval_shape(lambda: flux.nn.meta.unbox(flux.init_params(
        flux.dataclasses.replace(cfg, scan_layers=False), flux.jax.random.key(0))))
    flat = {}
    for path, _ in traverse_util.flatten_dict(shapes).items():
        key, transpose = flax_to_diffusers(path)
        w = sd[key].numpy()
        flat[path] = jnp.asarray(w.T if transpose else w)
    return traverse_util.unflatten_dict(flat)


def random_inputs(cfg: flux.FluxConfig, batch: int, h: int, w: int, txt_len: int, seed: int = 0) -> dict:
    """Inputs as FluxPipeline builds them: image ids (0, row, col), text ids zero."""
    rng = np.random.default_rng(seed)
    img_ids = np.zeros((h, w, 3), np.float32)
    img_ids[..., 1] = np.arange(h)[:, None]
    img_ids[..., 2] = np.arange(w)[None, :]
    out = dict(
        hidden_states=rng.standard_normal((batch, h * w, cfg.in_channels)).astype(np.float32),
        encoder_hidden_states=rng.standard_normal((batch, txt_len, cfg.joint_attention_dim)).astype(np.float32),
        pooled_projections=rng.standard_normal((batch, cfg.pooled_projection_dim)).astype(np.float32),
        timestep=rng.uniform(0, 1, (batch,)).astype(np.float32),
        img_ids=img_ids.reshape(h * w, 3),
        txt_ids=np.zeros((txt_len, 3), np.float32),
    )
    if cfg.guidance_embeds:
        out["guidance"] = np.full((batch,), 3.5, np.float32)
    return out


def torch_forward(model: FluxTransformer2DModel, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).sample.numpy()
