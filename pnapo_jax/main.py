"""Train with PNAPO: `python -m pnapo_jax.main --config=configs/flux_tpu.py --workdir=gs://bucket/run`.

Any config field can be overridden: `--config.pnapo.beta=5000 --config.lora.rank=64`. The logic lives in
`pnapo_jax.train` so that it can be imported from a notebook.
"""

from absl import flags
from ml_collections import config_flags

from pnapo_jax import cli, config_check, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl, TensorBoard (local path or gs://).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv  # cli.run refuses extra arguments
    config_check.check(_CONFIG.value, paths=True)  # the local inputs too, before pairs or weights
    line = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, show_progress=_PROGRESS.value)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in line.items()))
    if "eval/reward_mean" in line:
        print(summary(line, _WORKDIR.value))


def summary(line: dict, workdir: str) -> str:
    """The sampling eval in words: reward before -> after, the win rate against the base, fidelity."""
    text = (f"held-out reward {line['eval/reward_base_mean']:.3f} (base) -> {line['eval/reward_mean']:.3f} "
            f"(policy), win rate vs base {line['eval/win_rate_vs_base']:.2f}")
    if "eval/fidelity_mean" in line:
        text += (f"; fidelity {line['eval/fidelity_base_mean']:.5f} -> {line['eval/fidelity_mean']:.5f} "
                 "(distance to the nearest clean rendering: lower is better)")
    return f"{text}; images {workdir}/samples.png, curves {workdir}/curves.png"


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
