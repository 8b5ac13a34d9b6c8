"""Records held in memory, and random but valid ones so the trainer and its tests run before real data exists."""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pnapo_jax.data.schema import FLUX_PATCH_PIXELS, SextupleSpec, validate_record


class InMemorySource:
    """Records already in memory (synthetic data, tests), checked against `spec` as they are read."""

    def __init__(self, records: Sequence[Mapping[str, Any]], spec: SextupleSpec, name: str = "in-memory"):
        self.records, self.spec, self._name = records, spec, name

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Mapping[str, Any]:
        record = self.records[index]
        validate_record(record, self.spec, self._name, index)
        return record


def synthetic_pairs(
    num: int,
    image_tokens: int,
    channels: int,
    text_len: int,
    text_dim: int,
    pooled_dim: int,
    seed: int,
    with_noise: bool = True,
) -> InMemorySource:
    """`num` records of Gaussian arrays and ordered uniform rewards; deterministic in `seed`."""
    spec = SextupleSpec(image_tokens, channels, text_len, text_dim, pooled_dim, has_noise=with_noise)
    rows = max(d for d in range(1, math.isqrt(image_tokens) + 1) if image_tokens % d == 0)  # squarest token grid
    rng = np.random.default_rng(seed)
    records = []
    for index in range(num):
        record = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in spec.array_shapes().items()}
        reward_l, reward_w = np.sort(rng.uniform(size=2).astype(np.float32))
        seed_w, seed_l = (int(s) for s in rng.integers(0, 2**31, size=2))
        record |= dict(
            prompt=f"synthetic prompt {index}",
            reward_w=reward_w,
            reward_l=reward_l,
            reward_gap=reward_w - reward_l,
            model_id="synthetic",
            seed_w=seed_w,
            seed_l=seed_l,
            steps=28,
            guidance=np.float32(3.5),
            height=FLUX_PATCH_PIXELS * rows,
            width=FLUX_PATCH_PIXELS * (image_tokens // rows),
        )
        records.append(record)
    return InMemorySource(records, spec, name=f"synthetic_pairs(seed={seed})")
