"""Original single-file checkpoints <-> our params: Black Forest Labs' (`flux1-dev.safetensors`) for FLUX, and,
through the same functions with another key map, Stability's for SD3 (`pnapo_jax.convert.sd3`).

A single-file tensor is one or more diffusers tensors concatenated on the output axis (`keys.diffusers_to_bfl`),
so loading splits each such tensor into diffusers tensors and feeds the diffusers assembler.
"""

import collections
import os
from collections.abc import Callable, Collection, Iterator
from typing import Any

import numpy as np

from pnapo_jax.convert import files, keys, layout
from pnapo_jax.errors import UserError
from pnapo_jax.models import flux

KeyMap = Callable[[str], tuple[str, int]]  # diffusers key -> (single-file key, position among the fused tensors)


def _fused(lay: layout.Layout, to_single: KeyMap) -> dict[str, list[str]]:
    """Single-file key -> the diffusers keys concatenated (in order, on axis 0) into it."""
    parts: dict[str, dict[int, str]] = collections.defaultdict(dict)
    for key in lay.entries:
        single_key, position = to_single(key)
        parts[single_key][position] = key
    return {single_key: [by_pos[p] for p in sorted(by_pos)] for single_key, by_pos in parts.items()}


def _swap_halves_if_needed(single_key: str, x: np.ndarray, swapped: Collection[str]) -> np.ndarray:
    """(shift, scale) <-> (scale, shift) for the modulations in `swapped`; its own inverse."""
    if single_key.rsplit(".", 1)[0] not in swapped:
        return x
    half = x.shape[0] // 2
    return np.concatenate([x[half:], x[:half]])


def load_single_file(file: str | os.PathLike, config: Any, to_single: KeyMap, swapped: Collection[str],
                     prefix: str = "", dtype: Any = None, shardings: Any = None) -> dict[str, Any]:
    """Our params (scanned if `config.scan_layers`) from a single file whose keys `to_single` maps, each optionally
    under `prefix`; the model's constant buffers (layout.buffers) are checked, not loaded."""
    file = str(file)
    if not os.path.isfile(file):
        raise UserError(f"single-file checkpoint {file} not found")
    lay = layout.layout(config, scanned=config.scan_layers)
    fused = _fused(lay, to_single)
    buffers = {to_single(k)[0]: x for k, x in layout.buffers(config).items()}
    with files.open_safetensors(file) as f:
        stored = {k.removeprefix(prefix): k for k in f.keys()}
        layout.check_backbone(type(config), file, None, stored)
        shapes = {single_key: (sum(lay.entries[k].shape[0] for k in names), *lay.entries[names[0]].shape[1:])
                  for single_key, names in fused.items()}
        shapes.update((key, x.shape) for key, x in buffers.items())
        layout.check_keys(shapes, {k: tuple(f.get_slice(name).get_shape()) for k, name in stored.items()}, file)
        for key, expected in buffers.items():
            layout.check_buffer(stored[key], file, expected, f.get_tensor(stored[key]))

        def diffusers_tensors() -> Iterator[tuple[str, np.ndarray, str]]:
            for single_key in sorted(fused, key=layout.by_leaf):
                names = fused[single_key]
                rows = [lay.entries[k].shape[0] for k in names]
                x = f.get_tensor(stored[single_key])
                files.check_finite(stored[single_key], file, x)
                x = _swap_halves_if_needed(single_key, x, swapped)
                for name, part in zip(names, np.split(x, np.cumsum(rows)[:-1]), strict=True):
                    yield name, part, file

        return layout.assemble(lay, diffusers_tensors(), config.param_dtype if dtype is None else dtype, shardings)


def save_single_file(config: Any, params: Any, file: str | os.PathLike, to_single: KeyMap,
                     swapped: Collection[str], prefix: str = "") -> None:
    """Write our params (scanned or per-layer) as one file in a single-file layout, buffers included."""
    lay, flat = layout.export_layout(config, params)
    tensors = {prefix + single_key: _swap_halves_if_needed(
        single_key, np.concatenate([layout.tensor(flat, lay.entries[k]) for k in names]), swapped)
        for single_key, names in _fused(lay, to_single).items()}
    tensors.update({prefix + to_single(k)[0]: x for k, x in layout.buffers(config).items()})
    files.write_safetensors(tensors, file)


def load_bfl_transformer(file: str | os.PathLike, config: flux.FluxConfig, dtype: Any = None,
                         shardings: Any = None) -> dict[str, Any]:
    """Our params (scanned if `config.scan_layers`) from a BFL file; `dtype` defaults to config.param_dtype."""
    return load_single_file(file, config, keys.diffusers_to_bfl, (keys.BFL_SHIFT_SCALE_MODULE,), dtype=dtype,
                            shardings=shardings)


def save_bfl_transformer(config: flux.FluxConfig, params: Any, file: str | os.PathLike) -> None:
    """Write our params (scanned or per-layer) as one file in BFL's layout, as `from_single_file` reads it."""
    save_single_file(config, params, file, keys.diffusers_to_bfl, (keys.BFL_SHIFT_SCALE_MODULE,))
