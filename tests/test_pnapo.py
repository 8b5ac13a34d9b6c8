"""The PNAPO loss against direct NumPy (float64) evaluations, and one end-to-end check on a tiny FLUX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flux_testing import params_from_torch, random_inputs, torch_flux

from pnapo_jax import objective
from pnapo_jax.models import flux

B, H, W, T = 4, 4, 4, 8
GUIDANCE = 1.0  # config.pnapo.guidance's default: the guidance input the train step conditions FLUX.1-dev on


def _np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_preference(err_w, err_l, ref_w, ref_l, beta, scale, objective_name="dpo", sft_weight=0.0):
    """(loss_B, metrics, d mean-loss / d (err_w, err_l, ref_w, ref_l)) in float64, written out by hand.
    "ipo": (logit - 1/2)^2 (IPO, Azar et al., in DPO's units); sft_weight adds sft_weight * err_w."""
    err_w, err_l, ref_w, ref_l = (np.asarray(a, np.float64) for a in (err_w, err_l, ref_w, ref_l))
    beta = np.broadcast_to(np.asarray(beta, np.float64), err_w.shape)
    bs = scale * beta
    chosen, rejected = -bs * (err_w - ref_w), -bs * (err_l - ref_l)
    logits = -bs * ((err_w - ref_w) - (err_l - ref_l))
    if objective_name == "dpo":
        loss_B = -_np_log_sigmoid(logits)
        d_logit = -_np_sigmoid(-logits)  # dL/dlogit
    else:
        loss_B = (logits - 0.5) ** 2
        d_logit = 2 * (logits - 0.5)
    d_pref_w = -bs * d_logit / len(logits)  # dlogit/derr_w = -bs
    grads = (d_pref_w + sft_weight / len(logits), -d_pref_w, -d_pref_w, d_pref_w)
    metrics = {"loss/preference": loss_B.mean(), "loss/sft": sft_weight * err_w.mean()} if sft_weight else {}
    loss_B = loss_B + sft_weight * err_w
    metrics = {
        **metrics,
        "loss": loss_B.mean(), "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).mean(), "rewards/margins": (chosen - rejected).mean(),
        "beta_eff": beta.mean(), "mse/policy_w": err_w.mean(), "mse/policy_l": err_l.mean(),
        "mse/ref_w": ref_w.mean(), "mse/ref_l": ref_l.mean(),
    }
    return loss_B, metrics, grads


def _np_dynamic_beta(beta, gap, step, use_gap, tau, use_schedule, n1, n2):
    f = 2.0 * _np_sigmoid(np.asarray(gap, np.float64) / tau) - 1.0 if use_gap else np.ones_like(gap, np.float64)
    if not use_schedule or step <= n1:
        g = 1.0
    elif step <= n2:
        g = 0.75 + 0.25 * np.cos(np.pi * (step - n1) / (n2 - n1))
    else:
        g = 0.5
    return beta * f * g


def _assert_metrics(got, want, rtol):
    for k, v in want.items():
        np.testing.assert_allclose(float(got[k]), v, rtol=rtol, atol=1e-6, err_msg=k)


def _preference_loss(*args):
    """The mean of `preference_losses`, the loss `pair_loss` returns, and its metrics."""
    loss_B, metrics = objective.preference_losses(*args)
    return loss_B.mean(), metrics


@pytest.mark.parametrize("convention", ["beta", "half_beta"])
@pytest.mark.parametrize("per_example_beta", [False, True])
@pytest.mark.parametrize("objective_name,sft_weight", [("dpo", 0.0), ("ipo", 0.0), ("dpo", 0.7), ("ipo", 0.7)])
def test_preference_loss_and_grad_match_numpy(convention, per_example_beta, objective_name, sft_weight):
    rng = np.random.default_rng(0)
    ref_w, ref_l = (rng.uniform(0.5, 1.5, 16).astype(np.float32) for _ in range(2))
    err_w, err_l = (r + rng.normal(0, 1e-3, 16).astype(np.float32) for r in (ref_w, ref_l))
    beta = rng.uniform(500, 3000, 16).astype(np.float32) if per_example_beta else 2000.0
    errs = tuple(jnp.asarray(a) for a in (err_w, err_l, ref_w, ref_l))

    (loss, metrics), grads = jax.value_and_grad(_preference_loss, argnums=(0, 1, 2, 3), has_aux=True)(
        *errs, beta, convention, objective_name, sft_weight)
    loss_B, want, want_grads = _np_preference(err_w, err_l, ref_w, ref_l, beta, objective.SCALE_CONVENTIONS[convention],
                                              objective_name, sft_weight)
    assert set(metrics) == set(want)
    assert 0 < want["rewards/accuracies"] < 1  # both signs present
    np.testing.assert_allclose(float(loss), loss_B.mean(), rtol=1e-5)
    _assert_metrics(metrics, want, rtol=1e-5)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-7)


def test_ipo_is_bounded_where_dpo_keeps_falling():
    """Pushing the loser's error up lowers DPO's loss without end; IPO's is least at margin 1/2 and rises past it."""
    ref = jnp.asarray([1.0]), jnp.asarray([1.0])
    loss = lambda name, loser_err: float(_preference_loss(
        jnp.asarray([1.0]), jnp.asarray([loser_err]), *ref, 10.0, "beta", name)[0])
    dpo = [loss("dpo", 1.0 + d) for d in (0.0, 0.05, 0.2, 1.0)]
    ipo = [loss("ipo", 1.0 + d) for d in (0.0, 0.05, 0.2, 1.0)]  # margins 0, 1/2, 2, 10
    assert all(b < a for a, b in zip(dpo, dpo[1:], strict=False))
    np.testing.assert_allclose(ipo, [0.25, 0.0, 2.25, 90.25], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="objective"):
        _preference_loss(jnp.ones(1), jnp.ones(1), *ref, 10.0, "beta", "kto")


def test_half_beta_convention_is_beta_halved():
    errs = [jnp.asarray(a, jnp.float32) for a in ([1.0, 2.0], [1.5, 1.0], [1.2, 2.1], [1.4, 1.2])]
    a, _ = _preference_loss(*errs, 4.0, "half_beta")
    b, _ = _preference_loss(*errs, 2.0, "beta")
    np.testing.assert_allclose(a, b, rtol=1e-7)
    with pytest.raises(ValueError, match="scale_convention"):
        _preference_loss(*errs, 1.0, "0.5")


@pytest.mark.parametrize("use_gap,use_schedule", [(True, True), (False, True), (True, False), (False, False)])
def test_dynamic_beta_matches_numpy(use_gap, use_schedule):
    cfg = objective.LossConfig(use_gap=use_gap, use_schedule=use_schedule, tau=0.7, n1=100, n2=300)
    gap = np.array([0.0, 0.05, 0.5, 3.0, 40.0], np.float32)
    fn = jax.jit(lambda step: objective.dynamic_beta(2000.0, gap, step, cfg))
    for step in (0, 99, 100, 101, 200, 299, 300, 301, 10_000):
        want = _np_dynamic_beta(2000.0, gap, step, use_gap, cfg.tau, use_schedule, cfg.n1, cfg.n2)
        np.testing.assert_allclose(np.asarray(fn(jnp.asarray(step, jnp.int32))), want, rtol=1e-5, atol=1e-3,
                                   err_msg=f"step {step}")


def test_dynamic_beta_needs_n2_after_n1():
    with pytest.raises(ValueError, match="n2 > n1"):
        objective.dynamic_beta(1.0, jnp.ones(2), 0, objective.LossConfig(n1=5, n2=5))


def test_tie_has_zero_gradient():
    beta_B = objective.dynamic_beta(2000.0, jnp.zeros(3), 0, objective.LossConfig())
    np.testing.assert_array_equal(np.asarray(beta_B), 0.0)
    errs = [jnp.asarray(a, jnp.float32) for a in ([1.0, 2.0, 3.0], [1.5, 1.0, 0.2], [1.2, 2.1, 3.0], [1.4, 1, 1])]
    grads = jax.grad(lambda *e: _preference_loss(*e, beta_B)[0], argnums=(0, 1))(*errs)
    for g in grads:
        np.testing.assert_array_equal(np.asarray(g), 0.0)


def _pair_batch(cfg: flux.FluxConfig, seed: int = 0, with_noise: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    text = random_inputs(cfg, B, H, W, T, seed=seed)
    gap = rng.uniform(0, 2, B).astype(np.float32)
    batch = dict(prompt_embeds=text["encoder_hidden_states"], pooled_prompt_embeds=text["pooled_projections"],
                 reward_l=np.zeros(B, np.float32), reward_w=gap, reward_gap=gap)
    keys = ("x0_w", "x0_l", "x1_w", "x1_l") if with_noise else ("x0_w", "x0_l")
    batch.update({k: rng.standard_normal((B, H * W, cfg.in_channels)).astype(np.float32) for k in keys})
    return {k: jnp.asarray(v) for k, v in batch.items()}


def test_recorded_noise_uses_each_images_own_noise():
    batch = _pair_batch(flux.FluxConfig.from_diffusers(torch_flux().config))
    t = np.array([0.0, 0.25, 0.6, 1.0], np.float32)
    pair = objective.make_pair_inputs(batch, t, None, "recorded")
    tt = t[:, None, None]
    for s in ("w", "l"):
        x0, x1 = np.asarray(batch[f"x0_{s}"]), np.asarray(batch[f"x1_{s}"])
        np.testing.assert_allclose(getattr(pair, f"xt_{s}"), (1 - tt) * x0 + tt * x1, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(getattr(pair, f"target_{s}"), x1 - x0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pair.xt_w[0], batch["x0_w"][0])  # t = 0: data; t = 1: the recorded noise
    np.testing.assert_allclose(pair.xt_l[3], batch["x1_l"][3])


def _fresh_noise_pair(noise_mode: str):
    """(cfg, batch, t, key, pair inputs, winner's noise, loser's noise) of a fresh-noise mode."""
    cfg = flux.FluxConfig.from_diffusers(torch_flux().config)
    batch = _pair_batch(cfg)
    t = np.array([0.1, 0.25, 0.6, 0.9], np.float32)
    key = jax.random.key(3)
    pair = objective.make_pair_inputs(batch, t, key, noise_mode)
    noise_w, noise_l = (np.asarray(getattr(pair, f"target_{s}") + batch[f"x0_{s}"]) for s in "wl")
    return cfg, batch, t, key, pair, noise_w, noise_l


def test_independent_noise_is_fresh_and_shared_by_the_pair():
    cfg, batch, t, key, pair, noise_w, noise_l = _fresh_noise_pair("independent")
    np.testing.assert_allclose(noise_w, noise_l, atol=1e-5)  # one noise for both images
    np.testing.assert_allclose(noise_w, jax.random.normal(key, batch["x0_w"].shape), atol=1e-5)
    tt = t[:, None, None]
    np.testing.assert_allclose(pair.xt_l, (1 - tt) * batch["x0_l"] + tt * noise_w, rtol=1e-5, atol=1e-5)
    # the recorded noises are ignored: same result without them, a new key gives a new noise
    no_noise = objective.make_pair_inputs(_pair_batch(cfg, with_noise=False), t, key, "independent")
    jax.tree.map(np.testing.assert_array_equal, no_noise, pair)
    other = objective.make_pair_inputs(batch, t, jax.random.key(4), "independent")
    assert np.abs(np.asarray(other.xt_w) - np.asarray(pair.xt_w)).min() > 0


def test_independent_unshared_noise_is_fresh_and_separate_per_image():
    """noise_mode='independent_unshared': winner and loser each get their own N(0, 1) draw from the rng's two
    halves (issue 18's missing cell); 'independent' still shares one draw."""
    cfg, batch, t, key, pair, noise_w, noise_l = _fresh_noise_pair("independent_unshared")
    key_w, key_l = jax.random.split(key)
    np.testing.assert_allclose(noise_w, jax.random.normal(key_w, batch["x0_w"].shape), atol=1e-5)
    np.testing.assert_allclose(noise_l, jax.random.normal(key_l, batch["x0_l"].shape), atol=1e-5)
    assert np.abs(noise_w - noise_l).min() > 0  # no element shared
    assert abs(np.corrcoef(noise_w.ravel(), noise_l.ravel())[0, 1]) < 0.1
    for noise in (noise_w, noise_l):  # N(0, 1): 1024 draws each
        assert abs(noise.mean()) < 0.15 and abs(noise.std() - 1) < 0.1
    tt = t[:, None, None]
    np.testing.assert_allclose(pair.xt_w, (1 - tt) * batch["x0_w"] + tt * noise_w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pair.xt_l, (1 - tt) * batch["x0_l"] + tt * noise_l, rtol=1e-5, atol=1e-5)
    no_noise = objective.make_pair_inputs(_pair_batch(cfg, with_noise=False), t, key, "independent_unshared")
    jax.tree.map(np.testing.assert_array_equal, no_noise, pair)  # the recorded noises are ignored
    shared = objective.make_pair_inputs(batch, t, key, "independent")
    np.testing.assert_allclose(shared.target_w + batch["x0_w"], shared.target_l + batch["x0_l"], atol=1e-5)


def test_independent_unshared_loss_matches_numpy(tiny):
    """pair_loss in independent_unshared mode = NumPy's DPO loss on errors at each image's own fresh noise."""
    cfg = objective.LossConfig(beta=3.0, use_gap=False, use_schedule=False, noise_mode="independent_unshared")
    t = np.array([0.1, 0.3, 0.55, 0.9], np.float32)
    key = jax.random.key(7)
    loss, metrics = jax.jit(_loss_fn(tiny, cfg, t, rng=key))(tiny["policy"], tiny["ref"])
    batch = {k: np.asarray(v) for k, v in tiny["batch"].items()}
    noise = dict(zip("wl", (np.asarray(jax.random.normal(k, batch["x0_w"].shape))
                            for k in jax.random.split(key)), strict=True))
    errs = [_np_err(tiny, p, batch, t, s, noise[s]) for p in (tiny["policy"], tiny["ref"]) for s in "wl"]
    loss_B, want, _ = _np_preference(*errs, cfg.beta, 1.0)
    np.testing.assert_allclose(float(loss), loss_B.mean(), rtol=2e-4)
    _assert_metrics(metrics, want, rtol=2e-4)


def test_recorded_mode_without_noise_points_to_independent():
    batch = _pair_batch(flux.FluxConfig.from_diffusers(torch_flux().config), with_noise=False)
    with pytest.raises(KeyError, match="noise_mode='independent'"):
        objective.make_pair_inputs(batch, jnp.full((B,), 0.5), None, "recorded")
    with pytest.raises(ValueError, match="noise_mode"):
        objective.make_pair_inputs(batch, jnp.full((B,), 0.5), jax.random.key(0), "fresh")
    with pytest.raises(ValueError, match="rng"):
        objective.make_pair_inputs(batch, jnp.full((B,), 0.5), None, "independent")


def test_reference_gets_no_gradient():
    """The reference errors sit under stop_gradient even when both models share params (toy linear model)."""
    velocity = lambda p, x_t, t, cond: x_t * p
    batch = _pair_batch(flux.FluxConfig.from_diffusers(torch_flux().config))
    cfg = objective.LossConfig(beta=10.0)

    def loss(policy, ref):
        return objective.pair_loss(policy, batch, jnp.full((B,), 0.5), None, 0, policy_velocity=velocity,
                                   ref_velocity=velocity, ref_params=ref, cond={}, cfg=cfg)[0]

    g_policy, g_ref = jax.grad(loss, argnums=(0, 1))(jnp.float32(0.3), jnp.float32(0.2))
    assert g_ref == 0 and g_policy != 0


@pytest.fixture(scope="module")
def tiny():
    """Tiny FLUX (guidance-embedded) params, a batch of 4 pairs and its ids; the end-to-end loss (independent
    noise, constant β) jitted once as value_and_grad in (policy, reference)."""
    cfg = flux.FluxConfig.from_diffusers(torch_flux().config)
    apply = lambda p, **kw: flux.FluxTransformer(cfg).apply({"params": p}, **kw)
    ids = random_inputs(cfg, B, H, W, T)
    out = dict(cfg=cfg, apply=apply, policy=params_from_torch(torch_flux(seed=0), cfg),
               ref=params_from_torch(torch_flux(seed=1), cfg), batch=_pair_batch(cfg, seed=5),
               img_ids=jnp.asarray(ids["img_ids"]), txt_ids=jnp.asarray(ids["txt_ids"]),
               velocity=lambda p, x_t, t, cond: flux.Velocity(cfg, H, W)({"params": p}, x_t, t, cond))
    e2e_cfg = objective.LossConfig(beta=50.0, use_gap=False, use_schedule=False, noise_mode="independent")
    e2e_loss = _loss_fn(out, e2e_cfg, jnp.array([0.2, 0.4, 0.6, 0.8]), rng=jax.random.key(1))
    return dict(out, value_and_grad=jax.jit(jax.value_and_grad(e2e_loss, has_aux=True)))


def _loss_fn(tiny, cfg, t, rng=None, step=0):
    """pair_loss as a function of (policy params, reference params), with everything else fixed."""
    def loss(policy, ref):
        batch = tiny["batch"]
        cond = flux.conditioning(batch["prompt_embeds"], batch["pooled_prompt_embeds"], GUIDANCE)
        return objective.pair_loss(policy, batch, t, rng, step, policy_velocity=tiny["velocity"],
                                   ref_velocity=tiny["velocity"], ref_params=ref, cond=cond, cfg=cfg)
    return loss


def _np_err(tiny, params, batch, t, s, x1):
    """Per-example velocity MSE (float64) of image s ("w" / "l") at noise x1: one [B] forward per model and image,
    separately from pair_loss's [2B] one."""
    tt = t[:, None, None]
    v = jax.jit(tiny["apply"])(params, hidden_states=(1 - tt) * batch[f"x0_{s}"] + tt * x1,
                               encoder_hidden_states=batch["prompt_embeds"],
                               pooled_projections=batch["pooled_prompt_embeds"], timestep=t, img_ids=tiny["img_ids"],
                               txt_ids=tiny["txt_ids"], guidance=np.full(B, GUIDANCE, np.float32))
    return ((x1 - batch[f"x0_{s}"] - np.asarray(v, np.float64)) ** 2).mean(axis=(1, 2))


def test_pair_loss_metrics_match_numpy(tiny):
    cfg = objective.LossConfig(beta=3.0, scale_convention="half_beta", tau=0.5, n1=10, n2=30, num_t_buckets=4)
    t = np.array([0.1, 0.3, 0.35, 0.9], np.float32)  # bucket 2 stays empty
    step = 17
    _, metrics = jax.jit(_loss_fn(tiny, cfg, t, step=step))(tiny["policy"], tiny["ref"])

    batch = {k: np.asarray(v) for k, v in tiny["batch"].items()}
    err = lambda params, s: _np_err(tiny, params, batch, t, s, batch[f"x1_{s}"])

    beta = _np_dynamic_beta(cfg.beta, batch["reward_gap"], step, True, cfg.tau, True, cfg.n1, cfg.n2)
    errs = {"policy_w": err(tiny["policy"], "w"), "policy_l": err(tiny["policy"], "l"),
            "ref_w": err(tiny["ref"], "w"), "ref_l": err(tiny["ref"], "l")}
    loss_B, want, _ = _np_preference(*errs.values(), beta, 0.5)
    assert 0 < want["rewards/accuracies"] < 1
    bucket = [0, 1, 1, 3]
    for k in range(4):
        in_k = [i for i in range(B) if bucket[i] == k]
        want[f"count/t_bucket_{k}"] = len(in_k)
        want[f"loss/t_bucket_{k}"] = loss_B[in_k].mean() if in_k else 0.0
        want.update({f"err/{name}_t{k}": e[in_k].mean() if in_k else 0.0 for name, e in errs.items()})
    assert set(metrics) == set(want)
    _assert_metrics(metrics, want, rtol=2e-4)


def _random_tree(tree, seed: int):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)])


def test_gradient_matches_finite_difference(tiny):
    ref = tiny["policy"]
    policy = jax.tree.map(lambda p, n: p + 1e-2 * n, ref, _random_tree(ref, 1))
    direction = _random_tree(ref, 2)
    (_, metrics), grads = tiny["value_and_grad"](policy, ref)
    assert 0.1 < metrics["loss"] < 5  # neither saturated nor flat
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction),
                                                         strict=True))
    eps = 3e-4  # float32: smaller is noise-bound, larger curvature-bound
    shifted = lambda e: float(tiny["value_and_grad"](jax.tree.map(lambda p, d: p + e * d, policy, direction),
                                                     ref)[0][0])
    numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
    assert abs(analytic) > 1e-2
    np.testing.assert_allclose(numeric, analytic, rtol=3e-3)


def _normalized_sgd_step(params, grads, size: float):
    """params - size * grads / |grads|: a step of fixed length along the steepest descent."""
    norm = jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads)))
    return jax.tree.map(lambda p, g: p - size * g / norm, params, grads)


def test_step_moves_policy_toward_winner(tiny):
    """Starting from policy == reference (loss log 2, margin 0), a few SGD steps make the winner relatively
    easier to denoise than the loser: s < 0, loss below log 2, positive margin."""
    ref = policy = tiny["policy"]
    history = []
    for _ in range(4):
        (value, metrics), grads = tiny["value_and_grad"](policy, ref)
        history.append((float(value), float(metrics["rewards/margins"])))
        policy = _normalized_sgd_step(policy, grads, 1e-2)

    np.testing.assert_allclose(history[0], (np.log(2.0), 0.0), atol=1e-4)  # fused [2B] fwd: not bit-equal
    losses = [h[0] for h in history]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), history
    assert metrics["rewards/margins"] > 0 and metrics["rewards/accuracies"] == 1.0, history
    s = (metrics["mse/policy_w"] - metrics["mse/ref_w"]) - (metrics["mse/policy_l"] - metrics["mse/ref_l"])
    assert s < 0
