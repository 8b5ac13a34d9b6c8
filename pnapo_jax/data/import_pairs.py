"""Imports preference pairs that kept no prior noises (Pick-a-Pic style) into the sextuple format.

The dataset is written with has_noise=False, so it trains only with noise_mode="independent" (the
Diffusion-DPO / Flow-DPO baseline); recorded-noise training refuses it.

Manifest: JSON lines, one pair per row; file paths are relative to the manifest's directory:

    {"caption": "a red fox", "latent_0": "0/a.npy", "jpg_1": "0/b.jpg",
     "prompt_embeds": "0/t5.npy", "pooled_prompt_embeds": "0/clip.npy", "label_0": 1}

  latent_0, latent_1     float32 [I, C] latents of image 0 / 1, packed as the transformer consumes them
                         (VAE latent, (x - shift) * scale, 2x2 patches: [16, h/8, w/8] -> [(h/16)(w/16), 64])
  jpg_0, jpg_1           or instead image files (JPEG, PNG, anything PIL reads; Pick-a-Pic's column names),
                         encoded once here with --vae: resized to cover height x width and centre-cropped
                         (bicubic), scaled to [-1, 1], encoded to the posterior mean and packed as above
  prompt_embeds          float32 [T, D_t5]; pooled_prompt_embeds float32 [D_clip]
  label_0                as Pick-a-Pic: 1 image 0 preferred, 0 image 1 preferred, 0.5 tie (skipped, counted)
  model_id               optional

Preference labels carry no reward scale: winner 1, loser 0, gap 1. The dataset's array shapes come from the
first non-tie row that loads. Errors name the manifest and the row (0-based, blank lines not counted); a row
that is not a JSON object, misses a field or names a file that does not load is a bad row (--on_bad_record).
.npy files load with allow_pickle=False: nothing is unpickled.
"""

import functools
import itertools
import json
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from absl import flags
from PIL import Image, ImageOps

from pnapo_jax import cli
from pnapo_jax.convert.vae import load_vae
from pnapo_jax.data.builder import write_dataset
from pnapo_jax.data.schema import (
    FLUX_PATCH_PIXELS,
    ON_BAD_RECORD,
    BadRecords,
    RecordError,
    SextupleSpec,
    validate_record,
)
from pnapo_jax.errors import UserError
from pnapo_jax.models import flux
from pnapo_jax.models import vae as vae_model

TIE = 0.5
ARRAY_RANKS = {"latent_0": 2, "latent_1": 2, "prompt_embeds": 2, "pooled_prompt_embeds": 1}


class ImportReport(NamedTuple):
    """What an import produced."""

    path: str  # the dataset directory to train from
    written: int
    ties: int
    skipped: int  # bad rows dropped with on_bad_record="skip"


def _file(row: dict[str, Any], field: str, base: str, manifest: str, index: int) -> str:
    """The path a row's field names, relative to the manifest's directory."""
    if field not in row:
        raise RecordError(manifest, index, field, "missing")
    if not isinstance(row[field], str):
        raise RecordError(manifest, index, field, f"expected a file path (a string), got {row[field]!r}")
    return os.path.join(base, row[field])


def _load_array(row: dict[str, Any], field: str, base: str, manifest: str, index: int) -> np.ndarray:
    """One .npy of a row, float32 where that is lossless; a missing or unreadable file is a RecordError."""
    path = _file(row, field, base, manifest, index)
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise RecordError(manifest, index, field, f"cannot load {path}: {error}") from None
    if array.ndim != ARRAY_RANKS[field]:
        raise RecordError(manifest, index, field, f"{path} has shape {array.shape}, expected rank {ARRAY_RANKS[field]}")
    return array.astype(np.float32) if np.can_cast(array.dtype, np.float32, "safe") else array


def read_manifest(manifest: str) -> list[dict[str, Any] | RecordError]:
    """The rows of a JSON-lines manifest, blank lines left out; a line that is not a JSON object is kept as
    its RecordError, for the bad-row policy to raise or skip."""
    try:
        with open(manifest, "rb") as f:
            lines = [line for line in f if line.strip()]
    except OSError as error:
        raise UserError(f"{manifest}: cannot read the manifest ({error.strerror})") from None
    rows = []
    for index, line in enumerate(lines):
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as error:
            row = RecordError(manifest, index, None, f"invalid UTF-8 at byte {error.start} of the line")
        except json.JSONDecodeError as error:
            row = RecordError(manifest, index, None, f"not a JSON line ({error})")
        if not isinstance(row, dict | RecordError):
            row = RecordError(manifest, index, None, f"expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _label(row: dict[str, Any] | RecordError) -> Any:
    return None if isinstance(row, RecordError) else row.get("label_0")


class ImageEncoder:
    """Image files -> packed latents [I, C] with a diffusers VAE folder, compiled once for the dataset's size."""

    def __init__(self, vae_dir: str, height: int, width: int):
        self.cfg, self.params = load_vae(vae_dir)
        self.patch_pixels = 2 * self.cfg.downsample_factor  # one packed token covers this many pixels a side
        if height % self.patch_pixels or width % self.patch_pixels:
            raise UserError(f"--height/--width must be multiples of {self.patch_pixels}, got {height}x{width}")
        self.size = (width, height)

    def __call__(self, path: str) -> np.ndarray:
        with Image.open(path) as image:
            pixels = np.asarray(ImageOps.fit(image.convert("RGB"), self.size, Image.Resampling.BICUBIC))
        x = jnp.asarray(pixels.transpose(2, 0, 1)[None], jnp.float32) / 127.5 - 1
        return np.asarray(flux.pack_latents(vae_model.encode(self.params, self.cfg, x))[0])


def _load_latent(
    row: dict[str, Any], k: int, base: str, manifest: str, index: int, encode: ImageEncoder | None
) -> np.ndarray:
    """Image k's latent: its .npy, or its image file VAE-encoded."""
    field, image_field = f"latent_{k}", f"jpg_{k}"
    if field in row:
        return _load_array(row, field, base, manifest, index)
    if image_field not in row:
        raise RecordError(manifest, index, field, f"missing: give it (.npy) or {image_field} (an image file)")
    if encode is None:
        raise RecordError(
            manifest, index, field, f"missing; images need VAE encoding: pass --vae to encode {image_field}"
        )
    path = _file(row, image_field, base, manifest, index)
    try:
        return encode(path)
    except OSError as error:  # missing, unreadable or not an image
        raise RecordError(manifest, index, image_field, f"cannot load {path}: {error}") from None


def _pair_record(
    row: dict[str, Any], base: str, manifest: str, index: int, height: int, width: int, encode: ImageEncoder | None
) -> dict:
    """A non-tie manifest row -> an unvalidated record without noises."""
    caption = row.get("caption")
    if not isinstance(caption, str):
        raise RecordError(manifest, index, "caption", f"expected the prompt text (a string), got {caption!r}")
    label = row.get("label_0")
    if label not in (0, 1):
        raise RecordError(manifest, index, "label_0", f"{label!r} is not 0, 0.5 or 1")
    winner = 0 if label == 1 else 1
    load = lambda field: _load_array(row, field, base, manifest, index)
    latent = lambda k: _load_latent(row, k, base, manifest, index, encode)
    return dict(
        prompt=row.get("caption"),
        prompt_embeds=load("prompt_embeds"),
        pooled_prompt_embeds=load("pooled_prompt_embeds"),
        x0_w=latent(winner),
        x0_l=latent(1 - winner),
        reward_w=np.float32(1),
        reward_l=np.float32(0),
        reward_gap=np.float32(1),
        model_id=str(row.get("model_id", "")),
        seed_w=-1,
        seed_l=-1,
        steps=0,
        guidance=np.float32(0),
        height=height,
        width=width,
    )


def import_manifest(
    manifest: str,
    data_dir: str,
    height: int = 1024,
    width: int = 1024,
    on_bad_record: str = "raise",
    vae: str | None = None,
) -> ImportReport:
    """Writes the pairs of a JSON-lines manifest under `data_dir` as a noise-free sextuple dataset; `vae` (a
    diffusers VAE folder, or a pipeline folder holding vae/) encodes the rows' image files."""
    base, bad_records = os.path.dirname(os.path.abspath(manifest)), BadRecords(on_bad_record)
    rows = read_manifest(manifest)
    encode = None if vae is None else ImageEncoder(vae, height, width)
    pairs = ((index, row) for index, row in enumerate(rows) if _label(row) != TIE)

    def pair_record(index: int, row: dict[str, Any] | RecordError) -> dict:
        if isinstance(row, RecordError):
            raise row
        return _pair_record(row, base, manifest, index, height, width, encode)

    for first_index, first_row in pairs:  # the first pair that loads declares the shapes
        try:
            first = pair_record(first_index, first_row)
            break
        except RecordError as error:
            bad_records.handle(error)
    else:
        raise UserError(f"{manifest}: no non-tie pairs to import ({bad_records.skipped} bad rows skipped)")
    spec = SextupleSpec(
        *first["x0_w"].shape,
        *first["prompt_embeds"].shape,
        *first["pooled_prompt_embeds"].shape,
        has_noise=False,
        patch_pixels=FLUX_PATCH_PIXELS if encode is None else encode.patch_pixels,
    )

    def records() -> Iterator[dict]:
        for index, row in itertools.chain([(first_index, first_row)], pairs):
            try:
                record = first if index == first_index else pair_record(index, row)
                validate_record(record, spec, manifest, index)
            except RecordError as error:
                bad_records.handle(error)
                continue
            yield record

    report = write_dataset(records(), spec, data_dir)
    ties = sum(_label(row) == TIE for row in rows)
    return ImportReport(report.path, report.written, ties, bad_records.skipped)


@functools.cache  # once per process: a second in-process call (a test's) keeps the first's definitions
def _define_flags() -> None:
    flags.DEFINE_string("input", None, "JSON-lines manifest (format above).", required=True)
    flags.DEFINE_string("out", None, "TFDS data_dir to write; the dataset lands in OUT/pnapo_pairs/1.0.0.",
                        required=True)
    flags.DEFINE_integer("height", 1024, "Image height in pixels of every pair.")
    flags.DEFINE_integer("width", 1024, "Image width in pixels of every pair.")
    flags.DEFINE_enum("on_bad_record", "raise", list(ON_BAD_RECORD), "Stop at, or drop and count, bad rows.")
    flags.DEFINE_string("vae", None, "Diffusers VAE folder (or pipeline folder) to encode the rows' image files.")


def _main(argv: list[str]) -> None:
    f = flags.FLAGS
    if f.vae is not None and not os.path.isdir(f.vae):
        raise UserError(f"--vae={f.vae} is not a folder (a diffusers VAE folder or a pipeline folder)")
    report = import_manifest(f.input, f.out, f.height, f.width, f.on_bad_record, f.vae)
    print(f"wrote {report.written} pairs to {report.path}; skipped {report.ties} ties and {report.skipped} bad rows")


def main(argv: list[str] | None = None) -> None:
    """The CLI; `argv`: the flags of an in-process call (default the command line's). Flags are defined here, not
    at import, so that importing this module beside other commands (--out, --input) does not clash."""
    _define_flags()
    cli.run(_main, argv)


if __name__ == "__main__":
    main()
