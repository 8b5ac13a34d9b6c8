"""The variance of the loss's gradient estimate per method (issue 18, item 6): the quantity common random numbers
act on. PNAPO re-noises winner and loser with their own recorded noises; Flow-DPO gives the pair one fresh noise,
so the noise terms of their errors cancel in the loss's difference; which of the two gradients is the noisier?

    python benchmarks/grad_variance.py --pairs=/tmp/nm/pairs --shared_noise_pairs=/tmp/nm/shared_noise/pairs \
        --out=/tmp/grad_variance.json

Each method is configs/demo_cpu.py's variant (noise_modes.METHODS), at the demo base's parameters (or --policy: a
run's workdir, whose checkpoint's evaluated params are read, or a transformer folder), the frozen reference being
the base, at train step --step (the dynamic beta's schedule factor). The gradient is training's own:
pnapo_jax.step.batch_gradients, jitted, over every parameter.
1. Fixed batch: the first --batch pairs of the training loader's order (config seed); --draws independent RNG keys
   (the t draws, and the fresh noises of the independent modes), the full gradient g for each.
2. Redrawn batch: the loader's first --draws batches, each with its own key: a training step's gradient estimate.
Per method: ||mean g||, the total variance V = E||g - mean g||^2 (unbiased over draws, summed over parameters),
the relative variance V / ||mean g||^2 with its bootstrap spread over draws, and the noise's share: the fixed
batch's V over the redrawn V. The scale of the loss differs between objectives (IPO's, SFT's term, beta), so
compare methods by the relative variance. ref_cache's gradient is the same with the reference forward computed,
so it runs uncached with t on its 8-point grid.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from machine import describe, load  # noqa: E402
from noise_modes import METHODS, demo_config, own_pairs_variant  # noqa: E402

from pnapo_jax import cli, export, sharding, train  # noqa: E402
from pnapo_jax.data.pipeline import global_batch  # noqa: E402
from pnapo_jax.errors import UserError  # noqa: E402
from pnapo_jax.setup import base_params, init_state, make_setup  # noqa: E402
from pnapo_jax.step import batch_gradients  # noqa: E402

NAMES = {variant or "pnapo": name for name, variant in METHODS.items()}
DEFAULT_METHODS = ("pnapo", "independent", "independent_unshared", "ipo", "sft", "shared_noise", "ref_cache")
SCALE_NOTE = ("The objectives' scales differ (IPO's gradient at the base is exactly twice DPO's; SFT adds a term): "
              "compare methods by the relative variance V / ||mean g||^2, not by V.")


SIGNAL_NOTE = ("‖mean g‖² overstates ‖E g‖² by V / R (R draws), so V / ‖mean g‖² cannot exceed about R when the "
               "mean gradient is below the noise; V / ‖E g‖² uses the unbiased estimate (mean of <g_r, g_s>, r != s).")


def spread(gram_RxR: np.ndarray) -> dict[str, float]:
    """From the Gram matrix G_rs = <g_r, g_s> of R gradient draws: ||mean g||, the total variance
    V = sum_r ||g_r - mean g||^2 / (R - 1) (unbiased) and V / ||mean g||^2. ||mean g||^2 overstates ||E g||^2 by
    V / R, so `signal_sq` is the unbiased mean of the off-diagonal entries as well."""
    g = np.asarray(gram_RxR, np.float64)
    r = g.shape[0]
    mean_sq = g.sum() / r**2
    var = (np.trace(g) - r * mean_sq) / (r - 1)
    return {"mean_norm": float(np.sqrt(mean_sq)), "total_var": float(var), "rel_var": float(var / mean_sq),
            "signal_sq": float((g.sum() - np.trace(g)) / (r * (r - 1)))}


def bootstrap(gram_RxR: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """The relative variance's spread over draws resampled with replacement: std (what the table shows) and 5 / 95
    percentiles (a resample holds ~63% distinct draws, so these sit low: V / ‖mean g‖² falls with fewer draws)."""
    rng = np.random.default_rng(seed)
    r = gram_RxR.shape[0]
    rel = []
    for _ in range(resamples):
        i = rng.integers(0, r, r)
        if len(set(i.tolist())) > 1:
            rel.append(spread(gram_RxR[np.ix_(i, i)])["rel_var"])
    return {"rel_var_std": float(np.std(rel)), "rel_var_p5": float(np.percentile(rel, 5)),
            "rel_var_p95": float(np.percentile(rel, 95))}


def method_config(variant: str, args: argparse.Namespace, pairs: str):
    c = demo_config(variant, args.demo_variant)
    if args.base:
        c.model.pretrained = args.base
    c.pnapo.ref_cache = False  # the same gradient as the cache's (the reference's errors are computed, not read)
    c.train.global_batch_size = args.batch
    if pairs == "synthetic":  # tests: random records of the model's shapes
        c.data.source = "synthetic"
    else:
        c.data.source, c.data.path = "array_record", pairs
    return c


def policy_params(setup: Any, base: Any, policy: str) -> Any:
    """The params the gradient is taken at: the base, a run's checkpoint (its evaluated params) or a folder's."""
    if not policy:
        return base
    if (Path(policy) / "checkpoints").exists():
        return export.restore_params(setup, policy)[1]
    config = setup.config.copy_and_resolve_references()
    config.model.pretrained = policy
    return setup.backbone.load_pretrained(config, setup.model_cfg, setup.variable_shardings["params"])


def gradient_grams(config: Any, args: argparse.Namespace) -> dict[str, np.ndarray]:
    """The Gram matrices [R, R] of the R flattened gradients, for the fixed batch and for redrawn batches."""
    setup = make_setup(config, jax.devices()[:1])
    base = base_params(setup)
    state, frozen = init_state(setup, base)
    params = policy_params(setup, base, args.policy)
    loader = train.make_train_loader(config, train.make_source(config, config.data.path))
    batch_sh = sharding.batch_sharding(setup.mesh)
    batches = [global_batch(next(loader), batch_sh) for _ in range(args.draws)]
    loader.close()
    flat = jax.jit(lambda p, b, key: ravel_pytree(batch_gradients(setup, p, frozen, b, key, args.step)[0])[0])
    keys = [jax.random.fold_in(jax.random.PRNGKey(args.seed), r) for r in range(args.draws)]
    with setup.scope():
        fixed_RxP = np.stack([np.asarray(flat(params, batches[0], k), np.float64) for k in keys])
        # draw 0 is the same batch and key in both sets: computed once
        redrawn_RxP = np.stack([fixed_RxP[0], *(np.asarray(flat(params, b, k), np.float64)
                                                for b, k in zip(batches[1:], keys[1:], strict=True))])
    grams = {"fixed": fixed_RxP @ fixed_RxP.T, "redrawn": redrawn_RxP @ redrawn_RxP.T}
    del state
    return grams


def cells(x: dict[str, float]) -> str:
    """‖mean g‖ | V | V / ‖mean g‖² ± bootstrap std | V / (unbiased ‖E g‖²), or why that is not resolved."""
    snr = (f"{x['total_var'] / x['signal_sq']:.3g}" if x["signal_sq"] > 0
           else f"unresolved (‖E g‖² estimate {x['signal_sq']:.3g} ≤ 0)")
    return f"{x['mean_norm']:.4g} | {x['total_var']:.4g} | {x['rel_var']:.3g} ± {x['rel_var_std']:.2g} | {snr}"


def table(out: dict[str, Any]) -> str:
    """The markdown table (with its load line and notes) of a result JSON."""
    a = out["args"]
    lines = [f"load before {out['load_before']}, after {out.get('load_after', '?')} (1/5/15 min); "
             f"{a['batch']} pairs, {a['draws']} draws, step {a['step']}, params {a['policy'] or 'the base'}; "
             "± = bootstrap std over draws",
             "| method | fixed batch: ‖mean g‖ | V = E‖g - mean g‖² | V / ‖mean g‖² | V / ‖E g‖² (unbiased) | "
             "redrawn batches: ‖mean g‖ | V | V / ‖mean g‖² | V / ‖E g‖² (unbiased) | V fixed / V redrawn |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["methods"].values():
        f, d = r["fixed"], r["redrawn"]
        lines.append(f"| {r['name']} | {cells(f)} | {cells(d)} | "
                     f"{f['total_var'] / d['total_var']:.2f} |")
    lines += [SCALE_NOTE, SIGNAL_NOTE]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.table:
        out = json.loads(Path(args.table).read_text())
        print(table(out))
        return out
    if not args.pairs:
        raise UserError("--pairs: the pairs dataset to take the gradients on (or --table=JSON to print a result)")
    if args.pairs != "synthetic" and not Path(args.pairs).exists():
        raise UserError(f"--pairs={args.pairs}: not found (a pairs dataset, e.g. noise_modes' OUT/pairs)")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in NAMES or m == "iterative"]
    if unknown:
        raise UserError(f"--methods: unknown {unknown}; choose from {sorted(set(NAMES) - {'iterative'})}")
    if args.draws < 2:
        raise UserError(f"--draws={args.draws}: a variance needs at least 2 draws")
    print(describe())
    start_load, t0 = load(), time.time()
    print(f"load before: {start_load}; {args.batch} pairs, {args.draws} draws, step {args.step}, params "
          f"{args.policy or 'the base'}", flush=True)
    results = {}
    for m in methods:
        pairs = args.shared_noise_pairs if own_pairs_variant(m) else args.pairs  # the pairs it trains on
        if not pairs or (pairs != "synthetic" and not Path(pairs).exists()):
            print(f"{m}: skipped, no pairs (--shared_noise_pairs={pairs!r} not found)", flush=True)
            continue
        t = time.time()
        grams = gradient_grams(method_config("" if m == "pnapo" else m, args, pairs), args)
        results[m] = {"name": NAMES[m], "pairs": pairs,
                      **{k: {**spread(g), **bootstrap(g)} for k, g in grams.items()}}
        print(f"{m}: {time.time() - t:.0f} s, load {load()}", flush=True)
        write(args.out, {"args": vars(args), "machine": describe(), "load_before": start_load, "partial": True,
                         "methods": results})
    out = {"args": vars(args), "machine": describe(), "load_before": start_load, "load_after": load(),
           "seconds": round(time.time() - t0), "note": SCALE_NOTE, "methods": results}
    print(table(out))
    write(args.out, out)
    return out


def write(path: str, out: dict[str, Any]) -> None:
    """The JSON so far (after each method: a long run that is stopped keeps what it measured)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(out, indent=2))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default="", help="the pairs dataset (noise_modes' OUT/pairs); 'synthetic': random")
    p.add_argument("--shared_noise_pairs", default="", help="shared-noise pairs (OUT/shared_noise/pairs)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--draws", type=int, default=32)
    p.add_argument("--step", type=int, default=0, help="the train step (beta's schedule); 0: the run's start")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default="", help="another base (transformer folder): the reference and the default "
                                              "params")
    p.add_argument("--policy", default="", help="take the gradient at a run's checkpoint (its workdir) or a "
                                                "transformer folder instead of the base")
    p.add_argument("--demo_variant", default="", help="an extra configs/demo_cpu.py variant (tests: fast)")
    p.add_argument("--out", default="", help="JSON file")
    p.add_argument("--table", default="", help="print the table of a result JSON (--out of a run) and exit")
    p.add_argument("--debug", action="store_true", help="the traceback of an expected error, not one line")
    return p


if __name__ == "__main__":
    arguments = parser().parse_args(sys.argv[1:])
    cli.quiet_logs()
    with cli.one_line_errors(arguments.debug):
        main(arguments)
