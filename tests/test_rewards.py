"""CLIP rewards against their ground truths (torch, CPU, fp32): transformers' CLIPModel (PickScore's layout),
open_clip's CLIP built in-process from a tiny config (HPSv2's layout), open_clip's tokenizer, transformers'
CLIPImageProcessor and HPSv2's preprocess_val written out in torch ops. Tiny random models, no downloads.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is local files; never reach for the hub

import argparse
import json

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import traverse_util

from pnapo_jax import rewards
from pnapo_jax.errors import UserError
from pnapo_jax.rewards import clip_model, convert_open_clip, open_clip_layout
from pnapo_jax.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess

VISION_TINY = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
                   image_size=32)
TEXT_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=20, hidden_act="quick_gelu", bos_token_id=62, eos_token_id=63,
                 pad_token_id=63)
# open_clip's counterpart: ViT-H-14.json's fields at tiny sizes (mlp_ratio 1.25: 40 hidden units).
OPEN_CLIP_TINY = {"embed_dim": 16,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8,
                                 "mlp_ratio": 1.25},
                  "text_cfg": {"context_length": 20, "vocab_size": 64, "width": 32, "heads": 4, "layers": 2,
                               "mlp_ratio": 1.25}}
REAL_VOCAB = 49408  # open_clip's BPE vocabulary, shipped in its package
PROMPTS = ["a photo of a cat", "A Tiny red DOG   under a blue sky, at night!", "zebra " * 90, "", "an astronaut"]


def _rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float32) - np.asarray(ref)).max() / np.abs(ref).max())


def _randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Random weights everywhere (norms and logit_scale included), so each tensor's loading shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return model.eval()


def _open_clip_tokenizer(open_clip) -> transformers.CLIPTokenizer:
    """A transformers CLIPTokenizer over open_clip's own BPE vocabulary and merges (its special tokens under
    the names transformers' CLIP tokenizer files give them, as in laion/CLIP-ViT-H-14-laion2B-s32B-b79K's)."""
    bpe = open_clip.tokenizer.SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): i for token, i in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


# --- model parity --------------------------------------------------------------------------------------

def _hf_clip(seed: int = 0, text: dict | None = None, vision: dict | None = None) -> transformers.CLIPModel:
    config = transformers.CLIPConfig(text_config={**TEXT_TINY, **(text or {})},
                                     vision_config={**VISION_TINY, **(vision or {})}, projection_dim=16)
    return _randomize(transformers.CLIPModel(config), seed)


def _open_clip_model(open_clip, quick_gelu: bool = False, model_cfg: dict | None = None):
    cfg = model_cfg or OPEN_CLIP_TINY
    model = open_clip.model.CLIP(cfg["embed_dim"], open_clip.model.CLIPVisionCfg(**cfg["vision_cfg"]),
                                 open_clip.model.CLIPTextCfg(**cfg["text_cfg"]), quick_gelu=quick_gelu)
    return _randomize(model)


def _save_open_clip(model, folder, model_cfg: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                folder / open_clip_layout.WEIGHTS_NAME)
    (folder / open_clip_layout.CONFIG_NAME).write_text(json.dumps({"model_cfg": model_cfg}))


def _pixels(batch: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def _ids(batch: int, length: int, eos: int, seed: int = 0) -> np.ndarray:
    """Random ids below `eos`, an eos at a different place in each row, `eos` padding after it."""
    ids = np.random.default_rng(seed).integers(0, eos, (batch, length))
    ends = np.linspace(2, length - 1, batch).astype(int)
    return np.where(np.arange(length)[None] >= ends[:, None], eos, ids).astype(np.int32)


def _cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.parametrize("text, vision", [({}, {}), (dict(hidden_act="gelu", eos_token_id=2), dict(hidden_act="gelu"))],
                         ids=["quick_gelu_eos_id", "gelu_legacy_eos_2"])
def test_hf_layout_matches_transformers(tmp_path, text, vision):
    model = _hf_clip(text=text, vision=vision)
    model.save_pretrained(tmp_path)
    cfg, params = clip_model.load(tmp_path)
    pixels, ids = _pixels(3, 32), _ids(3, 20, eos=63)
    image, prompt, logit_scale = clip_model.CLIPModel(cfg).apply({"params": params}, pixels, ids)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids).long(), pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    assert _rel_err(image, ref.vision_model_output.pooler_output.numpy()) <= 1e-4
    assert _rel_err(prompt, ref.text_model_output.pooler_output.numpy()) <= 1e-4
    ours = _cosine(image, prompt) * np.exp(float(logit_scale))
    assert _rel_err(ours, np.diag(ref.logits_per_image.numpy())) <= 1e-4


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_layout_matches_open_clip(tmp_path, open_clip, quick_gelu):
    model = _open_clip_model(open_clip, quick_gelu)
    _save_open_clip(model, tmp_path, {**OPEN_CLIP_TINY, "quick_gelu": quick_gelu})
    cfg, params = open_clip_layout.load(tmp_path)
    pixels, ids = _pixels(3, 32, seed=1), _ids(3, 20, eos=63, seed=1)
    ids[ids == 63] = 0  # open_clip pads with zeros and pools at argmax, the end token
    ids[np.arange(3), [2, 10, 19]] = 63
    image, prompt, logit_scale = clip_model.CLIPModel(cfg).apply({"params": params}, pixels, ids)
    with torch.no_grad():
        ref_image = model.encode_image(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()
        ref_prompt = model.encode_text(torch.from_numpy(ids).long()).numpy()
        unit_image, unit_prompt, _ = model(torch.from_numpy(pixels).permute(0, 3, 1, 2), torch.from_numpy(ids).long())
    assert _rel_err(image, ref_image) <= 1e-4
    assert _rel_err(prompt, ref_prompt) <= 1e-4
    assert _rel_err(_cosine(image, prompt), np.sum((unit_image * unit_prompt).numpy(), -1)) <= 1e-4
    np.testing.assert_allclose(float(logit_scale), model.logit_scale.item(), rtol=1e-6)


# --- tokenization and preprocessing ----------------------------------------------------------------------

def test_tokenize_matches_open_clip(open_clip):
    tokenizer = _open_clip_tokenizer(open_clip)
    ours = open_clip_layout.tokenize(tokenizer, PROMPTS, 77)
    ref = open_clip.tokenize(PROMPTS, context_length=77).numpy()
    np.testing.assert_array_equal(ours, ref)
    assert ours[2, -1] == ours.max()  # a truncated prompt still ends with the end token


def _smooth_images(batch: int, h: int, w: int, seed: int) -> np.ndarray:
    """Images like a generator's: smooth colour fields plus a little noise, in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    phase = rng.uniform(0, 6, (batch, 1, 1, 3))
    base = 0.5 + 0.45 * np.sin(5 * xx[None, ..., None] + 3 * yy[None, ..., None] + phase)
    return np.clip(base + 0.04 * rng.standard_normal((batch, h, w, 3)), 0, 1).astype(np.float32)


@pytest.mark.parametrize("shape", [(256, 256), (300, 200), (200, 301), (97, 131), (64, 64)])
def test_crop_preprocessing_matches_clip_image_processor(shape):
    """Within two 8-bit steps everywhere and a hundredth of a step on average (PIL's fixed-point weights)."""
    u8 = np.round(_smooth_images(2, *shape, seed=shape[0]) * 255).astype(np.uint8)
    ref = transformers.CLIPImageProcessorPil()(list(u8), return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
    ours = np.asarray(preprocess(u8 / np.float32(255), "crop", 224))
    assert ours.shape == ref.shape == (2, 224, 224, 3)
    steps = np.abs(ours - ref) * np.asarray(OPENAI_CLIP_STD) * 255
    assert steps.max() <= 2.01 and steps.mean() <= 0.01


def _hpsv2_preprocess(images_BxHxWx3: np.ndarray, size: int) -> np.ndarray:
    """HPSv2's preprocess_val in torch ops: ToTensor, ResizeMaxSize (torchvision's antialiased bicubic tensor
    resize), zero padding, Normalize."""
    x = torch.from_numpy(images_BxHxWx3).permute(0, 3, 1, 2)
    h, w = x.shape[2:]
    scale = size / max(h, w)
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        x = torch.nn.functional.interpolate(x, (nh, nw), mode="bicubic", align_corners=False, antialias=True)
        pad_h, pad_w = size - nh, size - nw
        x = torch.nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    mean, std = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None], torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    return ((x - mean) / std).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("shape", [(256, 256), (300, 200), (203, 301), (64, 48)])
def test_pad_preprocessing_matches_hpsv2(shape):
    images = _smooth_images(2, *shape, seed=shape[1])
    np.testing.assert_allclose(preprocess(images, "pad", 224), _hpsv2_preprocess(images, 224), atol=2e-5)


# --- load_reward end to end ------------------------------------------------------------------------------

def _images(seed: int) -> np.ndarray:
    return _smooth_images(len(PROMPTS), 48, 40, seed)


def test_pickscore_reward(tmp_path, open_clip):
    model = _hf_clip(text=dict(vocab_size=REAL_VOCAB, max_position_embeddings=77, eos_token_id=2, bos_token_id=0,
                               pad_token_id=1))
    model.save_pretrained(tmp_path)
    tokenizer = _open_clip_tokenizer(open_clip)
    tokenizer.save_pretrained(tmp_path)
    reward = rewards.load_reward("pickscore", tmp_path, batch_size=2)
    images = _images(seed=0)
    scores = reward(images, PROMPTS)
    # PickScore's own recipe on our pixels: padded to the longest prompt, with the attention mask.
    inputs = tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    pixels = torch.tensor(np.asarray(preprocess(images, "crop", 32))).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref = model(pixel_values=pixels, **inputs).logits_per_image.numpy()
    assert scores.shape == (len(PROMPTS),) and scores.dtype == np.float32
    assert _rel_err(scores, np.diag(ref)) <= 1e-4
    np.testing.assert_allclose(reward(images[:1], PROMPTS[:1]), scores[:1], rtol=1e-5)


def test_hpsv2_reward(tmp_path, open_clip):
    model_cfg = {**OPEN_CLIP_TINY, "text_cfg": {**OPEN_CLIP_TINY["text_cfg"], "context_length": 77,
                                                 "vocab_size": REAL_VOCAB}}
    model = _open_clip_model(open_clip, model_cfg=model_cfg)
    _save_open_clip(model, tmp_path, model_cfg)
    _open_clip_tokenizer(open_clip).save_pretrained(tmp_path)
    reward = rewards.load_reward("hpsv2", tmp_path, batch_size=2)
    images = _images(seed=1)
    scores = reward(images, PROMPTS)
    with torch.no_grad():
        out = model(torch.from_numpy(_hpsv2_preprocess(images, 32)).permute(0, 3, 1, 2), open_clip.tokenize(PROMPTS))
    assert _rel_err(scores, np.diag(out[0].numpy() @ out[1].numpy().T)) <= 1e-4
    assert np.all(np.abs(scores) <= 1)


def test_reward_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="known kinds are"):
        rewards.load_reward("unknown", tmp_path)
    reward = rewards.Reward(None, None, lambda prompts: None, "crop", "logit_scaled")
    assert reward(np.zeros((0, 8, 8, 3)), []).shape == (0,)
    with pytest.raises(ValueError, match=r"expected images \[B, H, W, 3\] and B prompts"):
        reward(np.zeros((2, 8, 8, 3)), ["one prompt"])
    with pytest.raises(ValueError, match="known modes"):
        preprocess(np.zeros((1, 8, 8, 3)), "stretch", 4)


# --- loading errors and conversion -----------------------------------------------------------------------

def test_hf_load_errors_name_the_keys(tmp_path):
    _hf_clip().save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = safetensors.torch.load_file(file)
    tensors["vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # a buffer older versions stored
    safetensors.torch.save_file(tensors, file)
    clip_model.load(tmp_path)
    tensors["extra.weight"] = tensors.pop("visual_projection.weight")
    safetensors.torch.save_file(tensors, file)
    with pytest.raises(UserError, match=r"missing tensors \(1\): visual_projection\.weight; "
                                        r"unexpected tensors \(1\): extra\.weight"):
        clip_model.load(tmp_path)


def test_open_clip_load_errors_name_the_keys(tmp_path, open_clip):
    model = _open_clip_model(open_clip)
    _save_open_clip(model, tmp_path, OPEN_CLIP_TINY)
    file = tmp_path / open_clip_layout.WEIGHTS_NAME
    tensors = safetensors.torch.load_file(file)
    tensors["attn_mask"] = torch.zeros(20, 20)  # a buffer older versions stored
    tensors["logit_bias"] = tensors.pop("visual.ln_post.bias")
    safetensors.torch.save_file(tensors, file)
    with pytest.raises(UserError, match=r"missing tensors \(1\): visual\.ln_post\.bias; "
                                        r"unexpected tensors \(1\): logit_bias"):
        open_clip_layout.load(tmp_path)
    wide = {**OPEN_CLIP_TINY, "text_cfg": {**OPEN_CLIP_TINY["text_cfg"], "mlp_ratio": 2.0}}
    _save_open_clip(model, tmp_path, wide)
    with pytest.raises(UserError, match=r"wrong shapes \(\d+\): transformer\.resblocks\.0\.mlp\.c_fc\.bias in .*: "
                                         r"expected \(64,\), found \(40,\)"):
        open_clip_layout.load(tmp_path)


@pytest.mark.parametrize("model_cfg, match", [
    ({**OPEN_CLIP_TINY, "custom_text": True}, r"fields not supported: \['custom_text'\]"),
    ({**OPEN_CLIP_TINY, "vision_cfg": {**OPEN_CLIP_TINY["vision_cfg"], "ls_init_value": 0.1}}, "ls_init_value"),
    ({**OPEN_CLIP_TINY, "text_cfg": {**OPEN_CLIP_TINY["text_cfg"], "pool_type": "last"}}, "pool_type"),
    ({**OPEN_CLIP_TINY, "vision_cfg": {**OPEN_CLIP_TINY["vision_cfg"], "image_size": [32, 48]}}, "square"),
])
def test_unsupported_open_clip_configs(model_cfg, match):
    with pytest.raises(ValueError, match=match):
        open_clip_layout.config_from_open_clip(model_cfg)
    open_clip_layout.config_from_open_clip({**OPEN_CLIP_TINY, "text_cfg": {"no_causal_mask": False}})


def test_convert_open_clip(tmp_path, open_clip):
    model = _open_clip_model(open_clip)
    _save_open_clip(model, tmp_path / "ref", OPEN_CLIP_TINY)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "hps.pt")
    out = tmp_path / "converted" / open_clip_layout.WEIGHTS_NAME
    assert convert_open_clip.convert(tmp_path / "hps.pt", out) == len(model.state_dict())
    config = json.loads((out.parent / open_clip_layout.CONFIG_NAME).read_text())
    assert config == {"model_cfg": open_clip_layout.VIT_H_14}
    (out.parent / open_clip_layout.CONFIG_NAME).write_text(json.dumps(OPEN_CLIP_TINY))  # a bare model config
    params, ref = open_clip_layout.load(out.parent)[1], open_clip_layout.load(tmp_path / "ref")[1]
    for a, b in zip(traverse_util.flatten_dict(params).values(), traverse_util.flatten_dict(ref).values(),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pt")
    with pytest.raises(UserError, match="not a checkpoint of tensors"):
        convert_open_clip.convert(tmp_path / "pickled.pt", tmp_path / "x.safetensors")
