"""Train with PNAPO: `python -m pnapo_jax.main --config=configs/flux_tpu.py --workdir=gs://bucket/run`.

Any config field can be overridden: `--config.pnapo.beta=5000 --config.lora.rank=64`. The logic lives in
`pnapo_jax.train` so that it can be imported from a notebook.
"""

import logging as pylogging
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from pnapo_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl, TensorBoard (local path or gs://).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    pylogging.getLogger("absl").setLevel(pylogging.WARNING)  # orbax's per-save INFO lines would drown the bar
    logging.set_verbosity(logging.WARNING)
    line = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, show_progress=_PROGRESS.value)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in line.items()))


def _parse_flags(argv: list[str]) -> list[str]:
    """absl parsing, with config override mistakes reported as one clear line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: a field that does not exist
        msg = str(e.args[0]).encode().decode("unicode_escape").strip("'")
        hint = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', msg)
        field = f"{hint.group(2)!r} (did you mean {hint.group(1)!r}?)" if hint else msg.splitlines()[0]
        sys.exit(f"error: unknown config field {field} in --config.* overrides")
    except flags.Error as e:  # ill-typed value, missing required flag, bad config file
        sys.exit(f"error: {e}")


def run() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
