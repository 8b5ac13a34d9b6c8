"""Iterative PNAPO (train.regenerate_every, issue 18): every K steps the policy makes new pairs with recorded
noises; a run killed in a round or while generating one resumes to the straight run's state, and each round's
generation compute is logged."""

import jax
import numpy as np
import pytest
from etils import epath
from test_generate import BrightnessWorld, _config, _records
from test_train import _lines, _restored_params, _train_losses

from pnapo_jax import config_check, sampling, train, worlds
from pnapo_jax.errors import UserError
from pnapo_jax.setup import make_setup


def _iterative(num_steps=8):
    config = _config()  # tiny + BrightnessWorld: 6 train prompts, 3 images each, chunks of 4 prompts
    config.data.source = "generate"
    config.train.num_steps, config.train.global_batch_size, config.train.eval_every = num_steps, 4, 0
    config.train.log_every, config.train.regenerate_every = 1, 3
    config.checkpoint.every_steps, config.checkpoint.keep = 100, 10
    return config


def _run(config, workdir, world, monkeypatch):
    monkeypatch.setattr(worlds, "make_world", lambda config: world)
    return train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1], show_progress=False)


def _round_records(workdir, r):
    return _records(epath.Path(workdir) / f"pairs_round{r}")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """8 steps straight: rounds 1 and 2 generated at steps 3 and 6."""
    workdir = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as mp:
        _run(_iterative(), workdir, BrightnessWorld(), mp)
    return workdir


def test_rounds_are_the_policys_samples_from_new_recorded_noises(straight):
    config = _iterative()
    assert sorted(p.name for p in straight.iterdir() if p.name.startswith("pairs")) == [
        "pairs", "pairs_round1", "pairs_round2"]
    costs = [d for d in _lines(straight) if "regen/round" in d]
    assert [(d["step"], d["regen/round"]) for d in costs] == [(3, 1), (6, 2)]
    assert all(d["regen/images"] == 18 and d["regen/model_forwards"] == 18 * 4 and d["regen/seconds"] > 0
               for d in costs)
    base, round1 = _records(straight / "pairs"), _round_records(straight, 1)
    assert [r["prompt"] for r in round1] == [r["prompt"] for r in base]
    # the round's noises are generate.seed + 1's, its latents the step-3 policy's samples of them
    setup = make_setup(config)
    gen = config.generate.copy_and_resolve_references()
    gen.seed = config.generate.seed + 1
    sampler = sampling.Sampler(setup, {"params": _restored_params(config, straight, 3)}, gen)
    world = BrightnessWorld()
    for r in round1[:2]:
        np.testing.assert_array_equal(r["x1_w"], np.asarray(sampler.noises(np.array([r["seed_w"]])))[0])
        embeds, pooled = world.encode_prompts([r["prompt"]])
        x0 = sampler(sampler.noises(np.array([r["seed_w"]])), embeds, pooled)
        np.testing.assert_allclose(r["x0_w"], np.asarray(x0[0]), atol=1e-5)
    base_sampler = sampling.Sampler(setup, {"params": _restored_params(config, straight, 3)}, config.generate)
    assert not np.array_equal(round1[0]["x1_w"], np.asarray(base_sampler.noises(np.array([round1[0]["seed_w"]])))[0])


def test_killed_in_a_round_resumes_to_the_straight_run(straight, tmp_path, monkeypatch):
    _run(_iterative(num_steps=5), tmp_path, BrightnessWorld(), monkeypatch)  # stops in round 1
    _run(_iterative(), tmp_path, BrightnessWorld(), monkeypatch)
    assert _train_losses(tmp_path) == _train_losses(straight)
    config = _iterative()
    jax.tree.map(np.testing.assert_array_equal, _restored_params(config, straight, 8),
                 _restored_params(config, tmp_path, 8))


def test_killed_while_generating_a_round_resumes_to_the_straight_run(straight, tmp_path, monkeypatch):
    # reward calls: 3 for the base's pairs, then round 1's chunk 0 (calls 4, 5) and chunk 1 (call 6): dies there
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(_iterative(), tmp_path, BrightnessWorld(fail_on_call=6), monkeypatch)
    assert sorted(p.name for p in (tmp_path / "pairs_round1").iterdir()) == ["chunk_00000"]
    _run(_iterative(), tmp_path, BrightnessWorld(), monkeypatch)
    assert _train_losses(tmp_path) == _train_losses(straight)
    for r in (1, 2):
        for a, b in zip(_round_records(straight, r), _round_records(tmp_path, r), strict=True):
            np.testing.assert_array_equal(a["x0_w"], b["x0_w"])
    config = _iterative()
    jax.tree.map(np.testing.assert_array_equal, _restored_params(config, straight, 8),
                 _restored_params(config, tmp_path, 8))


def test_regenerate_every_is_refused_without_a_world_and_with_the_reference_cache():
    config = _iterative()
    config.data.source = "synthetic"
    with pytest.raises(UserError, match="config.train.regenerate_every needs a world"):
        config_check.check(config)
    config = _iterative()
    config.pnapo.ref_cache, config.t_sampling.kind = True, "grid"
    with pytest.raises(UserError, match="use one of them"):
        config_check.check(config)
