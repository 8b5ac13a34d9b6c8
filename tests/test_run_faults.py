"""The training run off the happy path (issue 13): a full disk, a second run on the workdir, a relative workdir,
a torn metrics line, Ctrl-C, a run that diverged, a finished run rerun; each ends in one line or a resume, and
nothing saved is lost."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest
from etils import epath

from pnapo_jax import checkpoint, metrics, report, train
from pnapo_jax.errors import UserError
from pnapo_jax.setup import make_setup

ROOT = epath.Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "configs"))
import tiny  # noqa: E402

ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")


def _config(num_steps=4, every=4, log_every=1):
    config = tiny.get_config()
    config.train.num_steps, config.checkpoint.every_steps = num_steps, every
    config.train.log_every, config.train.eval_every = log_every, 0
    return config


def _steps(workdir) -> list[int]:
    return [d["step"] for d in metrics.read_lines(epath.Path(workdir) / "metrics.jsonl") if "loss" in d]


def _restore(config, workdir, step):
    setup = make_setup(config, jax.devices()[:1])
    ckpt = checkpoint.Checkpointer(str(epath.Path(workdir) / "checkpoints"), config.checkpoint)
    try:
        return jax.device_get(ckpt.restore(step, setup.abstract_state, None))
    finally:
        ckpt.close()


def _saved(workdir) -> list[int]:
    return sorted(int(p.name) for p in (epath.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


# A TensorBoard event file that hits a full disk after 30 kB: the run must stop with one line, not hang.
_DISK_FILLS = """
import errno, io, sys
import tensorboardX.record_writer as rw

class Full(io.FileIO):
    left = 15_000
    def write(self, b):
        Full.left -= len(b)
        if Full.left < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(b)

rw.open_file = lambda path: Full(path, "wb")
sys.argv[0] = "pnapo_jax.main"
from pnapo_jax import main
main.run()
"""


def test_full_disk_stops_with_one_line_and_the_checkpoint_restores(tmp_path):
    workdir = tmp_path / "run"
    args = ["--config=" + str(ROOT / "configs/tiny.py"), f"--workdir={workdir}", "--config.train.num_steps=400",
            "--config.train.log_every=1", "--config.train.eval_every=0", "--config.checkpoint.every_steps=2",
            "--progress=false"]
    try:
        proc = subprocess.run([sys.executable, "-c", _DISK_FILLS, *args], env=ENV, capture_output=True, text=True,
                              timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the run hung on a full disk")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no space left on device" in last and "tensorboard" in last, last
    saved = _saved(workdir)
    assert saved and saved[-1] < 400, saved
    state = _restore(_config(400, 4), workdir, saved[-1])
    assert int(state["step"]) == saved[-1]
    assert not (workdir / "run.lock").exists()


def _hold_lock(workdir, **fields):
    workdir.mkdir(parents=True, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": os.getppid(), "since": "2026-01-01 00:00:00 UTC", **fields}
    (workdir / "run.lock").write_text(json.dumps(holder))
    return holder


def test_second_run_on_a_workdir_refuses_naming_the_holder(tmp_path):
    holder = _hold_lock(tmp_path)  # our parent: a live process on this host
    with pytest.raises(UserError, match=rf"in use by another run: pid {holder['pid']} on host "
                                        rf"{socket.gethostname()} since 2026-01-01 00:00:00 UTC"):
        train.train_and_evaluate(_config(), str(tmp_path), devices=jax.devices()[:1], show_progress=False)
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "checkpoints").exists()
    assert json.loads((tmp_path / "run.lock").read_text()) == holder  # still theirs


def test_lock_of_a_dead_process_a_reused_pid_or_a_silent_host_is_taken_over(tmp_path):
    from pnapo_jax import workdir as run_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _hold_lock(tmp_path, pid=dead.pid)
    mine = run_dir.acquire(tmp_path)
    assert mine["pid"] == os.getpid()
    run_dir.release(tmp_path, mine)
    assert not (tmp_path / "run.lock").exists()
    _hold_lock(tmp_path, start="1")  # a live pid, but not the process that took the lock (started at tick 1)
    run_dir.release(tmp_path, run_dir.acquire(tmp_path))
    _hold_lock(tmp_path, host="another-host", pid=os.getpid(), beat=time.time() - 60)  # alive a minute ago
    with pytest.raises(UserError, match="pid .* on host another-host"):
        run_dir.acquire(tmp_path)
    _hold_lock(tmp_path, host="another-host", beat=time.time() - run_dir.STALE_S - 1)  # a preempted VM's
    run_dir.release(tmp_path, run_dir.acquire(tmp_path))
    assert not (tmp_path / "run.lock").exists()


def test_relative_workdir_is_made_absolute_and_empty_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _config(num_steps=2, every=1)
    train.train_and_evaluate(config, "rel", devices=jax.devices()[:1], show_progress=False)
    assert _saved(tmp_path / "rel") == [1, 2]
    with pytest.raises(UserError, match="--workdir is empty"):
        train.train_and_evaluate(config, "", show_progress=False)


def test_torn_last_metrics_line_is_skipped_and_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "loss": 0.5}\n{"step": 4, "eval/reward_mean": 0.5, "eval/reward_base_mean": 0.4, '
                    '"eval/win_rate_vs_base": 0.6}\n{"step": 6, "loss": 0.4}\n{"step": 8, "lo')
    assert [d["step"] for d in metrics.read_lines(path)] == [2, 4, 6]
    report.eval_curves(path, tmp_path / "curves.png")  # what the first sampling eval of a resume draws
    assert (tmp_path / "curves.png").exists()
    writer = metrics.MetricWriter(str(tmp_path), 10, start_step=4, show_progress=False)  # resumed at step 4
    writer.write(5, {"loss": 0.3})
    writer.close()
    assert [d["step"] for d in metrics.read_lines(path)] == [2, 4, 5]
    path.write_text('{"step": 2}\n{"st\n{"step": 4}\n')
    with pytest.raises(UserError, match="metrics.jsonl: line 2 is not JSON"):
        metrics.read_lines(path)


def test_resume_after_a_crash_between_log_and_checkpoint_logs_each_step_once(tmp_path, capsys):
    config = _config(num_steps=8, every=4)
    train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1], show_progress=False)
    import shutil

    shutil.rmtree(tmp_path / "checkpoints" / "8")  # the run died after logging steps 5-8, before saving 8
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')  # and mid-line
    capsys.readouterr()
    train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1], show_progress=False)
    assert "resuming from step 4" in capsys.readouterr().out
    assert _steps(tmp_path) == list(range(1, 9))
    last = train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1], show_progress=False)
    assert f"already finished at step 8 ({tmp_path})" in capsys.readouterr().out
    assert last["step"] == 8 and "loss" in last
    assert _steps(tmp_path) == list(range(1, 9))


def test_error_after_the_checkpointer_exists_closes_it_and_surfaces(tmp_path, monkeypatch):
    closed = []
    close = checkpoint.Checkpointer.close
    monkeypatch.setattr(checkpoint.Checkpointer, "close", lambda self: (closed.append(1), close(self)))

    def broken(setup):
        raise UserError("the real error")

    monkeypatch.setattr(train, "base_params", broken)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(UserError, match="the real error"):
        train.train_and_evaluate(_config(), str(tmp_path), devices=jax.devices()[:1], show_progress=False)
    assert closed == [1]
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C is the caller's again
    assert not (tmp_path / "run.lock").exists()


def test_diverged_run_stops_with_one_line(tmp_path):
    config = _config(num_steps=50, every=50)
    config.pnapo.beta = 1e39  # inf in float32: every loss and gradient is non-finite
    config.train.max_nonfinite_steps = 3
    with pytest.raises(UserError, match="training diverged: the last 3 updates .to step 3. had non-finite"):
        train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1], show_progress=False)


def test_second_ctrl_c_aborts(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), _config().checkpoint)
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first only asks the loop to save and stop
        time.sleep(0.1)
        assert ckpt.should_stop(1) and ckpt.stop_signal == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        ckpt.close()


def test_ctrl_c_saves_and_exits_75_with_the_resume_command(tmp_path):
    """Ctrl-C: the run saves a checkpoint and exits 75 (not 0: it did not finish), saying how to resume."""
    workdir = tmp_path / "run"
    args = ["--config=" + str(ROOT / "configs/tiny.py"), "--config.train.num_steps=400", "--workdir", str(workdir),
            "--config.train.log_every=1", "--config.train.eval_every=0", "--config.checkpoint.every_steps=1000",
            "--progress=false"]
    proc = subprocess.Popen([sys.executable, "-m", "pnapo_jax.main", *args], env=ENV, cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path, deadline = workdir / "metrics.jsonl", time.time() + 180
    while time.time() < deadline and (not path.exists() or path.read_text().count("\n") < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]  # EX_TEMPFAIL: stopped early, rerun to resume
    saved = _saved(workdir)
    assert saved and 3 <= saved[-1] < 400, saved
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"stopped at step {saved[-1]} on SIGINT; the checkpoint is saved; resume with: "), last
    assert f"-m pnapo_jax.main --config={ROOT}/configs/tiny.py" in last and f"--workdir {workdir} " in last, last
    assert "results" not in out and "step=0" not in out
    assert _steps(workdir) == list(range(1, saved[-1] + 1))


def test_full_disk_while_saving_is_one_line_and_does_not_hide_the_loops_error(tmp_path, monkeypatch):
    config = _config()
    full = ValueError('RESOURCE_EXHAUSTED: Error writing local file "x/manifest.ocdbt": Failed to write 118 bytes '
                      "to file 11: No space left on device [os_error_code='28']")

    def fail(*args, **kwargs):
        raise full

    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), config.checkpoint)
    (tmp_path / "checkpoints" / "4").mkdir()
    (tmp_path / "checkpoints" / "4" / "_CHECKPOINT_METADATA").write_text("{}")
    monkeypatch.setattr(ckpt.manager, "wait_until_finished", fail)
    with pytest.raises(UserError, match=r"checkpoints: no space left on device while saving a checkpoint; the last "
                                        r"finished one \(step 4\) is intact"):
        ckpt.wait()
    monkeypatch.setattr(ckpt.manager, "close", fail)
    with pytest.raises(UserError, match="the loop's own error"):  # the close failing too does not replace it
        with ckpt:
            raise UserError("the loop's own error")


def test_lock_without_hard_links(tmp_path, monkeypatch):
    """File systems without hard links (some FUSE mounts) get the lock by exclusive create."""
    from pnapo_jax import workdir as run_dir

    def no_links(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    mine = run_dir.acquire(tmp_path)
    assert json.loads((tmp_path / "run.lock").read_text()) == mine
    run_dir.release(tmp_path, mine)
    _hold_lock(tmp_path)
    with pytest.raises(UserError, match="in use by another run"):
        run_dir.acquire(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["run.lock"]


def test_lock_holder_beats_and_lets_go(tmp_path, monkeypatch):
    from pnapo_jax import workdir as run_dir

    monkeypatch.setattr(run_dir, "BEAT_S", 0.05)
    with run_dir.locked(tmp_path):
        first = json.loads((tmp_path / "run.lock").read_text())["beat"]
        time.sleep(0.5)
        assert json.loads((tmp_path / "run.lock").read_text())["beat"] > first
    assert list(tmp_path.iterdir()) == []
