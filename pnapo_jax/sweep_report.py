"""One table and one plot over a sweep's workdir (local or gs://): per point, the config fields that differ
between points (the grid), its final train and eval metrics (each key's last value in metrics.jsonl), and the
means and win rates of `python -m pnapo_jax.evaluate` results found in POINT/*/results.json.

    python -m pnapo_jax.sweep_report --workdir=/tmp/sweep --metric=eval/reward_mean [--out=DIR]

writes sweep_report.md, sweep_report.csv (every column) and sweep_METRIC.png into --out (default: --workdir) and
prints the markdown table (the --columns shown).
"""

import csv
import io
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from etils import epath  # noqa: E402

from pnapo_jax.convert import files  # noqa: E402
from pnapo_jax.errors import UserError  # noqa: E402

DEFAULT_COLUMNS = ("loss", "rewards/accuracies", "eval/reward_mean", "eval/win_rate_vs_base", "eval/fidelity_mean")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v
    return out


def _final_metrics(path: epath.Path) -> dict:
    """Each key's last value over the lines of metrics.jsonl."""
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                out |= {k: v for k, v in json.loads(line).items() if v is not None}
    return out


def _bench(point: epath.Path) -> dict:
    """`bench:NAME/MODEL/SCORER` means and `win:NAME/MODEL/SCORER` win rates of POINT/NAME/results.json."""
    out = {}
    for results in sorted(point.glob("*/results.json")):
        r = files.read_json(results)
        name = results.parent.name
        for model, scores in r.get("models", {}).items():
            out |= {f"bench:{name}/{model}/{s}": v["value"] for s, v in scores.items()}
        for model, scores in r.get("win_rates", {}).items():
            out |= {f"win:{name}/{model}/{s}": v["value"] for s, v in scores.items()}
    return out


def collect(workdir: str) -> tuple[list[str], list[dict]]:
    """(grid keys, one row per point: point, grid values, final metrics, bench results)."""
    root = epath.Path(workdir)
    if not root.exists():
        raise UserError(f"--workdir={workdir}: not found")
    points = sorted(p for p in root.iterdir() if (p / "config.json").exists())
    if not points:
        raise UserError(f"--workdir={workdir}: no point workdirs (subfolders with config.json) in it")
    configs = [_flat(files.read_json(p / "config.json")) for p in points]
    keys = sorted({k for c in configs for k in c})
    grid = [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]
    rows = [{"point": p.name, **{k: c.get(k) for k in grid}, **_final_metrics(p / "metrics.jsonl"), **_bench(p)}
            for p, c in zip(points, configs, strict=True)]
    return grid, rows


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(grid: list[str], rows: list[dict], columns: list[str]) -> str:
    shown = ["point", *grid, "step", *[c for c in columns if any(c in r for r in rows)]]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in shown) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], metric: str) -> bytes:
    """PNG bytes: `metric` per point (a bar each, in point order)."""
    have = [r for r in rows if isinstance(r.get(metric), int | float)]
    if not have:
        raise UserError(f"--metric={metric}: no point has it (keys: {sorted({k for r in rows for k in r})[:20]})")
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(have) + 1.5), 3.2))
    ax.bar(range(len(have)), [r[metric] for r in have])
    ax.set_xticks(range(len(have)), [r["point"] for r in have], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} across the sweep")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write(workdir: str, metric: str, out: str = "", columns: tuple[str, ...] = DEFAULT_COLUMNS) -> str:
    """Write the table (md, csv) and the plot; returns the markdown."""
    grid, rows = collect(workdir)
    dst = epath.Path(out or workdir)
    dst.mkdir(parents=True, exist_ok=True)
    md = markdown(grid, rows, [*columns, *([metric] if metric not in columns else [])])
    (dst / "sweep_report.md").write_text(md)
    header = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)
    (dst / "sweep_report.csv").write_text(buf.getvalue())
    (dst / f"sweep_{metric.replace('/', '_')}.png").write_bytes(plot(rows, metric))
    return md


def run() -> None:
    from absl import flags

    from pnapo_jax import cli

    flags.DEFINE_string("workdir", None, "The sweep's workdir (local or gs://): one subfolder per point.")
    flags.DEFINE_string("metric", "eval/reward_mean", "The metric plotted across the grid.")
    flags.DEFINE_string("out", "", "Where the report goes (default: --workdir).")
    flags.DEFINE_list("columns", list(DEFAULT_COLUMNS), "Metrics shown in the markdown table (the CSV has all).")
    flags.mark_flags_as_required(["workdir"])

    def main(argv: list[str]) -> None:
        f = flags.FLAGS
        print(write(f.workdir, f.metric, f.out, tuple(f.columns)), end="")

    cli.run(main)


if __name__ == "__main__":
    run()
