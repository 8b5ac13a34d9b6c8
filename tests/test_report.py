"""The run's pictures say what they show: which numbers are rewards, and how many of the eval images appear."""

import numpy as np

from pnapo_jax import report


def test_samples_grid_labels_rewards_and_counts_the_images(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2, 20, 4, 4, 3))
    prompts = [f"prompt {i // 2}" for i in range(20)]
    rewards = np.round(rng.uniform(size=(2, 20)), 2)
    fig = report.grid_figure(*images, prompts, *rewards, "step 50: base (top) vs policy (bottom)")
    axes = fig.get_axes()
    assert len(axes) == 2 * 12
    assert [ax.get_title() for ax in axes[:2]] == [f"base reward {rewards[0, 0]:.2f}",
                                                   f"base reward {rewards[0, 1]:.2f}"]
    assert axes[12].get_title() == f"policy reward {rewards[1, 0]:.2f}"
    assert "the first 12 of 20 eval images, titled with their reward" in fig._suptitle.get_text()
    report.sample_grid(*images, prompts, *rewards, tmp_path / "samples.png", "step 50")
    assert (tmp_path / "samples.png").stat().st_size > 0
