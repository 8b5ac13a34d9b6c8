"""A run's inputs that checkpoints do not hold: the pretrained weights the frozen reference is rebuilt from.

Each (re)start rebuilds the reference from config.model.pretrained, so weights changed in between (overwritten
by an export, a hub revision that moved) would silently train a resumed run against another reference. The
first start records a fingerprint of those weights in WORKDIR/pretrained_fingerprint.json; a resume whose
weights differ is refused in one line; and export refuses to write over the weights or the workdir.

The fingerprint is cheap at any size: per file its size and a SHA-256 of its first MiB (a safetensors header
and its first tensors) and of 16 evenly spaced 64 KiB samples; plus the hub revision when `pretrained` is a
hub id. It is content-based, so copying the weights elsewhere keeps it.
"""

import hashlib
import json
import os
import re
from typing import Any

import ml_collections
from etils import epath

from pnapo_jax.convert import files
from pnapo_jax.errors import UserError

FINGERPRINT_NAME = "pretrained_fingerprint.json"
_HEAD = 1 << 20
_SAMPLES, _SAMPLE = 16, 1 << 16
_HUB_SNAPSHOT_RE = re.compile(r"^(?P<repo>.*/models--[^/]+)/snapshots/(?P<revision>[0-9a-f]{40})(/|$)")


def _file_digest(path: epath.Path) -> dict[str, Any]:
    size = path.stat().length
    h = hashlib.sha256()
    with path.open("rb") as f:
        h.update(f.read(_HEAD))
        for i in range(_SAMPLES):
            f.seek(_HEAD + (size - _HEAD) * i // _SAMPLES if size > _HEAD else size)
            h.update(f.read(_SAMPLE))
    return {"size": size, "sha256_sampled": h.hexdigest()}


def _weights_path(model: ml_collections.ConfigDict) -> epath.Path:
    """The local transformer folder (diffusers) or file (bfl) that training loads."""
    if model.pretrained_format == "bfl":
        return epath.Path(model.pretrained)
    return epath.Path(files.resolve_transformer_dir(model.pretrained))


def fingerprint(model: ml_collections.ConfigDict) -> dict[str, Any]:
    """What identifies config.model's pretrained weights (see the module docstring); {} for the seeded init."""
    if not model.pretrained:
        return {}
    path = _weights_path(model)
    if model.pretrained_format == "bfl":
        names, folder = [path.name], path.parent
    else:
        folder = path
        index = [files.INDEX_NAME] if (folder / files.INDEX_NAME).exists() else []
        names = [files.CONFIG_NAME, *index, *files.weight_files(folder)]
    hub = _HUB_SNAPSHOT_RE.match(os.fspath(path))
    return {"source": model.pretrained, "revision": hub["revision"] if hub else None,
            "files": {name: _file_digest(folder / name) for name in names}}


def _differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    if recorded == now:
        return []
    if not recorded or not now:
        return [f"source {recorded.get('source', 'the seeded init')!r} -> {now.get('source', 'the seeded init')!r}"]
    out = [f"hub revision {recorded['revision']} -> {now['revision']}"] if recorded["revision"] != now["revision"] \
        else []
    for name in sorted(recorded["files"].keys() | now["files"].keys()):
        before, after = recorded["files"].get(name), now["files"].get(name)
        if before is None or after is None:
            out.append(f"{name} {'added' if before is None else 'removed'}")
        elif before != after:
            out.append(f"{name} changed (size {before['size']} -> {after['size']}"
                       f"{', content differs' if before['sha256_sampled'] != after['sha256_sampled'] else ''})")
    return out


def check_or_record(config: ml_collections.ConfigDict, workdir: str, resuming: bool, write: bool = True) -> None:
    """Record the pretrained weights' fingerprint at a run's first start; on a resume, refuse weights that
    changed since. `write`: whether this process writes the record (process 0)."""
    record = epath.Path(workdir) / FINGERPRINT_NAME
    now = fingerprint(config.model)
    if resuming and record.exists():
        recorded = files.read_json(record)
        changed = _differences(recorded, now)
        if changed:
            raise UserError(f"the pretrained weights (config.model.pretrained={config.model.pretrained!r}) changed "
                            f"since this run started: {'; '.join(changed)}; the resumed run would train against "
                            f"another frozen reference. Restore those weights, or, if the change is meant, delete "
                            f"{record} and resume")
        return
    if write:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(now, indent=2, sort_keys=True) + "\n")


def _protected(config: ml_collections.ConfigDict, workdir: str) -> list[tuple[str, str, bool]]:
    """(real path, what it is, whether writing inside it is refused too) of the places an export must not write
    to: the workdir itself, its checkpoints, and wherever the pretrained weights are (found without network)."""
    work = os.path.realpath(workdir)
    out = [(work, "the run's workdir", False), (os.path.join(work, "checkpoints"), "the run's checkpoints", True)]
    if config.model.pretrained:
        out += [(os.path.realpath(p), f"config.model.pretrained={config.model.pretrained!r}", True)
                for p in files.local_copies(config.model.pretrained)]
    return out


def refuse_overwrite(out: str, config: ml_collections.ConfigDict, workdir: str) -> None:
    """One line instead of writing `out` over the run's inputs: inside its pretrained weights or its
    checkpoints, or the workdir itself (a diffusers export would replace its config.json)."""
    target = os.path.realpath(out)
    for path, what, nor_inside in _protected(config, workdir):
        if target == path or (nor_inside and os.path.commonpath([target, path]) == path):
            raise UserError(f"--out={out} would write over {what} ({path}); choose another output path")
