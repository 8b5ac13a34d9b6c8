"""The benchmark on two JAX processes with 4 CPU devices each (as tests/test_multihost_train.py runs them: each
host runs this file as a script, `jax.distributed.initialize`, then the command's `benchmark.run` into one out
folder both share): its rows, scores and report equal one process's with 8 devices on the same prompts and noises.
A first two-host run loses a process mid-run; the rerun draws only what is missing and leaves every finished image
as it was."""

import csv
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath

from pnapo_jax import flow
from pnapo_jax.bench import benchmark, sampling
from pnapo_jax.world import demo_base as base

HOSTS, DEVICES_PER_HOST, DIE_AFTER = 2, 4, 6  # process 1 dies after writing DIE_AFTER of its images
DEMO_BASE = str(base.DEFAULT_BASE)
DEMO_REFLOW = str(base.DEFAULT_BASE.parent / "demo_base_reflow")


def _opts(out) -> benchmark.Options:
    return benchmark.Options(models=f"base={DEMO_BASE},reflow={DEMO_REFLOW}", prompts="world:heldout", out=str(out),
                             scorers="world_reward,world_fidelity", seeds=2, max_prompts=5, num_steps=3, seed=7,
                             batch_size=4, show_progress=False)


def _host(process_id: int, port: int, out: str, die_after: int) -> None:
    jax.config.update("jax_num_cpu_devices", DEVICES_PER_HOST)
    jax.distributed.initialize(f"127.0.0.1:{port}", HOSTS, process_id)
    if die_after:
        save, saved = sampling.save_png, []

        def save_then_die(image, path, *text):
            save(image, path, *text)
            saved.append(path)
            if len(saved) == die_after:
                os._exit(3)  # as a kill: no cleanup, no shutdown of jax.distributed

        sampling.save_png = save_then_die
    euler, seen = flow.euler_sample, []

    def spy(velocity, variables, noise, *args, **kwargs):
        seen.append(noise.shape[0])
        for leaf in jax.tree.leaves(variables):  # every weight matrix split over both hosts' devices (FSDP)
            if leaf.ndim == 2 and min(leaf.shape) >= 32:
                assert {d.process_index for d in leaf.sharding.device_set} == set(range(HOSTS))
                assert leaf.addressable_shards[0].data.size == leaf.size // (HOSTS * DEVICES_PER_HOST), leaf.shape
        return euler(velocity, variables, noise, *args, **kwargs)

    flow.euler_sample = spy
    summary = benchmark.run(_opts(out))
    assert (summary is not None) == (process_id == 0)
    assert seen and set(seen) == {HOSTS * DEVICES_PER_HOST}, seen  # one global batch: both hosts' 4 rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hosts(out, die_after: int = 0) -> list[subprocess.Popen]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    port = _free_port()
    return [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(out), str(die_after * (i == 1))],
                             env=env) for i in range(HOSTS)]


def _images(out) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}


def _rows(out) -> list[dict]:
    with (out / "scores.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # about 100 s on the 2-core box: four processes start and compile
def test_two_hosts_evaluate_like_one_and_resume_after_losing_one(tmp_path):
    one, two = tmp_path / "one_host", tmp_path / "two_hosts"
    first = _hosts(two, die_after=DIE_AFTER)
    summary = benchmark.run(_opts(one))  # this process: 8 devices
    assert first[1].wait(timeout=300) == 3
    time.sleep(2)
    first[0].kill()  # left waiting for its peer in a collective (or already failed on its loss)
    first[0].wait(timeout=60)
    before = _images(two)
    mine = [p for p in before if int(p.split("/")[-1][:5]) % HOSTS == 1]
    assert len(mine) == DIE_AFTER, sorted(before)  # process 1's finished images, nothing half-written kept
    assert not (two / "results.json").exists()
    time.sleep(0.01)

    second = _hosts(two)
    assert [h.wait(timeout=300) for h in second] == [0] * HOSTS
    after = _images(two)
    assert len(after) == 2 * 5 * 2 and set(after) == set(_images(one))
    assert all(after[p] == t for p, t in before.items()), "a finished image was redrawn"

    got = json.loads((two / "results.json").read_text())
    assert got.keys() == summary.keys() and got["win_rates"].keys() == summary["win_rates"].keys()
    flat = lambda d: {k: v for k, v in jax.tree_util.tree_flatten_with_path(d)[0]}
    for key, value in flat(summary).items():
        if isinstance(value, str):
            assert flat(got)[key] == value, key
        else:
            np.testing.assert_allclose(flat(got)[key], value, rtol=1e-5, atol=1e-6, err_msg=str(key))
    rows_one, rows_two = _rows(one), _rows(two)
    assert [{k: v for k, v in r.items() if not k.startswith("world_")} for r in rows_two] == \
        [{k: v for k, v in r.items() if not k.startswith("world_")} for r in rows_one]
    for a, b in zip(rows_one, rows_two, strict=True):
        np.testing.assert_allclose(float(b["world_reward"]), float(a["world_reward"]), rtol=1e-5, atol=1e-6)
    for p in after:
        diff = np.abs(sampling.load_png(one / p) - sampling.load_png(two / p)).max() * 255
        assert diff <= 1.0, p  # float rounding at the PNG's quantization boundary at most
    assert (two / "report.html").read_text().count("<img ") == 2 * 5 * 2
    assert epath.Path(two / "results.md").read_text() == (one / "results.md").read_text()


if __name__ == "__main__":
    _host(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
