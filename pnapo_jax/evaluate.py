"""Evaluation by sampling: the policy and the frozen base draw images for held-out prompts from the same fixed
noises; the world's reward scores both, and its fidelity measure says how far samples drifted off the data.

Reward alone is easy to hack by drifting away from valid images, so every eval line carries both:
    eval/reward_mean, eval/reward_base_mean, eval/win_rate_vs_base (ties count half), eval/fidelity_mean,
    eval/fidelity_base_mean; the last two only for worlds with a `fidelity` (FLUX has no ground-truth image
    manifold to measure the distance to).
"""

import dataclasses
from typing import Any

import ml_collections
import numpy as np

from pnapo_jax import generate, train


@dataclasses.dataclass
class SampleEval:
    """Fixed prompts and noises; the base's samples and scores are computed once."""

    setup: train.Setup
    world: generate.World
    cfg: ml_collections.ConfigDict  # config.eval
    base_variables: Any

    def __post_init__(self):
        prompts = self.world.prompts(self.cfg.split)[: self.cfg.num_prompts]
        self.prompts = [p for p in prompts for _ in range(self.cfg.samples_per_prompt)]
        gen = ml_collections.ConfigDict(dict(self.setup.config.generate))
        gen.num_steps, gen.seed = self.cfg.num_steps, self.cfg.seed
        self._gen = gen
        embeds, pooled = self.world.encode_prompts(self.prompts)
        self._inputs = (embeds, pooled)
        self._noises = generate.Sampler(self.setup, self.base_variables, gen).noises(np.arange(len(self.prompts)))
        self.base_images = self._sample(self.base_variables)
        self.base_rewards = np.asarray(self.world.reward(self.base_images, self.prompts))
        self.base_fidelity = self._fidelity(self.base_images)

    def _fidelity(self, images: np.ndarray) -> np.ndarray | None:
        """The world's distance of `images` to the data, or None for a world without one."""
        fidelity = getattr(self.world, "fidelity", None)
        return None if fidelity is None else np.asarray(fidelity(images, self.prompts))

    def _sample(self, variables: Any) -> np.ndarray:
        sampler = generate.Sampler(self.setup, variables, self._gen)
        images = []
        for s in range(0, len(self.prompts), self.cfg.batch_size):
            sl = slice(s, s + self.cfg.batch_size)
            latents = sampler(self._noises[sl], self._inputs[0][sl], self._inputs[1][sl])
            images.append(np.asarray(self.world.decode(latents)))
        return np.concatenate(images)

    def __call__(self, variables: Any) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        """(eval metrics, the policy's images, their rewards) for the policy's `variables`."""
        images = self._sample(variables)
        rewards = np.asarray(self.world.reward(images, self.prompts))
        wins = np.mean((rewards > self.base_rewards) + 0.5 * (rewards == self.base_rewards))
        metrics = {"eval/reward_mean": float(rewards.mean()), "eval/reward_base_mean": float(self.base_rewards.mean()),
                   "eval/win_rate_vs_base": float(wins)}
        fidelity = self._fidelity(images)
        if fidelity is not None:
            metrics |= {"eval/fidelity_mean": float(fidelity.mean()),
                        "eval/fidelity_base_mean": float(self.base_fidelity.mean())}
        return metrics, images, rewards
