"""A benchmark's numbers: per-model means with 95% intervals, paired win rates against the baseline with
bootstrap intervals, per-category tables; written as results.json, scores.csv (one row per image) and
results.md (the tables printed at the end)."""

import csv
import io
import json
from collections.abc import Sequence

import numpy as np
from etils import epath

from pnapo_jax.bench import stats
from pnapo_jax.bench.prompt_sets import PromptSet

Scores = dict[str, dict[str, np.ndarray]]  # model -> scorer -> [P, N]


def summarize(scores: Scores, higher_is_better: dict[str, bool], baseline: str, prompt_set: PromptSet) -> dict:
    """Everything results.json holds (see the module docstring)."""
    models = list(scores)
    P, N = next(iter(next(iter(scores.values())).values())).shape
    out = {"prompt_set": prompt_set.name, "num_prompts": P, "seeds_per_prompt": N, "baseline": baseline,
           "scorers": {s: {"higher_is_better": h} for s, h in higher_is_better.items()},
           "models": {m: {s: stats.mean_interval(scores[m][s]).as_dict() for s in higher_is_better} for m in models},
           "win_rates": {m: {s: stats.win_rate(scores[m][s], scores[baseline][s], h).as_dict()
                             for s, h in higher_is_better.items()} for m in models if m != baseline},
           "categories": {}}
    for breakdown, labels in prompt_set.categories.items():
        labels_P = np.asarray(labels[:P])
        table = {}
        for label in dict.fromkeys(labels_P):
            rows = labels_P == label
            table[label] = {
                "prompts": int(rows.sum()),
                "models": {m: {s: float(scores[m][s][rows].mean()) for s in higher_is_better} for m in models},
                "win_rates": {m: {s: float(stats.wins(scores[m][s][rows], scores[baseline][s][rows], h).mean())
                                  for s, h in higher_is_better.items()} for m in models if m != baseline}}
        out["categories"][breakdown] = table
    return out


def write_csv(path: epath.Path, scores: Scores, prompt_set: PromptSet, image_paths: dict[str, list[list[str]]],
              noise_seed: int) -> None:
    """One row per image: model, prompt, seed, noise index, categories, image file, every score."""
    scorer_names = list(next(iter(scores.values())))
    P, N = next(iter(next(iter(scores.values())).values())).shape
    f = io.StringIO(newline="")
    writer = csv.writer(f)
    writer.writerow(["model", "prompt_index", "seed_index", "noise_index", "noise_seed", "prompt",
                     *prompt_set.categories, "image", *scorer_names])
    for m in scores:
        for p in range(P):
            cats = [labels[p] for labels in prompt_set.categories.values()]
            for k in range(N):
                writer.writerow([m, p, k, p * N + k, noise_seed, prompt_set.prompts[p], *cats,
                                 image_paths[m][p][k], *(f"{scores[m][s][p, k]:.6g}" for s in scorer_names)])
    path.write_text(f.getvalue())


def _cell(d: dict) -> str:
    v = d.get("value", d.get("mean"))
    return f"{v:.4g} [{d['low']:.4g}, {d['high']:.4g}]"


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def markdown(summary: dict) -> str:
    """The tables: means, win rates against the baseline, and per category, means and win rates."""
    scorers = list(summary["scorers"])
    arrow = {s: "↑" if summary["scorers"][s]["higher_is_better"] else "↓" for s in scorers}
    head = [f"{s} {arrow[s]}" for s in scorers]
    parts = [f"{summary['prompt_set']}: {summary['num_prompts']} prompts x {summary['seeds_per_prompt']} seeds, "
             "means with 95% intervals (t over prompts)", "",
             _table(["model", *head], [[m, *(_cell(v[s]) for s in scorers)] for m, v in summary["models"].items()])]
    if summary["win_rates"]:
        parts += ["", f"win rate against {summary['baseline']} (same prompt and noise; ties count half; 95% "
                  "bootstrap interval over prompts)", "",
                  _table(["model", *head], [[m, *(_cell(v[s]) for s in scorers)]
                                            for m, v in summary["win_rates"].items()])]
    models = list(summary["models"])
    for breakdown, table in summary["categories"].items():
        for s in scorers:
            cols = [*models, *(f"{m} wins" for m in summary["win_rates"])]
            rows = [[label, t["prompts"], *(f"{t['models'][m][s]:.4g}" for m in models),
                     *(f"{t['win_rates'][m][s]:.2f}" for m in summary["win_rates"])] for label, t in table.items()]
            parts += ["", f"{s} {arrow[s]} by {breakdown}", "", _table([breakdown, "prompts", *cols], rows)]
    return "\n".join(parts) + "\n"


def write(out: epath.Path, summary: dict) -> str:
    """results.json and results.md; returns the markdown."""
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = markdown(summary)
    (out / "results.md").write_text(md)
    return md
