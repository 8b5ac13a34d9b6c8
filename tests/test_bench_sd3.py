"""The benchmark command (python -m pnapo_jax.evaluate --world=flux) on SD3 models: a tiny random
StableDiffusion3Pipeline folder (the base), a full fine-tune SD3 run started from it, and that run exported as a
diffusers SD3 transformer, against diffusers' StableDiffusion3Pipeline on the same noises (its default CFG 7
against ""); and a FLUX-vs-SD3 mix refused in one line before anything is written."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from sd3_pipeline_testing import tiny_sd3_pipeline
from sd3_testing import tiny_config
from test_bench import DEMO_BASE
from test_bench_flux import save_tiny_clip
from test_sd3_pipeline import OPTIONS, PROMPTS, _fake_folder

from pnapo_jax import export, flow, pipelines, rewards, train
from pnapo_jax.bench import benchmark, sampling
from pnapo_jax.errors import UserError
from pnapo_jax.models import sd3

SEED = 7


def _train(folder, workdir) -> None:
    """Two full fine-tune steps of a tiny SD3 run whose starting point is the pipeline's transformer."""
    config = tiny_config()
    model = sd3.SD3Config.from_diffusers(json.loads((folder / "transformer" / "config.json").read_text()))
    for k, v in model.to_diffusers().items():
        if k != "_class_name":
            config.model[k] = v
    config.model.pretrained = str(folder)
    config.train.num_steps, config.train.eval_every = 2, 0
    config.optim.warmup_steps = 0
    config.optim.lr = 1e-2  # two steps must move the images
    train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1], show_progress=False)


def _diffusers(pipe: StableDiffusion3Pipeline, noise_BxCxHxW: np.ndarray) -> np.ndarray:
    """StableDiffusion3Pipeline's images [B, H, W, 3] in [0, 1], its default guidance (7, negative "")."""
    o = OPTIONS
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(prompt=PROMPTS, latents=torch.from_numpy(noise_BxCxHxW), height=o["height"], width=o["width"],
                    num_inference_steps=o["num_steps"], max_sequence_length=o["max_sequence_length"],
                    output_type="np").images


@pytest.fixture(scope="module")
def sd3_bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd3_bench")
    pipe = tiny_sd3_pipeline(seed=2)
    pipe.save_pretrained(tmp / "pipe")
    _train(tmp / "pipe", tmp / "run")
    export.export(str(tmp / "run"), str(tmp / "exported"), "diffusers")
    save_tiny_clip(tmp / "clip")
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    opts = benchmark.Options(models=f"base={tmp / 'pipe'},run={tmp / 'run'},exported={tmp / 'exported'}",
                             prompts=str(tmp / "prompts.txt"), out=str(tmp / "out"),
                             scorers=f"clip_score={tmp / 'clip'}", world="flux", seeds=1, seed=SEED,
                             height=OPTIONS["height"], width=OPTIONS["width"], num_steps=OPTIONS["num_steps"],
                             max_sequence_length=OPTIONS["max_sequence_length"], batch_size=2, show_progress=False)
    return pipe, tmp, opts, benchmark.run(opts)  # guidance_scale left to the pipeline's default


def _pngs(out, model: str) -> np.ndarray:
    return np.stack([sampling.load_png(sampling.image_path(out, model, p, 0)) for p in range(len(PROMPTS))])


@pytest.mark.slow  # a tiny SD3 training run and an export: minutes on the shared 2-core box
def test_sd3_models_match_diffusers_on_the_recorded_noises(sd3_bench):
    pipe, tmp, opts, summary = sd3_bench
    out = tmp / "out"
    noise = np.asarray(flow.seeded_noise(SEED, [0, 1], (16, OPTIONS["height"] // 8, OPTIONS["width"] // 8)))
    atol = 0.5 / 255 + 1e-4  # PNG pixels are round(255 x)
    base = _pngs(out, "base")
    assert np.mean((base > 0) & (base < 1)) > 0.5, "mostly saturated images would compare nothing"
    np.testing.assert_allclose(base, _diffusers(pipe, noise), atol=atol)
    exported = StableDiffusion3Pipeline(**{**pipe.components,
                                           "transformer": SD3Transformer2DModel.from_pretrained(tmp / "exported")})
    np.testing.assert_allclose(_pngs(out, "exported"), _diffusers(exported, noise), atol=atol)
    np.testing.assert_allclose(_pngs(out, "run"), _pngs(out, "exported"), atol=2 / 255)  # checkpoint vs its export
    assert np.abs(_pngs(out, "run") - base).max() > 4 / 255, "training changed nothing"
    manifest = json.loads((out / benchmark.MANIFEST).read_text())
    assert (manifest["guidance_scale"], manifest["max_sequence_length"]) == (7.0, OPTIONS["max_sequence_length"])
    reward = rewards.load_reward("clip_score", tmp / "clip")
    results = json.loads((out / "results.json").read_text())
    for m in ("base", "run"):
        assert results["models"][m]["clip_score"]["value"] == pytest.approx(
            float(np.mean(reward(_pngs(out, m), PROMPTS))), rel=1e-5)
    assert set(results["win_rates"]) == {"run", "exported"}


def _fake_run(root, backbone: str):
    """A training workdir's layout (config.json naming the backbone, one checkpoint step): what parse reads."""
    (root / "checkpoints" / "1").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model": {"backbone": backbone}}))
    return root


def test_a_flux_sd3_mix_is_refused_in_one_line(tmp_path):
    """One evaluate shares one pipeline's text encoders and VAE: models of the other backbone (a FLUX transformer
    with an SD3 pipeline, an SD3 run with a FLUX pipeline, an SD3 run in the embedded world) are refused up front,
    naming them, and nothing is written."""
    sd3_pipe = _fake_folder(tmp_path / "sd3", "StableDiffusion3Pipeline", "SD3Transformer2DModel")
    flux_pipe = _fake_folder(tmp_path / "flux", "FluxPipeline", "FluxTransformer2DModel", pipelines.FLUX.subfolders)
    sd3_run = _fake_run(tmp_path / "sd3_run", "sd3")
    clip = tmp_path / "clip"
    clip.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):  # what --scorers checks before loading
        (clip / name).write_text("{}")
    (tmp_path / "p.txt").write_text("a cat\n")
    opts = benchmark.Options(models="", prompts=str(tmp_path / "p.txt"), out=str(tmp_path / "out"),
                             scorers=f"clip_score={clip}", world="flux", show_progress=False)
    cases = [(f"base={sd3_pipe},demo={DEMO_BASE}", "flux", "", f"demo={DEMO_BASE} is flux's, but the pipeline "
              f"{sd3_pipe} is a StableDiffusion3Pipeline (sd3)"),
             (f"base={flux_pipe},pnapo={sd3_run}", "flux", "", f"pnapo={sd3_run} is sd3's, but the pipeline "
              f"{flux_pipe} is a FluxPipeline (flux)"),
             (f"pnapo={sd3_run}", "flux", str(flux_pipe), "is sd3's, but the pipeline"),
             (f"base={DEMO_BASE},pnapo={sd3_run}", "demo", "", f"--world=demo: pnapo={sd3_run} is an SD3 model")]
    for models, world, pipeline, message in cases:
        case = dataclasses.replace(opts, models=models, world=world, pipeline=pipeline,
                                   scorers="world_reward" if world == "demo" else opts.scorers)
        with pytest.raises(UserError, match=None) as e:
            benchmark.run(case)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert pipelines.pipeline_kind(sd3_pipe) is pipelines.SD3  # the SD3 folder itself is accepted
    proc = subprocess.run([sys.executable, "-m", "pnapo_jax.evaluate", f"--models=base={sd3_pipe},demo={DEMO_BASE}",
                           f"--prompts={tmp_path / 'p.txt'}", f"--out={tmp_path / 'out'}", "--world=flux",
                           f"--scorers=clip_score={clip}"], capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: --models: "), proc.stderr
    assert "one evaluate samples one backbone's models" in lines[0]
    assert not (tmp_path / "out").exists()
