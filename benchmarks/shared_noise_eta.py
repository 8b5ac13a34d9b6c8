"""What generate.eta does to shared-noise pairs in the embedded world: the shipped base samples K = 4 images for
each of the first N train prompts, by today's ODE from a noise per image, and from one noise per prompt with the
stochastic sampler at each eta. Prints mean reward, the within-prompt reward spread (what pairs are made of), the
pairs with gap >= 0.05 (configs/demo_cpu.py's min_gap), fidelity, and how far each sample lands from the ODE's
sample of the same noise (how much of the path the noise still marks).

    python benchmarks/shared_noise_eta.py --prompts=12 --etas=0.3,0.5,1.0
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "configs"))
import demo_cpu  # noqa: E402

from pnapo_jax import generate, sampling, worlds  # noqa: E402
from pnapo_jax.setup import base_params, make_setup  # noqa: E402

K = 4


def main(args: argparse.Namespace) -> None:
    c = demo_cpu.get_config()
    world, setup = worlds.make_world(c), make_setup(c)
    prompts = world.prompts("train")[: args.prompts]
    embeds, pooled = world.encode_prompts(prompts)
    E, P = np.repeat(embeds, K, 0), np.repeat(pooled, K, 0)
    texts = [p for p in prompts for _ in range(K)]
    seeds = np.arange(len(prompts) * K)
    params = {"params": base_params(setup)}
    ode = sampling.Sampler(setup, params, c.generate)
    shared_x1 = ode.noises(generate.noise_seeds(seeds, K, shared=True))
    ode_shared = np.asarray(ode(shared_x1, E, P))

    def report(name: str, x0: np.ndarray, ode_x0: np.ndarray | None) -> None:
        images = world.decode(x0)
        r = np.asarray(world.reward(images, texts)).reshape(-1, K)
        pairs = sum(len(generate.select_pairs(rr, "all_above_gap", 0.05)) for rr in r)
        d = np.sqrt(((x0 - ode_x0) ** 2).mean(axis=(1, 2))).mean() if ode_x0 is not None else float("nan")
        print(f"| {name} | {r.mean():.3f} | {r.std(axis=1).mean():.3f} | {pairs}/{len(prompts) * K * (K - 1) // 2} | "
              f"{np.mean(world.fidelity(images, texts)):.5f} | {d:.3f} |", flush=True)

    print("| sampler | reward | within-prompt reward std | pairs, gap >= 0.05 | fidelity | rms to the ODE's sample |")
    print("|---|---|---|---|---|---|")
    report("ODE, a noise per image (today)", np.asarray(ode(ode.noises(seeds), E, P)), None)
    for eta in (float(e) for e in args.etas.split(",")):
        gen = c.generate.copy_and_resolve_references()
        gen.eta, gen.shared_noise = eta, True
        x0 = np.asarray(sampling.Sampler(setup, params, gen)(shared_x1, E, P, seeds))
        report(f"one noise per prompt, eta {eta:g}", x0, ode_shared)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=12, help="the first N train prompts")
    parser.add_argument("--etas", default="0.3,0.5,1.0")
    main(parser.parse_args())
