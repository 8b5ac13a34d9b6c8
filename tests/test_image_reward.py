"""ImageReward's JAX port against a torch reference on tiny random weights (CPU, fp32), through the real loading
path: the reference's weights are `torch.save`d under ImageReward's state-dict names as ImageReward.pt and read
back by convert/torch_pickle.py (never unpickled).

The reference: the `image-reward` package (1.5, the latest) cannot be built here: its BLIP modules import
`apply_chunking_to_forward`, `find_pruneable_heads_and_indices` and `prune_linear_layer` from
`transformers.modeling_utils` and `transformers.file_utils`, which transformers 5 removed, plus timm, fairscale and
torchvision, which the project does not install. So the reference is transformers' port of the same BLIP code
(BlipVisionModel: the timm ViT; BlipTextModel with cross-attention layers, called bidirectionally as med.py's
"multimodal" mode is) plus ImageReward's MLP and its (r - mean) / std, written in torch below as the package
defines them. Its state dict is renamed to ImageReward's names (visual_encoder.*, text_encoder.*, mlp.layers.*)
with the `blip.` prefix and the unused vision_proj / text_proj / position_ids entries the real file holds.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from PIL import Image

from pnapo_jax.bench import benchmark, sampling, scorers
from pnapo_jax.errors import UserError
from pnapo_jax.rewards import image_reward, load_reward
from pnapo_jax.world import demo_base as base
from pnapo_jax.world import grammar

VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
TEXT = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
            max_position_embeddings=40, hidden_act="gelu", layer_norm_eps=1e-12)
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "red", "blue", "cat", "dog", "under",
         "sky", "the", "at", "night", "##s", ",", "!", "an", "astronaut", "zebra"]
PROMPTS = ["a photo of a cat", "A red DOG under the blue sky, at night!", "zebra " * 50, "", "an astronaut"]


class MLP(torch.nn.Module):
    """ImageReward's MLP: Linear layers with dropouts between and no activation."""

    def __init__(self, input_size: int):
        super().__init__()
        d = torch.nn.Dropout
        self.layers = torch.nn.Sequential(torch.nn.Linear(input_size, 1024), d(0.2), torch.nn.Linear(1024, 128),
                                          d(0.2), torch.nn.Linear(128, 64), d(0.1), torch.nn.Linear(64, 16),
                                          torch.nn.Linear(16, 1))


def _reference():
    torch.manual_seed(0)
    vision = transformers.BlipVisionModel(transformers.BlipVisionConfig(
        **VISION, intermediate_size=4 * VISION["hidden_size"], layer_norm_eps=1e-6, hidden_act="gelu"))
    text = transformers.BlipTextModel(transformers.BlipTextConfig(
        **TEXT, vocab_size=len(WORDS), encoder_hidden_size=VISION["hidden_size"], is_decoder=True, pad_token_id=0),
        add_pooling_layer=False)
    mlp = MLP(TEXT["hidden_size"])
    with torch.no_grad():
        for module in (vision, text, mlp):
            for p in module.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
    return vision.eval(), text.eval(), mlp.eval()


def _reference_scores(vision, text, mlp, images_BxHxWx3: np.ndarray, prompts, tokenizer) -> np.ndarray:
    """ImageReward.score for each (image, prompt): PIL image, ToTensor, CLIP Normalize (the images are already at
    the model's size, so Resize and CenterCrop leave them), tokenizer(padding=max_length, max_length=35)."""
    out = []
    for image, prompt in zip(images_BxHxWx3, prompts, strict=True):
        pil = Image.fromarray(np.round(image * 255).astype(np.uint8))
        x = torch.from_numpy(np.asarray(pil, np.float32) / 255).permute(2, 0, 1)[None]
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
        ids = tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        with torch.no_grad():
            image_embeds = vision((x - mean) / std).last_hidden_state
            states = text(ids.input_ids, attention_mask=ids.attention_mask, encoder_hidden_states=image_embeds,
                          encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
                          is_decoder=False).last_hidden_state
            r = mlp.layers(states[:, 0].float())
        out.append(float((r - 0.16717362830052426) / 1.0333394966054072))
    return np.asarray(out)


def _imagereward_state_dict(vision, text, mlp) -> dict[str, torch.Tensor]:
    """The reference's weights under ImageReward's names, as its ImageReward.pt stores them."""
    renames = [("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
               ("embeddings.patch_embedding", "patch_embed.proj"), ("encoder.layers.", "blocks."),
               ("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.qkv", "attn.qkv"),
               ("self_attn.projection", "attn.proj"), ("post_layernorm", "norm")]
    out = {}
    for key, value in vision.state_dict().items():
        for a, b in renames:
            key = key.replace(a, b)
        out[f"blip.visual_encoder.{key}"] = value
    out |= {f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()}
    out["blip.text_encoder.embeddings.position_ids"] = torch.arange(TEXT["max_position_embeddings"])[None]
    out |= {f"mlp.{k}": v for k, v in mlp.state_dict().items()}
    out |= {"blip.vision_proj.weight": torch.zeros(8, VISION["hidden_size"]),
            "blip.text_proj.weight": torch.zeros(8, TEXT["hidden_size"])}  # BLIP's, unused by the score
    return out


def _folder(tmp_path, state, fmt: str = "pt"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    if fmt == "pt":
        torch.save(state, tmp_path / "ImageReward.pt")
    else:
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "ImageReward.safetensors")
    med = {**TEXT, "vocab_size": len(WORDS), "encoder_width": 768, "add_cross_attention": True, "model_type": "bert"}
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    (tmp_path / "vision_config.json").write_text(json.dumps(VISION))
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return tmp_path


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_image_reward_matches_blip_reference(tmp_path, fmt):
    vision, text, mlp = _reference()
    folder = _folder(tmp_path, _imagereward_state_dict(vision, text, mlp), fmt)
    tokenizer = transformers.BertTokenizer(str(folder / "vocab.txt"))
    images = _images(len(PROMPTS))
    ref = _reference_scores(vision, text, mlp, images, PROMPTS, tokenizer)
    ours = load_reward("imagereward", folder, batch_size=2)(images, PROMPTS)  # batches of 2: the last one padded
    assert ref.std() > 0.1  # the scores differ: a swapped or missing image, prompt or mask would show
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_image_reward_uses_the_image_and_the_prompt(tmp_path):
    """The score moves with the image (the cross-attention is wired) and with the prompt."""
    folder = _folder(tmp_path, _imagereward_state_dict(*_reference()))
    reward = image_reward.load(folder)
    images = _images(2)
    same_prompt = reward(images, ["a photo of a cat"] * 2)
    same_image = reward(images[[0, 0]], ["a photo of a cat", "a blue dog"])
    assert abs(same_prompt[0] - same_prompt[1]) > 1e-3 and abs(same_image[0] - same_image[1]) > 1e-3


def test_image_reward_default_architecture_is_vit_l16_bert_base():
    cfg = image_reward.ImageRewardConfig()
    v, t = cfg.vision, cfg.text
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size, v.image_size) == (1024, 24, 16,
                                                                                                        16, 224)
    assert (t.hidden_size, t.num_hidden_layers, t.vocab_size, t.encoder_width) == (768, 12, 30524, 1024)


def test_image_reward_weight_errors(tmp_path):
    state = _imagereward_state_dict(*_reference())
    folder = _folder(tmp_path / "ok", state)
    (folder / "ImageReward.pt").unlink()
    with pytest.raises(UserError, match=r"no ImageReward weights \(ImageReward\.pt or"):
        image_reward.load(folder)
    with pytest.raises(UserError, match="--scorers: imagereward=.*missing ImageReward.pt"):
        scorers.parse(f"imagereward={folder}")
    broken = dict(state)
    del broken["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    broken["mlp.layers.0.weight"] = broken["mlp.layers.0.weight"][:, :4]
    folder = _folder(tmp_path / "broken", broken)
    with pytest.raises(UserError, match=r"ImageReward\.pt does not match .*missing tensors \(1\): text_encoder\."
                                        r"encoder\.layer\.1\.crossattention\.self\.key\.weight; wrong shapes \(1\): "
                                        r"mlp\.layers\.0"):
        image_reward.load(folder)
    (folder / "med_config.json").unlink()
    with pytest.raises(UserError, match="no med_config.json"):
        image_reward.load(folder)


def test_scorers_accept_an_image_reward_folder(tmp_path):
    folder = _folder(tmp_path, _imagereward_state_dict(*_reference()))
    assert scorers.parse(f"imagereward={folder}") == [("imagereward", str(folder))]


def test_evaluate_scores_with_image_reward(tmp_path):
    """The benchmark command's path: the embedded world's base sampled, its image files scored by ImageReward."""
    folder = _folder(tmp_path / "ir", _imagereward_state_dict(*_reference()))
    out = tmp_path / "out"
    opts = benchmark.Options(models=f"base={base.DEFAULT_BASE}", prompts="world:heldout", out=str(out),
                             scorers=f"world_reward,imagereward={folder}", seeds=1, max_prompts=2, num_steps=2,
                             batch_size=2, show_progress=False)
    summary = benchmark.run(opts)
    prompts = grammar.prompts("heldout")[:2]
    images = np.stack([sampling.load_png(sampling.image_path(out, "base", p, 0)) for p in range(2)])
    expected = load_reward("imagereward", folder)(images, prompts)
    assert summary["models"]["base"]["imagereward"]["value"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert "imagereward" in (out / "results.md").read_text()
