"""The benchmark command on FLUX models: a tiny random pipeline folder (the base), a LoRA training run started
from it, and that run exported as a diffusers transformer, against diffusers' FluxPipeline on the same noises,
scored with CLIP score (a tiny random CLIP)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json

import numpy as np
import pytest
import transformers
from diffusers import FluxTransformer2DModel
from flux_testing import CLIP_TINY, clip_tokenizer, randomize, tiny_flux_pipeline
from test_flow import FLUX_SCHEDULER
from test_rewards import VISION_TINY
from test_sample import OPTIONS, PROMPTS, _diffusers, _train, _with_transformer

from pnapo_jax import export, flow, rewards
from pnapo_jax.bench import benchmark, sampling
from pnapo_jax.errors import UserError

SEED = 5


pytestmark = pytest.mark.slow  # two tiny training runs' worth of compiling: minutes on 2 cores


def save_tiny_clip(folder) -> None:
    """A tiny random CLIP (text and vision) with its tokenizer, a clip_score scorer folder."""
    tokenizer = clip_tokenizer()
    text = {**CLIP_TINY, "vocab_size": len(tokenizer), "max_position_embeddings": 77, "eos_token_id": 2,
            "bos_token_id": 0, "pad_token_id": 1}
    clip = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=VISION_TINY,
                                                          projection_dim=16))
    randomize(clip, 0, 0.2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def flux_bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flux_bench")
    pipe = tiny_flux_pipeline(FLUX_SCHEDULER)
    pipe.save_pretrained(tmp / "pipe")
    _train(tmp / "pipe", tmp / "run", "lora")
    export.export(str(tmp / "run"), str(tmp / "exported"), "diffusers")
    save_tiny_clip(tmp / "clip")
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    opts = benchmark.Options(models=f"base={tmp / 'pipe'},lora={tmp / 'run'},exported={tmp / 'exported'}",
                             prompts=str(tmp / "prompts.txt"), out=str(tmp / "out"),
                             scorers=f"clip_score={tmp / 'clip'}",
                             world="flux", seeds=1, seed=SEED, height=OPTIONS["height"], width=OPTIONS["width"],
                             num_steps=OPTIONS["num_steps"], guidance_scale=OPTIONS["guidance_scale"],
                             max_sequence_length=OPTIONS["max_sequence_length"], batch_size=2, show_progress=False)
    return pipe, tmp, opts, benchmark.run(opts)


def _pngs(out, model: str) -> np.ndarray:
    return np.stack([sampling.load_png(sampling.image_path(out, model, p, 0)) for p in range(len(PROMPTS))])


def test_flux_models_match_diffusers_on_the_recorded_noises(flux_bench):
    pipe, tmp, opts, summary = flux_bench
    out = tmp / "out"
    noise = np.asarray(flow.seeded_noise(SEED, [0, 1], (16, OPTIONS["height"] // 8, OPTIONS["width"] // 8)))
    atol = 0.5 / 255 + 1e-4  # PNG pixels are round(255 x)
    np.testing.assert_allclose(_pngs(out, "base"), _diffusers(pipe, noise), atol=atol)
    exported = _with_transformer(pipe, FluxTransformer2DModel.from_pretrained(tmp / "exported"))
    np.testing.assert_allclose(_pngs(out, "exported"), _diffusers(exported, noise), atol=atol)
    np.testing.assert_allclose(_pngs(out, "lora"), _pngs(out, "exported"), atol=2 / 255)  # merged vs adapters
    assert np.any(_pngs(out, "lora") != _pngs(out, "base")), "training changed nothing"  # 2 LoRA steps: a little
    reward = rewards.load_reward("clip_score", tmp / "clip")
    results = json.loads((out / "results.json").read_text())
    for m in ("base", "lora"):
        assert results["models"][m]["clip_score"]["value"] == pytest.approx(
            float(np.mean(reward(_pngs(out, m), PROMPTS))), rel=1e-5)
    assert set(results["win_rates"]) == {"lora", "exported"}


def test_flux_refuses_world_scorers_and_demo_refuses_pipelines(flux_bench):
    _, tmp, opts, _ = flux_bench
    import dataclasses

    with pytest.raises(UserError, match=r"\['world_reward'\] score the embedded world's images only"):
        benchmark.run(dataclasses.replace(opts, scorers="world_reward"))
    with pytest.raises(UserError, match="--world=demo: .*pipe is a FLUX pipeline folder"):
        benchmark.run(dataclasses.replace(opts, world="demo", scorers="world_reward"))
