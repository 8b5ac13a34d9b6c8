"""Off-policy pair generation: the base model samples K images per prompt from noises it records, a reward
ranks them, and winner / loser are stored with their noises as sextuples.

    python -m pnapo_jax.generate --config=configs/demo_cpu.py --prompts=prompts.txt --out=DIR
    python -m pnapo_jax.generate --config=configs/flux_tpu.py --config.generate.reward_path=HPSV2_DIR \\
        --prompts=prompts.txt --out=DIR

The noise of image k of prompt p (0-based line of the prompts file) is
`jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(generate.seed), p * K + k), (I, C))`; the record
stores it and `p * K + k` as its seed. Prompts go in chunks of `generate.prompts_per_chunk`; each finished
chunk is a complete dataset (DIR/chunk_00000/...), written to a temporary name and renamed, so a rerun skips
finished chunks: an interrupted run resumes with no prompt done twice and none lost. Training reads DIR as
one dataset. With several JAX processes each takes every n-th chunk.

Shared noise (issue 18): with `generate.shared_noise` the K images of prompt p all start from the noise of seed
p * K (`noise_seeds`) and differ by a stochastic sampler (`generate.eta` > 0, `flow.stochastic_step`) whose step
noises come from each image's own seed p * K + k. Records stay sextuples, with x1_w = x1_l, so PNAPO's recorded
noise is shared by the pair as Flow-DPO's fresh one is. `generate.eta` > 0 without sharing makes each image's
path stochastic from its own noise.
"""

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from etils import epath

from pnapo_jax import worlds
from pnapo_jax.config import PAIR_MODES
from pnapo_jax.data.builder import write_dataset
from pnapo_jax.errors import UserError
from pnapo_jax.sampling import Sampler, World, read_prompts, world_guide
from pnapo_jax.setup import Setup, base_params, make_setup


def select_pairs(rewards_K: np.ndarray, mode: str, min_gap: float) -> list[tuple[int, int]]:
    """(winner, loser) indices among K samples of one prompt: best vs worst, or every pair whose gap is at
    least `min_gap` (ties never make a pair: they carry no preference)."""
    if mode == "best_worst":
        w, l = int(np.argmax(rewards_K)), int(np.argmin(rewards_K))
        gap = rewards_K[w] - rewards_K[l]
        return [(w, l)] if gap > 0 and gap >= min_gap else []
    if mode == "all_above_gap":
        K = len(rewards_K)
        return [(i, j) for i in range(K) for j in range(K)
                if rewards_K[i] > rewards_K[j] and rewards_K[i] - rewards_K[j] >= min_gap]
    raise ValueError(f"config.generate.pairs={mode!r}: choose from {PAIR_MODES}")


def noise_seeds(seeds_N: np.ndarray, images_per_prompt: int, shared: bool) -> np.ndarray:
    """The seeds whose noises images `seeds_N` start from: their own, or with `shared` their prompt's first
    image's (seed - seed % K), so that a record's seed names its start noise and its step noises both."""
    seeds_N = np.asarray(seeds_N)
    return seeds_N - seeds_N % images_per_prompt if shared else seeds_N


def model_forwards(images: int, gen: ml_collections.ConfigDict, guide: Any) -> int:
    """Transformer forwards (per image row) that sampling `images` costs: num_steps each, twice with CFG."""
    return images * gen.num_steps * (2 if guide is not None and guide.cfg_scale > 1 else 1)


def _records_of_prompt(prompt: str, seeds_K: np.ndarray, x1_KxIxC: np.ndarray, x0_KxIxC: np.ndarray,
                       rewards_K: np.ndarray, embeds_TxD: np.ndarray, pooled_P: np.ndarray, world: World,
                       gen: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """The sextuples of one prompt's K samples."""
    h = world.latent_h_tokens * world.patch_pixels
    w = world.latent_w_tokens * world.patch_pixels
    out = []
    for i, j in select_pairs(rewards_K, gen.pairs, gen.min_gap):
        out.append(dict(
            prompt=prompt, prompt_embeds=embeds_TxD, pooled_prompt_embeds=pooled_P,
            x0_w=x0_KxIxC[i], x0_l=x0_KxIxC[j], x1_w=x1_KxIxC[i], x1_l=x1_KxIxC[j],
            reward_w=np.float32(rewards_K[i]), reward_l=np.float32(rewards_K[j]),
            reward_gap=np.float32(rewards_K[i]) - np.float32(rewards_K[j]),
            model_id=world.model_id, seed_w=int(seeds_K[i]), seed_l=int(seeds_K[j]), steps=gen.num_steps,
            guidance=np.float32(gen.guidance_scale), height=h, width=w))
    return out


def generate_chunk(prompts: Sequence[str], first_index: int, sampler: Sampler, world: World,
                   gen: ml_collections.ConfigDict, on_batch: Callable[[int], None]) -> list[dict[str, Any]]:
    """Records for `prompts` (whose first has index `first_index` in the prompts file)."""
    K = gen.images_per_prompt
    records = []
    for start in range(0, len(prompts), gen.prompts_per_batch):
        batch = list(prompts[start:start + gen.prompts_per_batch])
        idx = np.arange(first_index + start, first_index + start + len(batch))
        seeds_PxK = idx[:, None] * K + np.arange(K)[None]
        embeds, pooled = world.encode_prompts(batch)
        x1 = sampler.noises(noise_seeds(seeds_PxK.reshape(-1), K, gen.shared_noise))
        step_seeds = seeds_PxK.reshape(-1) if gen.eta > 0 else None
        x0 = sampler(x1, np.repeat(embeds, K, axis=0), np.repeat(pooled, K, axis=0), step_seeds)
        images = world.decode(x0)
        rewards_PxK = np.asarray(world.reward(images, [p for p in batch for _ in range(K)])).reshape(-1, K)
        shape_PxKxIxC = (len(batch), K, *x0.shape[1:])
        x0, x1 = np.asarray(x0).reshape(shape_PxKxIxC), np.asarray(x1).reshape(shape_PxKxIxC)
        for b, prompt in enumerate(batch):
            records += _records_of_prompt(prompt, seeds_PxK[b], x1[b], x0[b], rewards_PxK[b], embeds[b], pooled[b],
                                          world, gen)
        on_batch(len(batch))
    return records


def run(config: ml_collections.ConfigDict, prompts_file: str, out: str, show_progress: bool = True,
        variables: Any = None, setup: Setup | None = None) -> dict:
    """Generate pairs for every prompt of `prompts_file` into `out` (resuming); returns counts, and the seconds,
    images and model forwards this call's sampling cost. The base model samples, or `variables` ({"params"} and
    "lora" for a LoRA policy, on `setup`'s mesh: iterative PNAPO's policy, pnapo_jax.train)."""
    gen = config.generate
    prompts = read_prompts(prompts_file)  # the inputs first: nothing is loaded for a bad file or config
    out_dir = epath.Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out={out} is a file; generate writes a dataset folder there")
    started = time.perf_counter()
    setup = setup or make_setup(config)
    world = worlds.make_world(config)
    guide = world_guide(world)
    sampler = Sampler(setup, variables or {"params": base_params(setup)}, gen, guide)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = gen.prompts_per_chunk
    mine = {c: prompts[c * n:(c + 1) * n] for c in range(-(-len(prompts) // n))
            if c % jax.process_count() == jax.process_index()}
    todo = [c for c in mine if not (out_dir / f"chunk_{c:05d}").exists()]
    if len(todo) < len(mine):
        logging.warning("resuming: %d of %d chunks already written", len(mine) - len(todo), len(mine))
    spec = dataclasses.replace(setup.record_spec, patch_pixels=world.patch_pixels)
    pairs = 0
    done = sum(len(mine[c]) for c in mine if c not in todo)
    with tqdm.tqdm(total=sum(map(len, mine.values())), initial=done, unit="prompt", disable=not show_progress,
                   dynamic_ncols=True, desc="generating pairs") as bar:
        for c in todo:
            records = generate_chunk(mine[c], c * n, sampler, world, gen, bar.update)
            tmp = out_dir / f".tmp_chunk_{c:05d}"
            if tmp.exists():  # left by a run that died while writing this chunk
                shutil.rmtree(tmp)
            write_dataset(records, spec, str(tmp))
            tmp.rename(out_dir / f"chunk_{c:05d}")
            pairs += len(records)
            bar.set_postfix(pairs=pairs)
    images = sum(len(mine[c]) for c in todo) * gen.images_per_prompt
    summary = {"prompts": len(prompts), "chunks_written_now": len(todo), "pairs_written_now": pairs,
               "images_sampled_now": images, "model_forwards_now": model_forwards(images, gen, guide),
               "seconds_now": time.perf_counter() - started}
    if jax.process_index() == 0:
        config_json = json.loads(config.to_json_best_effort())
        (out_dir / "generation.json").write_text(json.dumps({**summary, "config": config_json}, indent=2))
    return summary


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from pnapo_jax import cli, config_check

    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with a `generate` section.",
                                              lock_config=True)
    _PROMPTS = flags.DEFINE_string("prompts", None, "Text file, one prompt a line.")
    _OUT = flags.DEFINE_string("out", None, "Output directory (training's config.data.path).")
    flags.mark_flags_as_required(["config", "prompts", "out"])

    def _main(argv: list[str]) -> None:
        config_check.check(_CONFIG.value, paths=True)  # the pipeline and reward folders too, before loading
        print(json.dumps(run(_CONFIG.value, _PROMPTS.value, _OUT.value)))

    cli.run(_main)
