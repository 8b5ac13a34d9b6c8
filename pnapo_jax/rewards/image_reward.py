"""ImageReward (THUDM, NeurIPS 2023) in JAX: BLIP's ViT-L/16 encodes the image, BLIP's BERT encodes the prompt
while cross-attending to the image tokens, and the [CLS] state goes through an MLP 768 -> 1024 -> 128 -> 64 ->
16 -> 1 (no activations; dropouts inert at inference); the score is (r - MEAN) / STD with the package's
constants, what `ImageReward.score` returns. Models: models/blip.py.

Folder layout (THUDM/ImageReward's files plus bert-base-uncased's vocabulary):
    ImageReward.pt           the checkpoint as published: a torch zip, read by convert/torch_pickle.py
                             WITHOUT unpickling (or ImageReward.safetensors with the same keys)
    med_config.json          BLIP's BERT config
    vocab.txt                bert-base-uncased's WordPiece vocabulary (or its tokenizer.json)
    vision_config.json       optional: models.blip.VisionConfig fields (default: ViT-L/16 at 224, ImageReward's)
Keys may carry the `blip.` prefix ImageReward's module gives them; keys the scorer does not use (vision_proj,
text_proj, buffers) are ignored. Prompts: lower-cased WordPiece ids, padded and truncated to 35 tokens, with the
attention mask. Pixels: resized bicubic to 224 on the short side, centre-cropped, CLIP-normalized ("crop",
rewards/preprocess.py; torchvision's CenterCrop rounds an odd margin up where ours rounds down, which only
matters for non-square images).
"""

import dataclasses
import functools
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import traverse_util

from pnapo_jax.convert import files, torch_pickle
from pnapo_jax.convert import hf as hf_files
from pnapo_jax.errors import UserError
from pnapo_jax.models import blip, hf
from pnapo_jax.rewards.batching import images_and_prompts, in_batches
from pnapo_jax.rewards.preprocess import preprocess

MEAN = 0.16717362830052426  # ImageReward's published normalization of the MLP's output
STD = 1.0333394966054072
MAX_LENGTH = 35  # ImageReward's tokenizer call
MLP_WIDTHS = (1024, 128, 64, 16, 1)
MLP_LAYERS = (0, 2, 4, 6, 7)  # Linear layers' indices in its nn.Sequential (dropouts between)
CHECKPOINTS = ("ImageReward.pt", "ImageReward.safetensors")
TEXT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "hidden_act", "layer_norm_eps")
_PREFIX = "blip."


@dataclasses.dataclass(frozen=True)
class ImageRewardConfig:
    vision: blip.VisionConfig = blip.VisionConfig()
    text: blip.TextConfig = blip.TextConfig()


class ImageRewardModel(nn.Module):
    """(pixels [B, S, S, 3], ids [B, L], mask [B, L]) -> the MLP's raw output [B] (before MEAN / STD)."""

    cfg: ImageRewardConfig

    @nn.compact
    def __call__(self, pixels_BxSxSx3: jax.Array, input_ids_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
        text = self.cfg.text
        image = blip.VisionTransformer(self.cfg.vision, name="visual_encoder")(pixels_BxSxSx3)
        x = blip.TextEncoder(text, name="text_encoder")(input_ids_BxL, mask_BxL, image)[:, 0]
        for i, width in zip(MLP_LAYERS, MLP_WIDTHS, strict=True):
            x = hf.dense(width, ("embed", "mlp"), "float32", text.param_dtype, True, f"mlp.layers.{i}")(
                x.astype(jnp.float32))
        return x[:, 0]


def init_params(cfg: ImageRewardConfig, rng: jax.Array) -> dict[str, Any]:
    size = cfg.vision.image_size
    return ImageRewardModel(cfg).init(rng, jnp.zeros((1, size, size, 3)), jnp.zeros((1, 4), jnp.int32),
                                      jnp.ones((1, 4), jnp.int32))["params"]


@functools.partial(jax.jit, static_argnums=0)
def scores(cfg: ImageRewardConfig, params: Any, images_BxHxWx3: jax.Array, input_ids_BxL: jax.Array,
           mask_BxL: jax.Array) -> jax.Array:
    """[B] ImageReward scores in fp32."""
    pixels = preprocess(images_BxHxWx3, "crop", cfg.vision.image_size)
    raw = ImageRewardModel(cfg).apply({"params": params}, pixels, input_ids_BxL, mask_BxL)
    return (raw - MEAN) / STD


@dataclasses.dataclass(frozen=True)
class ImageReward:
    """callable(images [B, H, W, 3] in [0, 1], prompts [B]) -> np.ndarray scores [B]."""

    cfg: ImageRewardConfig
    params: Any
    tokenize: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]  # prompts -> (ids, mask) [B, L]
    batch_size: int = 16

    def __call__(self, images_BxHxWx3: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        images, prompts = images_and_prompts(images_BxHxWx3, prompts)
        if not prompts:
            return np.zeros(0, np.float32)
        return in_batches(functools.partial(scores, self.cfg, self.params), self.batch_size, images,
                          *self.tokenize(prompts))


def tokenize(tokenizer: Any, prompts: Sequence[str], max_length: int = MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask) [B, max_length] as ImageReward's BertTokenizer call makes them."""
    out = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)


def read_config(folder: pathlib.Path, dtype: Any = None) -> ImageRewardConfig:
    """The text tower from med_config.json, the vision tower from vision_config.json or ImageReward's ViT-L/16."""
    dtypes = hf_files.dtypes(dtype)
    if not (folder / "med_config.json").is_file():
        raise UserError(f"{folder}: no med_config.json (BLIP's BERT config, from THUDM/ImageReward)")
    med = files.read_json(folder / "med_config.json")
    missing = [k for k in TEXT_FIELDS if k not in med]
    if missing:
        raise UserError(f"{folder / 'med_config.json'}: missing {missing}")
    vision = files.read_json(folder / "vision_config.json") if (folder / "vision_config.json").is_file() else {}
    fields = {f.name for f in dataclasses.fields(blip.VisionConfig)} - {"dtype", "param_dtype"}
    if set(vision) - fields:
        raise UserError(f"{folder / 'vision_config.json'}: unknown fields {sorted(set(vision) - fields)}; "
                        f"known: {sorted(fields)}")
    vcfg = blip.VisionConfig(**vision, **dtypes)
    tcfg = blip.TextConfig(**{k: med[k] for k in TEXT_FIELDS}, encoder_width=vcfg.hidden_size, **dtypes)
    return ImageRewardConfig(vcfg, tcfg)


def read_state_dict(folder: pathlib.Path) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    """(the checkpoint file, its tensors) from ImageReward.pt (never unpickled) or ImageReward.safetensors."""
    for name in CHECKPOINTS:
        path = folder / name
        if path.is_file():
            if name.endswith(".pt"):
                return path, torch_pickle.load_state_dict(path)
            with files.open_safetensors(str(path)) as f:
                return path, {k: f.get_tensor(k) for k in f.keys()}
    raise UserError(f"{folder}: no ImageReward weights ({' or '.join(CHECKPOINTS)}; THUDM/ImageReward's "
                    "ImageReward.pt as published)")


def params_from_state_dict(cfg: ImageRewardConfig, state: Mapping[str, np.ndarray], file: os.PathLike | str
                           ) -> dict[str, Any]:
    """Our params from ImageReward's state-dict names (a `blip.` prefix or none), checked: one UserError
    naming the file and the missing or mis-shaped keys; unused keys are ignored."""
    state = {k.removeprefix(_PREFIX): v for k, v in state.items()}
    expected = hf_files.param_keys(init_params, cfg)
    missing = [k for k in expected if k not in state]
    misshaped = [f"{k}: expected {shape}, found {state[k].shape}" for k, (_, shape) in expected.items()
                 if k in state and tuple(state[k].shape) != tuple(shape)]
    if problems := files.mismatch(missing, (), misshaped):
        raise UserError(f"{file} does not match ImageReward's architecture (med_config.json, vision_config.json): "
                        f"{problems}")
    out = {}
    for key, (path, _) in expected.items():
        x = np.asarray(state[key])
        files.check_finite(key, str(file), x)
        out[path] = jnp.asarray(x.T if path[-1] == "kernel" else x, jnp.dtype(cfg.text.param_dtype))
    return traverse_util.unflatten_dict(out)


def load(path: str | os.PathLike, dtype: Any = None, batch_size: int = 16) -> ImageReward:
    """The scorer from a folder (layout above); `dtype`: BLIP's compute and storage dtype (the MLP computes in fp32)."""
    folder = pathlib.Path(path)
    cfg = read_config(folder, dtype)
    file, state = read_state_dict(folder)
    params = params_from_state_dict(cfg, state, file)
    tokenizer = transformers.BertTokenizer.from_pretrained(str(folder))
    return ImageReward(cfg, params, functools.partial(tokenize, tokenizer), batch_size)
