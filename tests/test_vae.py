"""The Flax VAE against diffusers' AutoencoderKL: tiny random models saved with save_pretrained, loaded by ours."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is local files; never reach for the hub

import json
import shutil

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL
from flux_testing import randomize_vae as _randomize  # test_import_images imports both from here
from flux_testing import torch_vae as _torch_vae

from pnapo_jax.convert import files
from pnapo_jax.convert.vae import VAE_SUBFOLDER, load_vae, vae_layout
from pnapo_jax.errors import UserError
from pnapo_jax.models import vae

CONFIGS = {  # FLUX-like: 16 latent channels, shift, no quant convs; SD-like: 4 channels, quant convs, no shift
    "flux_like": dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=16,
                      scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
    "sd_like": dict(block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=8, latent_channels=4,
                    scaling_factor=0.18215),
}
CASES = {"2x32x32": (2, 32, 32, None), "3x24x40_chunks_of_2": (3, 24, 40, 2)}  # batch, height, width, batch_chunk


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple]:
    """Config name -> (torch model, its save_pretrained folder, our config, our params)."""
    out = {}
    for seed, (name, config) in enumerate(CONFIGS.items()):
        model = _torch_vae(**config).eval()
        _randomize(model, seed)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, folder, *load_vae(folder))
    return out


@pytest.fixture(params=list(CONFIGS))
def saved(request, models) -> tuple:
    return models[request.param]


@pytest.fixture
def flux_like(models) -> tuple:
    return models["flux_like"]


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _images(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, height, width)).astype(np.float32)


def _latents(cfg: vae.VAEConfig, batch: int, height: int, width: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, cfg.latent_channels, height, width), np.float32)


def _torch_decode(model: AutoencoderKL, latents: np.ndarray) -> np.ndarray:
    """FluxPipeline's decode: latents / scale + shift -> vae.decode."""
    c = model.config
    with torch.no_grad():
        return model.decode(torch.from_numpy(latents) / c.scaling_factor + (c.shift_factor or 0.0)).sample.numpy()


def test_config_and_keys_match_diffusers(saved):
    model, _, cfg, params = saved
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: shape for k, (_, shape) in vae_layout(cfg).items()} == expected
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    assert cfg.scaling_factor == model.config.scaling_factor and cfg.shift_factor == model.config.shift_factor


def test_flux_config_matches_diffusers_flux_vae():
    with torch.device("meta"):
        model = _torch_vae(**{k: getattr(vae.FLUX_VAE, k) for k in CONFIGS["flux_like"]})
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: shape for k, (_, shape) in vae_layout(vae.FLUX_VAE).items()} == expected
    assert vae.FLUX_VAE.downsample_factor == 8 and vae.FLUX_VAE.latent_channels == 16


@pytest.mark.parametrize("case", list(CASES))
def test_encode_decode_match_diffusers(saved, case):
    """FluxPipeline's use: latents = (mode - shift) * scale; images = decode(latents / scale + shift). The
    second case runs in chunks of 2 images out of 3, so both a chunk and the remainder are checked."""
    model, _, cfg, params = saved
    c = model.config
    batch, height, width, chunk = CASES[case]
    x = _images(batch, height, width)
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(x)).latent_dist
    ref = ((dist.mode() - (c.shift_factor or 0.0)) * c.scaling_factor).numpy()
    latents = vae.encode(params, cfg, jnp.asarray(x), batch_chunk=chunk)
    assert _rel_err(latents, ref) <= 1e-4
    assert _rel_err(vae.decode(params, cfg, latents, batch_chunk=chunk), _torch_decode(model, ref)) <= 1e-4


def test_encode_sample(flux_like):
    model, _, cfg, params = flux_like
    c = model.config
    x, rng = _images(2, 32, 32, seed=3), jax.random.key(7)
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(x)).latent_dist
    z = dist.mean.numpy() + dist.std.numpy() * np.asarray(jax.random.normal(rng, dist.mean.shape))
    ref = (z - (c.shift_factor or 0.0)) * c.scaling_factor
    assert _rel_err(vae.encode(params, cfg, jnp.asarray(x), rng), ref) <= 1e-4


def test_tiled_decode_matches_diffusers_tiling(flux_like):
    model, _, cfg, params = flux_like
    latents = _latents(cfg, 2, 7, 10)  # tiles of 4 at stride 3: full tiles plus smaller bottom / right ones
    model.enable_tiling()
    model.tile_latent_min_size, model.tile_sample_min_size = 4, 4 * cfg.downsample_factor
    try:
        ref = _torch_decode(model, latents)
    finally:
        model.disable_tiling()
    assert _rel_err(vae.decode(params, cfg, jnp.asarray(latents), tile_latent_size=4), ref) <= 1e-4
    assert _rel_err(_torch_decode(model, latents), ref) > 1e-3  # tiling does change the result


def test_bfloat16(flux_like):
    model, folder, _, _ = flux_like
    cfg, params = load_vae(folder, dtype=jnp.bfloat16)
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    cfg32, params32 = load_vae(folder, dtype="bfloat16", param_dtype="float32")
    assert (cfg32.dtype, jax.tree.leaves(params32)[0].dtype) == ("bfloat16", jnp.float32)
    latents = _latents(cfg, 2, 4, 4)
    out = vae.decode(params, cfg, jnp.asarray(latents))
    assert out.dtype == jnp.float32
    assert _rel_err(out, _torch_decode(model, latents)) <= 5e-2


def test_pipeline_folder_and_hub_id(saved, tmp_path, monkeypatch):
    _, folder, cfg, params = saved
    shutil.copytree(folder, tmp_path / VAE_SUBFOLDER)
    downloads = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, allow_patterns: downloads.append((repo, allow_patterns)) or str(tmp_path))
    for path in (tmp_path, "some-org/some-flux"):
        got_cfg, got = load_vae(path)
        assert got_cfg == cfg
        jax.tree.map(np.testing.assert_array_equal, got, params)
    assert downloads == [("some-org/some-flux", ["vae/*"])]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_vae(tmp_path / "empty")


def _edit_weights(folder, tmp_path, edit) -> str:
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    file = out / files.WEIGHTS_NAME
    tensors = safetensors.torch.load_file(file)
    edit(tensors)
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("decoder.conv_in.bias"), r"missing tensors \(1\): decoder.conv_in.bias"),
    (lambda t: t.update(extra=torch.zeros(2)), r"unexpected tensors \(1\): extra in .*safetensors"),
    (lambda t: t.update({"encoder.conv_in.weight": torch.zeros(8, 3, 1, 1)}),
     r"wrong shapes \(1\): encoder.conv_in.weight in .*: expected \(8, 3, 3, 3\), found \(8, 3, 1, 1\)"),
])
def test_key_errors(saved, tmp_path, edit, message):
    with pytest.raises(UserError, match=message):
        load_vae(_edit_weights(saved[1], tmp_path, edit))


def test_config_errors(saved, tmp_path):
    folder = tmp_path / "vae"
    shutil.copytree(saved[1], folder)
    config = json.loads((folder / files.CONFIG_NAME).read_text())
    for change, message in [({"_class_name": "AutoencoderTiny"}, "AutoencoderKL"), ({"act_fn": "gelu"}, "silu"),
                            ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types")]:
        (folder / files.CONFIG_NAME).write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            load_vae(folder)
