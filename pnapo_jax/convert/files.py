"""Finding, reading and writing safetensors checkpoints: local folders, pipeline folders, hub ids, gs://.

Remote folders are copied to a local cache first because `safe_open` memory-maps local files only.
"""

import contextlib
import json
import os
import pathlib
import re
from collections.abc import Iterable, Iterator, Mapping

import huggingface_hub
import numpy as np
import safetensors.numpy
from etils import epath
from safetensors import safe_open

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"  # diffusers' shard naming
INDEX_NAME = f"{WEIGHTS_NAME}.index.json"
TRANSFORMER_SUBFOLDER = "transformer"
DEFAULT_CACHE_DIR = "~/.cache/pnapo_jax"
_HUB_ID_RE = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_transformer_dir(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """A local diffusers `transformer/` folder from a folder, a pipeline folder, a hub id or a remote path."""
    path = str(path)
    if "://" in path:
        sub = _transformer_subfolder(epath.Path(path))
        dst = pathlib.Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / path.replace("://", "/", 1)
        return _copy(epath.Path(path) / sub, dst / sub)
    if not os.path.exists(path) and _HUB_ID_RE.match(path):
        path = huggingface_hub.snapshot_download(path, allow_patterns=[f"{TRANSFORMER_SUBFOLDER}/*"])
    return pathlib.Path(path) / _transformer_subfolder(epath.Path(path))


def _transformer_subfolder(folder: epath.Path) -> str:
    """Where config.json is: in `folder` itself (a transformer folder) or in its `transformer/` (a pipeline)."""
    for sub in ("", TRANSFORMER_SUBFOLDER):
        if (folder / sub / CONFIG_NAME).exists():
            return sub
    raise FileNotFoundError(f"no {CONFIG_NAME} in {folder} nor in {folder / TRANSFORMER_SUBFOLDER}")


def weight_files(folder: epath.Path | pathlib.Path, weights_name: str = WEIGHTS_NAME,
                 index_name: str = INDEX_NAME) -> list[str]:
    """Names of the safetensors files holding the weights: those in the shard index, or the single file
    (diffusers' names by default; transformers folders pass theirs)."""
    if (folder / index_name).exists():
        names = sorted(set(json.loads((folder / index_name).read_text())["weight_map"].values()))
    else:
        names = [weights_name]
    for name in names:
        if not (folder / name).exists():
            raise FileNotFoundError(f"weights file {folder / name} not found")
    return names


def _copy(src: epath.Path, dst: pathlib.Path) -> pathlib.Path:
    """Copy config, index and weights; files already in `dst` with the same size are kept."""
    dst.mkdir(parents=True, exist_ok=True)
    names = [n for n in (CONFIG_NAME, INDEX_NAME) if (src / n).exists()] + weight_files(src)
    for name in names:
        local = dst / name
        if local.exists() and local.stat().st_size == (src / name).stat().length:
            continue
        partial = dst / f"{name}.partial"
        (src / name).copy(epath.Path(partial), overwrite=True)
        partial.rename(local)
    return dst


def keys_by_file(files: Iterable[str]) -> dict[str, str]:
    """Every tensor name in `files` -> its file, reading only the headers."""
    where: dict[str, str] = {}
    for file in files:
        with safe_open(file, framework="np") as f:
            for key in f.keys():
                if key in where:
                    raise ValueError(f"{key} is stored twice: in {where[key]} and in {file}")
                where[key] = file
    return where


def iter_tensors(where: Mapping[str, str]) -> Iterator[tuple[str, np.ndarray, str]]:
    """(key, tensor, file) for each key of `where` (key -> file), one at a time, in its order."""
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(safe_open(file, framework="np")) for file in set(where.values())}
        for key, file in where.items():
            yield key, handles[file].get_tensor(key), file


def write_safetensors(tensors: dict[str, np.ndarray], file: str | os.PathLike) -> None:
    pathlib.Path(file).parent.mkdir(parents=True, exist_ok=True)
    # "format": "pt" is what torch-side loaders (diffusers, transformers) expect in the header.
    safetensors.numpy.save_file(tensors, str(file), metadata={"format": "pt"})
    umask = os.umask(0o022)  # read it back: safetensors writes 0600 (a temporary file renamed into place)
    os.umask(umask)
    os.chmod(file, 0o666 & ~umask)  # what open() would give: 0644 under the usual umask, readable by the team
