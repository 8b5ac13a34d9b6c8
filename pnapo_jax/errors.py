"""The one exception type for expected mistakes, so that every command can report them in one line."""


class UserError(Exception):
    """A mistake in the user's input or environment (a flag, a config field, a file, a record, a workdir).

    The message is one line that names the flag / field / file / record and says what was expected; commands
    print it as `error: ...` and exit non-zero with no traceback (`--debug` shows the traceback). Raise it
    only for what the user can fix; a bug in our code must stay a traceback.
    """
