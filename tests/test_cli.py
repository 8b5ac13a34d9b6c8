"""Every command's bad invocations end in one line naming the flag, field or file, with no traceback
(tests/cli_probe.py lists them and runs them, one forked child per case); --debug shows the traceback.
A few per command run by default, all of them with the slow tests."""

import collections
import json
import os
import subprocess
import sys

import pytest
from cli_probe import QUICK, cases
from etils import epath

from pnapo_jax import cli
from pnapo_jax.errors import UserError

ROOT = epath.Path(__file__).parent.parent
COMMANDS = sorted({c.name.split("/")[0] for c in cases(collections.defaultdict(str), "/probe")})


def _probe(*selection: str) -> dict[str, dict]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_probe.py"), "--json", *selection], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    assert results
    bad = {name: f"{r['outcome']}: {r['last']}" for name, r in results.items() if r["outcome"] != "one_line"}
    assert not bad, "\n".join(f"{k}: {v}" for k, v in bad.items())
    return results


def test_a_bad_invocation_of_each_command_is_one_line():
    assert len(_probe("--quick")) == len(QUICK)


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_every_bad_invocation_is_one_line(command):
    _probe(command)


def test_one_line_errors_and_debug(capsys):
    with pytest.raises(SystemExit) as exit_info, cli.one_line_errors(debug=False):
        raise UserError("--out=x: not a folder")
    assert exit_info.value.code == "error: --out=x: not a folder"
    with pytest.raises(UserError), cli.one_line_errors(debug=True):
        raise UserError("--out=x: not a folder")
    with pytest.raises(KeyError), cli.one_line_errors(debug=False):  # a bug stays a traceback
        raise KeyError("bug")


def test_dashed_flag_names_reach_their_underscored_flags():
    """sweep's `--dry-run` (argparse spelled it so) sets absl's --dry_run; words after `--` and names that are no
    flag stay as given."""
    from absl import flags

    flags.DEFINE_bool("dashes_probe_x", False, "A flag for this test only.")
    argv = ["prog", "--dashes-probe-x", "--nodashes-probe-x", "--not-a-flag=1", "--", "--dashes-probe-x"]
    assert cli.dashes_to_underscores(argv) == ["prog", "--dashes_probe_x", "--nodashes_probe_x", "--not-a-flag=1",
                                               "--", "--dashes-probe-x"]


def test_no_command_parses_its_flags_with_argparse():
    """One way to define command-line flags: absl, through cli.run (sweep and import_pairs used argparse)."""
    import pathlib

    package = pathlib.Path(str(ROOT)) / "pnapo_jax"
    assert [str(p) for p in package.rglob("*.py") if "import argparse" in p.read_text()] == []
