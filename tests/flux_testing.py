"""Shared test helpers: tiny random diffusers FLUX models and their weights as our params; tiny CLIP / T5 text
encoders with offline tokenizers, a tiny FLUX-like VAE, a whole tiny FluxPipeline made of them, and scanned params
back in the per-layer layout."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
import torch
import transformers
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from flax import traverse_util

from pnapo_jax.convert.keys import flax_to_diffusers
from pnapo_jax.models import flux

TINY = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))
T5_TINY = dict(vocab_size=40, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4, feed_forward_proj="gated-gelu",
               relative_attention_num_buckets=8, relative_attention_max_distance=12, decoder_start_token_id=0)
CLIP_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=20, hidden_act="quick_gelu", bos_token_id=62, eos_token_id=63,
                 pad_token_id=63)
# FLUX-like VAE (16 latent channels, shift, no quant convs) downsampling 8x as FLUX's does.
VAE_TINY = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=16,
                scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
_WORDS = "a photo of cat dog red blue on the under sky tiny model".split()


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


def randomize(model: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """Random (not default-initialised) weights everywhere, norms included, so each tensor's loading shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return model.eval()


def torch_t5(seed: int = 0, **overrides) -> transformers.T5EncoderModel:
    return randomize(transformers.T5EncoderModel(transformers.T5Config(**{**T5_TINY, **overrides})), seed, 0.3)


def torch_clip(seed: int = 0, **overrides) -> transformers.CLIPTextModel:
    config = transformers.CLIPTextConfig(**{**CLIP_TINY, **overrides})
    return randomize(transformers.CLIPTextModel(config), seed, 0.2)


def clip_tokenizer(**kwargs) -> transformers.CLIPTokenizer:
    """A CLIP BPE tokenizer over a tiny vocabulary built like CLIP's: byte symbols, their `</w>` forms, merges;
    `kwargs` go to CLIPTokenizer (e.g. SD3's CLIP-G pad_token="!")."""
    byte_symbols = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("p", "h"), ("ph", "o"), ("t", "h"),
              ("th", "e</w>"), ("s", "k"), ("sk", "y</w>")]
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    vocab = {t: i for i, t in enumerate([*tokens, "<|startoftext|>", "<|endoftext|>"])}
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, **kwargs)


def t5_tokenizer() -> transformers.T5TokenizerFast:
    """A Unigram T5 tokenizer: <pad>=0, </s>=1, <unk>=2, whole words, then letters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in _WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return transformers.T5TokenizerFast(vocab=pieces, extra_ids=0)


def torch_vae(**config) -> AutoencoderKL:
    n = len(config["block_out_channels"])
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         **config)


def randomize_vae(model: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.2^2): nothing at its default."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim > 1:
                p.copy_(noise / np.sqrt(p[0].numel()))
            else:
                p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)


def tiny_flux_pipeline(scheduler_config: dict | None = None) -> FluxPipeline:
    """A tiny random FluxPipeline whose parts fit as FLUX.1-dev's do: a transformer with guidance embeds, the
    16-channel VAE_TINY, CLIP and T5 with offline tokenizers; `scheduler_config` (default: diffusers')."""
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    vae = torch_vae(**VAE_TINY).eval()
    randomize_vae(vae, seed=0)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**(scheduler_config or {})), vae=vae, tokenizer=tokenizer,
        text_encoder=torch_clip(vocab_size=len(tokenizer), max_position_embeddings=77, eos_token_id=2,
                                bos_token_id=0, pad_token_id=1),
        tokenizer_2=tokenizer_2, text_encoder_2=torch_t5(vocab_size=len(tokenizer_2) + 4),
        transformer=torch_flux(seed=1, in_channels=64, pooled_projection_dim=32, num_layers=1, num_single_layers=1))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pickscore_folder(folder) -> None:
    """A tiny random PickScore-layout reward folder: a CLIPModel with FLUX's CLIP tokenizer, as PickScore ships."""
    tokenizer = clip_tokenizer()
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=77, eos_token_id=2, bos_token_id=0,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
                           patch_size=8, image_size=32), projection_dim=16)
    randomize(transformers.CLIPModel(config), seed=3, scale=0.2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def assert_pairs_hold_the_worlds_computations(records, embeds, pooled, seed: int, grid: tuple[int, int],
                                              pipeline, reward) -> None:
    """Records of K=2 samples per prompt (in prompt order) hold the encoders' embeddings, the seeded noises, and
    the rewards of their latents decoded with the pipeline folder's VAE; winners beat losers."""
    import jax

    from pnapo_jax.convert.vae import load_vae
    from pnapo_jax.models import vae

    h, w = grid
    vae_cfg, vae_params = load_vae(pipeline)
    key = jax.random.PRNGKey(seed)
    for p, r in enumerate(records):
        np.testing.assert_array_equal(r["prompt_embeds"], embeds[p])
        np.testing.assert_array_equal(r["pooled_prompt_embeds"], pooled[p])
        assert {r["seed_w"], r["seed_l"]} == {2 * p, 2 * p + 1}
        for side in "wl":
            noise = jax.random.normal(jax.random.fold_in(key, r[f"seed_{side}"]), (h * w, 64))
            np.testing.assert_array_equal(r[f"x1_{side}"], noise)
        latents = flux.unpack_latents(np.stack([r["x0_w"], r["x0_l"]]), 2 * h, 2 * w)
        images = np.clip(np.asarray(vae.decode(vae_params, vae_cfg, latents)) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
        assert images.shape == (2, 16 * h, 16 * w, 3)
        np.testing.assert_allclose([r["reward_w"], r["reward_l"]], reward(images, [r["prompt"]] * 2), rtol=1e-4,
                                   atol=1e-5)
        assert r["reward_w"] > r["reward_l"]


def unscan_params(params: dict[str, Any], cfg: flux.FluxConfig) -> dict[str, Any]:
    """Scanned layout -> per-layer layout; the inverse of `flux.scan_params`."""
    out = {k: v for k, v in params.items() if k not in flux.STACKS}
    for stack, n in zip(flux.STACKS, (cfg.num_layers, cfg.num_single_layers), strict=True):
        for i in range(n):
            out[f"{stack}_{i}"] = jax.tree.map(lambda x, i=i: x[i], params[stack])
    return out
