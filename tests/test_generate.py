"""Pair generation: recorded noises reproduce, pairs are ranked by the reward, runs resume exactly, and the
output trains."""

import json
import sys
import zlib

import jax
import numpy as np
import pytest
from etils import epath

from pnapo_jax import generate, sampling, train, worlds
from pnapo_jax.data.source import open_written
from pnapo_jax.errors import UserError
from pnapo_jax.models import flux
from pnapo_jax.setup import base_params, make_setup

sys.path.insert(0, str(epath.Path(__file__).parent.parent / "configs"))
import tiny  # noqa: E402


class BrightnessWorld:
    """A programmatic world for the tiny config: prompts embed by a seeded hash, images are the packed latents'
    first 3 channels squashed to [0, 1], and the reward is mean brightness."""

    latent_h_tokens, latent_w_tokens, patch_pixels, model_id = 4, 4, 2, "tiny-random"

    def __init__(self, fail_on_call: int | None = None):
        self.calls, self.fail_on_call = 0, fail_on_call

    def encode_prompts(self, prompts):
        rngs = [np.random.default_rng(zlib.crc32(p.encode())) for p in prompts]
        return (np.stack([r.standard_normal((8, 32), np.float32) for r in rngs]),
                np.stack([r.standard_normal((16,), np.float32) for r in rngs]))

    def decode(self, latents):
        images = np.asarray(flux.unpack_latents(latents, 8, 8))[:, :3].transpose(0, 2, 3, 1)
        return 1 / (1 + np.exp(-images))

    def prompts(self, split):
        return [f"{split} prompt {i}" for i in range(6)]

    def fidelity(self, images, prompts):
        return np.abs(images - 0.5).mean(axis=(1, 2, 3))

    def reward(self, images, prompts):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        return images.mean(axis=(1, 2, 3))


def _config():
    c = tiny.get_config()
    c.generate.images_per_prompt = 3
    c.generate.num_steps = 4
    c.generate.prompts_per_batch = 2
    c.generate.prompts_per_chunk = 4
    return c


def _prompts(tmp_path, n=10):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(f"prompt number {i}" for i in range(n)))
    return str(path)


def _records(out):
    source = open_written(str(out))
    return [source[i] for i in range(len(source))]


@pytest.fixture
def world(monkeypatch):
    w = BrightnessWorld()
    monkeypatch.setattr(worlds, "make_world", lambda config: w)
    return w


def test_select_pairs():
    r = np.array([0.2, 0.9, 0.5, 0.9])
    assert generate.select_pairs(r, "best_worst", 0.0) == [(1, 0)]
    assert generate.select_pairs(r, "best_worst", 0.8) == []
    assert sorted(generate.select_pairs(r, "all_above_gap", 0.3)) == [(1, 0), (1, 2), (2, 0), (3, 0), (3, 2)]
    assert generate.select_pairs(np.ones(4), "best_worst", 0.0) == []  # a tie carries no preference


def test_pairs_carry_their_real_noises_and_rewards(tmp_path, world):
    config = _config()
    summary = generate.run(config, _prompts(tmp_path), str(tmp_path / "out"), show_progress=False)
    assert summary["pairs_written_now"] == 10 and summary["chunks_written_now"] == 3
    records = _records(tmp_path / "out")
    assert [r["prompt"] for r in records] == [f"prompt number {i}" for i in range(10)]
    setup = make_setup(config)
    sampler = sampling.Sampler(setup, {"params": base_params(setup)}, config.generate)
    for p, r in [(0, records[0]), (7, records[7])]:
        assert {r["seed_w"], r["seed_l"]} <= set(range(3 * p, 3 * p + 3))
        np.testing.assert_array_equal(r["x1_w"], np.asarray(sampler.noises(np.array([r["seed_w"]])))[0])
        embeds, pooled = world.encode_prompts([r["prompt"]])
        x0 = sampler(sampler.noises(np.array([r["seed_w"], r["seed_l"]])), np.repeat(embeds, 2, 0),
                     np.repeat(pooled, 2, 0))
        np.testing.assert_allclose(r["x0_w"], np.asarray(x0[0]), atol=1e-5)
        np.testing.assert_allclose(r["x0_l"], np.asarray(x0[1]), atol=1e-5)
        rewards = world.reward(world.decode(np.asarray(x0)), [r["prompt"]] * 2)
        np.testing.assert_allclose([r["reward_w"], r["reward_l"]], rewards, rtol=1e-5)
        assert r["reward_w"] > r["reward_l"] and (r["height"], r["width"]) == (8, 8)


def test_crash_then_resume_equals_straight_run(tmp_path, monkeypatch):
    config = _config()
    straight = BrightnessWorld()
    monkeypatch.setattr(worlds, "make_world", lambda config: straight)
    generate.run(config, _prompts(tmp_path), str(tmp_path / "straight"), show_progress=False)

    crashing = BrightnessWorld(fail_on_call=4)  # dies in the second chunk's second batch
    monkeypatch.setattr(worlds, "make_world", lambda config: crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate.run(config, _prompts(tmp_path), str(tmp_path / "resumed"), show_progress=False)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["chunk_00000"]
    (tmp_path / "resumed" / ".tmp_chunk_00001").mkdir()  # as if it had died while writing
    resumed = BrightnessWorld()
    monkeypatch.setattr(worlds, "make_world", lambda config: resumed)
    summary = generate.run(config, _prompts(tmp_path), str(tmp_path / "resumed"), show_progress=False)
    assert summary["chunks_written_now"] == 2
    a, b = _records(tmp_path / "straight"), _records(tmp_path / "resumed")
    assert [(r["prompt"], r["seed_w"], r["seed_l"]) for r in a] == [(r["prompt"], r["seed_w"], r["seed_l"]) for r in b]
    for ra, rb in zip(a, b, strict=True):
        np.testing.assert_array_equal(ra["x0_w"], rb["x0_w"])


def test_generated_pairs_train(tmp_path, world):
    config = _config()
    generate.run(config, _prompts(tmp_path, 16), str(tmp_path / "pairs"), show_progress=False)
    config.data.source, config.data.path = "array_record", str(tmp_path / "pairs")
    config.train.num_steps, config.train.global_batch_size, config.train.eval_every = 4, 4, 0
    line = train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1], show_progress=False)
    assert line["step"] == 4 and np.isfinite(line["loss"])


def test_blank_prompt_lines_are_refused(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a\n\nb\n")
    with pytest.raises(UserError, match="blank prompt on line"):
        sampling.read_prompts(str(path))


def test_main_job_generates_trains_and_evaluates_by_sampling(tmp_path, world):
    """data.source=generate makes the pairs first; eval lines compare policy and base samples on fixed noises."""
    config = _config()
    config.data.source = "generate"
    config.train.num_steps, config.train.global_batch_size, config.train.eval_every = 4, 4, 0
    config.eval.sample_every, config.eval.num_prompts, config.eval.num_steps, config.eval.batch_size = 2, 3, 3, 4
    last = train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1], show_progress=False)
    evals = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [d for d in evals if "eval/reward_mean" in d]
    assert [d["step"] for d in evals] == [0, 2, 4]
    assert evals[0]["eval/win_rate_vs_base"] == 0.5  # step 0: the policy is the base
    assert evals[0]["eval/reward_mean"] == pytest.approx(evals[0]["eval/reward_base_mean"])
    assert last["eval/reward_mean"] == evals[-1]["eval/reward_mean"]
    assert evals[-1]["eval/reward_mean"] != evals[-1]["eval/reward_base_mean"]  # the policy moved
    assert len(open_written(str(tmp_path / "pairs"))) == 6  # one pair per train prompt
    assert (tmp_path / "samples.png").exists() and (tmp_path / "curves.png").exists()
