"""The pipeline world on a tiny SD3 pipeline folder (CLIP-L, CLIP-G, T5, the SD3 VAE and scheduler, a tiny
SD3 transformer as the base) and a PickScore-layout reward: generation's records have SD3's shapes, hold what the
world's parts compute on their own, and StableDiffusion3Pipeline run from a record's noise gives its latent; the
pairs train."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is local files; never reach for the hub

import json

import jax
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from etils import epath
from flux_testing import assert_pairs_hold_the_worlds_computations, pickscore_folder
from sd3_pipeline_testing import T5_WIDTH, max_rel_err, tiny_sd3_pipeline

from pnapo_jax import export, generate, rewards, sample, sd3_text, train, worlds
from pnapo_jax.config import defaults
from pnapo_jax.data.source import open_written
from pnapo_jax.errors import UserError
from pnapo_jax.models import flux, sd3

PROMPTS = ["a photo of a cat", "the tiny red dog under a blue sky", "a blue sky", "zebra"]
H_TOKENS, W_TOKENS, T5_LEN = 2, 3, 8  # 32 x 48 images; records hold 77 CLIP + 8 T5 tokens
GUIDANCE = 5.0


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(the torch pipeline, its folder, a PickScore folder)."""
    pipe = tiny_sd3_pipeline()
    pipeline = epath.Path(tmp_path_factory.mktemp("sd3_pipeline"))
    pipe.save_pretrained(pipeline)
    reward = epath.Path(tmp_path_factory.mktemp("pickscore"))
    pickscore_folder(reward)
    return pipe, pipeline, reward


def _config(pipeline: epath.Path, reward: epath.Path, tmp_path: epath.Path):
    """An SD3 run config on the pipeline's transformer, generating K=2 pairs with CFG in the pipeline world."""
    c = defaults(sd3.SD3Config)
    model = sd3.SD3Config.from_diffusers(json.loads((pipeline / "transformer" / "config.json").read_text()))
    for k, v in model.to_diffusers().items():
        if k != "_class_name":
            c.model[k] = v
    c.model.pretrained = str(pipeline / "transformer")
    c.pnapo.beta = 50.0
    c.optim.lr, c.optim.warmup_steps = 1e-3, 0
    c.train.num_steps, c.train.global_batch_size, c.train.eval_every = 2, 2, 0
    c.data.latent_h_tokens, c.data.latent_w_tokens, c.data.text_len = H_TOKENS, W_TOKENS, 77 + T5_LEN
    c.generate.world, c.generate.pipeline = "flux", str(pipeline)
    c.generate.reward, c.generate.reward_path = "pickscore", str(reward)
    c.generate.prompts_file = str(tmp_path / "prompts_{split}.txt")
    c.generate.images_per_prompt, c.generate.num_steps, c.generate.guidance_scale = 2, 3, GUIDANCE
    c.generate.prompts_per_batch, c.generate.prompts_per_chunk = 4, 4
    return c


@pytest.mark.slow
def test_sd3_pairs_are_the_pipelines_samples_and_train(folders, tmp_path):
    pipe, pipeline, reward_dir = folders
    config = _config(pipeline, reward_dir, tmp_path)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    summary = generate.run(config, str(tmp_path / "prompts.txt"), str(tmp_path / "pairs"), show_progress=False)
    assert summary["pairs_written_now"] == len(PROMPTS)
    source = open_written(str(tmp_path / "pairs"))
    records = [source[i] for i in range(len(source))]
    assert [r["prompt"] for r in records] == PROMPTS
    r = records[0]  # SD3's shapes: 2x2 tokens of 16 channels, 77 CLIP + T5 tokens at T5's width, both projections
    assert r["x0_w"].shape == r["x1_w"].shape == (H_TOKENS * W_TOKENS, 64)
    assert r["prompt_embeds"].shape == (77 + T5_LEN, T5_WIDTH) and r["pooled_prompt_embeds"].shape == (12 + 20,)

    embeds, pooled = sd3_text.encode_prompts(PROMPTS, sd3_text.load_text_encoders(pipeline), T5_LEN)
    reward = rewards.load_reward("pickscore", reward_dir)
    assert_pairs_hold_the_worlds_computations(records, embeds, pooled, config.generate.seed, (H_TOKENS, W_TOKENS),
                                              pipeline, reward)
    assert all(r["guidance"] == GUIDANCE for r in records)

    # Regenerating from the recorded noises: diffusers' pipeline (CFG against "", its shift-3 schedule) gives the
    # stored latents.
    noise = flux.unpack_latents(np.stack([r[f"x1_{s}"] for r in records for s in "wl"]), 2 * H_TOKENS, 2 * W_TOKENS)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(prompt=[r["prompt"] for r in records for _ in "wl"], latents=torch.from_numpy(np.asarray(noise)),
                   height=16 * H_TOKENS, width=16 * W_TOKENS, num_inference_steps=config.generate.num_steps,
                   guidance_scale=GUIDANCE, max_sequence_length=T5_LEN, output_type="latent").images.numpy()
    stored = flux.unpack_latents(np.stack([r[f"x0_{s}"] for r in records for s in "wl"]), 2 * H_TOKENS, 2 * W_TOKENS)
    assert max_rel_err(stored, ref) <= 1e-4

    config.data.source, config.data.path = "array_record", str(tmp_path / "pairs")
    line = train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1], show_progress=False)
    assert line["step"] == 2 and np.isfinite(line["loss"])


def test_errors(folders, tmp_path):
    """A pipeline folder of the other backbone, and records too short for SD3's CLIP tokens, are one line."""
    _, pipeline, reward_dir = folders
    config = _config(pipeline, reward_dir, tmp_path)
    config.data.text_len = 77
    with pytest.raises(UserError, match=r"config.data.text_len=77: SD3's prompt embeds are 77 CLIP tokens, then "
                                        r"T5's; set it to 77 \+ max_sequence_length"):
        worlds.make_world(config).encode_prompts(["a cat"])
    config = _config(pipeline, reward_dir, tmp_path)
    config.model.backbone = "flux"
    with pytest.raises(UserError, match=r"sd3_pipeline.* is a StableDiffusion3Pipeline folder \(model_index.json\) "
                                        r"but config.model.backbone='flux'"):
        worlds.make_world(config).encode_prompts(["a cat"])


@pytest.mark.slow
def test_sample_an_sd3_checkpoint_as_diffusers_samples_its_export(folders, tmp_path):
    """`sample --workdir` on an SD3 run: the checkpoint's policy replaces the folder's transformer, and the images
    are what StableDiffusion3Pipeline gives with the run exported as a diffusers transformer."""
    pipe, pipeline, reward_dir = folders
    config = _config(pipeline, reward_dir, tmp_path)
    config.data.source, config.generate.world = "synthetic", "demo"
    train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1], show_progress=False)
    options = dict(height=16 * H_TOKENS, width=16 * W_TOKENS, num_steps=3, max_sequence_length=T5_LEN)
    noise = np.random.default_rng(0).standard_normal((2, 16, 2 * H_TOKENS, 2 * W_TOKENS)).astype(np.float32)
    images = sample.sample_images(sample.load_pipeline(pipeline, str(tmp_path / "run"), dtype="float32"),
                                  PROMPTS[:2], noise, **options)
    export.export(str(tmp_path / "run"), str(tmp_path / "exported"), "diffusers")
    tuned = StableDiffusion3Pipeline(**{**pipe.components, "transformer": SD3Transformer2DModel.from_pretrained(
        tmp_path / "exported")})
    tuned.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = tuned(prompt=PROMPTS[:2], latents=torch.from_numpy(noise), height=options["height"],
                    width=options["width"], num_inference_steps=3, max_sequence_length=T5_LEN,
                    output_type="np").images
    assert np.abs(images - ref).max() <= 1e-4
    base = sample.sample_images(sample.load_pipeline(pipeline, dtype="float32"), PROMPTS[:2], noise, **options)
    assert np.abs(images - base).max() > 1e-3, "training changed nothing"
    with pytest.raises(UserError, match="trained a sd3 model; the pipeline folder is flux's"):
        sample.checkpoint_policy(str(tmp_path / "run"), backbone="flux")
