"""launch/tpu.sh and pnapo_jax.sweep, through their --dry-run output: the gcloud commands, the quoting that carries
overrides with spaces, commas and quotes to every worker intact, and one workdir per sweep point."""

import os
import shlex
import shutil
import subprocess
import sys

import pytest
from etils import epath

from pnapo_jax import sweep
from pnapo_jax.errors import UserError

ROOT = epath.Path(__file__).parent.parent
TPU_SH = str(ROOT / "launch" / "tpu.sh")
ENV = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "TPU_ZONE")}
AT = ["--name=pn", "--zone=us-east5-a"]


def _dry(*args: str, rc: int = 0) -> list[list[str]]:
    """The commands `tpu.sh --dry-run ARGS` prints, each split as a shell would."""
    proc = subprocess.run([TPU_SH, "--dry-run", *args], capture_output=True, text=True, env=ENV)
    assert proc.returncode == rc, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def _remote(command: list[str]) -> list[str]:
    """The words the workers' shell runs, from a `gcloud ... ssh --command=...` line."""
    (remote,) = [w.removeprefix("--command=") for w in command if w.startswith("--command=")]
    return shlex.split(remote)


def test_create_a_spot_tpu_vm_and_a_queued_resource():
    (vm,) = _dry("create", "--type=v5p-8", "--spot", *AT)
    assert vm == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pn", "--zone=us-east5-a",
                  "--accelerator-type=v5p-8", "--version=v2-alpha-tpuv5", "--spot"]
    (queued,) = _dry("create", "--type=v6e-16", "--queued", *AT)
    assert queued[3:6] == ["queued-resources", "create", "pn"] and "--node-id=pn" in queued
    assert "--runtime-version=v2-alpha-tpuv6e" in queued and "--spot" not in queued
    (v5e,) = _dry("create", "--type=v5litepod-16", *AT)
    assert "--version=v2-alpha-tpuv5-lite" in v5e


def test_ship_and_setup_reach_every_worker():
    archive, scp, unpack = _dry("ship", "--ref=v1.0", *AT)
    assert archive[:2] == ["git", "-C"] and archive[3:5] == ["archive", "--format=tar.gz"] and archive[-1] == "v1.0"
    tarball = archive[5].removeprefix("--output=")
    assert scp[4:7] == ["scp", tarball, "pn:pnapo_jax.tar.gz"] and "--worker=all" in scp
    assert "--worker=all" in unpack and "tar" in _remote(unpack)
    (setup,) = _dry("setup", *AT)
    assert "--worker=all" in setup and "~/pnapo_jax[tpu]" in _remote(setup)


def test_run_carries_overrides_and_env_to_all_workers_intact():
    overrides = ["--config.data.path=gs://b/my pairs", "--config.lora.targets=to_q,to_k", "--config.x=it's"]
    (run,) = _dry("run", *AT, "--workdir=gs://b/run", "--config=configs/flux_tpu.py:lora", "--env=HF_HOME=/a b",
                  "--", *overrides)
    assert run[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pn"] and "--worker=all" in run
    words = _remote(run)
    main = words.index("pnapo_jax.main")
    assert words[main + 1:main + 4] == ["--config=configs/flux_tpu.py:lora", "--workdir=gs://b/run", "--progress=false"]
    assert words[main + 4:main + 7] == overrides
    assert "HF_HOME=/a b" in words[:main]


def test_logs_stop_delete():
    (logs,) = _dry("logs", "--worker=1", *AT)
    assert "--worker=1" in logs and _remote(logs)[:2] == ["tail", "-n"]
    (stop,) = _dry("stop", *AT)
    assert "--worker=all" in stop and _remote(stop)[:2] == ["kill", "-TERM"]
    assert _dry("delete", *AT)[0][3:6] == ["tpu-vm", "delete", "pn"]
    assert _dry("delete", "--queued", *AT)[0][3:6] == ["queued-resources", "delete", "pn"]


@pytest.mark.parametrize("args", [["run", *AT, "--workdir=/local/dir"], ["run", "--workdir=gs://b"],
                                  ["create", *AT], ["launch", *AT], ["run", *AT, "--bogus"]])
def test_mistakes_are_refused(args):
    assert _dry(*args, rc=2) == []


def test_sweep_gives_each_point_its_tpu_and_workdir():
    argv = [sys.executable, "-m", "pnapo_jax.sweep", f"--config={ROOT / 'configs' / 'flux_tpu.py'}",
            "--workdir=gs://b/sweeps/beta/", "--zone=us-east5-a", "--grid", "pnapo.beta=1000,2000,5000",
            "--grid", "config.optim.lr=1e-6,2e-6", "--dry-run", "--", "--config.data.path=gs://b/my pairs"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=True, env=ENV)
    commands = [shlex.split(line) for line in proc.stdout.splitlines()]
    assert len(commands) == 6
    workdirs = [w for c in commands for w in c if w.startswith("--workdir=")]
    assert workdirs[:2] == ["--workdir=gs://b/sweeps/beta/beta=1000,lr=1e-6", "--workdir=gs://b/sweeps/beta/beta=1000,lr=2e-6"]
    assert len(set(workdirs)) == 6
    assert [c[2] for c in commands] == [f"--name=pnapo-{i}" for i in range(6)]
    # what tpu.sh makes of the last point
    (run,) = _dry(*commands[-1][1:])
    words = _remote(run)
    assert "--worker=all" in run and "--workdir=gs://b/sweeps/beta/beta=5000,lr=2e-6" in words
    overrides = words[words.index("--progress=false") + 1:words.index(">")]
    assert overrides == ["--config.pnapo.beta=5000", "--config.optim.lr=2e-6", "--config.data.path=gs://b/my pairs"]


def test_sweep_names_and_checks():
    points = sweep.parse_grid(["a.lr=1,2", "b.lr=x"])
    assert points == [{"a.lr": "1", "b.lr": "x"}, {"a.lr": "2", "b.lr": "x"}]
    assert sweep.point_name(points[0]) == "a.lr=1,b.lr=x"  # last components collide: full keys
    assert sweep.point_name({"model.pretrained": "gs://b/w x"}) == "pretrained=gs___b_w_x"
    config = sweep.load_config(str(ROOT / "configs" / "flux_tpu.py:lora"))
    assert config.lora.rank == 64
    sweep.check_point(config, {"pnapo.beta": "5000", "pnapo.noise_mode": "independent", "lora.rank": "8"})
    for bad in ({"pnapo.betaa": "1"}, {"optim.lr": "fast"}, {"train.num_steps": "1.5"}):
        with pytest.raises(UserError, match="--config."):
            sweep.check_point(config, bad)
    for bad in (["pnapo.beta"], ["pnapo.beta=1,,2"], ["a=1", "a=2"]):
        with pytest.raises(UserError):
            sweep.parse_grid(bad)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck():
    subprocess.run(["shellcheck", *map(str, (ROOT / "launch").glob("*.sh"))], check=True)
