"""Two JAX processes with 4 CPU devices each train the tiny config to the losses one process with 8 devices
gets, on an FSDP mesh spanning both; their checkpoint resumes on one process with 4 devices (as does the
8-device run's) to the straight run's losses.

Each host runs this file as a script: `jax.distributed.initialize`, then `train.train_and_evaluate`, the entry
point `pnapo_jax.main` calls, into one workdir both hosts share (as a gs:// bucket is shared on a pod).
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath

from pnapo_jax import train
from pnapo_jax.setup import make_setup

sys.path.insert(0, str(epath.Path(__file__).parent.parent / "configs"))
import tiny  # noqa: E402

HOSTS, DEVICES_PER_HOST, STEPS, SAVED = 2, 4, 6, 3


def _config():
    config = tiny.get_config()  # mesh fsdp=-1: weights and optimizer state sharded over all 8 devices
    config.train.num_steps, config.train.log_every, config.train.eval_every = STEPS, 1, 0
    config.checkpoint.every_steps = SAVED
    return config


def _host(process_id: int, port: int, workdir: str) -> None:
    jax.config.update("jax_num_cpu_devices", DEVICES_PER_HOST)
    jax.distributed.initialize(f"127.0.0.1:{port}", HOSTS, process_id)
    mesh = make_setup(_config()).mesh
    assert {d.process_index for d in mesh.devices.flat} == set(range(HOSTS)), mesh  # the mesh spans both hosts
    train.train_and_evaluate(_config(), workdir, show_progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(workdir) -> dict[int, float]:
    lines = [json.loads(s) for s in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {d["step"]: d["loss"] for d in lines if "loss" in d}


def _resume_on_4_devices(checkpoint, workdir) -> dict[int, float]:
    """Steps SAVED+1.. trained by one process on 4 devices from `checkpoint` (a step directory)."""
    shutil.copytree(checkpoint, workdir / "checkpoints" / checkpoint.name)
    train.train_and_evaluate(_config(), str(workdir), devices=jax.devices()[:4], show_progress=False)
    return _losses(workdir)


def _close(a: dict[int, float], b: dict[int, float]) -> None:
    assert a.keys() == b.keys()
    np.testing.assert_allclose(list(a.values()), list(b.values()), rtol=1e-5)


@pytest.mark.slow  # 90 to 150 s on the 2-core box: three layouts compile the step
def test_two_hosts_train_like_one_and_checkpoints_move_between_layouts(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    port, two = _free_port(), tmp_path / "two_hosts"
    hosts = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(two)], env=env) for i in range(HOSTS)]
    one = tmp_path / "one_host"
    train.train_and_evaluate(_config(), str(one), devices=jax.devices()[:8], show_progress=False)
    assert [host.wait(timeout=300) for host in hosts] == [0] * HOSTS

    straight = _losses(one)
    assert list(straight) == list(range(1, STEPS + 1))
    _close(_losses(two), straight)  # one metrics line a step: only process 0 writes
    data_state = sorted(p.name for p in (two / "checkpoints" / str(SAVED) / "data").glob("process_*"))
    assert data_state == [f"process_{i}-of-{HOSTS}.json" for i in range(HOSTS)]  # no file for a 1-host restore
    continued = {s: v for s, v in straight.items() if s > SAVED}
    _close(_resume_on_4_devices(two / "checkpoints" / str(SAVED), tmp_path / "from_two_hosts"), continued)
    _close(_resume_on_4_devices(one / "checkpoints" / str(SAVED), tmp_path / "from_8_devices"), continued)


if __name__ == "__main__":
    _host(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
