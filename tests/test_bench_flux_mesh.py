"""The benchmark's FLUX sampling sharded over the mesh's data axis (the suite's 8 fake CPU devices): the same
images as the one-device `sample_images` from the same noises, for a batch that divides the device count and for
ones that do not (padded with copies of the last row, which are dropped)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import jax
import numpy as np
import pytest
from flux_testing import tiny_flux_pipeline
from test_flow import FLUX_SCHEDULER
from test_sample import OPTIONS

from pnapo_jax import flow, sample
from pnapo_jax.bench import sampling

SEED = 3
PROMPTS = ["a photo of a cat", "the tiny red dog under a blue sky", "an astronaut", "a bowl of soup", "a zebra",
           "two cups", "a red door", "snow", "a kite", "the sea", "a lamp"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux_mesh") / "pipe"
    tiny_flux_pipeline(FLUX_SCHEDULER).save_pretrained(folder)
    return sample.load_pipeline(folder)


def test_flux_sampling_is_sharded_over_the_devices_and_matches_one_device(pipeline, monkeypatch):
    assert jax.local_device_count() == 8  # tests/conftest.py's fake devices
    options = {k: OPTIONS[k] for k in ("height", "width", "num_steps", "guidance_scale", "max_sequence_length")}
    generate = sampling.PipelineGenerator(pipeline, SEED, options)
    seen = []
    euler = flow.euler_sample

    def spy(velocity, variables, noise, *args, **kwargs):
        seen.append((noise.shape[0], len(noise.sharding.device_set)))
        return euler(velocity, variables, noise, *args, **kwargs)

    monkeypatch.setattr(flow, "euler_sample", spy)
    got = {}
    for start, stop in ((0, 8), (8, 11), (0, 1)):  # a full batch, 3 rows padded to 8, a single row
        ids = np.arange(start, stop) * 2 + 1  # noise indices other than the rows' positions
        got[(start, stop)] = generate(PROMPTS[start:stop], ids)
        assert got[(start, stop)].shape == (stop - start, OPTIONS["height"], OPTIONS["width"], 3)
    assert seen == [(8, 8)] * 3, "each batch sampled as 8 rows sharded over the 8 devices"

    monkeypatch.setattr(flow, "euler_sample", euler)
    f = pipeline.vae.downsample_factor
    noise = np.asarray(flow.seeded_noise(SEED, np.arange(11) * 2 + 1, (16, OPTIONS["height"] // f,
                                                                          OPTIONS["width"] // f)))
    one_device = sample.sample_images(pipeline, PROMPTS, noise, **options)
    for (start, stop), images in got.items():
        np.testing.assert_allclose(images, one_device[start:stop], atol=2e-5)
