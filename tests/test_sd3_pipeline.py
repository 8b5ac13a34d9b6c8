"""SD3 / SD3.5 pipeline pieces against diffusers' StableDiffusion3Pipeline (torch, CPU, fp32) on tiny random
components saved with save_pretrained: prompt encoding, the static-shift schedule, and sampling."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is local files; never reach for the hub

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from flux_testing import randomize
from PIL import Image
from sd3_pipeline_testing import (
    T5_WIDTH,
    TRANSFORMER_TINY,
    StubTransformer,
    StubVelocity,
    max_rel_err,
    tiny_sd3_pipeline,
)

from pnapo_jax import flow, pipelines, sample, sd3_text
from pnapo_jax.convert.vae import load_vae
from pnapo_jax.errors import UserError

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


OPTIONS = dict(height=64, width=48, num_steps=4, max_sequence_length=12)  # 4 x 3 tokens of 2 x 2 latent pixels
NOISE_SHAPE = (len(PROMPTS), 16, 8, 6)


def _noise(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(NOISE_SHAPE).astype(np.float32)


def _diffusers(pipe, noise_BxCxHxW: np.ndarray, **kwargs) -> np.ndarray:
    """StableDiffusion3Pipeline's images [B, H, W, 3] in [0, 1] from the given noise."""
    o = OPTIONS
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(prompt=PROMPTS, latents=torch.from_numpy(noise_BxCxHxW), height=o["height"], width=o["width"],
                    num_inference_steps=o["num_steps"], max_sequence_length=o["max_sequence_length"],
                    output_type="np", **kwargs).images


def _assert_same_image(ours: np.ndarray, ref: np.ndarray, atol: float = 1e-4) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert np.mean((ref > 0) & (ref < 1)) > 0.5, "mostly saturated images would compare nothing"
    err = float(np.abs(ours - ref).max())
    assert err <= atol, f"max abs error {err:.3g} > {atol}"


@pytest.fixture(scope="module")
def stubbed(sd3_folder):
    """(diffusers' pipeline with a stand-in transformer, ours with the same): everything but the transformer."""
    pipe, folder = sd3_folder
    stub = StubTransformer(16, T5_WIDTH, pipe.text_encoder.config.projection_dim
                           + pipe.text_encoder_2.config.projection_dim)
    kind = dataclasses.replace(pipelines.SD3, velocity=StubVelocity, conditioning=lambda e, p, g: {
        "encoder_hidden_states": e, "pooled_projections": p})
    vae_cfg, vae_params = load_vae(folder)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    ours = sample.Pipeline(sd3_text.load_text_encoders(folder), None, stub.variables(), vae_cfg, vae_params,
                           scheduler, sample.timestep_scale(scheduler), kind=kind)
    return StableDiffusion3Pipeline(**{**pipe.components, "transformer": stub}), ours


@pytest.mark.parametrize("case", ["default_cfg", "negatives_in_batches_of_1", "no_cfg"])
def test_sampling_around_the_transformer_matches_the_pipeline(stubbed, case):
    """Encoding, negative prompts, CFG, SD3's schedule and the SD3 VAE, with a stand-in transformer."""
    pipe, ours = stubbed
    kwargs = {"default_cfg": {}, "no_cfg": dict(guidance_scale=1.0),
              "negatives_in_batches_of_1": dict(guidance_scale=4.5, negative_prompt=["dog", "blue sky"])}[case]
    noise = _noise()
    images = sample.sample_images(ours, PROMPTS, noise, **OPTIONS, **kwargs,
                                  batch_size=1 if case == "negatives_in_batches_of_1" else None)
    _assert_same_image(images, _diffusers(pipe, noise, **kwargs))


def _fake_folder(root, pipeline_class: str | None, transformer_class: str, parts=pipelines.SD3.subfolders):
    """A pipeline folder's layout without weights: what is checked before anything loads."""
    for part in (*parts, "scheduler", "transformer"):
        (root / part).mkdir(parents=True)
    if pipeline_class is not None:
        (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    (root / "transformer" / "config.json").write_text(json.dumps({"_class_name": transformer_class}))
    return root


def test_pipeline_kinds_and_bad_folders(tmp_path):
    """A folder is FLUX's or SD3's by model_index.json; parts of the other backbone or another pipeline are one line
    naming the folder, in the command as well (before anything loads)."""
    sd3 = _fake_folder(tmp_path / "sd3", "StableDiffusion3Pipeline", "SD3Transformer2DModel")
    assert pipelines.pipeline_kind(sd3) is pipelines.SD3
    flux = _fake_folder(tmp_path / "flux", None, "FluxTransformer2DModel", pipelines.FLUX.subfolders)
    assert pipelines.pipeline_kind(flux) is pipelines.FLUX  # hand-made FLUX folders have no model_index.json
    mixed = _fake_folder(tmp_path / "mixed", "StableDiffusion3Pipeline", "FluxTransformer2DModel")
    with pytest.raises(UserError, match=r"mixed: model_index.json says StableDiffusion3Pipeline but transformer/ "
                                        r"holds 'FluxTransformer2DModel' \(a flux transformer\)"):
        pipelines.pipeline_kind(mixed)
    assert pipelines.pipeline_kind(mixed, need_transformer=False) is pipelines.SD3  # --workdir's policy replaces it
    mixed_2 = _fake_folder(tmp_path / "mixed_2", "FluxPipeline", "SD3Transformer2DModel", pipelines.FLUX.subfolders)
    with pytest.raises(UserError, match=r"mixed_2: .* says FluxPipeline but .*'SD3Transformer2DModel' \(a sd3"):
        pipelines.pipeline_kind(mixed_2)
    sdxl = _fake_folder(tmp_path / "sdxl", "StableDiffusionXLPipeline", "UNet2DConditionModel")
    with pytest.raises(UserError, match=r"sdxl: model_index.json names 'StableDiffusionXLPipeline', neither a FLUX "
                                        r"nor an SD3 pipeline"):
        pipelines.pipeline_kind(sdxl)
    (sd3 / "text_encoder_3").rmdir()
    with pytest.raises(UserError, match=r"sd3 lacks text_encoder_3: not a diffusers StableDiffusion3Pipeline folder"):
        pipelines.pipeline_kind(sd3)
    for folder, message in ((mixed, "holds 'FluxTransformer2DModel'"), (sdxl, "neither a FLUX nor an SD3")):
        run = subprocess.run([sys.executable, "-m", "pnapo_jax.sample", f"--pipeline={folder}", "--prompt=a cat",
                              f"--out={tmp_path}/cat.png"], capture_output=True, text=True)
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
        last = run.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: --pipeline={folder}") and message in last, last
    assert not (tmp_path / "cat.png").exists()


def test_matches_sd3_pipeline(sd3_folder):
    """The whole pipeline with the folder's SD3 transformer, default CFG (7, "") and an explicit negative prompt."""
    pipe, folder = sd3_folder
    ours = sample.load_pipeline(folder, dtype="float32")
    assert ours.kind is pipelines.SD3
    noise = _noise(1)
    for kwargs in ({}, dict(guidance_scale=3.0, negative_prompt="blue dog")):
        images = sample.sample_images(ours, PROMPTS, noise, **OPTIONS, **kwargs)
        _assert_same_image(images, _diffusers(pipe, noise, **kwargs))


def test_sample_command_matches_sd3_pipeline(sd3_folder, tmp_path):
    """`python -m pnapo_jax.sample --pipeline=SD3_DIR` on a prompts file with explicit noise, as PNGs."""
    pipe, folder = sd3_folder
    noise = _noise(2)
    np.save(tmp_path / "noise.npy", noise)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    o = OPTIONS
    run = subprocess.run(
        [sys.executable, "-m", "pnapo_jax.sample", f"--pipeline={folder}", f"--prompts={tmp_path}/prompts.txt",
         f"--out={tmp_path}/out", f"--noise={tmp_path}/noise.npy", "--dtype=float32", f"--height={o['height']}",
         f"--width={o['width']}", f"--num_steps={o['num_steps']}", f"--max_sequence_length={o['max_sequence_length']}",
         "--batch_size=2"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    pngs = np.stack([np.asarray(Image.open(tmp_path / "out" / f"{i:05d}.png")) for i in range(len(PROMPTS))])
    _assert_same_image(pngs / 255, _diffusers(pipe, noise), atol=0.5 / 255 + 1e-4)  # PNG pixels are round(255 x)


def test_matches_sd35_medium_style_pipeline(tmp_path):
    """SD3.5-Medium's transformer (MMDiT-X dual attention, QK RMSNorm) in the same pipeline."""
    transformer = randomize(SD3Transformer2DModel(**TRANSFORMER_TINY, dual_attention_layers=(0,), qk_norm="rms_norm"),
                            7, 0.2)
    pipe = tiny_sd3_pipeline(seed=5, transformer=transformer)
    pipe.save_pretrained(tmp_path)
    noise = _noise(3)
    images = sample.sample_images(sample.load_pipeline(tmp_path, dtype="float32"), PROMPTS, noise, **OPTIONS)
    _assert_same_image(images, _diffusers(pipe, noise))
