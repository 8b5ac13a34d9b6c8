"""Finding, reading and writing safetensors checkpoints: local folders, pipeline folders, hub ids, gs://.

Remote folders are copied to a local cache first because `safe_open` memory-maps local files only.
"""

import contextlib
import json
import os
import pathlib
import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any

import huggingface_hub
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from etils import epath
from huggingface_hub import errors as hub_errors
from safetensors import SafetensorError, safe_open

from pnapo_jax.errors import UserError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"  # diffusers' shard naming
INDEX_NAME = f"{WEIGHTS_NAME}.index.json"
TRANSFORMER_SUBFOLDER = "transformer"
DEFAULT_CACHE_DIR = "~/.cache/pnapo_jax"
_HUB_ID_RE = re.compile(r"^[\w.-]+/[\w.-]+$")
_MAX_LISTED = 8  # names shown per kind of mismatch; the count says how many there are


def resolve_transformer_dir(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """A local diffusers `transformer/` folder from a folder, a pipeline folder, a hub id or a remote path."""
    path = str(path)
    if "://" in path:
        sub = _transformer_subfolder(epath.Path(path))
        dst = pathlib.Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / path.replace("://", "/", 1)
        return _copy(epath.Path(path) / sub, dst / sub)
    if not os.path.exists(path) and _HUB_ID_RE.match(path):
        path = hub_snapshot(path, [TRANSFORMER_SUBFOLDER])
    return pathlib.Path(path) / _transformer_subfolder(epath.Path(path))


def hub_snapshot(repo_id: str, subfolders: Iterable[str]) -> str:
    """The local snapshot folder of hub repo `repo_id` holding `subfolders`, downloaded unless cached; a repo
    that is neither cached nor reachable is one line saying so and how to get it, not pages of HTTP errors."""
    try:
        return huggingface_hub.snapshot_download(repo_id, allow_patterns=[f"{sub}/*" for sub in subfolders])
    except (hub_errors.LocalEntryNotFoundError, hub_errors.HfHubHTTPError) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        include = " ".join(f"--include '{sub}/*'" for sub in subfolders)
        raise UserError(f"{repo_id} is not a local folder and not in the hub cache "
                        f"({huggingface_hub.constants.HF_HUB_CACHE}), and could not be fetched ({reason}); "
                        f"fetch it where the hub is reachable with `hf download {repo_id} {include}` "
                        f"(HF_HUB_OFFLINE={int(huggingface_hub.constants.HF_HUB_OFFLINE)}) or give a local "
                        "folder") from e


def local_copies(path: str) -> list[pathlib.Path]:
    """Where `resolve_transformer_dir(path)` reads or would keep local files, found without any network: the
    path itself, a hub id's whole entry in the hub cache, or a remote folder's copy in the default cache."""
    if "://" in path:
        return [pathlib.Path(DEFAULT_CACHE_DIR).expanduser() / path.replace("://", "/", 1)]
    if not os.path.exists(path) and _HUB_ID_RE.match(path):
        return [pathlib.Path(huggingface_hub.constants.HF_HUB_CACHE) / f"models--{path.replace('/', '--')}"]
    return [pathlib.Path(path)]


def _transformer_subfolder(folder: epath.Path) -> str:
    """Where config.json is: in `folder` itself (a transformer folder) or in its `transformer/` (a pipeline)."""
    for sub in ("", TRANSFORMER_SUBFOLDER):
        if (folder / sub / CONFIG_NAME).exists():
            return sub
    raise UserError(f"no {CONFIG_NAME} in {folder} nor in {folder / TRANSFORMER_SUBFOLDER}")


def weight_files(folder: epath.Path | pathlib.Path, weights_name: str = WEIGHTS_NAME,
                 index_name: str = INDEX_NAME) -> list[str]:
    """Names of the safetensors files holding the weights: those in the shard index, or the single file
    (diffusers' names by default; transformers folders pass theirs)."""
    index = folder / index_name
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no \"weight_map\" object naming each tensor's file")
        names = sorted(set(map(str, weight_map.values())))
        for name in names:
            if os.path.isabs(name) or ".." in pathlib.PurePosixPath(name.replace("\\", "/")).parts:
                raise UserError(f"{index} names {name!r}, which is outside its folder: refused")
    else:
        names = [weights_name]
    for name in names:
        if not (folder / name).exists():
            raise UserError(f"weights file {folder / name} not found")
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


def read_json(path: epath.PathLike) -> dict:
    """A JSON object file (a config, a shard index); anything else is one line naming the file."""
    path = epath.Path(path)
    try:
        value = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, expected an object")
    return value


def open_safetensors(file: str, framework: str = "np") -> contextlib.AbstractContextManager:
    """`safe_open(file)`; a file that is not safetensors (truncated, a pickle renamed) is one line naming it."""
    try:
        return safe_open(file, framework=framework)
    except SafetensorError as e:
        raise UserError(f"{file} is not a readable safetensors file ({e}): truncated or another format?") from e


def check_finite(key: str, file: str, x: Any) -> None:
    """A NaN or inf weight would train and sample NaN without a word; name the tensor and its file instead.
    A host array is checked on the host (not copied to an accelerator), a jax array where it is."""
    xp = np if isinstance(x, np.ndarray) else jnp
    if jnp.issubdtype(x.dtype, jnp.inexact) and not bool(xp.isfinite(x).all()):
        raise UserError(f"{key} in {file} holds NaN or infinite values: a damaged or mis-converted checkpoint")


def keys_by_file(files: Iterable[str]) -> dict[str, str]:
    """Every tensor name in `files` -> its file, reading only the headers."""
    where: dict[str, str] = {}
    for file in files:
        with open_safetensors(file) as f:
            for key in f.keys():
                if key in where:
                    raise UserError(f"{key} is stored twice: in {where[key]} and in {file}")
                where[key] = file
    return where


def header_shapes(where: Mapping[str, str]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape (`where`: name -> its file), read from the headers only."""
    shapes = {}
    for file in sorted(set(where.values())):
        with open_safetensors(file) as f:
            shapes.update((k, tuple(f.get_slice(k).get_shape())) for k in f.keys() if k in where)
    return shapes


def mismatch(missing: Collection[str], unexpected: Collection[str], misshaped: Collection[str] = ()) -> str:
    """How a checkpoint's tensors differ from those of the model config, in one line ('' if they do not): each
    kind's count and its first names."""
    parts = []
    for what, names in (("missing tensors", missing), ("unexpected tensors", unexpected),
                        ("wrong shapes", misshaped)):
        if names:
            names = sorted(names)
            more = ", ..." if len(names) > _MAX_LISTED else ""
            parts.append(f"{what} ({len(names)}): {', '.join(names[:_MAX_LISTED])}{more}")
    return "; ".join(parts)


def check_tensors(source: str, missing: Collection[str], unexpected: Collection[str],
                  misshaped: Collection[str] = ()) -> None:
    """Weights that do not match the model config are the user's to fix (another model's folder, a bad
    conversion): one UserError line naming `source` (their folder or file) and the tensors."""
    if problems := mismatch(missing, unexpected, misshaped):
        raise UserError(f"{source} does not match the model config: {problems}")


def iter_tensors(where: Mapping[str, str]) -> Iterator[tuple[str, np.ndarray, str]]:
    """(key, tensor, file) for each key of `where` (key -> file), one at a time, in its order; all finite."""
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(open_safetensors(file)) for file in set(where.values())}
        for key, file in where.items():
            x = handles[file].get_tensor(key)
            check_finite(key, file, x)
            yield key, x, file


def write_safetensors(tensors: dict[str, np.ndarray], file: str | os.PathLike) -> None:
    pathlib.Path(file).parent.mkdir(parents=True, exist_ok=True)
    # "format": "pt" is what torch-side loaders (diffusers, transformers) expect in the header.
    safetensors.numpy.save_file(tensors, str(file), metadata={"format": "pt"})
    umask = os.umask(0o022)  # read it back: safetensors writes 0600 (a temporary file renamed into place)
    os.umask(umask)
    os.chmod(file, 0o666 & ~umask)  # what open() would give: 0644 under the usual umask, readable by the team
