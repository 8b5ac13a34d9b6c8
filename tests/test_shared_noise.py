"""Shared-noise pairs (issue 18): the stochastic sampler against diffusers' and a Gaussian's exact marginals, and
pairs whose winner and loser start from one recorded noise: reproducible from their seeds, different, trainable."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from test_generate import BrightnessWorld, _config, _prompts, _records

from pnapo_jax import config_check, flow, generate, sampling, train, worlds
from pnapo_jax.errors import UserError
from pnapo_jax.setup import base_params, make_setup


@pytest.fixture
def world(monkeypatch):
    w = BrightnessWorld()
    monkeypatch.setattr(worlds, "make_world", lambda config: w)
    return w


def test_stochastic_step_at_eta_0_is_diffusers_euler_step_and_at_eta_1_the_forward_posterior(monkeypatch):
    """eta 0 is FlowMatchEulerDiscreteScheduler's step (FluxPipeline's schedule); eta 1 draws from the forward
    process's posterior q(x_s | x_t, x0^) (NumPy, Gaussian algebra) with the model's x0^ = x - t v."""
    rng = np.random.default_rng(0)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=0.8)
    sigmas = scheduler.sigmas.numpy().astype(np.float64)
    x = rng.standard_normal((2, 5, 3)).astype(np.float32)
    for j, step_t in enumerate(scheduler.timesteps):
        t, s = sigmas[j], sigmas[j + 1]
        v, eps = (rng.standard_normal(x.shape).astype(np.float32) for _ in range(2))
        want = scheduler.step(torch.from_numpy(v), step_t, torch.from_numpy(x)).prev_sample.numpy()
        np.testing.assert_allclose(np.asarray(flow.stochastic_step(x, v, t, s, 0.0, eps)), want, atol=2e-6)
        # x_t = a_t x0 + t x1 with x0 given: x_t | x_s ~ N(a_t/a_s x_s, t^2 - (a_t/a_s)^2 s^2), x_s ~ N(a_s x0, s^2)
        x0 = x - t * v
        r, var_ts = (1 - t) / (1 - s), t**2 - ((1 - t) / (1 - s)) ** 2 * s**2
        mean = (1 - s) * x0 + r * s**2 / t**2 * (x - (1 - t) * x0)  # Bishop 2.116 for q(x_s | x_t, x0)
        std = np.sqrt(var_ts * s**2 / t**2)
        np.testing.assert_allclose(np.asarray(flow.stochastic_step(x, v, t, s, 1.0, eps)), mean + std * eps,
                                   atol=2e-5)
        x = want


def test_stochastic_sampler_keeps_the_data_marginal_and_varies_from_one_noise():
    """With the exact velocity of Gaussian data N(m, s^2), samples at eta 0.7 have the data's mean and std
    (NumPy's estimate over 4096 noises and step-noise keys; 160 steps, where the ODE's Euler error is small too);
    from ONE noise the step noises alone spread them over most of the data's std (the ODE maps one noise to one
    sample). At 16 steps every eta is ~10% narrow, as Euler is: a discretisation error that more steps remove."""
    m, s = 0.5, 0.3

    def velocity(variables, x, t, cond):  # E[x1 - x0 | x_t] for x0 ~ N(m, s^2), x1 ~ N(0, 1), x_t on the line
        t = t[:, None, None]
        var = (1 - t) ** 2 * s**2 + t**2
        centred = x - (1 - t) * m
        return t / var * centred - (m + (1 - t) * s**2 / var * centred)

    N = 4096
    noises = jax.random.normal(jax.random.PRNGKey(0), (N, 1, 1))
    keys = flow.seeded_keys(3, np.arange(N))
    sample = lambda noise, **kw: np.asarray(flow.euler_sample(velocity, {}, noise, {}, 160, mu=0.0, **kw)).ravel()
    for x0 in (sample(noises), sample(noises, eta=0.7, step_keys=keys)):
        assert abs(x0.mean() - m) < 0.02 and abs(x0.std() - s) < 0.02, (x0.mean(), x0.std())
    one = jnp.broadcast_to(noises[:1], noises.shape)
    assert sample(one).std() < 1e-6
    assert sample(one, eta=0.7, step_keys=keys).std() > 0.9 * s
    assert 0.5 * s < sample(one, eta=0.3, step_keys=keys).std() < 0.9 * s  # a lower eta remembers the noise


def _shared_config():
    config = _config()
    config.generate.eta, config.generate.shared_noise = 0.6, True
    return config


def test_shared_noise_pairs_reproduce_from_their_seeds_and_differ(tmp_path, world):
    config = _shared_config()
    generate.run(config, _prompts(tmp_path), str(tmp_path / "out"), show_progress=False)
    records = _records(tmp_path / "out")
    assert len(records) == 10  # one best-worst pair per prompt: the K images of a prompt differ
    setup = make_setup(config)
    sampler = sampling.Sampler(setup, {"params": base_params(setup)}, config.generate)
    K = config.generate.images_per_prompt
    for p, r in enumerate(records):
        np.testing.assert_array_equal(r["x1_w"], r["x1_l"])  # the pair shares its recorded noise
        assert np.abs(r["x0_w"] - r["x0_l"]).max() > 1e-2  # and still differs
        assert r["seed_w"] != r["seed_l"] and {r["seed_w"], r["seed_l"]} <= set(range(K * p, K * p + K))
        np.testing.assert_array_equal(r["x1_w"], np.asarray(sampler.noises(np.array([K * p])))[0])
    for r in records[:2] + records[7:8]:  # regenerated from the record's seeds alone
        embeds, pooled = world.encode_prompts([r["prompt"]])
        seeds = np.array([r["seed_w"], r["seed_l"]])
        x1 = sampler.noises(generate.noise_seeds(seeds, K, shared=True))
        x0 = sampler(x1, np.repeat(embeds, 2, 0), np.repeat(pooled, 2, 0), seeds)
        np.testing.assert_allclose(r["x0_w"], np.asarray(x0[0]), atol=1e-5)
        np.testing.assert_allclose(r["x0_l"], np.asarray(x0[1]), atol=1e-5)
    # PNAPO trains on them unchanged (noise_mode "recorded")
    config.data.source, config.data.path = "array_record", str(tmp_path / "out")
    config.train.num_steps, config.train.global_batch_size, config.train.eval_every = 2, 4, 0
    line = train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1], show_progress=False)
    assert line["step"] == 2 and np.isfinite(line["loss"]) and config.pnapo.noise_mode == "recorded"


def test_eta_without_sharing_keeps_a_noise_per_image(tmp_path, world):
    config = _config()
    config.generate.eta = 0.6
    generate.run(config, _prompts(tmp_path, 2), str(tmp_path / "out"), show_progress=False)
    ode = _config()
    generate.run(ode, _prompts(tmp_path, 2), str(tmp_path / "ode"), show_progress=False)
    for r, o in zip(_records(tmp_path / "out"), _records(tmp_path / "ode"), strict=True):
        assert not np.array_equal(r["x1_w"], r["x1_l"])
        np.testing.assert_array_equal(r["x1_w"], np.asarray(flow.seeded_noise(0, [r["seed_w"]], r["x1_w"].shape))[0])
        if r["seed_w"] == o["seed_w"]:
            assert np.abs(r["x0_w"] - o["x0_w"]).max() > 1e-3  # eta changes the path from the same noise


def test_shared_noise_without_eta_and_eta_above_1_are_refused_in_one_line():
    config = _config()
    config.generate.shared_noise = True
    with pytest.raises(UserError, match=r"config.generate.shared_noise needs config.generate.eta > 0"):
        config_check.check(config)
    config.generate.eta = 1.5
    with pytest.raises(UserError, match=r"config.generate.eta is 1.5; it must be in \[0, 1\]"):
        config_check.check(config)
