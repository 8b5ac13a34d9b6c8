"""What every command-line tool shares: flag parsing with one-line errors, and quiet library logs."""

import logging as pylogging
import re
import sys

from absl import flags, logging


def parse_flags(argv: list[str]) -> list[str]:
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


def quiet_logs() -> None:
    """Warnings and errors only: orbax and grain log every save and read at INFO, which drowns progress bars."""
    pylogging.getLogger("absl").setLevel(pylogging.WARNING)
    logging.set_verbosity(logging.WARNING)
