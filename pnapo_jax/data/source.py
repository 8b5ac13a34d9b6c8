"""Random-access record sources for the grain pipeline: a written dataset, or synthetic records in memory.

Each gives `len`, `source[i] -> record` (validated: a bad record raises RecordError naming its file, its
index there and the field) and `.spec`. Each pickles, so grain worker processes can read it.
"""

import dataclasses
import os
from collections.abc import Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from etils import epath
from google.protobuf import json_format

from pnapo_jax.data.builder import DATASET_NAME, SPLIT
from pnapo_jax.data.schema import RecordError, SextupleSpec, validate_record
from pnapo_jax.data.synthetic import InMemorySource, synthetic_pairs
from pnapo_jax.data.tfds_format import check_features_file, decode_record, spec_of
from pnapo_jax.errors import UserError


class ArrayRecordSource:
    """A dataset written by `write_dataset` (its version directory), read straight from its array_record files."""

    def __init__(self, path: str, split: str = SPLIT):
        check_version_dir(path)
        check_features_file(path)
        try:
            info = tfds.builder_from_directory(path).info
        except json_format.ParseError as error:
            raise UserError(f"{path}/dataset_info.json: unreadable ({error})") from None
        self.spec = spec_of(info, path)
        if split not in info.splits:
            raise UserError(f"{path}: no {split!r} split in dataset_info.json (it has {list(info.splits)})")
        split_info = info.splits[split]
        self._paths = [os.fspath(p) for p in split_info.filepaths]
        for file, declared in zip(self._paths, split_info.shard_lengths, strict=True):
            check_shard(file, declared)
        self._file_starts = np.cumsum([0, *split_info.shard_lengths])
        if not self._file_starts[-1]:
            raise UserError(f"{path}: the dataset holds no records")
        self._records = grain.sources.ArrayRecordDataSource(self._paths)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        file_index = int(np.searchsorted(self._file_starts, index, side="right")) - 1
        path, index_in_file = self._paths[file_index], int(index - self._file_starts[file_index])
        try:
            raw = self._records[index]
        except RuntimeError as error:  # riegeli: a corrupt chunk, e.g. a hash mismatch
            raise RecordError(path, index_in_file, None, f"unreadable ({error})") from None
        record = decode_record(raw, self.spec, path, index_in_file)
        validate_record(record, self.spec, path, index_in_file)
        return record


def check_version_dir(path: str) -> None:
    """Refuses a path that is not a dataset version directory, naming the version directories below it."""
    folder = epath.Path(path)  # local or gs://
    if (folder / "dataset_info.json").exists():
        return
    if not folder.is_dir():
        raise UserError(f"{path}: no such dataset directory")
    below = sorted({os.fspath(p.parent) for depth in ("*", "*/*", "*/*/*")
                    for p in folder.glob(f"{depth}/dataset_info.json")})
    if not below:
        raise UserError(f"{path}: not a dataset (no dataset_info.json in it or below it)")
    hint = f"use {below[0]}" if len(below) == 1 else f"use one of {below}"
    raise UserError(f"{path}: not a dataset version directory (no dataset_info.json); {hint}")


def check_shard(file: str, declared: int) -> None:
    """Refuses a missing, truncated or corrupt array_record file, or one of another length than declared."""
    if not epath.Path(file).exists():
        raise UserError(f"{file}: missing (dataset_info.json declares it, with {declared} records)")
    found, problem = None, "no index at the file's end"
    try:  # riegeli reads the index at the file's end; a failure shows as not ok() and raises on close()
        reader = array_record_module.ArrayRecordReader(file)
        found = reader.num_records() if reader.ok() else None
        reader.close()
    except RuntimeError as error:
        found, problem = None, str(error).splitlines()[0] if str(error) else problem
    if found is None:
        raise UserError(f"{file}: unreadable array_record file, truncated or corrupt ({problem})")
    if found != declared:
        raise UserError(f"{file}: {found} records, dataset_info.json declares {declared}")


class ConcatSource:
    """Several written datasets of one spec read as one, in order (pair generation writes one per chunk)."""

    def __init__(self, sources: Sequence[ArrayRecordSource]):
        specs = {source.spec for source in sources}
        if len(specs) != 1:
            raise UserError(f"datasets of different specs cannot be read as one: {sorted(map(str, specs))}")
        self.sources, self.spec = list(sources), specs.pop()
        self._starts = np.cumsum([0, *map(len, self.sources)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> dict:
        which = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.sources[which][int(index - self._starts[which])]


CHUNK_GLOB = "chunk_[0-9]*"  # finished chunks of a `python -m pnapo_jax.generate` output directory


def open_written(path: str) -> "ArrayRecordSource | ConcatSource":
    """A dataset version directory, or a generation output directory of finished chunks (read as one)."""
    chunks = sorted(epath.Path(path).glob(f"{CHUNK_GLOB}/{DATASET_NAME}/*"))
    if chunks:
        return ConcatSource([ArrayRecordSource(os.fspath(c)) for c in chunks])
    return ArrayRecordSource(path)


PairSource = ArrayRecordSource | InMemorySource | ConcatSource


def open_source(kind: str, path: str, expected: SextupleSpec, synthetic_num: int = 256, seed: int = 0) -> PairSource:
    """The source a config names: "array_record" (the dataset at `path`, refused unless its shapes are those of
    `expected`) or "synthetic" (`synthetic_num` random pairs with noises, of `expected`'s shapes)."""
    shapes = {f.name: getattr(expected, f.name) for f in dataclasses.fields(SextupleSpec)
              if f.name not in ("has_noise", "patch_pixels")}
    if kind == "synthetic":
        return synthetic_pairs(synthetic_num, **shapes, seed=seed)
    if kind != "array_record":
        raise UserError(f"data source {kind!r}; expected 'array_record' or 'synthetic'")
    source = open_written(path)
    for name, wanted in shapes.items():
        if getattr(source.spec, name) != wanted:
            problem = f"the dataset declares {getattr(source.spec, name)}, the model config needs {wanted}"
            raise RecordError(path, None, name, problem)
    return source
