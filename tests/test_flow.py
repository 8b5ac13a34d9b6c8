"""Rectified-flow math against first principles and diffusers' FluxPipeline / FlowMatchEulerDiscreteScheduler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.training_utils import compute_density_for_timestep_sampling
from flux_testing import params_from_torch, random_inputs, torch_flux
from scipy.special import ndtr

from pnapo_jax import flow
from pnapo_jax.models import flux

# FLUX.1's scheduler_config.json (time_shift_type defaults to "exponential").
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")


def diffusers_euler(model, noise_BxIxC, prompt_embeds, pooled, num_steps, guidance_scale, img_ids, txt_ids,
                    true_cfg_scale=1.0, negative_prompt_embeds=None, negative_pooled=None) -> np.ndarray:
    """FluxPipeline's denoising loop (torch tensors in); returns every state [num_steps + 1, B, I, C]."""
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    c = scheduler.config
    mu = calculate_shift(noise_BxIxC.shape[1], c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    timesteps, _ = retrieve_timesteps(scheduler, num_steps, "cpu",
                                      sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    B = noise_BxIxC.shape[0]
    guidance = torch.full([1], guidance_scale).expand(B) if model.config.guidance_embeds else None
    do_true_cfg = true_cfg_scale > 1 and negative_prompt_embeds is not None
    scheduler.set_begin_index(0)
    latents, states = noise_BxIxC, [noise_BxIxC]
    with torch.no_grad():
        for t in timesteps:
            common = dict(hidden_states=latents, timestep=t.expand(B).to(latents.dtype) / 1000, guidance=guidance,
                          img_ids=img_ids, txt_ids=txt_ids, return_dict=False)
            v = model(encoder_hidden_states=prompt_embeds, pooled_projections=pooled, **common)[0]
            if do_true_cfg:
                v_neg = model(encoder_hidden_states=negative_prompt_embeds, pooled_projections=negative_pooled,
                              **common)[0]
                v = v_neg + true_cfg_scale * (v - v_neg)
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
            states.append(latents)
    return torch.stack(states).numpy()


def _rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def test_interpolate_and_velocity():
    x0, x1 = jax.random.normal(jax.random.key(0), (2, 3, 5, 4))
    t_B = jnp.array([0.0, 0.3, 1.0])
    xt = flow.interpolate(x0, x1, t_B)
    for b in range(3):
        np.testing.assert_allclose(xt[b], (1 - t_B[b]) * x0[b] + t_B[b] * x1[b], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(xt[0], x0[0])
    np.testing.assert_allclose(xt[2], x1[2], atol=1e-6)
    # The target is the time derivative of the path, at every t.
    _, dxdt = jax.jvp(lambda t: flow.interpolate(x0, x1, t), (t_B,), (jnp.ones(3),))
    np.testing.assert_allclose(dxdt, flow.velocity_target(x0, x1), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(flow.velocity_target(x0, x1), x1 - x0)


def test_uniform_and_logit_normal_moments():
    t = np.asarray(flow.sample_t(jax.random.key(1), 200_000))
    assert 0 <= t.min() and t.max() < 1
    np.testing.assert_allclose([t.mean(), t.var()], [1 / 2, 1 / 12], atol=3e-3)
    t = np.asarray(flow.sample_t(jax.random.key(2), 200_000, kind="logit_normal", logit_mean=-0.5, logit_std=1.5))
    logit = np.log(t / (1 - t))
    np.testing.assert_allclose([logit.mean(), logit.std()], [-0.5, 1.5], atol=2e-2)


@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "mode"])
def test_samplers_match_diffusers_on_same_draws(kind):
    args = dict(logit_mean=0.3, logit_std=0.8, mode_scale=1.29)
    ref = compute_density_for_timestep_sampling(kind if kind != "uniform" else "none", 4096,
                                                generator=torch.Generator().manual_seed(0), **args).numpy()
    gen = torch.Generator().manual_seed(0)  # the draws diffusers made, mapped to our uniform u
    if kind == "logit_normal":
        u = ndtr((torch.normal(0.3, 0.8, (4096,), generator=gen).numpy() - 0.3) / 0.8)
    else:
        u = torch.rand(4096, generator=gen).numpy()
    ours = flow.t_from_uniform(jnp.asarray(u, jnp.float32), kind=kind, **args)
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_unknown_sampler_kind():
    with pytest.raises(ValueError, match="kind"):
        flow.sample_t(jax.random.key(0), 4, kind="cosmap")


def test_resolution_shift():
    for seq_len in (16, 256, 1024, 4096, 6000):
        np.testing.assert_allclose(flow.resolution_mu(seq_len), calculate_shift(seq_len), rtol=1e-12)
    assert flow.resolution_mu(256) == pytest.approx(0.5) and flow.resolution_mu(4096) == pytest.approx(1.15)
    t = np.linspace(0, 1, 1001)
    shifted = np.asarray(flow.time_shift(1.15, jnp.asarray(t, jnp.float32)))
    assert np.all(np.diff(shifted) > 0) and np.all(shifted[1:-1] > t[1:-1])
    assert shifted[0] == 0 and shifted[-1] == 1
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(shifted, np.exp(1.15) / (np.exp(1.15) + (1 / t - 1)), rtol=1e-6)
    np.testing.assert_allclose(flow.time_shift(0.0, jnp.asarray(t[1:], jnp.float32)), t[1:], rtol=1e-6)
    key = jax.random.key(3)
    np.testing.assert_array_equal(flow.sample_t(key, 64, kind="logit_normal", shift_mu=0.8),
                                  flow.time_shift(0.8, flow.sample_t(key, 64, kind="logit_normal")))


def test_t_bucket():
    t = jnp.array([0.0, 0.249, 0.25, 0.5, 0.999, 1.0])
    np.testing.assert_array_equal(flow.t_bucket(t, 4), [0, 0, 1, 2, 3, 3])


def test_pack_unpack_match_flux_pipeline():
    x = np.random.default_rng(0).standard_normal((2, 16, 6, 10)).astype(np.float32)
    packed = flux.pack_latents(jnp.asarray(x))
    ref = FluxPipeline._pack_latents(torch.from_numpy(x), 2, 16, 6, 10).numpy()
    np.testing.assert_array_equal(packed, ref)
    unpacked = flux.unpack_latents(packed, 6, 10)
    ref_un = FluxPipeline._unpack_latents(torch.from_numpy(ref), height=6 * 8, width=10 * 8, vae_scale_factor=8)
    np.testing.assert_array_equal(unpacked, ref_un.numpy())
    np.testing.assert_array_equal(unpacked, x)


def test_ids_match_flux_pipeline():
    ref = FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32).numpy()
    ids = flux.img_ids(3, 5)
    assert ids.dtype == jnp.float32
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_array_equal(flux.txt_ids(7), np.zeros((7, 3)))


@pytest.mark.parametrize("num_steps,seq_len", [(28, 4096), (50, 1024), (4, 16)])
def test_sigmas_match_scheduler(num_steps, seq_len):
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    timesteps, _ = retrieve_timesteps(scheduler, num_steps, "cpu", sigmas=np.linspace(1.0, 1 / num_steps, num_steps),
                                      mu=calculate_shift(seq_len))
    sigmas = flow.flux_sigmas(num_steps, seq_len)
    np.testing.assert_allclose(sigmas, scheduler.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sigmas[:-1], timesteps.numpy() / 1000, rtol=1e-6)
    np.testing.assert_allclose(flow.flux_sigmas(num_steps, seq_len, mu=0.0)[:-1],
                               np.linspace(1.0, 1 / num_steps, num_steps), rtol=1e-6)


@pytest.mark.parametrize("case", [dict(), dict(true_cfg_scale=4.0), dict(guidance_embeds=False, true_cfg_scale=1.5)])
def test_euler_matches_diffusers(case):
    case = dict(case)
    true_cfg_scale = case.pop("true_cfg_scale", 1.0)
    model = torch_flux(seed=1, **case)
    cfg = flux.FluxConfig.from_diffusers(dict(model.config))
    params = params_from_torch(model, cfg)
    inputs = random_inputs(cfg, batch=2, h=4, w=4, txt_len=8, seed=2)
    negative = random_inputs(cfg, batch=2, h=4, w=4, txt_len=8, seed=3) if true_cfg_scale > 1 else {}
    args = (inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["pooled_projections"], 6, 3.5,
            inputs["img_ids"], inputs["txt_ids"], true_cfg_scale,
            negative.get("encoder_hidden_states"), negative.get("pooled_projections"))

    velocity = flux.Velocity(cfg, 4, 4)
    cond = flux.conditioning(inputs["encoder_hidden_states"], inputs["pooled_projections"], 3.5)
    negative_cond = flux.conditioning(negative["encoder_hidden_states"], negative["pooled_projections"],
                                      3.5) if negative else None
    ours_args = (inputs["hidden_states"], cond, 6, true_cfg_scale, negative_cond)
    ours = flow.euler_sample(velocity, {"params": params}, *ours_args, return_trajectory=True)
    ref = diffusers_euler(model, *(a if a is None or np.isscalar(a) else torch.from_numpy(a) for a in args))
    assert ours.shape == ref.shape == (7, 2, 16, cfg.in_channels)
    assert _rel_err(ours, ref) <= 1e-4, _rel_err(ours, ref)
    assert _rel_err(ours[-1], ref[-1]) <= 1e-4, _rel_err(ours[-1], ref[-1])
    np.testing.assert_array_equal(ours[0], inputs["hidden_states"])
    if not case:  # the plain output is the trajectory's end
        final = flow.euler_sample(velocity, {"params": params}, *ours_args)
        np.testing.assert_allclose(final, ours[-1], rtol=1e-6, atol=1e-6)
