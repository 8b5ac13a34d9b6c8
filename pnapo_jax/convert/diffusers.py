"""diffusers transformer folders (config.json + safetensors, sharded or not) <-> our params: FLUX's
`FluxTransformer2DModel` and SD3's `SD3Transformer2DModel` (pass `config_cls=sd3.SD3Config`)."""

import json
import math
import os
import pathlib
import re
from typing import Any

import huggingface_hub
import jax.numpy as jnp

from pnapo_jax.convert import files, layout
from pnapo_jax.models import flux

Config = Any  # flux.FluxConfig | sd3.SD3Config

# Weight files a previous save may have left behind (not variants such as `.fp16.safetensors`).
_OURS_RE = re.compile(r"^diffusion_pytorch_model(-\d+-of-\d+)?\.safetensors(\.index\.json)?$")


def load_diffusers_transformer(path: str | os.PathLike, dtype: Any = None, shardings: Any = None, *,
                               cache_dir: str | os.PathLike | None = None, config_cls: type = flux.FluxConfig,
                               **config_overrides: Any) -> tuple[Config, dict[str, Any]]:
    """(config, params) from a diffusers transformer folder, a pipeline folder, a hub id or a gs:// folder.

    `config_cls` is the model family expected (FluxConfig or SD3Config): a folder of the other family is one
    line naming it and the config field to change. `config_overrides` are its fields (`scan_layers=True` gives
    the scanned layout); `dtype` is the param dtype (default: the config's param_dtype, float32); `shardings` a
    tree like the params.
    """
    folder = files.resolve_transformer_dir(path, cache_dir)
    if dtype is not None:
        config_overrides["param_dtype"] = jnp.dtype(dtype).name
    config = files.read_json(folder / files.CONFIG_NAME)
    weights = [str(folder / name) for name in files.weight_files(folder)]
    where = files.keys_by_file(weights)
    layout.check_backbone(config_cls, str(folder), config.get("_class_name"), where)
    cfg = config_cls.from_diffusers(config, **config_overrides)
    lay = layout.layout(cfg, scanned=cfg.scan_layers)
    buffers = layout.buffers(cfg)
    expected = {**{key: e.shape for key, e in lay.entries.items()}, **{key: x.shape for key, x in buffers.items()}}
    layout.check_keys(expected, files.header_shapes(where), str(folder), where)
    for key, x, source in files.iter_tensors({k: where[k] for k in buffers}):
        layout.check_buffer(key, source, buffers[key], x)
    ordered = {key: where[key] for key in sorted(where, key=layout.by_leaf) if key not in buffers}
    return cfg, layout.assemble(lay, files.iter_tensors(ordered), cfg.param_dtype, shardings)


def save_diffusers_transformer(config: Config, params: Any, path: str | os.PathLike,
                               max_shard_size: int | str = "10GB") -> None:
    """Write a folder that diffusers' `from_pretrained` reads (the config's class: FluxTransformer2DModel or
    SD3Transformer2DModel, buffers included); shards named as diffusers does.

    One shard at a time is gathered on the host. Weight files of an earlier save are removed so that a
    stale shard index cannot shadow the new weights.
    """
    lay, flat = layout.export_layout(config, params)
    buffers = layout.buffers(config)
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {key: math.prod(e.shape) * flat[e.path].dtype.itemsize for key, e in lay.entries.items()}
    sizes.update({key: x.nbytes for key, x in buffers.items()})
    split = huggingface_hub.split_state_dict_into_shards_factory(
        sizes, get_storage_size=lambda n: n, filename_pattern=files.WEIGHTS_PATTERN, max_shard_size=max_shard_size)
    for old in folder.iterdir():
        if _OURS_RE.match(old.name):
            old.unlink()
    for filename, names in split.filename_to_tensors.items():
        files.write_safetensors({k: buffers[k] if k in buffers else layout.tensor(flat, lay.entries[k])
                                 for k in names}, folder / filename)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / files.INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (folder / files.CONFIG_NAME).write_text(json.dumps(config.to_diffusers(), indent=2) + "\n")
