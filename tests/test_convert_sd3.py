"""SD3 weight converters against diffusers itself: from_pretrained, from_single_file (with diffusers' own key
converter), the LoRA loader of StableDiffusion3Pipeline; and the other backbone's weights refused in one line."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is local files; never reach for the hub

import dataclasses
import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders import single_file_utils
from etils import epath
from flux_testing import TINY as FLUX_TINY
from flux_testing import torch_flux
from sd3_testing import TINY, random_inputs, scan_params, torch_forward, torch_sd3

from pnapo_jax import convert
from pnapo_jax.convert import files
from pnapo_jax.convert import sd3 as convert_sd3
from pnapo_jax.errors import UserError
from pnapo_jax.models import flux, sd3

SHARDS = {"one_file": "10GB", "sharded": "4KB"}


@functools.cache
def _apply(cfg: sd3.SD3Config):
    return jax.jit(sd3.SD3Transformer(cfg).apply, static_argnames=("h_tokens", "w_tokens"))


def _rel_err(cfg, params, torch_model) -> float:
    inputs = random_inputs(cfg, 2, 3, 5, 6, seed=2)
    ours = np.asarray(_apply(cfg)({"params": params}, **inputs))
    ref = torch_forward(torch_model, inputs)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _assert_same(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _random_params(cfg: sd3.SD3Config, seed: int = 0) -> dict:
    """Our own random params, nothing zero (adaLN and the output projection included)."""
    shapes = jax.eval_shape(lambda: sd3.nn.meta.unbox(sd3.init_params(cfg, jax.random.key(0))))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * 0.2), shapes)


@pytest.mark.parametrize("shard", list(SHARDS))
@pytest.mark.parametrize("name", list(TINY))
def test_load_diffusers_folder_matches_torch(tmp_path, name, shard):
    model = torch_sd3(name, seed=1)
    model.save_pretrained(tmp_path, max_shard_size=SHARDS[shard])
    assert (tmp_path / files.INDEX_NAME).exists() == (shard == "sharded")
    cfg, params = convert_sd3.load_sd3_transformer(tmp_path)
    assert cfg == sd3.SD3Config.from_diffusers(TINY[name])
    assert _rel_err(cfg, params, model) <= 1e-4


@pytest.mark.parametrize("name", list(TINY))
def test_diffusers_export_loads_in_diffusers(tmp_path, name):
    cfg = sd3.SD3Config.from_diffusers(TINY[name])
    params = _random_params(cfg)
    convert_sd3.save_sd3_transformer(cfg, params, tmp_path, max_shard_size="4KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert _rel_err(cfg, params, SD3Transformer2DModel.from_pretrained(tmp_path).eval()) <= 1e-4
    cfg_back, params_back = convert_sd3.load_sd3_transformer(tmp_path)
    assert cfg_back == cfg
    _assert_same(params_back, params)


def test_scanned_layout_round_trips(tmp_path):
    cfg = sd3.SD3Config.from_diffusers(TINY["sd35_medium"])
    params = _random_params(cfg)
    convert_sd3.save_sd3_transformer(cfg, scan_params(params, cfg), tmp_path / "scanned")
    _, per_layer = convert_sd3.load_sd3_transformer(tmp_path / "scanned")
    _assert_same(per_layer, params)
    _, scanned = convert_sd3.load_sd3_transformer(tmp_path / "scanned", scan_layers=True)
    _assert_same(scanned, scan_params(params, cfg))
    file = tmp_path / "sd3.safetensors"
    convert_sd3.save_sd3_single_file(cfg, params, file)
    _assert_same(convert_sd3.load_sd3_single_file(file, dataclasses.replace(cfg, scan_layers=True)),
                 scan_params(params, cfg))


def test_pipeline_folder_hub_id_and_gcs(tmp_path, monkeypatch):
    cfg = sd3.SD3Config.from_diffusers(TINY["sd3_medium"])
    params = _random_params(cfg)
    pipeline = tmp_path / "pipeline"
    convert_sd3.save_sd3_transformer(cfg, params, pipeline / "transformer", max_shard_size="4KB")
    _assert_same(convert_sd3.load_sd3_transformer(pipeline)[1], params)

    def snapshot_download(repo_id, allow_patterns):
        assert (repo_id, allow_patterns) == ("stabilityai/stable-diffusion-3-medium-diffusers", ["transformer/*"])
        return str(pipeline)

    monkeypatch.setattr(files.huggingface_hub, "snapshot_download", snapshot_download)
    _assert_same(convert_sd3.load_sd3_transformer("stabilityai/stable-diffusion-3-medium-diffusers")[1], params)
    monkeypatch.setattr(files, "epath", types.SimpleNamespace(
        Path=lambda p: epath.Path(str(p).replace("gs://bucket", str(tmp_path)))))
    _assert_same(convert_sd3.load_sd3_transformer("gs://bucket/pipeline", cache_dir=tmp_path / "cache")[1], params)


@pytest.mark.parametrize("name", list(TINY))
def test_single_file_export_loads_in_diffusers(tmp_path, name):
    cfg = sd3.SD3Config.from_diffusers(TINY[name])
    params = _random_params(cfg)
    file = tmp_path / "sd3_tiny.safetensors"
    convert_sd3.save_sd3_single_file(cfg, params, file)
    stored = safetensors.numpy.load_file(file)
    assert stored["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"].shape == (48, 16)
    assert ("model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in stored) == (name == "sd35_medium")
    # diffusers' own converter takes every key and gives the diffusers state dict we would write.
    checkpoint = {k: torch.from_numpy(v) for k, v in stored.items()}
    converted = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    assert not checkpoint, sorted(checkpoint)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / files.CONFIG_NAME).write_text(json.dumps(cfg.to_diffusers()))
    model = SD3Transformer2DModel.from_single_file(str(file), config=str(tmp_path / "config"), local_files_only=True)
    assert sorted(model.state_dict()) == sorted(converted)
    assert _rel_err(cfg, params, model.eval()) <= 1e-4
    _assert_same(convert_sd3.load_sd3_single_file(file, cfg), params)
    bare = tmp_path / "bare.safetensors"  # keys without Stability's `model.diffusion_model.` prefix load too
    safetensors.numpy.save_file({k.removeprefix(convert_sd3.PREFIX): v for k, v in stored.items()}, bare)
    _assert_same(convert_sd3.load_sd3_single_file(bare, cfg), params)


def test_lora_export_loads_in_stable_diffusion3_pipeline(tmp_path):
    cfg = sd3.SD3Config.from_diffusers(TINY["sd35_medium"], lora_rank=2, lora_alpha=4.0,
                                       lora_targets=("to_q", "to_k", "to_v", "to_out_0", "add_q_proj", "to_add_out"))
    base_cfg = dataclasses.replace(cfg, lora_rank=0)
    base = _random_params(base_cfg)
    variables = sd3.nn.meta.unbox(sd3.SD3Transformer(cfg).init(jax.random.key(0), **sd3.dummy_inputs(cfg)))
    lora = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape) * 0.2, variables["lora"])
    assert "lora_a" in lora["transformer_blocks_1"]["attn2"]["to_q"]
    convert.save_lora(cfg, lora, tmp_path / "lora")
    merged = convert.merge_lora(cfg, base, lora)
    convert_sd3.save_sd3_transformer(base_cfg, base, tmp_path / "base")
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(tmp_path / "base").eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    assert _rel_err(base_cfg, merged, pipe.transformer) > 1e-2  # the adapters matter
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert _rel_err(base_cfg, merged, pipe.transformer) <= 1e-4
    ours_with_adapters = _apply(cfg)({"params": base, "lora": lora}, **random_inputs(cfg, 2, 3, 5, 6, seed=2))
    merged_out = _apply(base_cfg)({"params": merged}, **random_inputs(cfg, 2, 3, 5, 6, seed=2))
    np.testing.assert_allclose(np.asarray(ours_with_adapters), np.asarray(merged_out), atol=1e-5)


def test_flux_weights_refused_by_sd3_loaders(tmp_path):
    torch_flux().save_pretrained(tmp_path / "flux")
    with pytest.raises(UserError, match=r"holds FLUX weights \(_class_name FluxTransformer2DModel\).*"
                                        r"config\.model\.backbone=flux"):
        convert_sd3.load_sd3_transformer(tmp_path / "flux")
    fcfg = flux.FluxConfig.from_diffusers(FLUX_TINY)
    convert.save_bfl_transformer(fcfg, convert.load_diffusers_transformer(tmp_path / "flux")[1], tmp_path / "f.st")
    with pytest.raises(UserError, match=r"holds FLUX weights \(its tensor names\).*config\.model\.backbone=flux"):
        convert_sd3.load_sd3_single_file(tmp_path / "f.st", sd3.SD3Config.from_diffusers(TINY["sd3_medium"]))


def test_sd3_weights_refused_by_flux_loaders(tmp_path):
    torch_sd3().save_pretrained(tmp_path / "sd3")
    with pytest.raises(UserError, match=r"holds SD3 weights \(_class_name SD3Transformer2DModel\).*"
                                        r"config\.model\.backbone=sd3"):
        convert.load_diffusers_transformer(tmp_path / "sd3")
    cfg = sd3.SD3Config.from_diffusers(TINY["sd3_medium"])
    convert_sd3.save_sd3_single_file(cfg, _random_params(cfg), tmp_path / "sd3.safetensors")
    with pytest.raises(UserError, match=r"holds SD3 weights \(its tensor names\).*config\.model\.backbone=sd3"):
        convert.load_bfl_transformer(tmp_path / "sd3.safetensors", flux.FluxConfig.from_diffusers(FLUX_TINY))


def test_one_map_from_a_folders_class_to_its_backbone(tmp_path):
    """The config.json class diffusers writes names the backbone, the same for every reader of transformer folders
    (the demo world's loader, bench's model kinds, pipeline folders' transformer/); a class of neither is None."""
    from pnapo_jax import pipelines
    from pnapo_jax.bench import models
    from pnapo_jax.convert import layout
    from pnapo_jax.world import demo_base

    for name, model in (("flux", torch_flux()), ("sd3", torch_sd3())):
        model.save_pretrained(tmp_path / name)
        assert layout.class_backbone(json.loads((tmp_path / name / "config.json").read_text())["_class_name"]) == name
        assert demo_base.folder_backbone(tmp_path / name) == name
        assert models.kind(str(tmp_path / name)) == "transformer" and models.backbone(str(tmp_path / name),
                                                                                     "transformer") == name
        assert layout.class_backbone(pipelines.BY_BACKBONE[name].config_cls().to_diffusers()["_class_name"]) == name
    assert layout.class_backbone("UNet2DConditionModel") is None and layout.class_backbone(None) is None


def test_position_table_other_than_ours_refused(tmp_path):
    model = torch_sd3()
    with torch.no_grad():
        model.pos_embed.pos_embed.mul_(1.01)
    model.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="pos_embed.pos_embed in .* differs from the 2-D sin-cos table"):
        convert_sd3.load_sd3_transformer(tmp_path)
    torch_sd3().half().save_pretrained(tmp_path / "fp16")  # a half-precision table is ours up to its rounding
    cfg, _ = convert_sd3.load_sd3_transformer(tmp_path / "fp16")
    assert cfg.num_layers == TINY["sd3_medium"]["num_layers"]
