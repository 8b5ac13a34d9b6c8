"""The FLUX world end to end on tiny random models: a FLUX pipeline folder (transformer with guidance embeds,
16-channel VAE, CLIP and T5 with offline tokenizers) and a PickScore-layout reward folder; generation's records
hold what the world's parts compute on their own, and they train."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is local files; never reach for the hub

import json
import sys

import jax
import numpy as np
import pytest
from etils import epath
from flux_testing import assert_pairs_hold_the_worlds_computations, pickscore_folder, tiny_flux_pipeline

from pnapo_jax import evaluate, generate, rewards, text, train, worlds
from pnapo_jax.data.source import open_written
from pnapo_jax.models.flux import FluxConfig
from pnapo_jax.pipeline_world import PipelineWorld
from pnapo_jax.setup import base_params, make_setup

sys.path.insert(0, str(epath.Path(__file__).parent.parent / "configs"))
import tiny  # noqa: E402

PROMPTS = ["a photo of a cat", "the tiny red dog under a blue sky", "a blue sky", "zebra"]
H_TOKENS, W_TOKENS, TEXT_LEN = 2, 3, 8  # 32 x 48 images


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[epath.Path, epath.Path]:
    """(FLUX pipeline folder, PickScore folder: a CLIPModel with FLUX's CLIP tokenizer, as PickScore ships)."""
    pipeline = epath.Path(tmp_path_factory.mktemp("flux_pipeline"))
    tiny_flux_pipeline().save_pretrained(pipeline)
    reward = epath.Path(tmp_path_factory.mktemp("pickscore"))
    pickscore_folder(reward)
    return pipeline, reward


def _config(pipeline: epath.Path, reward: epath.Path, tmp_path: epath.Path):
    """The tiny config with the pipeline's transformer as the base, generating K=2 pairs in the flux world."""
    c = tiny.get_config()
    model = FluxConfig.from_diffusers(json.loads((pipeline / "transformer" / "config.json").read_text()))
    for k, v in model.to_diffusers().items():
        if k != "_class_name":
            c.model[k] = v
    c.model.pretrained = str(pipeline / "transformer")
    c.data.latent_h_tokens, c.data.latent_w_tokens, c.data.text_len = H_TOKENS, W_TOKENS, TEXT_LEN
    c.generate.world, c.generate.pipeline = "flux", str(pipeline)
    c.generate.reward, c.generate.reward_path = "pickscore", str(reward)
    c.generate.prompts_file = str(tmp_path / "prompts_{split}.txt")
    c.generate.images_per_prompt, c.generate.num_steps = 2, 2
    c.generate.prompts_per_batch, c.generate.prompts_per_chunk = 4, 4
    return c


def test_flux_pairs_hold_the_worlds_computations_and_train(folders, tmp_path):
    pipeline, reward_dir = folders
    config = _config(pipeline, reward_dir, tmp_path)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    summary = generate.run(config, str(tmp_path / "prompts.txt"), str(tmp_path / "pairs"), show_progress=False)
    assert summary["pairs_written_now"] == len(PROMPTS)
    source = open_written(str(tmp_path / "pairs"))
    records = [source[i] for i in range(len(source))]
    assert [r["prompt"] for r in records] == PROMPTS

    embeds, pooled = text.encode_prompts(PROMPTS, text.load_text_encoders(pipeline), max_sequence_length=TEXT_LEN)
    reward = rewards.load_reward("pickscore", reward_dir)
    assert_pairs_hold_the_worlds_computations(records, embeds, pooled, config.generate.seed, (H_TOKENS, W_TOKENS),
                                              pipeline, reward)
    for r in records:
        assert (r["height"], r["width"], r["steps"], r["model_id"]) == (32, 48, 2, str(pipeline / "transformer"))

    config.data.source, config.data.path = "array_record", str(tmp_path / "pairs")
    config.train.num_steps, config.train.global_batch_size, config.train.eval_every = 2, 2, 0
    line = train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1], show_progress=False)
    assert line["step"] == 2 and np.isfinite(line["loss"])


def test_sample_eval_without_fidelity(folders, tmp_path):
    """The flux world reads eval prompts from prompts_file and has no fidelity: eval lines go without it."""
    config = _config(*folders, tmp_path)
    (tmp_path / "prompts_heldout.txt").write_text("\n".join(PROMPTS[:2]))
    config.eval.num_prompts, config.eval.samples_per_prompt, config.eval.num_steps = 2, 1, 2
    setup = make_setup(config, jax.devices()[:1])
    base = {"params": base_params(setup)}
    metrics, images, scores = evaluate.SampleEval(setup, worlds.make_world(config), config.eval, base)(base)
    assert set(metrics) == {"eval/reward_mean", "eval/reward_base_mean", "eval/win_rate_vs_base"}
    assert metrics["eval/win_rate_vs_base"] == 0.5  # the policy is the base
    assert images.shape == (2, 32, 48, 3) and scores.shape == (2,)


def test_errors(folders, tmp_path):
    config = _config(*folders, tmp_path)
    config.generate.reward_path = ""
    with pytest.raises(ValueError, match="reward_path is required"):
        PipelineWorld(config)
    config.generate.reward_path, config.generate.reward = str(folders[1]), "no_such_reward"
    with pytest.raises(ValueError, match="choose from"):
        PipelineWorld(config)
    config.generate.reward, config.generate.prompts_file = "pickscore", ""
    with pytest.raises(ValueError, match="no built-in prompts"):
        PipelineWorld(config).prompts("train")
    config.generate.pipeline = ""  # model.pretrained is the transformer folder, not a pipeline
    with pytest.raises(FileNotFoundError, match="has no text_encoder, text_encoder_2, tokenizer"):
        PipelineWorld(config).encode_prompts(["a cat"])
    config.generate.world = "sd3"
    with pytest.raises(ValueError, match=r"known worlds are \('demo', 'flux'\)"):
        worlds.make_world(config)
