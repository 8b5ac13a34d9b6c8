"""The LAION aesthetic predictor ("improved aesthetic predictor", sac+logos+ava1-l14-linearMSE): an MLP on the
L2-normalized CLIP ViT-L/14 image embedding; the score is roughly a 1-10 rating and ignores the prompt.

Folder layout:
    config.json + model.safetensors   openai/clip-vit-large-patch14 as a transformers CLIPModel folder (the
                                      text tower is loaded too and unused)
    aesthetic_mlp.safetensors         the MLP, torch key names: layers.{0,2,4,6,7}.{weight,bias}
The MLP is five Linear layers 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropout between the first four (inert
at inference) and no activation anywhere, as LAION's MLP class defines it. Its public weights are a torch
pickle, which this project never opens; convert them once, where torch is installed, with
    python -c "import torch, safetensors.torch as st; st.save_file(torch.load('sac+logos+ava1-l14-linearMSE.pth',
        map_location='cpu', weights_only=True), 'aesthetic_mlp.safetensors')"
(`weights_only=True` lets torch read tensors only). Pixels as OpenAI CLIP's preprocess makes them ("crop").
"""

import dataclasses
import functools
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from pnapo_jax.errors import UserError
from pnapo_jax.models import clip_vision
from pnapo_jax.rewards import clip_model
from pnapo_jax.rewards.batching import in_batches
from pnapo_jax.rewards.preprocess import preprocess

MLP_FILE = "aesthetic_mlp.safetensors"
MLP_LAYERS = (0, 2, 4, 6, 7)  # Linear layers' indices in LAION's nn.Sequential (dropouts between)


def load_mlp(path: str | os.PathLike) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(weight [out, in], bias [out])] of the MLP's Linear layers, checked to chain into one score."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"{path}: aesthetic MLP weights not found (convert sac+logos+ava1-l14-linearMSE.pth "
                        "once, as pnapo_jax/rewards/aesthetic.py says)")
    tensors = load_file(path)
    wanted = [f"layers.{i}.{p}" for i in MLP_LAYERS for p in ("weight", "bias")]
    missing = [k for k in wanted if k not in tensors]
    if missing:
        raise UserError(f"{path}: missing {missing}; expected LAION's MLP keys {wanted}")
    layers = [(tensors[f"layers.{i}.weight"].astype(np.float32), tensors[f"layers.{i}.bias"].astype(np.float32))
              for i in MLP_LAYERS]
    widths = [w.shape for w, _ in layers]
    if widths[-1][0] != 1 or any(a[0] != b[1] for a, b in zip(widths[:-1], widths[1:], strict=True)):
        raise UserError(f"{path}: layer shapes {[w.shape for w, _ in layers]} do not chain into one score")
    return layers


@functools.partial(jax.jit, static_argnums=0)
def scores(cfg: clip_model.CLIPConfig, params: Any, mlp: Any, images_BxHxWx3: jax.Array) -> jax.Array:
    """[B] aesthetic scores in fp32."""
    pixels = preprocess(images_BxHxWx3, "crop", cfg.vision.image_size)
    pooled = clip_vision.CLIPVisionModel(cfg.vision).apply({"params": params["vision_model"]}, pixels)[1]
    x = pooled.astype(jnp.float32) @ params["visual_projection"]["kernel"].astype(jnp.float32)
    x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    for weight, bias in mlp:
        x = x @ weight.T + bias
    return x[:, 0]


@dataclasses.dataclass(frozen=True)
class Aesthetic:
    """callable(images [B, H, W, 3] in [0, 1], prompts [B] (unused)) -> np.ndarray scores [B]."""

    cfg: clip_model.CLIPConfig
    params: Any
    mlp: Any
    batch_size: int = 16

    def __call__(self, images_BxHxWx3: np.ndarray, prompts: Any = None) -> np.ndarray:
        images = np.asarray(images_BxHxWx3, np.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images [B, H, W, 3], got {images.shape}")
        return in_batches(functools.partial(scores, self.cfg, self.params, self.mlp), self.batch_size, images)


def load(path: str | os.PathLike, dtype: Any = None, batch_size: int = 16) -> Aesthetic:
    """The predictor from a folder (layout above); `dtype` is CLIP's compute and storage dtype."""
    mlp = load_mlp(pathlib.Path(path) / MLP_FILE)
    cfg, params = clip_model.load(path, dtype)
    if mlp[0][0].shape[1] != cfg.projection_dim:
        raise UserError(f"{path}: the MLP takes {mlp[0][0].shape[1]}-d embeddings, the CLIP model makes "
                        f"{cfg.projection_dim}-d ones")
    return Aesthetic(cfg, params, [(jnp.asarray(w), jnp.asarray(b)) for w, b in mlp], batch_size)
