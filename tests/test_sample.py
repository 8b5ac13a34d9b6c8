"""Sampling against diffusers' FluxPipeline: a tiny random FLUX pipeline (transformer, 16-channel VAE with shift
and scale, CLIP and T5 with offline tokenizers, FLUX's scheduler config) saved as a folder, the same noise on
both sides; then the CLI, and the policy of tiny training runs started from that folder's transformer."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is local files; never reach for the hub

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from etils import epath
from flux_testing import tiny_flux_pipeline
from PIL import Image
from test_flow import FLUX_SCHEDULER

from pnapo_jax import export, flow, sample, train
from pnapo_jax.errors import UserError
from pnapo_jax.models import flux
from pnapo_jax.models.flux import FluxConfig

ROOT = epath.Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "configs"))
import tiny  # noqa: E402

PROMPTS = ["a photo of a cat", "the tiny red dog under a blue sky"]
OPTIONS = dict(height=64, width=48, num_steps=4, guidance_scale=3.5, max_sequence_length=16)  # 4 x 3 tokens
NOISE_SHAPE = (len(PROMPTS), 16, 8, 6)
ATOL = 1e-4  # images in [0, 1]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> tuple[FluxPipeline, epath.Path]:
    """The diffusers pipeline and the folder it saved itself to."""
    pipe = tiny_flux_pipeline(FLUX_SCHEDULER)
    folder = epath.Path(tmp_path_factory.mktemp("flux_pipeline"))
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture(scope="module")
def ours(pipeline) -> sample.Pipeline:
    return sample.load_pipeline(pipeline[1])


def _noise(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(NOISE_SHAPE).astype(np.float32)


def _diffusers(pipe: FluxPipeline, noise_BxCxHxW: np.ndarray, **kwargs) -> np.ndarray:
    """FluxPipeline's images [B, H, W, 3] in [0, 1] from the given (unpacked) noise."""
    latents = FluxPipeline._pack_latents(torch.from_numpy(noise_BxCxHxW), *noise_BxCxHxW.shape)
    o = OPTIONS
    with torch.no_grad():
        return pipe(prompt=PROMPTS, latents=latents, height=o["height"], width=o["width"],
                    num_inference_steps=o["num_steps"], guidance_scale=o["guidance_scale"],
                    max_sequence_length=o["max_sequence_length"], output_type="np", **kwargs).images


def _assert_same_image(ours: np.ndarray, ref: np.ndarray, atol: float = ATOL) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert np.mean((ref > 0) & (ref < 1)) > 0.5, "mostly saturated images would compare nothing"
    err = float(np.abs(ours - ref).max())
    assert err <= atol, f"max abs error {err:.3g} > {atol}"


def _with_transformer(pipe: FluxPipeline, transformer: FluxTransformer2DModel) -> FluxPipeline:
    out = FluxPipeline(**{**pipe.components, "transformer": transformer})
    out.set_progress_bar_config(disable=True)
    return out


@pytest.mark.parametrize("case", ["plain", "true_cfg_in_batches_of_1"])
def test_matches_flux_pipeline(pipeline, ours, case):
    cfg = dict(negative_prompt="a blue sky", true_cfg_scale=4.0) if case != "plain" else {}
    noise = _noise()
    images = sample.sample_images(ours, PROMPTS, noise, **OPTIONS, **cfg, batch_size=1 if cfg else None)
    assert images.dtype == np.float32
    _assert_same_image(images, _diffusers(pipeline[0], noise, **cfg))
    if not cfg:  # packed noise is accepted as well
        packed = FluxPipeline._pack_latents(torch.from_numpy(noise), *NOISE_SHAPE).numpy()
        np.testing.assert_array_equal(sample.sample_images(ours, PROMPTS, packed, **OPTIONS), images)


def test_seeded_noise_rule(ours):
    """Image i's noise depends on the seed and i only, not on the batch it is drawn in."""
    noise = flow.seeded_noise(5, range(2), NOISE_SHAPE[1:])
    np.testing.assert_array_equal(flow.seeded_noise(5, [1], NOISE_SHAPE[1:])[0], noise[1])
    np.testing.assert_array_equal(noise[0], jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(5), 0),
                                                              NOISE_SHAPE[1:]))
    np.testing.assert_array_equal(sample.sample_images(ours, PROMPTS, seed=5, **OPTIONS),
                                  sample.sample_images(ours, PROMPTS, noise, **OPTIONS))


def test_bfloat16_stays_close(pipeline, ours):
    """The CLI's default dtype: every model in bfloat16."""
    noise = _noise()
    images = sample.sample_images(sample.load_pipeline(pipeline[1], dtype="bfloat16"), PROMPTS, noise, **OPTIONS)
    assert images.dtype == np.float32
    assert np.abs(images - sample.sample_images(ours, PROMPTS, noise, **OPTIONS)).mean() < 0.01


def test_errors(pipeline, ours):
    with pytest.raises(UserError, match="multiples of 16"):
        sample.sample_images(ours, PROMPTS, **{**OPTIONS, "height": 56})
    with pytest.raises(UserError, match="needs --negative_prompt"):
        sample.sample_images(ours, PROMPTS, true_cfg_scale=2.0, **OPTIONS)
    with pytest.raises(UserError, match=r"expected \(2, 16, 8, 6\) or packed \(2, 12, 64\)"):
        sample.sample_images(ours, PROMPTS, _noise()[:1], **OPTIONS)
    with pytest.raises(UserError, match="needs the training workdir"):
        sample.load_pipeline(pipeline[1], step=3)
    with pytest.raises(UserError, match="not supported"):
        sample.schedule_mu({"use_karras_sigmas": True}, 16)
    assert sample.schedule_mu({"shift": 3.0}, 16) == pytest.approx(np.log(3.0))


def _train(folder: epath.Path, workdir: epath.Path, variant: str) -> None:
    """Two steps of the tiny config with the pipeline's transformer as the starting point."""
    config = tiny.get_config(variant)
    model = FluxConfig.from_diffusers(json.loads((folder / "transformer" / "config.json").read_text()))
    for k, v in model.to_diffusers().items():
        if k != "_class_name":
            config.model[k] = v
    config.model.pretrained = str(folder)
    config.train.num_steps, config.train.eval_every = 2, 0
    config.optim.warmup_steps = 0  # lr 0 at step 0 would leave the LoRA adapters at B = 0
    train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1], show_progress=False)


def test_cli_samples_a_full_finetune_checkpoint(pipeline, tmp_path):
    """The CLI on a prompts file, one image at a time, with explicit noise; diffusers runs the exported weights."""
    pipe, folder = pipeline
    _train(folder, tmp_path / "run", "")
    noise = _noise(1)
    np.save(tmp_path / "noise.npy", noise)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    o = OPTIONS
    run = subprocess.run(
        [sys.executable, "-m", "pnapo_jax.sample", f"--pipeline={folder}", f"--workdir={tmp_path}/run",
         f"--prompts={tmp_path}/prompts.txt", f"--out={tmp_path}/out", f"--noise={tmp_path}/noise.npy",
         "--batch_size=1", "--dtype=float32", f"--height={o['height']}", f"--width={o['width']}",
         f"--num_steps={o['num_steps']}", f"--max_sequence_length={o['max_sequence_length']}"],
        capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000.png", "00001.png"]
    pngs = np.stack([np.asarray(Image.open(tmp_path / "out" / f"{i:05d}.png")) for i in range(2)])
    assert pngs.dtype == np.uint8
    export.export(str(tmp_path / "run"), str(tmp_path / "exported"), "diffusers")
    ref = _diffusers(_with_transformer(pipe, FluxTransformer2DModel.from_pretrained(tmp_path / "exported")), noise)
    _assert_same_image(pngs / 255, ref, atol=0.5 / 255 + 1e-4)  # PNG pixels are round(255 x)
    assert np.abs(_diffusers(pipe, noise) - ref).max() > 0.01, "training changed nothing"


def test_lora_checkpoint_matches_diffusers_with_the_exported_lora(pipeline, tmp_path):
    pipe, folder = pipeline
    _train(folder, tmp_path / "run", "lora")
    noise = _noise(2)
    images = sample.sample_images(sample.load_pipeline(folder, tmp_path / "run"), PROMPTS, noise, **OPTIONS)
    export.export(str(tmp_path / "run"), str(tmp_path / "lora"), "lora")
    tuned = _with_transformer(pipe, FluxTransformer2DModel.from_pretrained(folder / "transformer"))
    tuned.load_lora_weights(str(tmp_path / "lora"))
    ref = _diffusers(tuned, noise)
    _assert_same_image(images, ref)
    assert np.abs(_diffusers(pipe, noise) - ref).max() > 10 * ATOL, "training changed nothing"


def test_scheduler_num_train_timesteps_is_fed_as_diffusers_does(tmp_path):
    """FluxPipeline gives the transformer timestep = sigma * num_train_timesteps / 1000, not sigma."""
    pipe = tiny_flux_pipeline(FLUX_SCHEDULER | {"num_train_timesteps": 500})
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    noise = _noise()
    ours_images = sample.sample_images(sample.load_pipeline(tmp_path), PROMPTS, noise, **OPTIONS)
    _assert_same_image(ours_images, _diffusers(pipe, noise))


DEMO_PROMPTS = ["a red triangle on the left", "a blue circle at the top"]


@pytest.mark.parametrize("backbone", ["flux", "sd3"])
def test_demo_base_samples_as_the_world_samples_it(backbone):
    """A shipped demo base (FLUX's, the default, or SD3's) has no pipeline folder: the world's text table and pixel
    latents stand in, on the schedule the world's own sampler (generate, the sampling eval) uses."""
    from pnapo_jax.world import demo_base as base
    from pnapo_jax.world import latents, reward

    demo = sample.load_pipeline(None if backbone == "flux" else str(base.BASES[backbone]))
    assert demo.size == 32 and demo.transformer.backbone == backbone
    noise_NxIxC = np.asarray(flux.pack_latents(flow.seeded_noise(3, range(2), (3, 32, 32))))
    images = sample.sample_images(demo, DEMO_PROMPTS, seed=3, num_steps=6)
    assert images.shape == (2, 32, 32, 3)
    cfg, params = base.load_base(base.BASES[backbone])
    world = latents.decode(np.asarray(base.sample_latents(cfg, params, DEMO_PROMPTS, noise_NxIxC, 6)))
    np.testing.assert_allclose(images, world, atol=1e-5)
    scores, noise_scores = (reward.reward(x, DEMO_PROMPTS) for x in (images, latents.decode(noise_NxIxC)))
    assert (scores > noise_scores + 0.1).all(), (scores, noise_scores)  # the prompts' pictures, not noise
    if backbone == "sd3":  # SD3's position table is 16 x 16 tokens: a larger image is one line, not a trace error
        with pytest.raises(UserError, match=r"^--height and --width: 64 x 32 is a 32 x 16 token grid.*\(16 x 16"):
            sample.sample_images(demo, DEMO_PROMPTS, height=64, num_steps=1)


@pytest.mark.slow
def test_demo_run_workdir_samples_its_policy(tmp_path, pipeline):
    """A demo run (here on synthetic pairs, one step) samples its checkpoint's policy with the world's parts;
    a FLUX run without its pipeline folder is refused in one line."""
    sys.path.insert(0, str(ROOT / "configs"))
    import demo_cpu  # noqa: PLC0415

    config = demo_cpu.get_config("fast")
    config.data.source, config.train.num_steps, config.eval.sample_every = "synthetic", 1, 0
    config.generate.shift_mu, config.optim.warmup_steps, config.optim.lr = 0.3, 0, 1e-3
    train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1], show_progress=False)
    policy = sample.load_pipeline(None, str(tmp_path / "run"))
    assert policy.scheduler == {"shift": pytest.approx(np.exp(0.3))}  # the run's fixed shift
    images = sample.sample_images(policy, DEMO_PROMPTS, seed=3, num_steps=6)
    base_images = sample.sample_images(sample.load_pipeline(None), DEMO_PROMPTS, seed=3, num_steps=6,
                                       height=32, width=32)
    assert images.shape == base_images.shape == (2, 32, 32, 3)
    assert 0 < np.abs(images - base_images).max()  # the policy, not the base
    _train(pipeline[1], tmp_path / "flux_run", "")
    with pytest.raises(UserError, match=r"^--workdir=.*flux_run: not the demo world's transformer .*--pipeline=DIR"):
        sample.load_pipeline(None, str(tmp_path / "flux_run"))
