"""The sextuple record: what one stored preference pair holds, and the checks every record passes.

A record is a plain dict, the unit that pair generation and `import_pairs` write and that the loader reads:

    prompt                str
    prompt_embeds         float32 [T, D_t5]   T5 sequence embedding
    pooled_prompt_embeds  float32 [D_clip]    CLIP pooled embedding
    x0_w, x0_l            float32 [I, C]      winner / loser clean latents, packed as the transformer consumes them
    x1_w, x1_l            float32 [I, C]      winner / loser prior noises (t = 1); only in datasets with has_noise
    reward_w, reward_l    float32             reward_w >= reward_l
    reward_gap            float32             reward_w - reward_l
    model_id              str                 generating model ("" when unknown)
    seed_w, seed_l        int64               sampler seeds of winner / loser (-1 when unknown)
    steps                 int64               sampler steps (0 when unknown)
    guidance              float32             guidance scale (0 when unknown)
    height, width         int64               image size in pixels: (height/16) * (width/16) = I

The dataset declares one `SextupleSpec` (shapes and whether noises are stored); every record is checked
against it when written and again when read, so a bad pair fails loudly with its file, index and field
instead of turning into a NaN loss a thousand steps later.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from pnapo_jax.data.batch import NOISE_KEYS, NOISE_MODES
from pnapo_jax.errors import UserError

ARRAY_DTYPE = np.dtype(np.float32)
TEXT_FIELDS = ("prompt", "model_id")
FLOAT_FIELDS = ("reward_w", "reward_l", "reward_gap", "guidance")
INT_FIELDS = ("seed_w", "seed_l", "steps", "height", "width")
ON_BAD_RECORD = ("raise", "skip")
FLUX_PATCH_PIXELS = 16  # VAE downsample 8 x 2x2 packing: one FLUX image token covers 16x16 pixels


class RecordError(UserError, ValueError):
    """A record that breaks the dataset's spec; the message is one line: where, which record, which field, what."""

    def __init__(self, path: str, index: int | None, field: str | None, problem: str):
        self.path, self.index, self.field, self.problem = path, index, field, problem
        where = "all records" if index is None else f"record {index}"
        what = "" if field is None else f" field {field!r}:"  # None: the record as a whole (unreadable bytes)
        super().__init__(f"{path}: {where}:{what} {problem}")

    def __reduce__(self):  # rebuilt from its parts when it crosses a grain worker boundary
        return RecordError, (self.path, self.index, self.field, self.problem)


@dataclasses.dataclass(frozen=True)
class SextupleSpec:
    """What every record of one dataset holds: the array shapes and whether prior noises are stored."""

    image_tokens: int  # I: (height/16) * (width/16), 4096 at 1024x1024
    channels: int  # C: 64 for FLUX (16 VAE channels packed 2x2)
    text_len: int  # T: T5 sequence length (512 for FLUX.1-dev)
    text_dim: int  # D_t5: T5 width (4096)
    pooled_dim: int  # D_clip: CLIP pooled width (768)
    has_noise: bool = True  # False for imported preference data: only noise_mode="independent" can train on it
    patch_pixels: int = FLUX_PATCH_PIXELS  # image pixels per token side (2 in the pixel-space demo world)

    def array_shapes(self) -> dict[str, tuple[int, ...]]:
        """The stored float32 arrays and their shapes, noises included when the dataset has them."""
        latent_IxC = (self.image_tokens, self.channels)
        shapes = {
            "prompt_embeds": (self.text_len, self.text_dim),
            "pooled_prompt_embeds": (self.pooled_dim,),
            "x0_w": latent_IxC,
            "x0_l": latent_IxC,
        }
        if self.has_noise:
            shapes.update({name: latent_IxC for name in NOISE_KEYS})
        return shapes


def check_noise_mode(spec: SextupleSpec, noise_mode: str) -> None:
    """Refuses a training noise mode the dataset cannot serve (recorded noise needs stored noises)."""
    if noise_mode not in NOISE_MODES:
        raise UserError(f"noise_mode={noise_mode!r}; expected one of {NOISE_MODES}")
    if noise_mode == "recorded" and not spec.has_noise:
        raise UserError(
            "noise_mode='recorded' needs the prior noises x1_w/x1_l, but this dataset was written without them "
            "(e.g. imported preference pairs); train it with noise_mode='independent' (the Diffusion-DPO baseline)."
        )


class BadRecords:
    """The `on_bad_record` policy: "raise" stops at the first bad record, "skip" logs it and counts it."""

    def __init__(self, on_bad_record: str):
        if on_bad_record not in ON_BAD_RECORD:
            raise UserError(f"on_bad_record={on_bad_record!r}; expected one of {ON_BAD_RECORD}")
        self.on_bad_record, self.skipped = on_bad_record, 0

    def handle(self, error: RecordError) -> None:
        if self.on_bad_record == "raise":
            raise error
        self.skipped += 1
        logging.warning("skipped bad record: %s", error)


def validate_record(record: Mapping[str, Any], spec: SextupleSpec, path: str, index: int) -> None:
    """Raises RecordError for the first field of `record` that breaks `spec`; `path`/`index` only name it."""

    def fail(field: str, problem: str):
        raise RecordError(path, index, field, problem)

    if not spec.has_noise:
        for name in NOISE_KEYS:
            if record.get(name) is not None:
                fail(name, "noise given but the dataset is declared without noises (has_noise=False)")
    for name, shape in spec.array_shapes().items():
        value = record.get(name)
        if value is None:
            fail(name, "missing prior noise" if name in NOISE_KEYS else "missing")
        if not isinstance(value, np.ndarray):
            fail(name, f"expected a numpy array, got {type(value).__name__}")
        if value.dtype != ARRAY_DTYPE:
            fail(name, f"dtype {value.dtype}, declared {ARRAY_DTYPE}")
        if value.shape != shape:
            fail(name, f"shape {value.shape}, declared {shape}")
        if not np.isfinite(value).all():
            fail(name, f"{np.size(value) - np.isfinite(value).sum()} non-finite values (NaN/Inf)")
    for name in TEXT_FIELDS:
        if not isinstance(record.get(name), str):
            fail(name, f"expected str, got {type(record.get(name)).__name__}")
    for name in INT_FIELDS:
        if not isinstance(record.get(name), int | np.integer):
            fail(name, f"expected an integer, got {type(record.get(name)).__name__}")
    for name in FLOAT_FIELDS:
        value = record.get(name)
        if not isinstance(value, float | int | np.floating | np.integer) or not np.isfinite(value):
            fail(name, f"expected a finite number, got {value!r}")
    reward_w, reward_l = np.float32(record["reward_w"]), np.float32(record["reward_l"])
    if reward_w < reward_l:
        fail("reward_w", f"winner reward {reward_w} below loser reward {reward_l}")
    if not np.isclose(np.float32(record["reward_gap"]), reward_w - reward_l, rtol=1e-5, atol=1e-6):
        fail("reward_gap", f"{record['reward_gap']} != reward_w - reward_l = {reward_w - reward_l}")
    height, width = record["height"], record["width"]
    patch = spec.patch_pixels
    tokens = (height // patch) * (width // patch)
    if height % patch or width % patch or tokens != spec.image_tokens:
        fail("height", f"{height}x{width} pixels is not {spec.image_tokens} tokens of {patch}x{patch}")
