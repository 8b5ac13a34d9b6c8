"""SD3 / SD3.5 pipeline pieces against diffusers' StableDiffusion3Pipeline (torch, CPU, fp32) on tiny random
components saved with save_pretrained: prompt encoding, the static-shift schedule, and sampling."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is local files; never reach for the hub

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from sd3_testing import max_rel_err, tiny_sd3_pipeline

from pnapo_jax import flow, sd3_text

PROMPTS = ["a photo of a cat", "the red dog under the blue sky on a tiny model photo of the cat"]


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    """(the torch pipeline, its saved folder)."""
    pipe = tiny_sd3_pipeline()
    folder = tmp_path_factory.mktemp("sd3") / "pipeline"
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.mark.parametrize("max_sequence_length", [7, 20])
def test_encoding_matches_encode_prompt(sd3_folder, max_sequence_length):
    """Prompts and negative prompts (the second prompt is cut by the shorter T5 length), 1e-5 of the scale."""
    pipe, folder = sd3_folder
    encoders = sd3_text.load_text_encoders(folder)
    negatives = ["", "dog"]
    with torch.no_grad():
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=True, negative_prompt=negatives,
            max_sequence_length=max_sequence_length)
    ours = sd3_text.encode_prompts(PROMPTS, encoders, max_sequence_length=max_sequence_length)
    ours_neg = sd3_text.encode_prompts(negatives, encoders, max_sequence_length=max_sequence_length)
    assert ours[0].shape == embeds.shape == (2, 77 + max_sequence_length, encoders.text_dim)
    assert ours[1].shape == pooled.shape == (2, encoders.pooled_dim)
    for got, ref in zip([*ours, *ours_neg], [embeds, pooled, neg_embeds, neg_pooled], strict=True):
        assert max_rel_err(got, ref.numpy()) <= 1e-5
    # The CLIP part is padded with zeros to T5's width; the T5 part is not.
    assert not np.asarray(ours[0][:, :77, 16 + 24:]).any() and np.asarray(ours[0][:, 77:, 40:]).any()


@pytest.mark.parametrize("num_steps", [1, 4, 28, 50])
@pytest.mark.parametrize("scheduler", [dict(shift=3.0), dict(shift=1.0), dict(shift=5.5, num_train_timesteps=500),
                                       dict(use_dynamic_shifting=True, mu=0.8)])
def test_default_sigmas_match_set_timesteps(num_steps, scheduler):
    """SD3's schedule: the pipeline passes no sigmas, so they start from the scheduler's shifted training range."""
    scheduler = dict(scheduler)
    mu = scheduler.pop("mu", None)
    ref = FlowMatchEulerDiscreteScheduler(**scheduler)
    ref.set_timesteps(num_steps, mu=mu)
    ours = flow.default_sigmas(num_steps, scheduler.get("shift", 1.0), mu, scheduler.get("num_train_timesteps", 1000))
    assert ours.dtype == np.float32 and ours.shape == (num_steps + 1,)
    np.testing.assert_allclose(ours, ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours[:-1] * ref.config.num_train_timesteps, ref.timesteps.numpy(), rtol=1e-6)
    if scheduler.get("shift", 1.0) != 1.0 and num_steps > 1:  # not FLUX's schedule: its last step is not 1/n shifted
        assert not np.allclose(ours, flow.flux_sigmas(num_steps, 0, np.log(scheduler["shift"])), atol=1e-5)
