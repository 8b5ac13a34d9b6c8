"""How straight are a base model's sampling paths? The gap between the ODE's states and the straight line.

    python -m pnapo_jax.world.straightness --out=/tmp/straight                       # the shipped base
    python -m pnapo_jax.world.straightness --base=A --base=B --num_steps=16,32 --out=/tmp/straight

PNAPO (and rectified-flow training) scores a sample at x_t = (1 - t) x0 + t x1, the straight interpolation
between the sample x0 and the noise x1 it came from; the state the sampler actually passed through at t is
that only if the ODE's paths are straight. For each base, noises x1 (one per sample, `flow.seeded_noise`)
are integrated with Euler on FluxPipeline's schedule (`flow.euler_sample`), and at every solver noise level
t it reports, averaged over samples:
  rel_distance        ||x_t^ODE - x_t^interp|| / ||x_t^interp||  (0 at both ends by construction)
  rms_distance        RMS over latent entries of x_t^ODE - x_t^interp
  velocity_deviation  ||v_k - (x1 - x0)||^2 / ||x1 - x0||^2 for each Euler step's velocity v_k (at its start
                      t): 0 for a straight path at constant speed, Liu et al.'s straightness per step
and in summary the mean and max rel_distance over the interior noise levels, and the t-integral of
velocity_deviation. It also scores the endpoints with the world's reward and fidelity, so a straighter
base is seen to still sample well. Writes OUT/straightness.json and OUT/straightness.png, prints a table.
"""

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from pnapo_jax import cli, flow  # noqa: E402
from pnapo_jax.errors import UserError  # noqa: E402
from pnapo_jax.world import demo_base, fidelity, grammar, latents, reward  # noqa: E402


def path_gap(traj_SxNxIxC: np.ndarray, sigmas_S: np.ndarray) -> dict[str, np.ndarray]:
    """Per noise level [S] (velocity_deviation: per step [S - 1]) gaps between the trajectories, from the noise
    (first state) to the sample (last), and the straight lines between their ends; see the module docstring."""
    traj = np.asarray(traj_SxNxIxC, np.float64)
    x1_NxIxC, x0_NxIxC = traj[0], traj[-1]
    t = np.asarray(sigmas_S, np.float64)[:, None, None, None]
    interp = (1 - t) * x0_NxIxC + t * x1_NxIxC
    diff = traj - interp

    def norm(x):
        return np.sqrt((x**2).sum((-2, -1)))

    v = (traj[1:] - traj[:-1]) / (t[1:] - t[:-1])  # each Euler step's velocity d x / d t
    chord_NxIxC = x1_NxIxC - x0_NxIxC
    return {"t": np.asarray(sigmas_S, np.float64), "rel_distance": (norm(diff) / norm(interp)).mean(1),
            "rms_distance": np.sqrt((diff**2).mean((1, 2, 3))),
            "velocity_deviation": (norm(v - chord_NxIxC) ** 2 / norm(chord_NxIxC) ** 2).mean(1)}


def summary(gap: dict[str, np.ndarray]) -> dict[str, float]:
    """One number per measure: rel_distance's mean and max over interior t, velocity_deviation integrated over t."""
    interior = gap["rel_distance"][1:-1]
    return {"rel_distance_mean": float(interior.mean()), "rel_distance_max": float(interior.max()),
            "velocity_deviation_integral": float((-np.diff(gap["t"]) * gap["velocity_deviation"]).sum())}


def measure(folder: str, prompts: Sequence[str], seed: int, num_steps: int, guidance: float, batch: int
            ) -> dict[str, Any]:
    """The gaps, their summary, and the endpoints' mean reward and fidelity for one base and solver."""
    cfg, params = demo_base.load_base(folder)
    _, traj = demo_base.sample_seeded(cfg, params, prompts, np.arange(len(prompts)), seed, num_steps, guidance, batch,
                                 return_trajectory=True)
    gap = path_gap(traj, np.asarray(flow.flux_sigmas(num_steps, traj.shape[2])))
    images = latents.decode(traj[-1])
    return {"base": folder, "num_steps": num_steps, **{k: v.tolist() for k, v in gap.items()},
            "summary": summary(gap), "reward_mean": float(reward.reward(images, prompts).mean()),
            "fidelity_mean": float(fidelity.fidelity(images, prompts).mean())}


def table(run: dict[str, Any]) -> str:
    rows = [f"{run['base']}  ({run['num_steps']} Euler steps)", "      t  rel_dist  rms_dist  vel_dev"]
    vdev = [*run["velocity_deviation"], float("nan")]  # no step starts at t = 0
    rows += [f"{t:7.3f}  {r:8.4f}  {m:8.4f}  {d:7.4f}"
             for t, r, m, d in zip(run["t"], run["rel_distance"], run["rms_distance"], vdev, strict=True)]
    s = run["summary"]
    rows.append(f"rel_dist mean {s['rel_distance_mean']:.4f}  max {s['rel_distance_max']:.4f}  "
                f"vel_dev integral {s['velocity_deviation_integral']:.4f}  reward {run['reward_mean']:.3f}  "
                f"fidelity {run['fidelity_mean']:.4f}")
    return "\n".join(rows)


def plot(runs: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for run in runs:
        label = f"{pathlib.Path(run['base']).name}, {run['num_steps']} steps"
        axes[0].plot(run["t"], run["rel_distance"], "o-", ms=3, label=label)
        axes[1].plot(run["t"][:-1], run["velocity_deviation"], "o-", ms=3, label=label)
    axes[0].set_title("||x_t ODE - x_t interp|| / ||x_t interp||", fontsize=9)
    axes[1].set_title("||v - (x1 - x0)||^2 / ||x1 - x0||^2 per Euler step", fontsize=9)
    for ax in axes:
        ax.set_xlabel("t (1 = noise)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _main(argv: list[str]) -> None:
    f = flags.FLAGS
    for folder in f.base:
        if not pathlib.Path(folder).is_dir():
            raise UserError(f"--base={folder} is not a folder (a diffusers transformer folder)")
    if not all(n.isdigit() and int(n) > 0 for n in f.num_steps):
        raise UserError(f"--num_steps={','.join(f.num_steps)}: a comma-separated list of step counts >= 1")
    prompts = grammar.prompts(f.split)[: f.num_prompts or None]
    prompts = [p for p in prompts for _ in range(f.noises_per_prompt)]
    runs = []
    for folder in f.base:
        for num_steps in map(int, f.num_steps):
            runs.append(measure(folder, prompts, f.seed, num_steps, f.guidance, f.batch))
            print(table(runs[-1]), flush=True)
    out = pathlib.Path(f.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"split": f.split, "samples": len(prompts), "noises_per_prompt": f.noises_per_prompt, "seed": f.seed,
                "guidance": f.guidance}
    (out / "straightness.json").write_text(json.dumps({"settings": settings, "runs": runs}, indent=1) + "\n")
    plot(runs, out / "straightness.png")
    print(f"wrote {out / 'straightness.json'} and straightness.png", flush=True)


def run() -> None:
    flags.DEFINE_multi_string("base", [str(demo_base.DEFAULT_BASE)], "Base model folder(s) (diffusers transformer).")
    flags.DEFINE_string("out", None, "Folder for straightness.json and straightness.png.", required=True)
    flags.DEFINE_list("num_steps", ["16"], "Euler steps, one measurement each (the world samples with 16).")
    flags.DEFINE_enum("split", "all", grammar.SPLITS, "Prompts to sample.")
    flags.DEFINE_integer("num_prompts", 0, "First prompts of the split (0: all).")
    flags.DEFINE_integer("noises_per_prompt", 2, "Samples per prompt, each from its own seeded noise.")
    flags.DEFINE_integer("seed", 1234, "Noise seed; not reflow's 0, so a reflowed base is measured on new noises.")
    flags.DEFINE_float("guidance", 3.5, "Guidance input (config.generate.guidance_scale); the world's base ignores it.")
    flags.DEFINE_integer("batch", 64, "Samples per jitted solve.")
    cli.run(_main)


if __name__ == "__main__":
    run()
