"""Grid sweeps: every point of a grid of config overrides trains into its own workdir under --workdir, either
as one `launch/tpu.sh run` on its own TPU, or with --local one after another on this machine.

    python -m pnapo_jax.sweep --config=configs/flux_tpu.py --workdir=gs://BUCKET/sweeps/beta \\
        --tpu=pnapo-{i} --zone=us-east5-a --grid pnapo.beta=1000,2000,5000 --grid optim.lr=1e-6,2e-6 \\
        -- --config.data.path=gs://BUCKET/pairs/1.0.0

runs 6 points on TPUs pnapo-0 ... pnapo-5 (created beforehand with launch/tpu.sh create), in workdirs such as
gs://BUCKET/sweeps/beta/beta=1000,lr=1e-6. Every point is checked against the config before anything launches;
--dry-run prints the commands instead.

    python -m pnapo_jax.sweep --local --config=configs/demo_cpu.py --workdir=/tmp/sweep --grid pnapo.beta=250,500

runs `python -m pnapo_jax.main` for each point here (the embedded world, or one GPU or TPU host), skipping
points whose metrics.jsonl already reaches config.train.num_steps; an unfinished point resumes from its last
checkpoint. `python -m pnapo_jax.sweep_report --workdir=...` then tabulates and plots the points.
"""

import ast
import functools
import importlib.util
import itertools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import ml_collections
from absl import flags

from pnapo_jax import cli, config_check, metrics
from pnapo_jax.convert import files
from pnapo_jax.errors import UserError

TPU_SH = Path(__file__).resolve().parent.parent / "launch" / "tpu.sh"
Point = dict[str, str]


def parse_grid(specs: list[str]) -> list[Point]:
    """['pnapo.beta=1,2', 'optim.lr=3,4'] -> the 4 points {'pnapo.beta': '1', 'optim.lr': '3'}, ..., first key
    slowest. Values are split on commas: a value containing one goes after `--` as a fixed override."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.removeprefix("--").removeprefix("config.")
        if not sep or not key or not all(values.split(",")):
            raise UserError(f"--grid takes KEY=V1,V2,..., got {spec!r}")
        axes.append([(key, v) for v in values.split(",")])
    keys = [axis[0][0] for axis in axes]
    if len(set(keys)) < len(keys):
        raise UserError(f"--grid: a key appears in two --grid flags: {keys}")
    return [dict(p) for p in itertools.product(*axes)]


def point_name(point: Point) -> str:
    """The workdir suffix: 'beta=1000,lr=1e-6' (the full key where last components collide)."""
    short = [k.rsplit(".", 1)[-1] for k in point]
    names = short if len(set(short)) == len(short) else list(point)
    return ",".join(f"{n}={re.sub(r'[^A-Za-z0-9._+-]', '_', v)}" for n, v in zip(names, point.values(), strict=True))


def load_config(spec: str) -> ml_collections.ConfigDict:
    """configs/x.py[:arg] -> its get_config(arg), as ml_collections' config flags load it."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise UserError(f"--config={spec}: {path} is not a file")
    module_spec = importlib.util.spec_from_file_location("sweep_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        return module.get_config(arg) if arg else module.get_config()
    except ValueError as e:  # the config file's own refusal (configs/*.py: an unknown variant)
        raise UserError(f"--config={spec}: {e}") from None


def check_point(config: ml_collections.ConfigDict, point: Point) -> ml_collections.ConfigDict:
    """`config` with `point` applied; a UserError when a key is not a config field or a value does not fit the
    field's type."""
    trial = config.copy_and_resolve_references()
    trial.lock()  # an unknown key is refused, not added
    for key, text in point.items():
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare string, as --config.x=y takes it
        try:
            current = trial
            for part in key.split("."):
                current = current[part]
            if isinstance(value, str) and isinstance(current, tuple):
                value = (value,)  # as ml_collections takes --config.lora.targets=a,b (name_list splits it)
            trial.update_from_flattened_dict({key: value})
        except (KeyError, AttributeError, TypeError) as e:
            raise UserError(f"--config.{key}={text}: {str(e.args[0]).splitlines()[-1]}") from None
    return trial


def run_commands(points: list[Point], config: str, workdir: str, tpu: str, zone: str, overrides: list[str]
                 ) -> list[list[str]]:
    """One `launch/tpu.sh run` per point."""
    if len(points) > 1 and "{i}" not in tpu:
        raise UserError(f"--tpu={tpu!r} names one TPU for {len(points)} runs: put {{i}} in it")
    zone_flag = [f"--zone={zone}"] if zone else []
    return [[str(TPU_SH), "run", f"--name={tpu.format(i=i)}", *zone_flag, f"--config={config}",
             f"--workdir={workdir.rstrip('/')}/{point_name(p)}", "--",
             *(f"--config.{k}={v}" for k, v in p.items()), *overrides]
            for i, p in enumerate(points)]


def local_commands(points: list[Point], config: str, workdir: str, overrides: list[str]) -> list[list[str]]:
    """One `python -m pnapo_jax.main` per point, run on this machine."""
    return [[sys.executable, "-m", "pnapo_jax.main", f"--config={config}",
             f"--workdir={workdir.rstrip('/')}/{point_name(p)}", "--progress=false",
             *(f"--config.{k}={v}" for k, v in p.items()), *overrides] for p in points]


def finished(workdir: str) -> bool:
    """The point's training reached its config's train.num_steps (by its metrics.jsonl)."""
    from etils import epath

    root = epath.Path(workdir)
    if not (root / "config.json").exists() or not (root / "metrics.jsonl").exists():
        return False
    num_steps = files.read_json(root / "config.json")["train"]["num_steps"]
    steps = [line.get("step", -1) for line in metrics.read_lines(root / "metrics.jsonl")]  # a torn last line skipped
    return max(steps, default=-1) >= num_steps


@functools.cache  # once per process: a second in-process call keeps the first's definitions
def _define_flags() -> None:
    flags.DEFINE_string("config", None, "configs/*.py[:variant], as pnapo_jax.main takes it.", required=True)
    flags.DEFINE_string("workdir", None, "Sweep root (gs://...): each point writes WORKDIR/NAME.", required=True)
    flags.DEFINE_multi_string("grid", None, "KEY=V1,V2,...: one axis of the grid; repeat per axis.", required=True)
    flags.DEFINE_string("tpu", "pnapo-{i}", "TPU name per point; {i} is the point's index.")
    flags.DEFINE_string("zone", "", "TPU zone (default: $TPU_ZONE in launch/tpu.sh).")
    flags.DEFINE_bool("local", False, "Train the points here, one after another.")
    flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them (also --dry-run).")


def _main(argv: list[str]) -> None:
    """argv[1:]: the overrides after `--` that every point shares."""
    f, overrides = flags.FLAGS, argv[1:]
    points = parse_grid(f.grid)
    config = load_config(f.config)
    fixed = dict(o.removeprefix("--config.").partition("=")[::2] for o in overrides if o.startswith("--config."))
    for point in points:  # each point's whole config, as its run will check it (the mesh there)
        config_check.check(check_point(config, {**fixed, **point}))
    if f.local:
        commands = local_commands(points, f.config, f.workdir, overrides)
    else:
        commands = run_commands(points, f.config, f.workdir, f.tpu, f.zone, overrides)
    for point, command in zip(points, commands, strict=True):
        if f.local and finished(f"{f.workdir.rstrip('/')}/{point_name(point)}"):
            print(f"finished already: {point_name(point)}", flush=True)
            continue
        print(shlex.join(command), flush=True)
        if not f.dry_run:
            subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> None:
    """The CLI; `argv`: the flags and `--` overrides of an in-process call (default the command line's)."""
    _define_flags()
    cli.run(_main, argv, arguments=True)


if __name__ == "__main__":
    main()
