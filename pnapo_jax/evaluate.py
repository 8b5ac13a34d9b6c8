"""Evaluation: the benchmark command, and the sampling eval training runs.

    python -m pnapo_jax.evaluate --models=base=pnapo_jax/assets/demo_base,pnapo=RUN_DIR --prompts=world:heldout \
        --scorers=world_reward,world_fidelity --out=DIR
    python -m pnapo_jax.evaluate --world=flux --pipeline=FLUX_DIR --models=base=FLUX_DIR,pnapo=RUN_DIR \
        --prompts=hpdv2.json --scorers=hpsv2=HPS_DIR,pickscore=PICK_DIR,clip_score=CLIP_DIR --out=DIR
    python -m pnapo_jax.evaluate --world=flux --models=base=SD3_DIR,pnapo=SD3_RUN_DIR ...  # an SD3 / SD3.5 pipeline

--world=flux is the diffusers pipeline world (as config.generate.world): FLUX.1 or SD3 / SD3.5, as the pipeline
folder's model_index.json says (pnapo_jax.pipelines); every model must be of that backbone.

The command (pnapo_jax.bench) samples every prompt N times per model from the same recorded noises, keeps the
images as files, scores them and writes results.json, scores.csv, results.md and report.html into DIR (local or
gs://). On a pod every worker runs the same command: the transformers are FSDP-sharded over all chips, each process
draws and scores its share of the prompts, process 0 writes the results (pnapo_jax.bench.sampling).

The sampling eval of training: the policy and the frozen base draw images for held-out prompts from the same fixed
noises; the world's reward scores both, and its fidelity measure says how far samples drifted off the data.

Reward alone is easy to hack by drifting away from valid images, so every eval line carries both:
    eval/reward_mean, eval/reward_base_mean, eval/win_rate_vs_base (ties count half), eval/fidelity_mean,
    eval/fidelity_base_mean; the last two only for worlds with a `fidelity` (FLUX has no ground-truth image
    manifold to measure the distance to).
"""

import dataclasses
import sys
from typing import Any

import ml_collections
import numpy as np

from pnapo_jax.sampling import Sampler, World, world_guide
from pnapo_jax.setup import Setup


@dataclasses.dataclass
class SampleEval:
    """Fixed prompts and noises; the base's samples and scores are computed once."""

    setup: Setup
    world: World
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
        self._guide = world_guide(self.world)
        self._noises = Sampler(self.setup, self.base_variables, gen).noises(np.arange(len(self.prompts)))
        self.base_images = self._sample(self.base_variables)
        self.base_rewards = np.asarray(self.world.reward(self.base_images, self.prompts))
        self.base_fidelity = self._fidelity(self.base_images)

    def _fidelity(self, images: np.ndarray) -> np.ndarray | None:
        """The world's distance of `images` to the data, or None for a world without one."""
        fidelity = getattr(self.world, "fidelity", None)
        return None if fidelity is None else np.asarray(fidelity(images, self.prompts))

    def _sample(self, variables: Any) -> np.ndarray:
        sampler = Sampler(self.setup, variables, self._gen, self._guide)
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


def run() -> None:
    """The benchmark command. Flags are defined here, not at import: training imports this module too."""
    from absl import flags

    from pnapo_jax import cli
    from pnapo_jax.bench import benchmark, results

    f = flags
    f.DEFINE_string("models", None, "NAME=PATH,...: FLUX or SD3 transformer folders (the demo base, exported), FLUX "
                    "or SD3 pipeline folders, training workdirs (RUN_DIR@STEP for a step).")
    f.DEFINE_string("prompts", None, "Prompt file (.txt, HPDv2 .json, PartiPrompts .tsv, DrawBench .csv, .jsonl or "
                    ".parquet rows) or world:SPLIT (the embedded world's train | heldout | all).")
    f.DEFINE_string("out", None, "Output folder (local or gs://); a rerun into it continues where the last one "
                    "stopped.")
    f.DEFINE_string("scorers", "world_reward,world_fidelity", "NAME[=DIR],...: world_reward, world_fidelity, "
                    "pickscore=DIR, hpsv2=DIR, clip_score=DIR, aesthetic=DIR, imagereward=DIR.")
    f.DEFINE_enum("world", "demo", list(benchmark.WORLDS), "demo: the embedded world; flux: diffusers pipelines, "
                  "FLUX.1 or SD3 / SD3.5 (as --pipeline's model_index.json says).")
    f.DEFINE_string("pipeline", "", "flux: pipeline folder of the text encoders and VAE, FLUX or SD3 (default: the "
                    "first pipeline among --models); every model must be of its backbone.")
    f.DEFINE_integer("seeds", 2, "Images per prompt, each from its own noise, the same for every model.")
    f.DEFINE_integer("max_prompts", 0, "Use the set's first N prompts (0: all).")
    f.DEFINE_integer("seed", 0, "Noise seed.")
    f.DEFINE_integer("num_steps", 16, "Euler steps (28 is FluxPipeline's and StableDiffusion3Pipeline's default).")
    f.DEFINE_float("guidance_scale", None, "flux: FLUX.1's guidance input (default 3.5); SD3's classifier-free "
                   "guidance scale against the empty prompt (default 7).")
    f.DEFINE_integer("height", 1024, "flux: image height.")
    f.DEFINE_integer("width", 1024, "flux: image width.")
    f.DEFINE_integer("max_sequence_length", 0, "flux: T5 tokens (0: the pipeline's, FLUX 512, SD3 256).")
    f.DEFINE_integer("batch_size", 16, "Images sampled together, over every process's devices.")
    f.DEFINE_string("baseline", "", "The model win rates are against (default: the first).")
    f.DEFINE_string("prompt_format", "", "text | hpdv2 | parti | drawbench | rows (default: by extension).")
    f.DEFINE_string("prompt_column", "", "rows: the prompt column (default: prompt, else caption).")
    f.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Params and compute dtype of the samplers.")
    f.mark_flags_as_required(["models", "prompts", "out"])

    def main(argv: list[str]) -> None:
        names = [field.name for field in dataclasses.fields(benchmark.Options) if field.name != "show_progress"]
        summary = benchmark.run(benchmark.Options(**{n: getattr(f.FLAGS, n) for n in names}))
        if summary is not None:
            print(results.markdown(summary), end="")
            print(f"wrote {f.FLAGS.out}/results.json, scores.csv, results.md and report.html", file=sys.stderr)

    cli.run(main)


if __name__ == "__main__":
    run()
