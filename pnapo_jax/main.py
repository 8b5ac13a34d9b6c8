"""Train with PNAPO: `python -m pnapo_jax.main --config=configs/flux_tpu.py --workdir=gs://bucket/run`.

Any config field can be overridden: `--config.pnapo.beta=5000 --config.lora.rank=64`. The logic lives in
`pnapo_jax.train` so that it can be imported from a notebook.

Exit status: 0 finished (or had finished before), 75 stopped early by SIGTERM / Ctrl-C with the checkpoint saved
(rerun the same command to resume), 1 an error (one line; --debug for the traceback).
"""

import shlex
import sys

from absl import flags
from ml_collections import config_flags

from pnapo_jax import cli, config_check, train
from pnapo_jax import workdir as run_dir


def main(argv: list[str]) -> None:
    del argv  # cli.run refuses extra arguments
    f = flags.FLAGS
    config_check.check(f.config, paths=True)  # the local inputs too, before pairs or weights
    try:
        line = train.train_and_evaluate(f.config, f.workdir, show_progress=f.progress)
    except train.Stopped as e:
        print(f"{e}; resume with: {resume_command(sys.argv)}", flush=True)
        sys.exit(train.Stopped.EXIT_CODE)
    if line:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in line.items()))
    if "eval/reward_mean" in line:
        print(summary(line, f.workdir))


def summary(line: dict, workdir: str) -> str:
    """The sampling eval in words: reward before -> after, the win rate against the base, fidelity."""
    text = (f"held-out reward {line['eval/reward_base_mean']:.3f} (base) -> {line['eval/reward_mean']:.3f} "
            f"(policy), win rate vs base {line['eval/win_rate_vs_base']:.2f}")
    if "eval/fidelity_mean" in line:
        text += (f"; fidelity {line['eval/fidelity_base_mean']:.5f} -> {line['eval/fidelity_mean']:.5f} "
                 "(distance to the nearest clean rendering: lower is better)")
    return f"{text}; images {workdir}/samples.png, curves {workdir}/curves.png"


def resume_command(argv: list[str]) -> str:
    """The command that resumes this run from any directory: this one, with the workdir made absolute."""
    args, workdir = [], str(run_dir.resolve(flags.FLAGS.workdir))
    for i, a in enumerate(argv[1:]):
        if a.startswith("--workdir="):
            a = f"--workdir={workdir}"
        elif i > 0 and argv[i] == "--workdir":
            a = workdir
        args.append(a)
    return shlex.join([sys.executable, "-m", "pnapo_jax.main", *args])


def run() -> None:
    """The command. Flags are defined here, not at import, as in every command: importing a command's module
    (from a notebook, a test or another command) defines none."""
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl, TensorBoard (local path or gs://).")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)


if __name__ == "__main__":
    run()
