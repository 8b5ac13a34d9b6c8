"""Weight converters against diffusers itself: save_pretrained, from_pretrained and from_single_file."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is local files; never reach for the hub

import dataclasses
import functools
import json
import re
import tracemalloc
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders import single_file_model, single_file_utils
from etils import epath
from flux_testing import TINY, random_inputs, torch_flux, torch_forward
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pnapo_jax import convert
from pnapo_jax.convert import files
from pnapo_jax.errors import UserError
from pnapo_jax.models import flux

GUIDANCE = {"guidance": dict(), "no_guidance": dict(guidance_embeds=False)}
SHARDS = {"one_file": "10GB", "sharded": "20KB"}


@functools.cache
def _apply(cfg: flux.FluxConfig):
    return jax.jit(flux.FluxTransformer(cfg).apply)


def _assert_matches(cfg, params, torch_model):
    inputs = random_inputs(cfg, 2, 4, 4, 8, seed=2)
    ours = np.asarray(_apply(cfg)({"params": params}, **inputs))
    ref = torch_forward(torch_model, inputs)
    rel_err = float(np.abs(ours - ref).max() / np.abs(ref).max())
    assert rel_err <= 1e-4, rel_err


def _assert_same(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _config(**overrides) -> flux.FluxConfig:
    return flux.FluxConfig.from_diffusers(TINY, **overrides)


def _random_params(cfg: flux.FluxConfig, seed: int = 0) -> dict:
    """Our own random params, nothing zero (adaLN and final projection included)."""
    shapes = jax.eval_shape(lambda: flux.nn.meta.unbox(flux.init_params(cfg, jax.random.key(0))))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * 0.2), shapes)


@pytest.mark.parametrize("shard", list(SHARDS))
@pytest.mark.parametrize("name", list(GUIDANCE))
def test_load_diffusers_folder_matches_torch(tmp_path, name, shard):
    model = torch_flux(seed=1, **GUIDANCE[name])
    model.save_pretrained(tmp_path, max_shard_size=SHARDS[shard])
    assert (tmp_path / files.INDEX_NAME).exists() == (shard == "sharded")
    cfg, params = convert.load_diffusers_transformer(tmp_path)
    assert cfg == _config(**GUIDANCE[name])
    _assert_matches(cfg, params, model)


@pytest.mark.parametrize("shard", list(SHARDS))
@pytest.mark.parametrize("name", list(GUIDANCE))
def test_diffusers_export_loads_in_diffusers(tmp_path, name, shard):
    cfg = _config(**GUIDANCE[name])
    params = _random_params(cfg)
    convert.save_diffusers_transformer(cfg, params, tmp_path, max_shard_size=SHARDS[shard])
    assert (len(list(tmp_path.glob("*.safetensors"))) > 1) == (shard == "sharded")
    _assert_matches(cfg, params, FluxTransformer2DModel.from_pretrained(tmp_path).eval())
    cfg_back, params_back = convert.load_diffusers_transformer(tmp_path)
    assert cfg_back == cfg
    _assert_same(params_back, params)


def test_resave_removes_stale_shards(tmp_path):
    cfg = _config()
    convert.save_diffusers_transformer(cfg, _random_params(cfg, seed=1), tmp_path, max_shard_size="20KB")
    params = _random_params(cfg, seed=2)
    convert.save_diffusers_transformer(cfg, params, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [files.CONFIG_NAME, files.WEIGHTS_NAME]
    _assert_same(convert.load_diffusers_transformer(tmp_path)[1], params)


def _diffusers_bfl_converter(inner_dim: int):
    """diffusers' own BFL -> diffusers converter at any width.

    It hard-codes FLUX.1's single-block `linear1` split (3072, 3072, 3072, 12288), so each part is
    zero-padded to that size on the way in and cut back on the way out. It must consume every key.
    """
    flux1_rows = (3072, 3072, 3072, 12288)
    rows = (inner_dim, inner_dim, inner_dim, 4 * inner_dim)
    cut = dict(zip(flux1_rows, rows, strict=True))

    def convert_checkpoint(checkpoint, **kwargs):
        for key in [k for k in checkpoint if ".linear1." in k]:
            parts = torch.split(checkpoint[key], rows)
            checkpoint[key] = torch.cat([torch.cat([p, p.new_zeros(n - len(p), *p.shape[1:])])
                                         for p, n in zip(parts, flux1_rows, strict=True)])
        out = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(checkpoint, **kwargs)
        assert not checkpoint, f"keys diffusers did not expect: {sorted(checkpoint)}"
        return {k: v[:cut[len(v)]] if k.startswith("single_") and len(v) in cut else v for k, v in out.items()}

    return convert_checkpoint


@pytest.mark.parametrize("name", list(GUIDANCE))
def test_bfl_export_loads_in_diffusers_single_file(tmp_path, monkeypatch, name):
    cfg = _config(**GUIDANCE[name])
    params = _random_params(cfg)
    file = tmp_path / "flux1-tiny.safetensors"
    convert.save_bfl_transformer(cfg, params, file)
    stored = safetensors.numpy.load_file(file)
    assert ("guidance_in.in_layer.weight" in stored) == cfg.guidance_embeds
    assert stored["single_blocks.1.linear1.weight"].shape == (7 * cfg.inner_dim, cfg.inner_dim)

    (tmp_path / "config").mkdir()
    (tmp_path / "config" / files.CONFIG_NAME).write_text(json.dumps(cfg.to_diffusers()))
    monkeypatch.setitem(single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"],
                        "checkpoint_mapping_fn", _diffusers_bfl_converter(cfg.inner_dim))
    model = FluxTransformer2DModel.from_single_file(str(file), config=str(tmp_path / "config"),
                                                    local_files_only=True)
    _assert_matches(cfg, params, model.eval())
    _assert_same(convert.load_bfl_transformer(file, cfg), params)


def _load(fmt: str, src, cfg: flux.FluxConfig, **kwargs) -> dict:
    if fmt == "bfl":
        return convert.load_bfl_transformer(src, cfg, **kwargs)
    return convert.load_diffusers_transformer(src, scan_layers=cfg.scan_layers, **kwargs)[1]


def _save(fmt: str, cfg: flux.FluxConfig, params, tmp_path):
    if fmt == "bfl":
        convert.save_bfl_transformer(cfg, params, tmp_path / "flux.safetensors")
        return tmp_path / "flux.safetensors"
    convert.save_diffusers_transformer(cfg, params, tmp_path, max_shard_size="20KB")
    return tmp_path


@pytest.mark.parametrize("fmt", ["diffusers", "bfl"])
def test_scanned_layout(tmp_path, fmt):
    cfg = _config()
    scanned_cfg = dataclasses.replace(cfg, scan_layers=True)
    params = _random_params(cfg)
    src = _save(fmt, cfg, params, tmp_path / "per_layer")
    _assert_same(_load(fmt, src, scanned_cfg), flux.scan_params(params, cfg))
    src = _save(fmt, cfg, flux.scan_params(params, cfg), tmp_path / "scanned")
    _assert_same(_load(fmt, src, cfg), params)


@pytest.mark.parametrize("fmt", ["diffusers", "bfl"])
def test_scanned_load_fills_one_stack_at_a_time(tmp_path, fmt):
    """Host memory while loading into the scanned layout stays well below one model copy (about 1.0
    if every stacked leaf were filled at once)."""
    cfg = _config(num_layers=2, num_single_layers=16, attention_head_dim=64, num_attention_heads=4,
                  axes_dims_rope=(16, 24, 24))
    params = _random_params(cfg)
    src = _save(fmt, cfg, params, tmp_path)
    tracemalloc.start()
    try:
        _load(fmt, src, dataclasses.replace(cfg, scan_layers=True))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.7 * sum(x.nbytes for x in jax.tree.leaves(params))


@pytest.mark.parametrize("fmt", ["diffusers", "bfl"])
def test_shardings_and_dtype(tmp_path, fmt):
    cfg = dataclasses.replace(_config(), scan_layers=True)
    params = _random_params(_config())
    src = _save(fmt, _config(), params, tmp_path)
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tensor"))
    assert mesh.size == 8

    def sharding(shape):
        spec = [None] * len(shape)
        if len(shape) > 1 and shape[0] % 2 == 0:
            spec[0] = "tensor"
        if shape[-1] % 4 == 0:
            spec[-1] = "fsdp"
        return NamedSharding(mesh, PartitionSpec(*spec))

    expected = jax.tree.map(lambda x: x.astype(jnp.bfloat16), flux.scan_params(params, _config()))
    shardings = jax.tree.map(lambda x: sharding(x.shape), expected)
    loaded = _load(fmt, src, cfg, dtype="bfloat16", shardings=shardings)
    for x, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(shardings), strict=True):
        assert x.dtype == jnp.bfloat16 and x.sharding == want, (x.dtype, x.sharding, want)
    _assert_same(loaded, expected)


def _write_diffusers(folder, state_dict):
    folder.mkdir()
    safetensors.torch.save_file(state_dict, folder / files.WEIGHTS_NAME)
    (folder / files.CONFIG_NAME).write_text(json.dumps(_config().to_diffusers()))
    return folder


BROKEN = {
    "missing": lambda sd: sd.pop("transformer_blocks.1.attn.norm_added_k.weight"),
    "unexpected": lambda sd: sd.update({"transformer_blocks.1.attn.extra.weight": torch.zeros(2)}),
    "shape": lambda sd: sd.update({"transformer_blocks.1.attn.norm_added_k.weight": torch.zeros(3)}),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_diffusers_weights_name_the_key(tmp_path, case):
    sd = torch_flux().state_dict()
    BROKEN[case](sd)
    folder = _write_diffusers(tmp_path / "model", sd)
    key = "extra" if case == "unexpected" else "norm_added_k"
    msg = "expected (16,), found (3,)" if case == "shape" else case
    with pytest.raises(UserError, match=rf"{key}.*{re.escape(msg)}|{re.escape(msg)}.*{key}"):
        convert.load_diffusers_transformer(folder)


BROKEN_BFL = {
    "missing": lambda sd: sd.pop("guidance_in.out_layer.bias"),
    "unexpected": lambda sd: sd.update({"double_blocks.0.extra.weight": np.zeros(2, np.float32)}),
    "shape": lambda sd: sd.update({"single_blocks.1.linear1.weight": np.zeros((96, 32), np.float32)}),
}


@pytest.mark.parametrize("case", list(BROKEN_BFL))
def test_broken_bfl_weights_name_the_key(tmp_path, case):
    cfg = _config()
    file = tmp_path / "flux.safetensors"
    convert.save_bfl_transformer(cfg, _random_params(cfg), file)
    sd = safetensors.numpy.load_file(file)
    BROKEN_BFL[case](sd)
    safetensors.numpy.save_file(sd, file)
    key = {"missing": "guidance_in.out_layer.bias", "unexpected": "double_blocks.0.extra.weight",
           "shape": "single_blocks.1.linear1.weight"}[case]
    with pytest.raises(UserError, match=re.escape(key)) as err:
        convert.load_bfl_transformer(file, cfg)
    assert str(file) in str(err.value)
    if case == "shape":
        assert "expected (224, 32), found (96, 32)" in str(err.value)


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(UserError, match=re.escape(str(tmp_path))):
        convert.load_diffusers_transformer(tmp_path)
    with pytest.raises(UserError, match="nothing.safetensors"):
        convert.load_bfl_transformer(tmp_path / "nothing.safetensors", _config())
    cfg = _config()
    convert.save_diffusers_transformer(cfg, _random_params(cfg), tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(UserError, match=re.escape(str(shard))):
        convert.load_diffusers_transformer(tmp_path)


def test_pipeline_folder_hub_id_and_gcs(tmp_path, monkeypatch):
    cfg = _config()
    params = _random_params(cfg)
    pipeline = tmp_path / "pipeline"
    convert.save_diffusers_transformer(cfg, params, pipeline / "transformer", max_shard_size="20KB")
    _assert_same(convert.load_diffusers_transformer(pipeline)[1], params)

    def snapshot_download(repo_id, allow_patterns):
        assert (repo_id, allow_patterns) == ("black-forest-labs/FLUX.1-dev", ["transformer/*"])
        return str(pipeline)

    monkeypatch.setattr(files.huggingface_hub, "snapshot_download", snapshot_download)
    _assert_same(convert.load_diffusers_transformer("black-forest-labs/FLUX.1-dev")[1], params)

    # gs://bucket is the local tmp_path seen through epath; the copy-to-cache path runs for real.
    monkeypatch.setattr(files, "epath", types.SimpleNamespace(
        Path=lambda p: epath.Path(str(p).replace("gs://bucket", str(tmp_path)))))
    cache = tmp_path / "cache"
    for _ in range(2):  # the second load finds the files cached
        _assert_same(convert.load_diffusers_transformer("gs://bucket/pipeline", cache_dir=cache)[1], params)
    cached = cache / "gs" / "bucket" / "pipeline" / "transformer"
    assert sorted(p.name for p in cached.iterdir()) == sorted(p.name for p in (pipeline / "transformer").iterdir())
