"""What every command-line tool shares: flag parsing and expected errors as one clear line, and quiet logs."""

import contextlib
import logging as pylogging
import re
import sys
import traceback
from collections.abc import Callable, Iterator

from absl import app, flags, logging
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from pnapo_jax.errors import UserError

_DEBUG = flags.DEFINE_bool("debug", False, "Show the full traceback of an expected error instead of one line.")


def dashes_to_underscores(argv: list[str]) -> list[str]:
    """`--dry-run` -> `--dry_run` (and `--nodry-run`) for a defined flag: absl knows only the underscored names,
    the argparse commands before it took dashes. Nothing after `--` changes."""
    out = list(argv)
    for i, arg in enumerate(argv[1:], 1):
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        if name.startswith("--") and "-" in name[2:]:
            flag = name[2:].replace("-", "_")
            if flag in flags.FLAGS or (flag.startswith("no") and flag[2:] in flags.FLAGS):
                out[i] = f"--{flag}{eq}{value}"
    return out


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing, with flag and config mistakes reported as one clear line instead of a traceback."""
    argv = dashes_to_underscores(argv)
    try:
        rest = flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: a field that does not exist
        msg = str(e.args[0]).encode().decode("unicode_escape").strip("'")
        hint = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', msg)
        field = f"{hint.group(2)!r} (did you mean {hint.group(1)!r}?)" if hint else msg.splitlines()[0]
        sys.exit(f"error: unknown config field {field} in --config.* overrides")
    except flags.Error as e:  # ill-typed value, missing required flag, a config file's get_config refusing
        lines = str(e).splitlines()
        if "Traceback (most recent call last):" in lines and "--debug" not in argv:
            lines = [lines[0].removesuffix("Error whilst parsing config file:") + lines[-1]]  # its exception
        sys.exit(f"error: {'; '.join(lines)}")
    except Exception as e:  # a config file's own code failed: it is user input, so say where, in one line
        if "--debug" in argv:
            raise
        frame = traceback.extract_tb(e.__traceback__)[-1]
        sys.exit(f"error: {type(e).__name__}: {e} ({frame.filename}, line {frame.lineno}, while reading the flags; "
                 "--debug shows the traceback)")
    _check_config_files()
    return rest


def _check_config_files() -> None:
    """ml_collections defers a config file that cannot be read to its first use, deep in the command: say it
    now, naming the flag and the file."""
    for name in flags.FLAGS:
        flag = flags.FLAGS[name]
        if isinstance(flag.parser, ConfigFileFlagParser) and flag.value is not None:
            try:
                flag.value.get("seed")
            except OSError as e:
                sys.exit(f"error: --{name}={flag.serialize().partition('=')[2]}: {str(e).splitlines()[-1].strip()}")


def run(main: Callable[[list[str]], None], argv: list[str] | None = None, arguments: bool = False) -> None:
    """absl's app.run with the shared parser; a UserError ends the command with `error: <its line>`, exit 1.
    `arguments`: the command takes arguments after `--` (main gets them after argv[0]); without, any is refused.
    `argv`: the flags (no program name) of an in-process call, e.g. a test's: parsed afresh, and a command that
    succeeds returns instead of exiting."""

    def guarded(args: list[str]) -> None:
        quiet_logs()
        with one_line_errors(_DEBUG.value):
            if len(args) > 1 and not arguments:
                raise UserError(f"unexpected arguments {args[1:]}: every input is a --flag (see --help)")
            main(args)

    if argv is None:
        app.run(guarded, flags_parser=parse_flags)
        return
    program = main.__module__  # --help lists the flags its module defined
    flags.FLAGS.unparse_flags()  # flags an earlier call gave do not carry over
    saved, sys.argv = sys.argv, [program, *argv]
    try:
        app.run(guarded, argv=sys.argv, flags_parser=parse_flags)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    finally:
        sys.argv = saved


@contextlib.contextmanager
def one_line_errors(debug: bool) -> Iterator[None]:
    """A UserError inside ends the process with `error: <its line>` and exit status 1 (`debug`: the traceback).
    `run` uses it."""
    try:
        yield
    except UserError as e:
        if debug:
            raise
        sys.exit(f"error: {e}")


def quiet_logs() -> None:
    """Warnings and errors only: orbax and grain log every save and read at INFO, which drowns progress bars."""
    pylogging.getLogger("absl").setLevel(pylogging.WARNING)
    logging.set_verbosity(logging.WARNING)
