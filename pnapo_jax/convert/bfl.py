"""Black Forest Labs single-file checkpoints (`flux1-dev.safetensors`) <-> our params.

A BFL tensor is one or more diffusers tensors concatenated on the output axis (`keys.diffusers_to_bfl`),
so loading splits each BFL tensor into diffusers tensors and feeds the diffusers assembler.
"""

import collections
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from pnapo_jax.convert import files, keys, layout
from pnapo_jax.errors import UserError
from pnapo_jax.models import flux


def _fused(lay: layout.Layout) -> dict[str, list[str]]:
    """BFL key -> the diffusers keys concatenated (in order, on axis 0) into it."""
    parts: dict[str, dict[int, str]] = collections.defaultdict(dict)
    for key in lay.entries:
        bfl_key, position = keys.diffusers_to_bfl(key)
        parts[bfl_key][position] = key
    return {bfl_key: [by_pos[p] for p in sorted(by_pos)] for bfl_key, by_pos in parts.items()}


def _swap_halves_if_needed(bfl_key: str, x: np.ndarray) -> np.ndarray:
    """(shift, scale) <-> (scale, shift) for the final modulation; its own inverse."""
    if bfl_key.rsplit(".", 1)[0] != keys.BFL_SHIFT_SCALE_MODULE:
        return x
    half = x.shape[0] // 2
    return np.concatenate([x[half:], x[:half]])


def load_bfl_transformer(file: str | os.PathLike, config: flux.FluxConfig, dtype: Any = None,
                         shardings: Any = None) -> dict[str, Any]:
    """Our params (scanned if `config.scan_layers`) from a BFL file; `dtype` defaults to config.param_dtype."""
    file = str(file)
    if not os.path.isfile(file):
        raise UserError(f"BFL checkpoint {file} not found")
    lay = layout.layout(config, scanned=config.scan_layers)
    fused = _fused(lay)
    with files.open_safetensors(file) as f:
        layout.check_keys(fused, dict.fromkeys(f.keys(), file), file)

        def diffusers_tensors() -> Iterator[tuple[str, np.ndarray, str]]:
            for bfl_key in sorted(f.keys(), key=layout.by_leaf):
                names = fused[bfl_key]
                rows = [lay.entries[k].shape[0] for k in names]
                x = f.get_tensor(bfl_key)
                files.check_finite(bfl_key, file, x)
                layout.check_shape(bfl_key, file, (sum(rows), *lay.entries[names[0]].shape[1:]), x.shape)
                x = _swap_halves_if_needed(bfl_key, x)
                for name, part in zip(names, np.split(x, np.cumsum(rows)[:-1]), strict=True):
                    yield name, part, file

        return layout.assemble(lay, diffusers_tensors(), config.param_dtype if dtype is None else dtype, shardings)


def save_bfl_transformer(config: flux.FluxConfig, params: Any, file: str | os.PathLike) -> None:
    """Write our params (scanned or per-layer) as one file in BFL's layout, as `from_single_file` reads it."""
    lay, flat = layout.export_layout(config, params)
    tensors = {bfl_key: _swap_halves_if_needed(
        bfl_key, np.concatenate([layout.tensor(flat, lay.entries[k]) for k in names]))
        for bfl_key, names in _fused(lay).items()}
    files.write_safetensors(tensors, file)
