"""Writes sextuple records as a TFDS dataset of array_record files (no TensorFlow needed to write or read).

    report = write_dataset(records, spec, data_dir)            # -> data_dir/pnapo_pairs/1.0.0
    tfds.data_source("pnapo_pairs", data_dir=data_dir)["train"]  # plain TFDS read, decoded dicts
    ArrayRecordSource(report.path)                             # the training read, validated per record

Records keep their order (no TFDS shuffle): the loader shuffles, and a record's index stays meaningful in
error messages. Every record is validated before it is written.
"""

import contextlib
import io
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import tensorflow_datasets as tfds

from pnapo_jax.data.schema import BadRecords, RecordError, SextupleSpec, validate_record
from pnapo_jax.data.tfds_format import features_of, spec_metadata
from pnapo_jax.errors import UserError

SPLIT = "train"


DATASET_NAME = "pnapo_pairs"


class SextupleBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder over an iterable of records; unregistered, so readers never need this class or its spec."""

    name = DATASET_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "PNAPO sextuples: prompt embeddings, winner/loser latents and prior noises, rewards."}
    # Nothing is downloaded, so no checksums file sits by the code; and TFDS 4.9's code-path lookup for a
    # builder inside a package imports `importlib_resources`, which it does not declare on Python >= 3.9.
    code_path = None

    def __init__(self, *, spec: SextupleSpec, records: Iterable[Mapping[str, Any]], on_bad_record: str, **kwargs):
        self._spec, self.bad_records = spec, BadRecords(on_bad_record)
        super().__init__(file_format="array_record", **kwargs)
        self.final_dir = os.fspath(self.data_dir)  # data_dir points at a temporary directory while writing
        self.examples = self._valid(records)  # (index, record) of the valid records, read once by the write

    def _info(self) -> tfds.core.DatasetInfo:
        return _LocalDatasetInfo(
            builder=self,
            description=__doc__,
            features=features_of(self._spec),
            metadata=spec_metadata(self._spec),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the records are given
        return {SPLIT: self._generate_examples()}

    def _valid(self, records: Iterable[Mapping[str, Any]]) -> Iterator[tuple[int, Mapping[str, Any]]]:
        """(index, record) of the records that pass validation; the others raise or are skipped and counted."""
        for index, record in enumerate(records):
            try:
                validate_record(record, self._spec, self.final_dir, index)
            except RecordError as error:
                self.bad_records.handle(error)
                continue
            yield index, record

    def _generate_examples(self):
        names = features_of(self._spec).keys()
        for index, record in self.examples:
            yield index, {name: record[name] for name in names}


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """DatasetInfo that never looks for pre-computed info on GCS: TFDS's lookup makes an empty temporary
    directory in /tmp on every write (and returns, GCS being disabled) that nothing removes."""

    def initialize_from_bucket(self) -> None:
        pass


class DatasetExistsError(UserError, FileExistsError):
    """The dataset directory a write would create exists: nothing written is ever overwritten."""


class WriteReport(NamedTuple):
    """What a write produced."""

    path: str  # the dataset directory to read from: data_dir/pnapo_pairs/<version>
    written: int
    skipped: int


def write_dataset(
    records: Iterable[Mapping[str, Any]], spec: SextupleSpec, data_dir: str, on_bad_record: str = "raise"
) -> WriteReport:
    """Validates and writes `records` (streamed, any number) under `data_dir`; refuses to touch an existing one."""
    builder = SextupleBuilder(spec=spec, records=records, on_bad_record=on_bad_record, data_dir=data_dir)
    if os.path.exists(builder.final_dir):
        raise DatasetExistsError(f"{builder.final_dir} already holds a dataset; write to a new data_dir")
    first = next(builder.examples, None)  # TFDS fails on an empty split with an assertion, after making dirs
    if first is None:
        skipped = f" ({builder.bad_records.skipped} bad records skipped)" if builder.bad_records.skipped else ""
        raise UserError(f"{builder.final_dir}: no records to write{skipped}")
    builder.examples = itertools.chain([first], builder.examples)
    tfds.disable_progress_bar()  # callers show their own progress; TFDS's bars would interleave with it
    with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints "Downloading and preparing ..." per write
        builder.download_and_prepare()
    return WriteReport(builder.final_dir, builder.info.splits[SPLIT].num_examples, builder.bad_records.skipped)
