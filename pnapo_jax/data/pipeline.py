"""The grain input pipeline: record source -> host-local numpy batches -> global jax.Arrays on the mesh.

One global order of record indices, shuffle(seed), a new order each epoch, cut into global batches; per host:
its slice of every global batch -> read and check (in `worker_count` processes) -> raise on, or drop and count,
bad records (here, so the count is exact) -> batches of global_batch_size / hosts, keyed as in batch.py.
The global batch of a step is a function of (seed, step) alone, whatever the number of hosts: one host with 8
chips trains on the batches two hosts with 4 do, and a run can resume on another host count (`first_step`).
Saving the iterator state with the train checkpoint makes a resumed run read exactly the records the interrupted
one had not, bad records skipped included: pnapo_jax.checkpoint saves `grain.checkpoint.CheckpointSave(
loader.iterator)` / restores `CheckpointRestore(loader.iterator)` as one item of `ocp.args.Composite` (one JSON
file per process).
A state only fits a loader made with the same source, config, noise mode, host count and first_step.
"""

import dataclasses
from collections.abc import Mapping

import grain
import jax
import numpy as np
from absl import flags

from pnapo_jax.data.batch import BATCH_KEYS, NOISE_KEYS
from pnapo_jax.data.schema import BadRecords, RecordError, check_noise_mode
from pnapo_jax.data.source import PairSource
from pnapo_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """How the loader reads (from config.train.global_batch_size, config.seed and config.data)."""

    global_batch_size: int  # pairs per train step summed over all hosts
    seed: int = 0  # shuffle seed: with it, the batch of every step is fixed
    num_epochs: int | None = None  # None repeats forever, reshuffled each epoch
    worker_count: int = 0  # grain worker processes that read and check records; 0 reads in this process
    worker_buffer_size: int = 2  # records each worker keeps ready
    read_threads: int = 4  # threads reading records, per worker
    prefetch_records: int = 8  # records read ahead, per worker (a FLUX record is ~12 MB)
    on_bad_record: str = "raise"  # "raise" stops at the first bad record; "skip" drops, counts and logs it


def batch_keys(noise_mode: str) -> tuple[str, ...]:
    """The batch keys the train step gets: noises only in `recorded` mode, so every dataset batches alike."""
    return BATCH_KEYS if noise_mode == "recorded" else tuple(k for k in BATCH_KEYS if k not in NOISE_KEYS)


class _ReadPair:
    """index -> the batch-contract arrays of one record (with its rows of `per_record`), or the RecordError it
    raised (judged downstream)."""

    def __init__(self, source: PairSource, keys: tuple[str, ...], per_record: Mapping[str, np.ndarray] | None):
        self._source, self._keys, self._per_record = source, keys, dict(per_record or {})

    def __call__(self, index: int) -> dict[str, np.ndarray] | RecordError:
        try:
            record = self._source[index]
        except RecordError as error:
            return error
        return {**{key: np.asarray(record[key], np.float32) for key in self._keys},
                **{key: np.asarray(rows[index], np.float32) for key, rows in self._per_record.items()}}


class _BadRecordGate:
    """Applies the bad-record policy to the RecordErrors the readers pass on, here so `skipped` is exact; stops
    when `num_records` bad records come in a row (every record is bad: skipping would never yield a batch)."""

    def __init__(self, bad_records: BadRecords, num_records: int):
        self.bad_records, self.num_records, self.in_a_row = bad_records, num_records, 0

    def __call__(self, element: dict[str, np.ndarray] | RecordError) -> bool:
        if not isinstance(element, RecordError):
            self.in_a_row = 0
            return True
        self.bad_records.handle(element)
        self.in_a_row += 1
        if self.in_a_row >= self.num_records:
            raise UserError(f"all {self.num_records} records in a row were bad, the last: {element}")
        return False


class _CountedBatches(grain.DatasetIterator):
    """The batch iterator with the bad-record count in its state, so a resumed run's `skipped` goes on counting."""

    def __init__(self, parent: grain.DatasetIterator, bad_records: BadRecords):
        super().__init__(parent)
        self._bad_records = bad_records

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict:
        return {"batches": self._parent.get_state(), "skipped_records": self._bad_records.skipped}

    def set_state(self, state: dict) -> None:
        if "batches" not in state:  # saved before the count was part of the state
            self._parent.set_state(state)
            return
        self._parent.set_state(state["batches"])
        self._bad_records.skipped = int(state["skipped_records"])


@dataclasses.dataclass
class Loader:
    """Iterates host-local numpy batches {key: [B_host, ...]}; `skipped` counts dropped records since the run's
    first step (a restored iterator state carries the count)."""

    iterator: grain.DatasetIterator
    bad_records: BadRecords

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self.iterator)

    @property
    def skipped(self) -> int:
        return self.bad_records.skipped

    def close(self) -> None:
        """Stops the worker processes."""
        self.iterator.close()


class _HostSlice:
    """Position q in this host's stream -> the record index at row q % b of this host's slice of global batch
    first_step + q // b (b = global batch / hosts): hosts read disjoint records, together every global batch."""

    def __init__(self, order: grain.MapDataset, global_batch_size: int, shard: grain.sharding.ShardOptions,
                 first_step: int):
        self._order, self._global = order, global_batch_size
        self._host_batch = global_batch_size // shard.shard_count
        self._offset = first_step * global_batch_size + shard.shard_index * self._host_batch

    def __call__(self, q: int) -> int:
        step, row = divmod(q, self._host_batch)
        return self._order[self._offset + step * self._global + row]


def make_loader(
    source: PairSource,
    cfg: LoaderConfig,
    noise_mode: str,
    shard: grain.sharding.ShardOptions | None = None,
    first_step: int = 0,
    per_record: Mapping[str, np.ndarray] | None = None,
) -> Loader:
    """Host-local batches of `source` for `noise_mode` from global batch `first_step` on; `shard` defaults to one
    slice of each global batch per JAX process. Only whole global batches are read. `per_record` adds arrays
    [len(source), ...] row by record index (the reference-error cache)."""
    check_noise_mode(source.spec, noise_mode)
    for key, rows in (per_record or {}).items():
        if len(rows) != len(source):
            raise UserError(f"{key} has {len(rows)} rows for a source of {len(source)} records")
    bad_records = BadRecords(cfg.on_bad_record)
    shard = shard or grain.sharding.ShardByJaxProcess()
    if cfg.global_batch_size % shard.shard_count:
        raise UserError(f"global_batch_size={cfg.global_batch_size} does not split over {shard.shard_count} hosts")
    if not len(source):
        raise UserError("the record source is empty")
    order = grain.MapDataset.range(len(source)).shuffle(seed=cfg.seed).repeat(cfg.num_epochs)
    host_batch_size = cfg.global_batch_size // shard.shard_count
    host_records = max(len(order) // cfg.global_batch_size - first_step, 0) * host_batch_size
    records = (
        grain.MapDataset.range(host_records)
        .map(_HostSlice(order, cfg.global_batch_size, shard, first_step))
        .map(_ReadPair(source, batch_keys(noise_mode), per_record))
        .to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_records))
    )
    if cfg.worker_count:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a plain script never parsed them
            flags.FLAGS.mark_as_parsed()
        records = records.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size)
        )
    batches = records.filter(_BadRecordGate(bad_records, len(source))).batch(host_batch_size, drop_remainder=True)
    return Loader(_CountedBatches(iter(batches), bad_records), bad_records)


def global_batch(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Host-local batches -> global arrays, batch axis laid out by `sharding` (e.g. NamedSharding(mesh, P('data')))."""
    return {key: jax.make_array_from_process_local_data(sharding, value) for key, value in batch.items()}
