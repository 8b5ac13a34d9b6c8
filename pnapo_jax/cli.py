"""What every command-line tool shares: flag parsing and expected errors as one clear line, and quiet logs."""

import logging as pylogging
import re
import sys
from collections.abc import Callable

from absl import app, flags, logging

from pnapo_jax.errors import UserError

_DEBUG = flags.DEFINE_bool("debug", False, "Show the full traceback of an expected error instead of one line.")


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


def run(main: Callable[[list[str]], None]) -> None:
    """absl's app.run with the shared parser; a UserError ends the command with `error: <its line>`, exit 1."""

    def guarded(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        quiet_logs()
        try:
            main(argv)
        except UserError as e:
            if _DEBUG.value:
                raise
            sys.exit(f"error: {e}")

    app.run(guarded, flags_parser=parse_flags)


def quiet_logs() -> None:
    """Warnings and errors only: orbax and grain log every save and read at INFO, which drowns progress bars."""
    pylogging.getLogger("absl").setLevel(pylogging.WARNING)
    logging.set_verbosity(logging.WARNING)
