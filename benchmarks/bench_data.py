"""Records/s of the data path: write, raw array_record read, decode+validate, and the grain loader (batched).

    python benchmarks/bench_data.py [--flux_records=48] [--small_records=512] [--dir=/tmp/pnapo_bench_data]

Files are read right after being written, so they sit in the page cache: the figures are the CPU cost of
reading (array_record's zstd, protobuf, validation, batching), not disk or GCS bandwidth.
"""

import argparse
import glob
import math
import os
import shutil
import tempfile
import time

import grain
import tensorflow_datasets as tfds

from pnapo_jax.data.builder import write_dataset
from pnapo_jax.data.pipeline import LoaderConfig, make_loader
from pnapo_jax.data.source import ArrayRecordSource
from pnapo_jax.data.synthetic import synthetic_pairs

SIZES = {  # image_tokens, channels, text_len, text_dim, pooled_dim
    "flux_1024px": (4096, 64, 512, 4096, 768),  # FLUX.1-dev at 1024x1024: ~12.6 MB per record
    "small_256px": (256, 64, 64, 512, 768),  # a demo-sized record: ~0.4 MB
}
# What a train step consumes, for comparison. FLUX.1-dev: 12B parameters, 4096 image + 512 text tokens per
# image; per pair 2 images x (policy forward + backward + remat forward + reference forward) = 2 x 5 forwards
# of ~1.25e14 FLOP (2 * 12e9 * 4608 + attention) = 1.25e15 FLOP per pair. v5p-8: 1 host, 4 chips x 459 TFLOP/s.
FLOP_PER_PAIR, HOST_FLOPS, PAIRS_PER_STEP = 1.25e15, 4 * 459e12, 16


def _timed(fn, count: int) -> float:
    """Items per second of `fn()` producing `count` items."""
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


def _loader_rate(source, batch_size: int, workers: int, batches: int) -> float:
    cfg = LoaderConfig(global_batch_size=batch_size, seed=0, worker_count=workers, prefetch_records=2 * batch_size)
    loader = make_loader(source, cfg, "recorded", grain.sharding.NoSharding())
    next(loader)  # worker start-up and first reads are not throughput
    rate = _timed(lambda: [next(loader) for _ in range(batches)], batches * batch_size)
    loader.close()
    return rate


def bench(name: str, num: int, root: str, batch_size: int) -> list[tuple[str, str, float, float]]:
    dims = SIZES[name]
    spec = synthetic_pairs(1, *dims, seed=0).spec
    record_mb = sum(math.prod(shape) for shape in spec.array_shapes().values()) * 4 / 2**20
    records = (synthetic_pairs(1, *dims, seed=i).records[0] for i in range(num))  # streamed: FLUX sizes are big
    start = time.perf_counter()
    path = write_dataset(records, spec, os.path.join(root, name)).path
    rows = [(name, "write (incl. random generation)", num / (time.perf_counter() - start), record_mb)]
    raw = grain.sources.ArrayRecordDataSource(sorted(glob.glob(os.path.join(path, "*.array_record*"))))
    source = ArrayRecordSource(path)
    rows.append((name, "raw array_record read", _timed(lambda: [raw[i] for i in range(num)], num), record_mb))
    rows.append((name, "read + decode + validate", _timed(lambda: [source[i] for i in range(num)], num), record_mb))
    for workers in (0, 2):
        rate = _loader_rate(source, batch_size, workers, batches=max(2, 2 * num // batch_size))
        rows.append((name, f"loader, batch {batch_size}, worker_count={workers}", rate, record_mb))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flux_records", type=int, default=48)
    parser.add_argument("--small_records", type=int, default=512)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temporary one, removed after)")
    args = parser.parse_args()
    tfds.display_progress_bar(False)
    root = args.dir or tempfile.mkdtemp(prefix="pnapo_bench_data_")
    try:
        rows = bench("flux_1024px", args.flux_records, root, batch_size=8)
        rows += bench("small_256px", args.small_records, root, batch_size=32)
    finally:
        if args.dir is None:
            shutil.rmtree(root)
    print(f"\n{'record':<12} {'stage':<36} {'records/s':>10} {'MB/s':>8}")
    for name, stage, rate, record_mb in rows:
        print(f"{name:<12} {stage:<36} {rate:>10.1f} {rate * record_mb:>8.0f}")
    for mfu in (0.4, 1.0):
        step_s = PAIRS_PER_STEP * FLOP_PER_PAIR / (HOST_FLOPS * mfu)
        print(
            f"v5p-8 FLUX.1-dev step of {PAIRS_PER_STEP} pairs at {mfu:.0%} MFU: ~{step_s:.0f} s -> "
            f"{PAIRS_PER_STEP / step_s:.2f} records/s per host needed"
        )


if __name__ == "__main__":
    main()
