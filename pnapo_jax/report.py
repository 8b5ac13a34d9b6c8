"""Pictures of a run: base vs policy samples from the same noises, and the eval curves.

    WORKDIR/samples.png   the first eval images: base (top) | policy (bottom), same noise, each titled with its reward
    WORKDIR/curves.png    eval reward and win rate vs the base, and fidelity (lower = closer to the data), per step
"""

from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

from pnapo_jax import metrics  # noqa: E402


def grid_figure(base_BxHxWx3: np.ndarray, policy_BxHxWx3: np.ndarray, prompts: list[str], base_rewards: np.ndarray,
                policy_rewards: np.ndarray, title: str, max_images: int = 12) -> plt.Figure:
    """The first `max_images` eval images, base over policy, each titled with its reward; the title says how
    many of the eval images are shown."""
    n = min(len(prompts), max_images)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.9), squeeze=False)
    for i in range(n):
        for row, (images, rewards, who) in enumerate([(base_BxHxWx3, base_rewards, "base"),
                                                      (policy_BxHxWx3, policy_rewards, "policy")]):
            ax = axes[row, i]
            ax.imshow(np.clip(images[i], 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{who} reward {rewards[i]:.2f}", fontsize=6)
        axes[1, i].set_xlabel(prompts[i], fontsize=6, wrap=True)
    fig.suptitle(f"{title}; the first {n} of {len(prompts)} eval images, titled with their reward", fontsize=9)
    fig.tight_layout()
    return fig


def sample_grid(base_BxHxWx3: np.ndarray, policy_BxHxWx3: np.ndarray, prompts: list[str], base_rewards: np.ndarray,
                policy_rewards: np.ndarray, path: epath.Path, title: str, max_images: int = 12) -> None:
    fig = grid_figure(base_BxHxWx3, policy_BxHxWx3, prompts, base_rewards, policy_rewards, title, max_images)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eval_curves(metrics_jsonl: epath.Path, path: epath.Path) -> None:
    lines = metrics.read_lines(metrics_jsonl)
    evals = [d for d in lines if "eval/reward_mean" in d]
    if not evals:
        return
    steps = [d["step"] for d in evals]
    has_fidelity = "eval/fidelity_mean" in evals[0]  # worlds without a data manifold (FLUX) have none
    fig, axes = plt.subplots(1, 3 if has_fidelity else 2, figsize=(11 if has_fidelity else 7.5, 3))
    axes[0].plot(steps, [d["eval/reward_mean"] for d in evals], "o-", label="policy")
    axes[0].plot(steps, [d["eval/reward_base_mean"] for d in evals], "--", label="base")
    axes[0].set_title("reward (held-out prompts)")
    axes[0].legend()
    axes[1].plot(steps, [d["eval/win_rate_vs_base"] for d in evals], "o-")
    axes[1].axhline(0.5, color="gray", lw=0.5)
    axes[1].set_title("win rate vs base")
    if has_fidelity:
        axes[2].plot(steps, [d["eval/fidelity_mean"] for d in evals], "o-", label="policy")
        axes[2].plot(steps, [d["eval/fidelity_base_mean"] for d in evals], "--", label="base")
        axes[2].set_title("fidelity (lower = closer to the data)")
        axes[2].legend()
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(workdir: epath.Path, sample_eval: Any, policy_images: np.ndarray, rewards: np.ndarray, step: int) -> None:
    """Refresh both pictures for the eval at `step` (`sample_eval`: a pnapo_jax.evaluate.SampleEval)."""
    sample_grid(sample_eval.base_images, policy_images, sample_eval.prompts, sample_eval.base_rewards, rewards,
                workdir / "samples.png", f"step {step}: base (top) vs policy (bottom), same noises")
    eval_curves(workdir / "metrics.jsonl", workdir / "curves.png")
