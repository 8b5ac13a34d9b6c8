"""The reference-error cache: with recorded noise and t on a fixed grid, the frozen reference's velocity errors
depend only on (record, grid point), so one pass over the dataset computes them all and the train step skips the
reference forward (3 model passes a step instead of 4: policy forward and backward, no reference).

    config.pnapo.ref_cache = True, config.pnapo.noise_mode = "recorded", config.t_sampling.kind = "grid"

Stored in config.pnapo.ref_cache_dir (default WORKDIR/ref_cache): meta.json (what the errors were computed for)
and errors_<first record>.npy, float32 [records, G, 2] (winner, loser) per chunk of CHUNK_RECORDS records, each
written whole under a temporary name first, so an interrupted pass resumes at its first missing chunk. A cache
made for other data, weights, grid or guidance is refused, never overwritten. One host only, for now.
"""

import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from pnapo_jax import objective, reference
from pnapo_jax.backbones import record_conditioning
from pnapo_jax.convert import files
from pnapo_jax.data.batch import LATENT_KEYS, NOISE_KEYS, REF_CACHE_KEYS, TEXT_KEYS
from pnapo_jax.data.schema import RecordError
from pnapo_jax.errors import UserError
from pnapo_jax.setup import Setup
from pnapo_jax.step import grid_t, reference_velocity, with_rules

CHUNK_RECORDS = 512


def folder(config: ml_collections.ConfigDict, workdir: str | epath.Path) -> epath.Path:
    return epath.Path(config.pnapo.ref_cache_dir or epath.Path(workdir) / "ref_cache")


def _meta(config: ml_collections.ConfigDict, data: str, num_records: int, t_G: np.ndarray) -> dict[str, Any]:
    """Everything the cached errors depend on: the records, the reference weights, its inputs' t and guidance.
    The weights by content (reference.fingerprint), not path: a copy elsewhere, e.g. the embedded base in
    another install, reuses the cache."""
    m = config.model
    weights = {k: v for k, v in reference.fingerprint(m).items() if k != "source"}
    return {"data": data or f"synthetic (num {config.data.synthetic_num}, seed {config.seed})",
            "records": num_records, "grid_t": [round(float(t), 7) for t in t_G], "guidance": config.pnapo.guidance,
            "weights": weights, "random_init_seed": None if m.pretrained else config.seed,
            "reference_dtype": m.reference_dtype,
            "model": {k: v for k, v in json.loads(m.to_json_best_effort()).items() if k != "pretrained"}}


def _errors_fn(setup: Setup, guidance: float) -> Callable:
    """jitted (reference params, batch of records [b], t) -> their errors [b, 2] (winner, loser) at t."""
    velocity = reference_velocity(setup)

    def errors(params: Any, batch: dict[str, jax.Array], t: jax.Array) -> jax.Array:
        t_B = jnp.full(batch["x0_w"].shape[:1], t, jnp.float32)
        pair = objective.make_pair_inputs(batch, t_B, None, "recorded")
        cond = record_conditioning(setup.backbone, batch, guidance)
        return jnp.stack(objective.velocity_errors(velocity, params, *objective.stacked_inputs(pair, t_B, cond)),
                         axis=-1)

    return with_rules(setup, jax.jit(errors))


def compute(setup: Setup, frozen: Any, source: Any, start: int, stop: int, t_G: np.ndarray,
            batch_size: int) -> np.ndarray:
    """[stop - start, G, 2] the reference's errors of records start..stop at every grid t; NaN rows for bad
    records when config.data.on_bad_record is "skip" (the loader drops those records anyway)."""
    errors = _errors_fn(setup, setup.config.pnapo.guidance)
    params = frozen[setup.frozen_key]
    keys = LATENT_KEYS + NOISE_KEYS + TEXT_KEYS
    out = np.full((stop - start, len(t_G), 2), np.nan, np.float32)
    for lo in range(start, stop, batch_size):
        rows, records = [], []
        for i in range(lo, min(lo + batch_size, stop)):
            try:
                records.append(source[i])
            except RecordError:
                if setup.config.data.on_bad_record != "skip":
                    raise
                continue
            rows.append(i - start)
        if not rows:
            continue
        records += records[-1:] * (batch_size - len(records))  # one batch shape: one compile
        batch = {k: np.stack([np.asarray(r[k], np.float32) for r in records]) for k in keys}
        for j, t in enumerate(t_G):
            out[rows, j] = np.asarray(errors(params, batch, jnp.float32(t)))[: len(rows)]
    return out


def load_or_build(config: ml_collections.ConfigDict, setup: Setup, frozen: Any, source: Any, data: str,
                  workdir: str | epath.Path, say: Callable[[str], None] = print) -> dict[str, np.ndarray]:
    """{ref_err_w, ref_err_l: [records, G]} for the train loader, from the cache (computing what is missing)."""
    if jax.process_count() > 1:
        raise UserError("config.pnapo.ref_cache builds its cache on one host; this run has "
                        f"{jax.process_count()}: build it with a one-host run first (same config.pnapo.ref_cache_dir)")
    where = folder(config, workdir)
    t_G = np.asarray(jax.device_get(grid_t(setup)))
    meta = _meta(config, data, len(source), t_G)
    meta_file = where / "meta.json"
    if meta_file.exists():
        old = files.read_json(meta_file)
        if old != meta:
            changed = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise UserError(f"{where} holds reference errors for another setup (differs in {', '.join(changed)}); "
                            "set config.pnapo.ref_cache_dir to a new folder or delete that one")
    else:
        where.mkdir(parents=True, exist_ok=True)
        meta_file.write_text(json.dumps(meta, indent=1))
    chunks = []
    for start in range(0, len(source), CHUNK_RECORDS):
        stop = min(start + CHUNK_RECORDS, len(source))
        path = where / f"errors_{start:09d}.npy"
        if not path.exists():
            say(f"reference-error cache: records {start}..{stop - 1} of {len(source)} at {len(t_G)} t")
            chunk = compute(setup, frozen, source, start, stop, t_G, config.train.global_batch_size)
            tmp = where / f"{path.name}.tmp"
            with tmp.open("wb") as f:
                np.save(f, chunk)
            tmp.rename(path)
        with path.open("rb") as f:
            chunk = np.load(f, allow_pickle=False)
        if chunk.shape != (stop - start, len(t_G), 2):
            raise UserError(f"{path}: shape {chunk.shape}, expected {(stop - start, len(t_G), 2)}")
        chunks.append(chunk)
    errors = np.concatenate(chunks)
    return dict(zip(REF_CACHE_KEYS, (errors[..., 0], errors[..., 1]), strict=True))
