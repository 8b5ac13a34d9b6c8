"""Importing preference pairs given as image files: VAE-encoded on import, as diffusers' AutoencoderKL encodes."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is local files; never reach for the hub

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image
from test_vae import _randomize, _torch_vae

from pnapo_jax.data import import_pairs
from pnapo_jax.data.schema import RecordError
from pnapo_jax.data.source import ArrayRecordSource
from pnapo_jax.errors import UserError

# FLUX-like (16 latent channels, shift, no quant convs), downsampling 8x: one packed token is 16x16 pixels.
VAE_TINY = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=16,
                scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
HEIGHT, WIDTH = 32, 48


@pytest.fixture
def vae(tmp_path):
    """(torch model, its save_pretrained folder)."""
    model = _torch_vae(**VAE_TINY).eval()
    _randomize(model, seed=3)
    model.save_pretrained(tmp_path / "vae")
    return model, tmp_path / "vae"


def _reference_latent(model, image: Image.Image) -> np.ndarray:
    """diffusers: pixels in [-1, 1], posterior mode, FluxPipeline's (z - shift) * scale, 2x2 packing."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32).transpose(2, 0, 1)[None] / 127.5 - 1)
    with torch.no_grad():
        z = model.encode(pixels).latent_dist.mode()
    z = (z - model.config.shift_factor) * model.config.scaling_factor
    return FluxPipeline._pack_latents(z, *z.shape).numpy()[0]


def test_images_are_vae_encoded(tmp_path, vae):
    model, folder = vae
    rng = np.random.default_rng(0)
    images = {  # an exact-size PNG, a JPEG at twice the size (resized on import), a PNG with alpha
        "a.png": Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), np.uint8)),
        "b.jpg": Image.fromarray(rng.integers(0, 256, (2 * HEIGHT, 2 * WIDTH, 3), np.uint8)),
        "c.png": Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 4), np.uint8), "RGBA"),
    }
    for name, image in images.items():
        image.save(tmp_path / name)
    np.save(tmp_path / "latent.npy", rng.standard_normal((6, 64)).astype(np.float32))
    np.save(tmp_path / "t5.npy", rng.standard_normal((4, 8)).astype(np.float32))
    np.save(tmp_path / "clip.npy", rng.standard_normal(5).astype(np.float32))
    text = {"prompt_embeds": "t5.npy", "pooled_prompt_embeds": "clip.npy"}
    rows = [{"caption": "both images", "jpg_0": "a.png", "jpg_1": "b.jpg", "label_0": 0, **text},
            {"caption": "latent and image", "latent_0": "latent.npy", "jpg_1": "c.png", "label_0": 1, **text},
            {"caption": "unreadable", "jpg_0": "latent.npy", "latent_1": "latent.npy", "label_0": 1, **text}]
    (tmp_path / "m.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")

    with pytest.raises(RecordError, match=r"record 0: field 'latent_1': missing; images need VAE encoding"):
        import_pairs.import_manifest(str(tmp_path / "m.jsonl"), str(tmp_path / "no_vae"), HEIGHT, WIDTH)
    report = import_pairs.import_manifest(str(tmp_path / "m.jsonl"), str(tmp_path / "out"), HEIGHT, WIDTH, "skip",
                                          vae=str(folder))
    assert (report.written, report.skipped) == (2, 1)
    source = ArrayRecordSource(report.path)
    assert source.spec.image_tokens == (HEIGHT // 16) * (WIDTH // 16) and source.spec.channels == 64
    resized = Image.open(tmp_path / "b.jpg").resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)  # same aspect
    expected = [(resized, Image.open(tmp_path / "a.png")),  # label_0 = 0: image 1 wins
                (np.load(tmp_path / "latent.npy"), Image.open(tmp_path / "c.png"))]
    for i, (winner, loser) in enumerate(expected):
        record = source[i]
        for stored, image in ((record["x0_w"], winner), (record["x0_l"], loser)):
            ref = image if isinstance(image, np.ndarray) else _reference_latent(model, image)
            assert stored.shape == ref.shape == (6, 64)
            assert np.abs(stored - ref).max() <= 1e-4 * np.abs(ref).max()
    with pytest.raises(UserError, match="multiples of 16"):
        import_pairs.import_manifest(str(tmp_path / "m.jsonl"), str(tmp_path / "bad"), 40, WIDTH, vae=str(folder))
