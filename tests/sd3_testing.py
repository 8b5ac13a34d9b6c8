"""Shared SD3 test helpers: tiny random diffusers SD3Transformer2DModels of each family member, their weights as our
params through the converter's layout, inputs in both layouts (our packed tokens, diffusers' NCHW latents), and
params moved between the per-layer and the scanned layout (the library's converters place each tensor directly)."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import SD3Transformer2DModel

from pnapo_jax.convert import layout
from pnapo_jax.models import flux, sd3

_BASE = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
             joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
             pos_embed_max_size=12)
# SD3-Medium-style (no QK norm), SD3.5-Medium-style (MMDiT-X dual attention on the first layers, QK RMSNorm),
# SD3.5-Large-style (QK RMSNorm, no dual attention).
TINY = {
    "sd3_medium": dict(_BASE),
    "sd35_medium": dict(_BASE, num_layers=5, dual_attention_layers=(0, 1, 2), qk_norm="rms_norm"),
    "sd35_large": dict(_BASE, qk_norm="rms_norm", num_layers=4),
}


def torch_sd3(name: str = "sd3_medium", seed: int = 0, **overrides) -> SD3Transformer2DModel:
    """A tiny diffusers SD3 with random (not default) weights everywhere, adaLN and norms included."""
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**{**TINY[name], **overrides}).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("norm_q.weight") or key.endswith("norm_k.weight") or "norm_added" in key:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.2)
    return model


def params_from_torch(model: SD3Transformer2DModel, cfg: sd3.SD3Config) -> dict:
    """Our params (per-layer or scanned, as cfg says) from a torch model's state dict, through the converter's
    layout; the position buffer is checked against ours, not loaded (it is computed)."""
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    np.testing.assert_allclose(sd.pop("pos_embed.pos_embed"), sd3.full_position_table(cfg), atol=1e-6)
    lay = layout.layout(cfg, scanned=cfg.scan_layers)
    return layout.assemble(lay, ((k, sd[k], "torch") for k in sorted(sd, key=layout.by_leaf)), cfg.param_dtype)


def random_inputs(cfg: sd3.SD3Config, batch: int, h: int, w: int, txt_len: int, seed: int = 0) -> dict:
    """Our inputs: packed tokens of an h x w token grid (latents 2h x 2w), text states, pooled, timestep x 1000."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, cfg.in_channels, h * cfg.patch_size, w * cfg.patch_size), np.float32)
    return dict(
        hidden_states=np.asarray(flux.pack_latents(latents)),
        encoder_hidden_states=rng.standard_normal((batch, txt_len, cfg.joint_attention_dim)).astype(np.float32),
        pooled_projections=rng.standard_normal((batch, cfg.pooled_projection_dim)).astype(np.float32),
        timestep=rng.uniform(0, 1000, (batch,)).astype(np.float32), h_tokens=h, w_tokens=w)


def torch_forward(model: SD3Transformer2DModel, inputs: dict) -> np.ndarray:
    """diffusers' output for our inputs, packed as ours is."""
    h, w = inputs["h_tokens"], inputs["w_tokens"]
    latents = flux.unpack_latents(inputs["hidden_states"], 2 * h, 2 * w)
    with torch.no_grad():
        out = model(hidden_states=torch.from_numpy(np.asarray(latents)),
                    encoder_hidden_states=torch.from_numpy(inputs["encoder_hidden_states"]),
                    pooled_projections=torch.from_numpy(inputs["pooled_projections"]),
                    timestep=torch.from_numpy(inputs["timestep"])).sample.numpy()
    return np.asarray(flux.pack_latents(out))


def tiny_config(variant: str = ""):
    """configs/tiny.py's run (synthetic pairs, its training settings) on a tiny SD3.5-Medium-like model: a dual-
    attention block, a plain one, the last; QK RMSNorm. variant: "" or "lora"."""
    import sys

    from pnapo_jax.config import defaults

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent.parent / "configs"))
    import tiny

    flux_run = tiny.get_config(variant)
    c = defaults(sd3.SD3Config)
    for key in flux_run:
        if key != "model":
            c[key] = flux_run[key]
    c.model.update(dict(TINY["sd35_medium"], num_layers=3, dual_attention_layers=(0,)))
    c.model.attention_impl = "head_major"
    c.model.dense_input_barrier = True
    if variant == "lora":
        c.lora.targets = ["to_q", "to_k", "to_v", "to_out_0", "add_q_proj", "to_add_out"]
    return c


def scan_params(params: dict[str, Any], cfg: sd3.SD3Config) -> dict[str, Any]:
    """Per-layer layout (`transformer_blocks_{i}`) -> scanned layout (each run stacked on axis 0)."""
    stacks = sd3.scanned_stacks(cfg)
    layers = {f"{prefix}_{i}" for prefix, start, n in stacks.values() for i in range(start, start + n)}
    out = {k: v for k, v in params.items() if k not in layers}
    for name, (prefix, start, n) in stacks.items():
        out[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"{prefix}_{i}"] for i in range(start, start + n)])
    return out


def unscan_params(params: dict[str, Any], cfg: sd3.SD3Config) -> dict[str, Any]:
    """Scanned layout -> per-layer layout; the inverse of `scan_params`."""
    stacks = sd3.scanned_stacks(cfg)
    out = {k: v for k, v in params.items() if k not in stacks}
    for name, (prefix, start, n) in stacks.items():
        for j in range(n):
            out[f"{prefix}_{start + j}"] = jax.tree.map(lambda x, j=j: x[j], params[name])
    return out
