"""Damaged weights, in every loader: one UserError line naming the file (and the tensor), never a traceback
from safetensors, json or the hub; and a shard index cannot make the copier write outside its cache."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is local files; never reach for the hub

import json
import pickle
import re
import types

import huggingface_hub
import numpy as np
import pytest
import safetensors.numpy
import transformers
from etils import epath
from flux_testing import TINY, VAE_TINY, torch_clip, torch_t5, torch_vae
from test_rewards import OPEN_CLIP_TINY, TEXT_TINY, VISION_TINY

from pnapo_jax import convert
from pnapo_jax.convert import files, hf
from pnapo_jax.convert.vae import load_vae
from pnapo_jax.errors import UserError
from pnapo_jax.models import flux
from pnapo_jax.rewards import clip_model, open_clip_layout


def _flux_params(cfg: flux.FluxConfig) -> dict:
    import jax

    shapes = jax.eval_shape(lambda: flux.nn.meta.unbox(flux.init_params(cfg, jax.random.key(0))))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def _open_clip_folder(folder: epath.Path) -> None:
    """A valid open_clip-layout folder at tiny sizes, its keys and shapes those the loader expects."""
    cfg = open_clip_layout.config_from_open_clip(OPEN_CLIP_TINY, **hf.dtypes())
    rng = np.random.default_rng(0)
    tensors = {}
    for hf_key, (_, shape) in hf.param_keys(clip_model.init_params, cfg).items():
        key, part = open_clip_layout.open_clip_key(hf_key)
        tensors[key] = rng.standard_normal(open_clip_layout._stored_shape(key, part, shape)).astype(np.float32)
    folder.mkdir(parents=True)
    safetensors.numpy.save_file(tensors, folder / open_clip_layout.WEIGHTS_NAME)
    (folder / open_clip_layout.CONFIG_NAME).write_text(json.dumps({"model_cfg": OPEN_CLIP_TINY}))


def _make(kind: str, folder: epath.Path):
    """Write a tiny valid checkpoint of `kind` into `folder`; returns (weights file, config file, load())."""
    if kind == "flux_diffusers":
        cfg = flux.FluxConfig.from_diffusers(TINY)
        convert.save_diffusers_transformer(cfg, _flux_params(cfg), folder)
        return folder / files.WEIGHTS_NAME, folder / files.CONFIG_NAME, lambda: convert.load_diffusers_transformer(
            folder)
    if kind == "flux_bfl":
        cfg = flux.FluxConfig.from_diffusers(TINY)
        file = folder / "flux.safetensors"
        convert.save_bfl_transformer(cfg, _flux_params(cfg), file)
        return file, None, lambda: convert.load_bfl_transformer(file, cfg)
    if kind == "vae":
        torch_vae(**VAE_TINY).save_pretrained(folder)
        return folder / files.WEIGHTS_NAME, folder / files.CONFIG_NAME, lambda: load_vae(folder)
    if kind == "hpsv2":
        _open_clip_folder(folder)
        return (folder / open_clip_layout.WEIGHTS_NAME, folder / open_clip_layout.CONFIG_NAME,
                lambda: open_clip_layout.load(folder))
    model, load = {"t5": (torch_t5, hf.load_t5), "clip_text": (torch_clip, hf.load_clip_text),
                   "pickscore": (lambda: transformers.CLIPModel(transformers.CLIPConfig(
                       text_config=TEXT_TINY, vision_config=VISION_TINY, projection_dim=16)), clip_model.load)}[kind]
    model().save_pretrained(folder)
    return folder / hf.WEIGHTS_NAME, folder / files.CONFIG_NAME, lambda: load(folder)


KINDS = ["flux_diffusers", "flux_bfl", "vae", "t5", "clip_text", "pickscore", "hpsv2"]


def _truncate(file: epath.Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _pickle(file: epath.Path) -> None:
    file.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))


def _nan(file: epath.Path) -> str:
    tensors = safetensors.numpy.load_file(file)
    key = sorted(k for k, v in tensors.items() if v.dtype.kind == "f")[-1]
    tensors[key] = tensors[key].copy()
    tensors[key].reshape(-1)[0] = np.nan
    safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})
    return key


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_weights_are_one_line_naming_the_file(tmp_path, kind):
    folder = tmp_path / kind
    weights, config, load = _make(kind, folder)
    load()  # the valid checkpoint loads
    original = weights.read_bytes()
    for damage in (_truncate, _pickle):
        damage(weights)
        with pytest.raises(UserError, match=re.escape(f"{weights} is not a readable safetensors file")):
            load()
        weights.write_bytes(original)
    key = _nan(weights)
    with pytest.raises(UserError, match=re.escape(f"{key} in {weights} holds NaN")):
        load()
    weights.write_bytes(original)
    if config is not None:
        config.write_text('{"_class_name": "FluxTransformer2DModel", ')
        with pytest.raises(UserError, match=re.escape(f"{config} is not valid JSON")):
            load()


def test_hub_id_not_in_cache_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for load in (convert.load_diffusers_transformer, load_vae):
        with pytest.raises(UserError, match=r"^someone/not-cached is not a local folder and not in the hub cache "
                                            rf"\({re.escape(str(tmp_path / 'hub'))}\).*`hf download someone/"
                                            "not-cached --include '(transformer|vae)/\\*'`"):
            load("someone/not-cached")


def test_index_naming_files_outside_the_folder_is_refused(tmp_path, monkeypatch):
    """A remote folder's shard index naming ../../x.safetensors: the copy to the cache must not leave the cache
    (before the fix it wrote tmp_path/cache/x.safetensors, outside cache/gs/bucket/model)."""
    remote = tmp_path / "remote" / "model"
    cfg = flux.FluxConfig.from_diffusers(TINY)
    convert.save_diffusers_transformer(cfg, _flux_params(cfg), remote, max_shard_size="20KB")
    index = remote / files.INDEX_NAME
    content = json.loads(index.read_text())
    victim = next(iter(content["weight_map"]))
    shard = remote / content["weight_map"][victim]
    (tmp_path / "remote" / "x.safetensors").write_bytes(shard.read_bytes())
    content["weight_map"][victim] = "../x.safetensors"
    index.write_text(json.dumps(content))
    monkeypatch.setattr(files, "epath", types.SimpleNamespace(
        Path=lambda p: epath.Path(str(p).replace("gs://bucket", str(tmp_path / "remote")))))
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=re.escape(f"{index} names '../x.safetensors', which is outside its folder")):
        convert.load_diffusers_transformer("gs://bucket/model", cache_dir=cache)
    assert not (cache / "gs" / "bucket" / "x.safetensors").exists()
    with pytest.raises(UserError, match="outside its folder"):  # a local folder is refused alike
        convert.load_diffusers_transformer(remote)
