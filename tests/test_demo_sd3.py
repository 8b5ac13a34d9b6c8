"""The embedded world on an SD3-architecture base (configs/demo_cpu.py:sd3, issue 16 part 5): the shipped SD3 base
(made by `python -m pnapo_jax.world.pretrain --backbone=sd3`) is what diffusers' SD3Transformer2DModel reads and
computes, and on it the demo's pairs, PNAPO training, the held-out sampling eval, a resume and an export that
diffusers loads run end to end. tests/test_world.py pretrains either backbone's base and samples the shipped ones."""

import json
import sys

import jax
import numpy as np
import pytest
from diffusers import SD3Transformer2DModel
from etils import epath
from sd3_testing import torch_forward

from pnapo_jax import checkpoint, export, flow, sample, train
from pnapo_jax.data.source import open_written
from pnapo_jax.models import flux, sd3
from pnapo_jax.setup import make_setup
from pnapo_jax.world import demo_base, grammar, latents, text

sys.path.insert(0, str(epath.Path(__file__).parent.parent / "configs"))
import demo_cpu  # noqa: E402


def _diffusers_rel_err(folder: epath.Path, cfg: sd3.SD3Config, params) -> float:
    """Max |ours - diffusers| / max |diffusers| of the world's inputs (held-out prompts' text table, 16 x 16 tokens
    of 12 values, two noise levels), with `params` in our model and `folder` in SD3Transformer2DModel."""
    prompts = grammar.prompts("heldout")[:2]
    embeds, pooled = text.encode_prompts(prompts)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((2, latents.LATENT_H_TOKENS * latents.LATENT_W_TOKENS, latents.IN_CHANNELS))
    inputs = dict(hidden_states=noise.astype(np.float32), encoder_hidden_states=embeds, pooled_projections=pooled,
                  timestep=np.array([250.0, 800.0], np.float32), h_tokens=latents.LATENT_H_TOKENS,
                  w_tokens=latents.LATENT_W_TOKENS)
    ours = np.asarray(sd3.SD3Transformer(cfg).apply({"params": params}, **inputs))
    ref = torch_forward(SD3Transformer2DModel.from_pretrained(str(folder)).eval(), inputs)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _checkpoint_params(config, workdir: epath.Path, step: int):
    setup = make_setup(config, jax.devices()[:1])
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), config.checkpoint)
    state = ckpt.restore(step, setup.abstract_state, None)
    ckpt.close()
    return setup.model_cfg, jax.device_get(state["params"])


def _lines(workdir: epath.Path) -> list[dict]:
    return [json.loads(s) for s in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_shipped_sd3_base_is_what_diffusers_computes():
    cfg, params = demo_base.load_base(demo_base.BASES["sd3"])
    assert cfg == demo_base.demo_model_config("sd3")
    assert _diffusers_rel_err(demo_base.BASES["sd3"], cfg, params) <= 1e-4


@pytest.mark.slow  # 58 s at load 9, 3 min at load 15 on the shared 2-core box: pairs, 2 + 2 steps, 3 evals, export
def test_demo_world_on_an_sd3_base_end_to_end(tmp_path):
    """configs/demo_cpu.py:sd3,fast, shortened: the shipped SD3 base's pairs (named in them), PNAPO steps, the
    held-out eval's reward and win rate at each sample_every, a resume from the checkpoint, and an export that
    SD3Transformer2DModel loads and computes as the checkpoint does."""
    config = demo_cpu.get_config("sd3,fast")
    assert config.model.backbone == "sd3" and config.model.pretrained == str(demo_base.BASES["sd3"])
    config.generate.max_prompts = 8
    config.train.num_steps, config.train.global_batch_size, config.train.log_every = 2, 4, 1
    config.eval.sample_every, config.eval.num_steps, config.checkpoint.every_steps = 2, 2, 2
    workdir = epath.Path(tmp_path / "run")
    train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1], show_progress=False)

    source = open_written(str(workdir / "pairs"))
    records = [source[i] for i in range(len(source))]
    assert records and {r["prompt"] for r in records} <= set(grammar.prompts("train"))
    r = records[0]
    assert r["model_id"] == "pnapo_jax/assets/demo_base_sd3"
    assert r["x0_w"].shape == (latents.LATENT_H_TOKENS * latents.LATENT_W_TOKENS, latents.IN_CHANNELS)
    assert r["prompt_embeds"].shape == (text.TEXT_LEN, text.TEXT_DIM) and r["pooled_prompt_embeds"].shape == (16,)

    config.train.num_steps = 4  # the same run, longer: it resumes from step 2's checkpoint
    train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1], show_progress=False)
    lines = _lines(workdir)
    assert [d["step"] for d in lines if "loss" in d] == [1, 2, 3, 4]  # no step trained twice
    evals = [d for d in lines if "eval/reward_mean" in d]
    assert [d["step"] for d in evals] == [0, 2, 4]
    assert evals[0]["eval/win_rate_vs_base"] == 0.5  # step 0: the policy is the base
    for d in evals:
        assert all(np.isfinite(d[k]) for k in ("eval/reward_mean", "eval/win_rate_vs_base", "eval/fidelity_mean"))
    assert np.isfinite([d["loss"] for d in lines if "loss" in d]).all()
    assert (workdir / "samples.png").exists()

    assert export.export(str(workdir), str(tmp_path / "exported"), "diffusers") == 4
    cfg, params = _checkpoint_params(config, workdir, 4)
    assert _diffusers_rel_err(epath.Path(tmp_path / "exported"), cfg, params) <= 1e-4

    # `python -m pnapo_jax.sample` takes the export and the run as it takes a FLUX demo's: the world's sampler's images
    prompts = grammar.prompts("heldout")[:2]
    noise_NxIxC = np.asarray(flux.pack_latents(flow.seeded_noise(3, range(2), (3, 32, 32))))
    world = latents.decode(np.asarray(demo_base.sample_latents(cfg, params, prompts, noise_NxIxC, 4)))
    for pipeline in (sample.load_pipeline(str(tmp_path / "exported")), sample.load_pipeline(None, str(workdir))):
        np.testing.assert_allclose(sample.sample_images(pipeline, prompts, seed=3, num_steps=4), world, atol=1e-5)
