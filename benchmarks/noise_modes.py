"""The paper's claim as an experiment in the embedded world: PNAPO vs Flow-DPO (independent noise) vs PNAPO
without dynamic beta, on the same pairs, for the same steps, each tuned on the same small grid.

    python benchmarks/noise_modes.py --out=/tmp/noise_modes                 # ~1 h on 2 free cores
    python benchmarks/noise_modes.py --out=/tmp/nm_reflow --base=DIR        # from another base (e.g. reflowed)
    python benchmarks/noise_modes.py --out=/tmp/nm --pick=/tmp/noise_modes/picked.json  # reuse picks (others: tuned)
    python benchmarks/noise_modes.py --out=/tmp/nm --methods=independent_unshared,ipo,sft   # issue 18's cells
    python benchmarks/noise_modes.py --out=/tmp/nm --methods=,shared_noise,iterative         # issue 18, items 2, 4

Methods of GENERATION_VARIANTS train on their own pairs (OUT/<variant>/pairs, the same prompts); the others share
OUT/pairs. Iterative PNAPO's runs also report the generation compute of their rounds (regen/* metric lines).

Stages (every run is resumable: a finished run is read back, not redone):
1. Pairs: the base model generates noise-tracked pairs for the world's train prompts once (configs/demo_cpu.py's
   generation settings); every run trains on them.
2. Tuning (seed --tune_seed): every method on every (beta, lr) of the grid. The scale of the loss differs between
   noise modes, so each method gets its own best point: the highest held-out reward at the last step among
   points whose fidelity stays within --fidelity_bound x the base's (reward is easy to hack by drifting off the
   data). Tuning runs sample the held-out prompts only at the end (all the pick uses), to save time. Selected on
   the same held-out prompts it is then reported on, with other seeds (--seeds).
3. Seeds: each method's pick with every seed of --seeds (t draws, Flow-DPO's noises and data order change).

Writes OUT/results.json (every run's eval curve and the summary), OUT/frontier.png (held-out reward vs fidelity
of every run and eval step, per method, with each method's upper-left frontier), and prints the tables: reward
gain at matched fidelity (the best gain among evals within each fidelity bound) and steps to reach a target
reward within the fidelity bound, mean +- std over seeds.
"""

import argparse
import importlib.util
import json
import os
import statistics
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402

from pnapo_jax import metrics, train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHODS = {"PNAPO": "", "Flow-DPO (independent noise)": "independent", "PNAPO, static beta": "static_beta",
           "independent noise, unshared (one per image)": "independent_unshared", "PNAPO, IPO objective": "ipo",
           "PNAPO + winner SFT": "sft", "PNAPO on shared-noise pairs (x1_w = x1_l)": "shared_noise",
           "iterative PNAPO (new pairs from the policy after each third of the run)": "iterative",
           "PNAPO, t on a fixed 8-point grid (reference errors cached)": "ref_cache",
           "Flow-DPO on the shared-noise pairs (a control)": "independent+shared_noise"}
GENERATION_VARIANTS = ("shared_noise",)  # methods whose pairs are their own (generated with their settings)
# A method is one or more configs/demo_cpu.py variants joined by "+".


def demo_config(*variants: str) -> ml_collections.ConfigDict:
    """configs/demo_cpu.py with the given variants ("" ones dropped; "a+b" is a and b)."""
    spec = importlib.util.spec_from_file_location("demo_cpu", ROOT / "configs" / "demo_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(",".join(v for x in variants for v in x.split("+") if v))


def run_config(args: argparse.Namespace, variant: str, beta: float, lr: float, seed: int, pairs: str,
               eval_every: int) -> ml_collections.ConfigDict:
    """configs/demo_cpu.py's method `variant`, shortened to --steps, on the shared pairs."""
    c = demo_config(variant, args.demo_variant)
    if args.base:
        c.model.pretrained = args.base
    c.data.source, c.data.path = "array_record", pairs
    c.pnapo.beta, c.optim.lr, c.seed = beta, lr, seed
    # The protocol as the README's first table was measured (2026-11-25), whatever the demo's settings are now: beta
    # eases from 0.3 to 0.9 of the run, and evals sample the raw weights (no EMA).
    c.pnapo.n1, c.pnapo.n2 = round(0.3 * args.steps), round(0.9 * args.steps)
    c.train.ema_decay = 0.0
    c.train.regenerate_every = round(c.train.regenerate_every * args.steps / c.train.num_steps)  # same rounds
    c.train.num_steps, c.eval.sample_every = args.steps, eval_every
    c.checkpoint.every_steps = args.steps
    if c.pnapo.ref_cache:  # one cache per pairs and base, shared by every run that reads them
        c.pnapo.ref_cache_dir = str(Path(pairs).parent / "ref_cache")
    return c


def evals(workdir: Path) -> list[dict[str, float]]:
    lines = metrics.read_lines(workdir / "metrics.jsonl") if (workdir / "metrics.jsonl").exists() else []
    return [x for x in lines if "eval/reward_mean" in x]


def run_dir(args: argparse.Namespace, method: str, beta: float, lr: float, seed: int) -> Path:
    return Path(args.out) / "runs" / f"{METHODS[method] or 'pnapo'}_beta{beta:g}_lr{lr:g}_seed{seed}"


ERROR_NAMES = ("policy_w", "ref_w", "policy_l", "ref_l")


def last_errors(workdir: Path) -> dict[str, float]:
    """The per-t velocity errors (err/{policy,ref}_{w,l}_t{k}) of a run's last train line that has them."""
    path = workdir / "metrics.jsonl"
    lines = [x for x in metrics.read_lines(path) if "err/policy_w_t0" in x] if path.exists() else []
    return {k: v for k, v in lines[-1].items() if k.startswith(("err/", "count/t_bucket_"))} if lines else {}


def error_table(runs: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: per method and t bin, the mean over its runs (of bins that held examples) of the policy's
    and the reference's winner / loser errors at the last train line: did the loss fall by the winner's error
    going down, or by the loser's going up?"""
    rows = ["| method | t bin | policy w | ref w | policy l | ref l | (policy - ref) w | (policy - ref) l |",
            "|---|---|---|---|---|---|---|---|"]
    for method, rs in runs.items():
        errs = [r["errors"] for r in rs if r.get("errors")]
        k = 0
        while errs and f"err/policy_w_t{k}" in errs[0]:
            held = [e for e in errs if e.get(f"count/t_bucket_{k}", 1) > 0]
            m = {n: statistics.mean(e[f"err/{n}_t{k}"] for e in held) if held else float("nan")
                 for n in ERROR_NAMES}
            rows.append(f"| {method} | {k} | " + " | ".join(f"{m[n]:.4f}" for n in ERROR_NAMES) +
                        f" | {m['policy_w'] - m['ref_w']:+.4f} | {m['policy_l'] - m['ref_l']:+.4f} |")
            k += 1
    return rows


def regen_costs(workdir: Path) -> dict[str, float]:
    """Iterative PNAPO's generation compute over a run's rounds (sums of its regen/* lines; {} for others)."""
    path = workdir / "metrics.jsonl"
    lines = [x for x in metrics.read_lines(path) if "regen/round" in x] if path.exists() else []
    return {k: sum(x[f"regen/{k}"] for x in lines) for k in ("seconds", "images", "model_forwards")} if lines else {}


def own_pairs_variant(variants: str) -> str | None:
    """The GENERATION_VARIANTS member of a method's variants ("a+b"), whose pairs it trains on; None: OUT/pairs."""
    return next((v for v in variants.split("+") if v in GENERATION_VARIANTS), None)


def method_pairs(args: argparse.Namespace, method: str, shared: str) -> str:
    """The pairs `method` trains on: `shared` (OUT/pairs), or for GENERATION_VARIANTS its own OUT/<variant>/pairs
    of the same prompts, generated with its settings (resumably, once)."""
    variant = own_pairs_variant(METHODS[method])
    if variant is None:
        return shared
    gen = demo_config(variant, args.demo_variant)
    if args.base:
        gen.model.pretrained = args.base
    (Path(args.out) / variant).mkdir(parents=True, exist_ok=True)
    return train.pairs_path(gen, Path(args.out) / variant, show_progress=True)


def run(args: argparse.Namespace, method: str, beta: float, lr: float, seed: int, pairs: str,
        eval_every: int) -> list[dict]:
    """Train one run (or read it back when it finished before); its eval lines."""
    workdir = run_dir(args, method, beta, lr, seed)
    pairs = method_pairs(args, method, pairs)
    done = evals(workdir)
    if not done or done[-1]["step"] < args.steps:
        config = run_config(args, METHODS[method], beta, lr, seed, pairs, eval_every)
        print(f"run {workdir.name}", flush=True)
        try:
            train.train_and_evaluate(config, str(workdir), show_progress=False)
        except train.Stopped as e:  # SIGTERM / Ctrl-C: the checkpoint is saved, the rerun resumes
            print(f"{workdir.name}: {e}; rerun the same command to resume it", flush=True)
            raise SystemExit(train.Stopped.EXIT_CODE) from None
        done = evals(workdir)
    last = done[-1]
    print(f"  {workdir.name}: reward {last['eval/reward_base_mean']:.3f} -> {last['eval/reward_mean']:.3f}, "
          f"fidelity {last['eval/fidelity_base_mean']:.5f} -> {last['eval/fidelity_mean']:.5f}", flush=True)
    return done


def within(e: dict, bound: float) -> bool:
    return e["eval/fidelity_mean"] <= bound * e["eval/fidelity_base_mean"]


def pick(grid: dict[str, list[dict]], bound: float) -> dict:
    """The grid point with the highest last-step reward among those within the fidelity bound (any if none)."""
    ok = [g for g in grid if within(g["evals"][-1], bound)] or grid
    return max(ok, key=lambda g: g["evals"][-1]["eval/reward_mean"])


def best_gain(curve: list[dict], bound: float) -> float | None:
    """The largest reward gain over the base among a run's evals within `bound` x the base's fidelity."""
    gains = [e["eval/reward_mean"] - e["eval/reward_base_mean"] for e in curve if within(e, bound)]
    return max(gains) if gains else None


def steps_to(curve: list[dict], target: float, bound: float) -> int | None:
    """The first eval step whose reward gain reaches `target` within the fidelity bound (None: never)."""
    return next((e["step"] for e in curve if e["eval/reward_mean"] - e["eval/reward_base_mean"] >= target
                 and within(e, bound)), None)


def mean_std(xs: list[float | None], fmt: str = ".3f") -> str:
    vals = [x for x in xs if x is not None]
    if not vals:
        return "never"
    m = statistics.mean(vals)
    text = f"{m:{fmt}} +- {statistics.stdev(vals):{fmt}}" if len(vals) > 1 else f"{m:{fmt}}"
    return text + (f" ({len(vals)}/{len(xs)} seeds)" if len(vals) < len(xs) else "")


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper-left frontier: points no other point beats on both lower fidelity and higher reward."""
    out: list[tuple[float, float]] = []
    for f, r in sorted(points):
        if not out or r > out[-1][1]:
            out.append((f, r))
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 5))
    base = next(iter(results["runs"].values()))[0]["evals"][0]
    for i, (method, runs) in enumerate(results["runs"].items()):
        color = f"C{i}"
        pts = [(e["eval/fidelity_mean"], e["eval/reward_mean"]) for r in runs for e in r["evals"] if e["step"] > 0]
        ax.scatter(*zip(*pts, strict=True), s=12, alpha=0.35, color=color)
        ax.plot(*zip(*frontier(pts), strict=True), "-o", ms=3, color=color, label=method)
    ax.scatter([base["eval/fidelity_base_mean"]], [base["eval/reward_base_mean"]], marker="*", s=150, color="k",
               label="base model", zorder=5)
    ax.axvline(results["fidelity_bound"] * base["eval/fidelity_base_mean"], ls=":", color="gray",
               label=f"fidelity bound ({results['fidelity_bound']:g}x base)")
    ax.set_xlabel("fidelity: distance to the nearest clean rendering (lower is better)")
    ax.set_ylabel("held-out reward")
    ax.set_title("Every run and eval step (grid + seeds); lines: each method's frontier")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = demo_config(args.demo_variant)
    if args.base:
        gen.model.pretrained = args.base
    pairs = train.pairs_path(gen, out, show_progress=True)
    betas, lrs = [float(x) for x in args.betas.split(",")], [float(x) for x in args.lrs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in METHODS if METHODS[m] in args.methods.split(",") or args.methods == "all"]

    picked: dict[str, dict] = json.loads(Path(args.pick).read_text()) if args.pick else {}
    tuning: dict[str, list] = {}
    for method in methods:
        if method in picked:
            continue
        tuning[method] = [dict(beta=b, lr=lr, evals=run(args, method, b, lr, args.tune_seed, pairs,
                                                        args.tune_eval_every or args.steps))
                          for b in betas for lr in lrs]
        p = pick(tuning[method], args.fidelity_bound)
        picked[method] = dict(beta=p["beta"], lr=p["lr"])
        print(f"{method}: picked beta {p['beta']:g}, lr {p['lr']:g}", flush=True)
    (out / "picked.json").write_text(json.dumps({m: picked[m] for m in methods}, indent=2))  # this run's methods

    runs = {m: [dict(seed=s, evals=run(args, m, picked[m]["beta"], picked[m]["lr"], s, pairs, args.eval_every),
                     errors=last_errors(run_dir(args, m, picked[m]["beta"], picked[m]["lr"], s)),
                     regen=regen_costs(run_dir(args, m, picked[m]["beta"], picked[m]["lr"], s)))
                for s in seeds] for m in methods}
    results = dict(args=vars(args), picked=picked, fidelity_bound=args.fidelity_bound,
                   runs={m: [*runs[m], *tuning.get(m, [])] for m in methods}, seeds=runs)
    report(results, args)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "frontier.png")
    print(f"wrote {out / 'results.json'} and {out / 'frontier.png'}")


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Tables over the seed runs: gain at matched fidelity, steps to target, last-step figures."""
    bounds = [float(b) for b in args.report_bounds.split(",")]
    seeds = results["seeds"]
    base = next(iter(seeds.values()))[0]["evals"][0]
    print(f"\nbase model: held-out reward {base['eval/reward_base_mean']:.3f}, fidelity "
          f"{base['eval/fidelity_base_mean']:.5f}; {args.steps} steps, seeds {args.seeds}, eval every "
          f"{args.eval_every} steps")
    header = "| method | beta | lr | " + " | ".join(f"best gain, fidelity <= {b:g}x base" for b in bounds)
    print(header + f" | steps to +{args.target:g} (fidelity <= {args.fidelity_bound:g}x) | last: gain | "
          "last: win rate | last: fidelity / base |")
    print("|" + "---|" * (3 + len(bounds) + 4))
    for method, rs in seeds.items():
        curves = [r["evals"] for r in rs]
        last = [c[-1] for c in curves]
        cells = [mean_std([best_gain(c, b) for c in curves]) for b in bounds]
        steps = [steps_to(c, args.target, args.fidelity_bound) for c in curves]
        p = results["picked"][method]
        print(f"| {method} | {p['beta']:g} | {p['lr']:g} | " + " | ".join(cells) + f" | {mean_std(steps, '.0f')} | "
              f"{mean_std([e['eval/reward_mean'] - e['eval/reward_base_mean'] for e in last])} | "
              f"{mean_std([e['eval/win_rate_vs_base'] for e in last])} | "
              f"{mean_std([e['eval/fidelity_mean'] / e['eval/fidelity_base_mean'] for e in last])} |")
    for method, rs in seeds.items():
        costs = [r["regen"] for r in rs if r.get("regen")]
        if costs:
            print(f"{method}: pair generation per run {mean_std([c['seconds'] for c in costs], '.0f')} s, "
                  f"{mean_std([c['model_forwards'] for c in costs], '.0f')} model forwards (image rows) over "
                  f"{mean_std([c['images'] for c in costs], '.0f')} images; training: {args.steps} steps x "
                  f"{4 * demo_config(args.demo_variant).train.global_batch_size} forward rows (policy and "
                  "reference, winner and loser), plus the policy's backward")
    print("\nVelocity errors per t bin at the last train line, mean over seeds (metrics.jsonl's err/*):")
    print("\n".join(error_table(seeds)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory of the pairs, the runs and the results")
    parser.add_argument("--base", default="", help="base model folder (default: the shipped demo base)")
    parser.add_argument("--demo_variant", default="", help="a configs/demo_cpu.py variant added to every run "
                        "(fast: seconds, for tests and notebooks)")
    parser.add_argument("--methods", default=",independent,static_beta", help="all, or comma-separated of: '' "
                        "(PNAPO), " + ", ".join(v for v in METHODS.values() if v) + " (default: the paper's three, "
                        "as in the README's table)")
    parser.add_argument("--betas", default="200,1000", help="the tuning grid's betas")
    parser.add_argument("--lrs", default="1e-5,4e-5", help="the tuning grid's learning rates")
    parser.add_argument("--tune_seed", type=int, default=0)
    parser.add_argument("--seeds", default="1,2,3", help="the seeds each method's pick is reported on")
    parser.add_argument("--pick", default="", help="picked.json of an earlier run: its methods skip tuning and use "
                        "its picks; the other methods are tuned")
    parser.add_argument("--steps", type=int, default=60, help="train steps per run")
    parser.add_argument("--eval_every", type=int, default=15, help="steps between held-out sampling evals of the "
                        "seed runs")
    parser.add_argument("--tune_eval_every", type=int, default=0, help="the same for tuning runs (0: only at the "
                        "end, which is all the pick uses)")
    parser.add_argument("--fidelity_bound", type=float, default=1.2,
                        help="picks and steps-to-target count only evals within this x the base's fidelity")
    parser.add_argument("--report_bounds", default="1.1,1.2,1.5", help="fidelity bounds of the gain table")
    parser.add_argument("--target", type=float, default=0.04, help="reward gain of the steps-to-target column")
    main(parser.parse_args())
