"""PNAPO on the SD3 backbone: the loss of a tiny SD3.5-like model against the NumPy reference the FLUX loss tests
use, the train loop on a tiny SD3 run (it trains, resumes exactly, LoRA trains only adapters), and export of an
SD3 run as a diffusers folder, Stability's single file and a LoRA file, each loaded back by diffusers."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from etils import epath
from flux_testing import torch_flux
from sd3_testing import params_from_torch, random_inputs, tiny_config, torch_forward, torch_sd3
from test_pnapo import _assert_metrics, _np_dynamic_beta, _np_preference

from pnapo_jax import backbones, checkpoint, config_check, export, objective, train
from pnapo_jax.convert import sd3 as convert_sd3
from pnapo_jax.errors import UserError
from pnapo_jax.models import sd3
from pnapo_jax.setup import base_params, make_setup

B, H, W, T = 4, 3, 4, 6
ROOT = epath.Path(__file__).parent.parent


def _pair_batch(cfg: sd3.SD3Config, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    text = random_inputs(cfg, B, H, W, T, seed=seed)
    gap = rng.uniform(0, 2, B).astype(np.float32)
    batch = dict(prompt_embeds=text["encoder_hidden_states"], pooled_prompt_embeds=text["pooled_projections"],
                 reward_l=np.zeros(B, np.float32), reward_w=gap, reward_gap=gap)
    batch.update({k: rng.standard_normal((B, H * W, cfg.token_dim)).astype(np.float32)
                  for k in ("x0_w", "x0_l", "x1_w", "x1_l")})
    return {k: jnp.asarray(v) for k, v in batch.items()}


def test_pair_loss_matches_numpy_on_sd3():
    """pair_loss through SD3's velocity (recorded noise, dynamic beta) equals the float64 NumPy formula fed by
    diffusers' own SD3 velocities of x_t = (1 - t) x0 + t x1 at timestep 1000 t."""
    policy_torch, ref_torch = torch_sd3("sd35_medium", seed=0), torch_sd3("sd35_medium", seed=1)
    cfg = sd3.SD3Config.from_diffusers(dict(policy_torch.config))
    policy, ref = params_from_torch(policy_torch, cfg), params_from_torch(ref_torch, cfg)
    backbone = backbones.BACKBONES["sd3"]
    velocity = backbone.velocity(cfg, H, W)
    v = lambda params, x_t, t, cond: velocity({"params": params}, x_t, t, cond)
    loss_cfg = objective.LossConfig(beta=3.0, tau=0.5, n1=10, n2=30, noise_mode="recorded")
    batch = _pair_batch(cfg, seed=5)
    t = np.array([0.1, 0.3, 0.55, 0.9], np.float32)
    step = 17
    cond = backbones.record_conditioning(backbone, batch, 1.0)  # SD3 ignores the guidance value
    _, metrics = jax.jit(lambda p, r: objective.pair_loss(p, batch, t, None, step, policy_velocity=v,
                                                          ref_velocity=v, ref_params=r, cond=cond, cfg=loss_cfg))(
        policy, ref)

    np_batch = {k: np.asarray(x) for k, x in batch.items()}
    tt = t[:, None, None]

    def err(model, s):
        x_t = (1 - tt) * np_batch[f"x0_{s}"] + tt * np_batch[f"x1_{s}"]
        out = torch_forward(model, dict(hidden_states=x_t.astype(np.float32),
                                        encoder_hidden_states=np_batch["prompt_embeds"],
                                        pooled_projections=np_batch["pooled_prompt_embeds"], timestep=1000 * t,
                                        h_tokens=H, w_tokens=W))
        return ((np_batch[f"x1_{s}"] - np_batch[f"x0_{s}"] - out.astype(np.float64)) ** 2).mean(axis=(1, 2))

    beta = _np_dynamic_beta(loss_cfg.beta, np_batch["reward_gap"], step, True, loss_cfg.tau, True, loss_cfg.n1,
                            loss_cfg.n2)
    _, want, _ = _np_preference(err(policy_torch, "w"), err(policy_torch, "l"), err(ref_torch, "w"),
                                err(ref_torch, "l"), beta, 1.0)
    assert 0 < want["rewards/accuracies"] < 1
    _assert_metrics(metrics, {k: want[k] for k in ("loss", "rewards/chosen", "rewards/rejected",
                                                   "rewards/margins", "rewards/accuracies")}, rtol=2e-4)


def _losses(workdir) -> dict[int, float]:
    lines = [json.loads(s) for s in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {d["step"]: d["loss"] for d in lines if "loss" in d}


def _checkpoint_params(setup, workdir, step):
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), setup.config.checkpoint)
    state = ckpt.restore(step, setup.abstract_state, None)
    ckpt.close()
    return jax.device_get(state["params"])


def test_tiny_sd3_trains_and_resumes_exactly(tmp_path):
    """2N steps straight == N steps, a restart from the checkpoint, N more; the first loss is log 2 (policy ==
    reference), and training moved it."""
    config = tiny_config()
    config.train.num_steps, config.checkpoint.every_steps, config.train.eval_every = 4, 2, 0
    train.train_and_evaluate(config, str(tmp_path / "straight"), devices=jax.devices()[:1], show_progress=False)
    half = tiny_config()
    half.train.num_steps, half.checkpoint.every_steps, half.train.eval_every = 2, 2, 0
    train.train_and_evaluate(half, str(tmp_path / "resumed"), devices=jax.devices()[:1], show_progress=False)
    train.train_and_evaluate(config, str(tmp_path / "resumed"), devices=jax.devices()[:1], show_progress=False)
    straight = _losses(tmp_path / "straight")
    assert _losses(tmp_path / "resumed") == straight
    assert straight[min(straight)] == pytest.approx(np.log(2), abs=0.02)
    assert abs(straight[max(straight)] - np.log(2)) > 1e-3
    setup = make_setup(config, jax.devices()[:1])
    jax.tree.map(np.testing.assert_array_equal, _checkpoint_params(setup, tmp_path / "straight", 4),
                 _checkpoint_params(setup, tmp_path / "resumed", 4))


def _train(workdir, variant: str = ""):
    """Two steps from a random diffusers SD3 folder (through the backbone's load_pretrained: a random init's
    zero adaLN gates would hide what the attention adapters do), a checkpoint after each."""
    config = tiny_config(variant)
    torch_sd3("sd35_medium", seed=4, num_layers=3, dual_attention_layers=(0,)).save_pretrained(workdir / "base")
    config.model.pretrained = str(workdir / "base")
    config.train.num_steps, config.train.eval_every, config.checkpoint.every_steps = 2, 0, 1
    config.optim.warmup_steps = 0  # lr 0 at step 0 would leave the LoRA adapters at B = 0
    train.train_and_evaluate(config, str(workdir / "run"), devices=jax.devices()[:1], show_progress=False)
    return make_setup(export.load_config(str(workdir / "run")), jax.devices()[:1])


def _rel_err(model: SD3Transformer2DModel, setup, variables) -> float:
    inputs = random_inputs(setup.model_cfg, 2, 3, 4, setup.config.data.text_len, seed=3)
    ours = np.asarray(sd3.SD3Transformer(setup.model_cfg).apply(variables, **inputs))
    ref = torch_forward(model.eval(), inputs)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.slow  # ~3 min on the shared 2-core box: a training run, an export subprocess, from_single_file
def test_export_full_finetune_as_diffusers_and_single_file(tmp_path):
    run = tmp_path / "run"
    setup = _train(tmp_path)
    trained = _checkpoint_params(setup, run, 2)
    assert export.export(str(run), str(tmp_path / "diffusers"), "diffusers") == 2
    assert _rel_err(SD3Transformer2DModel.from_pretrained(tmp_path / "diffusers"), setup, {"params": trained}) <= 1e-4
    cmd = [sys.executable, "-m", "pnapo_jax.export", f"--workdir={run}", f"--out={tmp_path / 'sd3'}",
           "--format=single_file"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    loaded = convert_sd3.load_sd3_single_file(tmp_path / "sd3.safetensors", setup.model_cfg)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), trained)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text((tmp_path / "diffusers" / "config.json").read_text())
    model = SD3Transformer2DModel.from_single_file(str(tmp_path / "sd3.safetensors"),
                                                   config=str(tmp_path / "config"), local_files_only=True)
    assert _rel_err(model, setup, {"params": trained}) <= 1e-4


@pytest.mark.slow  # ~1.5 min on the shared 2-core box
def test_export_lora_loads_in_stable_diffusion3_pipeline(tmp_path):
    run = tmp_path / "run"
    setup = _train(tmp_path, "lora")
    lora = _checkpoint_params(setup, run, 2)
    base = jax.device_get(base_params(setup))
    assert set(lora) == {"transformer_blocks_0", "transformer_blocks_1", "transformer_blocks_2"}
    export.export(str(run), str(tmp_path / "lora"), "lora")
    convert_sd3.save_sd3_transformer(setup.model_cfg, base, tmp_path / "base")
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(tmp_path / "base"),
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    assert _rel_err(pipe.transformer, setup, {"params": base, "lora": lora}) > 1e-4  # the adapters trained
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert _rel_err(pipe.transformer, setup, {"params": base, "lora": lora}) <= 1e-4
    export.export(str(run), str(tmp_path / "merged"), "diffusers")
    assert _rel_err(SD3Transformer2DModel.from_pretrained(tmp_path / "merged"), setup,
                    {"params": base, "lora": lora}) <= 1e-4


@pytest.mark.parametrize("arg", ["", "lora", "independent", "static_beta", "large", "medium35", "medium35,lora"])
def test_sd3_tpu_variants_pass_the_check(arg):
    sys.path.insert(0, str(ROOT / "configs"))
    import sd3_tpu

    c = sd3_tpu.get_config(arg)
    cfg = backbones.backbone_of(c).model_config(c)
    assert c.model.backbone == "sd3" and isinstance(cfg, sd3.SD3Config)
    want = {"": (24, 1536, None, ()), "large": (38, 2432, "rms_norm", ()),
            "medium35": (24, 1536, "rms_norm", tuple(range(13)))}[next((a for a in ("large", "medium35") if a in arg),
                                                                       "")]
    assert (cfg.num_layers, cfg.inner_dim, cfg.qk_norm, cfg.dual_attention_layers) == want
    assert c.pnapo.beta == 5000.0 and c.optim.lr == (1e-5 if "lora" in arg else 1e-6)
    assert c.pnapo.noise_mode == ("independent" if "independent" in arg else "recorded")
    assert c.pnapo.use_gap == c.pnapo.use_schedule == (arg != "static_beta")
    assert backbones.backbone_of(c).record_spec(c).channels == 64
    c.data.path = "gs://bucket/pairs"  # the one required override
    config_check.check(c)
    c.t_sampling.kind = "logit_normal"  # SD3's own t-sampling is one override away
    config_check.check(c)


def test_sd3_tpu_fields_are_commented():
    for line in (ROOT / "configs" / "sd3_tpu.py").read_text().splitlines():
        if line.lstrip().startswith("c.") and " = " in line:
            assert "#" in line, line


@pytest.mark.parametrize("overrides,field", [
    ({"model.qk_norm": "layer_norm"}, "config.model.qk_norm"),
    ({"model.caption_projection_dim": 24}, "config.model.caption_projection_dim"),
    ({"model.dual_attention_layers": (0, 7)}, "config.model.dual_attention_layers"),
    ({"model.pretrained_format": "bfl"}, "config.model.pretrained_format"),
    ({"model.pos_embed_max_size": 3}, "config.model.pos_embed_max_size"),
    ({"lora.rank": 2, "lora.targets": ["to_q", "proj_out"]}, "proj_out"),
])
def test_a_bad_sd3_field_is_named_before_any_work(overrides, field):
    c = tiny_config()
    for k, v in overrides.items():
        section, name = k.split(".")
        c[section][name] = v
    with pytest.raises(UserError, match=re.escape(field)) as err:
        config_check.check(c)
    assert "\n" not in str(err.value)


def test_flux_weights_for_an_sd3_run_fail_in_one_line(tmp_path):
    torch_flux().save_pretrained(tmp_path / "flux")
    c = tiny_config()
    c.model.pretrained = str(tmp_path / "flux")
    backbone = backbones.backbone_of(c)
    with pytest.raises(UserError, match=r"holds FLUX weights .* config\.model\.backbone=flux") as err:
        backbone.load_pretrained(c, backbone.model_config(c), None)
    assert "\n" not in str(err.value)
