"""The benchmark's added scorers against their references on tiny random weights (torch, CPU, fp32):
CLIP score as torchmetrics' `_clip_score_update` computes it (transformers' CLIPModel and CLIPProcessor,
100 * cosine of the normalized features), and the LAION aesthetic predictor as its inference script runs it
(CLIP image features, L2-normalized, through LAION's MLP), built in torch here. No downloads.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from test_rewards import PROMPTS, REAL_VOCAB, _hf_clip, _images, _open_clip_tokenizer, _rel_err

from pnapo_jax import rewards
from pnapo_jax.errors import UserError
from pnapo_jax.rewards import aesthetic
from pnapo_jax.rewards.preprocess import preprocess


def _features(out) -> torch.Tensor:
    """get_*_features' projected embeds (transformers 5 wraps them in an output object)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _clip_folder(tmp_path, open_clip) -> tuple[transformers.CLIPModel, transformers.CLIPTokenizer]:
    model = _hf_clip(text=dict(vocab_size=REAL_VOCAB, max_position_embeddings=77, eos_token_id=2, bos_token_id=0,
                               pad_token_id=1))
    model.save_pretrained(tmp_path)
    tokenizer = _open_clip_tokenizer(open_clip)
    tokenizer.save_pretrained(tmp_path)
    return model, tokenizer


def test_clip_score_matches_torchmetrics_definition(tmp_path, open_clip):
    model, tokenizer = _clip_folder(tmp_path, open_clip)
    # Captions within CLIP's 77 tokens: torchmetrics slices longer ones, which drops their end-of-text token
    # (the one CLIP pools), while we truncate as the tokenizer (and OpenAI's clip.tokenize) do, keeping it.
    prompts = [p for p in PROMPTS if len(tokenizer(p).input_ids) <= 77]
    assert len(prompts) == len(PROMPTS) - 1
    images = _images(seed=2)[:len(prompts)]
    scores = rewards.load_reward("clip_score", tmp_path, batch_size=2)(images, prompts)
    # torchmetrics' _clip_score_update: processor(text, padding=True), cut to max_position_embeddings,
    # get_text_features(ids, mask); get_image_features(pixels); both L2-normalized; 100 * sum of products.
    inputs = tokenizer(prompts, padding=True, return_tensors="pt")
    ids, mask = inputs["input_ids"][..., :77], inputs["attention_mask"][..., :77]
    pixels = torch.tensor(np.asarray(preprocess(images, "crop", 32))).permute(0, 3, 1, 2)
    with torch.no_grad():
        img = _features(model.get_image_features(pixels))
        txt = _features(model.get_text_features(ids, mask))
    img, txt = img / img.norm(p=2, dim=-1, keepdim=True), txt / txt.norm(p=2, dim=-1, keepdim=True)
    ref = (100 * (img * txt).sum(axis=-1)).numpy()
    assert _rel_err(scores, ref) <= 1e-4
    assert np.all(np.abs(scores) <= 100)


class LaionMLP(torch.nn.Module):
    """LAION's improved-aesthetic-predictor MLP, layer for layer (Linear / Dropout, no activations)."""

    def __init__(self, input_size: int):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def test_aesthetic_matches_laion_inference(tmp_path, open_clip):
    model, _ = _clip_folder(tmp_path, open_clip)
    torch.manual_seed(3)
    mlp = LaionMLP(model.config.projection_dim).eval()
    safetensors.torch.save_file(mlp.state_dict(), tmp_path / aesthetic.MLP_FILE)
    images = _images(seed=3)
    scores = rewards.load_reward("aesthetic", tmp_path, batch_size=2)(images, PROMPTS)
    pixels = torch.tensor(np.asarray(preprocess(images, "crop", 32))).permute(0, 3, 1, 2)
    with torch.no_grad():
        emb = _features(model.get_image_features(pixels)).numpy()
        emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)  # the script's `normalized`
        ref = mlp(torch.from_numpy(emb).float())[:, 0].numpy()
    assert scores.shape == (len(PROMPTS),)
    assert _rel_err(scores, ref) <= 1e-4


def test_aesthetic_weights_errors(tmp_path, open_clip):
    _clip_folder(tmp_path, open_clip)
    with pytest.raises(UserError, match="aesthetic MLP weights not found"):
        rewards.load_reward("aesthetic", tmp_path)
    safetensors.torch.save_file({"layers.0.weight": torch.zeros(4, 16)}, tmp_path / aesthetic.MLP_FILE)
    with pytest.raises(UserError, match=r"missing \['layers.0.bias'"):
        rewards.load_reward("aesthetic", tmp_path)
