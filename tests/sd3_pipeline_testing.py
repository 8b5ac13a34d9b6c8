"""Shared test helpers for SD3: a whole tiny random StableDiffusion3Pipeline (CLIP-L and CLIP-G with projections,
T5, an SD3-like VAE, the static-shift scheduler) with offline tokenizers."""

import dataclasses
import types
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from flux_testing import CLIP_TINY, clip_tokenizer, randomize, randomize_vae, t5_tokenizer, torch_t5, torch_vae

# SD3's VAE: 16 latent channels, its scaling and shift, no quant convs, 8x downsampling.
SD3_VAE_TINY = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=16,
                    scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # stabilityai/stable-diffusion-3-medium-diffusers'
T5_WIDTH = 48  # wider than both CLIPs' states together (16 + 24), as 4096 is wider than 768 + 1280
TRANSFORMER_TINY = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                        num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
                        pooled_projection_dim=12 + 20, out_channels=16, pos_embed_max_size=16)


def torch_clip_projection(seed: int, **overrides) -> transformers.CLIPTextModelWithProjection:
    config = transformers.CLIPTextConfig(**{**CLIP_TINY, **overrides})
    return randomize(transformers.CLIPTextModelWithProjection(config), seed, 0.2)


def tiny_sd3_pipeline(seed: int = 0, transformer: torch.nn.Module | None = None) -> StableDiffusion3Pipeline:
    """A tiny random StableDiffusion3Pipeline whose parts fit as SD3-Medium's do (CLIP-L pools by the legacy
    argmax rule, CLIP-G at its end-of-text id; different widths and projections); `transformer` defaults to a
    tiny random SD3Transformer2DModel."""
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(pad_token="!"), t5_tokenizer()
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    vae = torch_vae(**SD3_VAE_TINY).eval()
    randomize_vae(vae, seed=seed)
    clip_l = torch_clip_projection(seed + 1, vocab_size=len(tokenizer), max_position_embeddings=77, eos_token_id=2,
                                   bos_token_id=0, pad_token_id=1, hidden_size=16, projection_dim=12)
    clip_g = torch_clip_projection(seed + 2, vocab_size=len(tokenizer), max_position_embeddings=77, eos_token_id=eot,
                                   bos_token_id=eot - 1, pad_token_id=eot, hidden_size=24, projection_dim=20,
                                   hidden_act="gelu", num_hidden_layers=3)
    if transformer is None:
        torch.manual_seed(seed + 3)
        transformer = randomize(SD3Transformer2DModel(**TRANSFORMER_TINY), seed + 3, 0.2)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), vae=vae,
        text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=clip_g, tokenizer_2=tokenizer_2,
        text_encoder_3=torch_t5(seed + 4, vocab_size=len(tokenizer_3) + 4, d_model=T5_WIDTH),
        tokenizer_3=tokenizer_3)


def max_rel_err(ours, ref) -> float:
    ref = np.asarray(ref, np.float32)
    return float(np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max())


class StubTransformer(torch.nn.Module):
    """A stand-in for SD3Transformer2DModel that the pipeline can call: a simple function of the packed latent
    tokens, the timestep, the mean text state and the pooled text, the same as `StubVelocity` computes in JAX."""

    def __init__(self, in_channels: int, text_dim: int, pooled_dim: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        D = 4 * in_channels
        self.wx = torch.nn.Parameter(torch.randn(D, D, generator=gen) / D ** 0.5)
        self.wc = torch.nn.Parameter(torch.randn(text_dim, D, generator=gen) / text_dim ** 0.5)
        self.wp = torch.nn.Parameter(torch.randn(pooled_dim, D, generator=gen) / pooled_dim ** 0.5)
        self.config = types.SimpleNamespace(sample_size=8, patch_size=2, in_channels=in_channels)

    device = property(lambda self: self.wx.device)  # what the pipeline asks its modules
    dtype = property(lambda self: self.wx.dtype)

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, **_):
        B, C, H, W = hidden_states.shape
        tokens = hidden_states.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, 4 * C)
        out = (torch.tanh(tokens @ self.wx) * (timestep / 1000)[:, None, None] - 0.5 * tokens
               + (encoder_hidden_states.mean(1) @ self.wc)[:, None] + (pooled_projections @ self.wp)[:, None])
        out = out.reshape(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
        return (out,)

    def variables(self) -> dict:
        return {"params": {k: jnp.asarray(v.detach().numpy()) for k, v in self.named_parameters()}}


@dataclasses.dataclass(frozen=True)
class StubVelocity:
    """`StubTransformer` as a velocity function (flow.VelocityFn) on packed tokens, SD3's timestep = sigma x 1000
    x timestep_scale."""

    cfg: Any
    h_tokens: int
    w_tokens: int
    timestep_scale: float = 1.0

    def __call__(self, variables, x_BxIxC, t_B, cond):
        p = variables["params"]
        t = t_B * 1000 * self.timestep_scale / 1000
        text = (cond["encoder_hidden_states"].mean(1) @ p["wc"]) + (cond["pooled_projections"] @ p["wp"])
        return jnp.tanh(x_BxIxC @ p["wx"]) * t[:, None, None] - 0.5 * x_BxIxC + text[:, None]
