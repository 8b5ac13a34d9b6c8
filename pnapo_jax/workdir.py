"""A run's working directory: an absolute path fixed up front, and a lock so that one run at a time writes it.

WORKDIR/run.lock holds JSON {host, pid, since, boot, start, beat}: the run that holds it (`boot` and `start` tell
a reused pid from the holder after a restart; `beat`, rewritten every minute, says it is still there). A second
run on the workdir refuses with one line naming the holder. A lock left by a process that is gone is taken over
with a warning, so a run killed with kill -9 or a preempted VM resumes: on the same host when its pid is dead or
reused, from another host when its beat is older than STALE_S. On a remote workdir (gs://) the lock is read then
written, not atomically: it stops a second run started later, not two started within the same second.
"""

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from pnapo_jax.errors import UserError

LOCK_NAME = "run.lock"
BEAT_S = 60  # the holder rewrites its lock this often
STALE_S = 15 * 60  # a lock from another host not rewritten for this long is a dead run's


def resolve(workdir: str) -> epath.Path:
    """The workdir as an absolute path (relative: from the current directory), so that nothing written later
    (orbax needs absolute paths) depends on where the process stands; empty is refused."""
    if not str(workdir).strip():
        raise UserError("--workdir is empty: give the run's directory (a local path or gs://bucket/...)")
    if "://" in str(workdir):
        return epath.Path(workdir)
    return epath.Path(os.path.abspath(os.path.expanduser(str(workdir))))


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _process_start(pid: int) -> str:
    """The kernel's start time of `pid` (clock ticks since boot), "" where /proc does not say."""
    try:
        return _read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _boot_id() -> str:
    try:
        return _read("/proc/sys/kernel/random/boot_id")
    except OSError:
        return ""


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "boot": _boot_id(), "start": _process_start(os.getpid()), "beat": time.time()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _gone(holder: dict[str, Any]) -> bool:
    """Whether the holder is known to be dead: on this host, its pid is gone, is ours, or is reused (another boot
    or another start time); on another host, its beat stopped STALE_S ago."""
    if holder.get("host") != socket.gethostname():
        return time.time() - float(holder.get("beat", time.time())) > STALE_S
    pid = int(holder.get("pid", -1))
    if pid == os.getpid() or not _alive(pid):
        return True
    if holder.get("boot") and holder["boot"] != _boot_id():
        return True
    return bool(holder.get("start")) and holder["start"] != _process_start(pid)


def _holder(path: epath.Path) -> dict[str, Any] | None:
    """The lock's content; None when it vanished meanwhile."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
        int(holder["pid"])
        return holder
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: unreadable lock file; if no run uses this workdir, delete it") from None


def _create(path: epath.Path, content: str) -> bool:
    """Writes the lock unless it exists; False when it does. Atomic for a local path (a hard link of a complete
    file cannot half-exist); read-then-write on a remote one."""
    if "://" in str(path):
        if path.exists():
            return False
        path.write_text(content)
        return True
    tmp = path.parent / f".{path.name}.{os.getpid()}"
    tmp.write_text(content)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links (some FUSE mounts): exclusive create, then write
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(content)
        return True
    finally:
        tmp.unlink()


def acquire(workdir: epath.Path) -> dict[str, Any]:
    """Takes WORKDIR/run.lock for this process (see the module docstring); returns what it wrote."""
    path = workdir / LOCK_NAME
    me = _me()
    workdir.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # a stale lock removed, then retaken; a race with another run is lost cleanly
        if _create(path, json.dumps(me)):
            return me
        holder = _holder(path)
        if holder is None:
            continue
        if not _gone(holder):
            raise UserError(f"{workdir} is in use by another run: pid {holder['pid']} on host {holder['host']} "
                            f"since {holder.get('since', '?')} ({path}); stop it or use another --workdir (a dead "
                            f"run's lock is taken over: at once on its host, after {STALE_S // 60} min elsewhere)")
        logging.warning("taking over %s: its run (pid %s on host %s since %s) is gone", path, holder["pid"],
                        holder["host"], holder.get("since", "?"))
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    raise UserError(f"{path}: another run keeps taking the lock; use another --workdir")


def _beat(workdir: epath.Path, mine: dict[str, Any], stop: threading.Event) -> None:
    """Rewrites the lock's beat every BEAT_S until `stop` (a temporary file renamed over it: never half-written)."""
    path = workdir / LOCK_NAME
    while not stop.wait(BEAT_S):
        mine["beat"] = time.time()
        tmp = path.parent / f".{path.name}.{os.getpid()}.beat"
        try:
            tmp.write_text(json.dumps(mine))
            tmp.replace(path)
        except OSError as e:  # a full disk must not end the run here: its own writes say so in one line
            logging.warning("could not refresh %s: %s", path, e)


def release(workdir: epath.Path, mine: dict[str, Any]) -> None:
    """Removes the lock if it is still this process's."""
    path = workdir / LOCK_NAME
    with contextlib.suppress(UserError):
        holder = _holder(path)
        if holder is not None and (holder["host"], holder["pid"], holder.get("since")) == (
                mine["host"], mine["pid"], mine["since"]):
            path.unlink()


@contextlib.contextmanager
def locked(workdir: epath.Path) -> Iterator[None]:
    """Holds the workdir's lock for the block. Process 0 takes it for all hosts; when it cannot, every host
    stops (the others with a line pointing to process 0's)."""
    mine, error = None, None
    if jax.process_index() == 0:
        try:
            mine = acquire(workdir)
        except UserError as e:
            error = e
    if jax.process_count() > 1:
        ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            error = UserError(f"{workdir}: process 0 could not take the workdir's lock (see its log)")
    if error is not None:
        raise error
    stop = threading.Event()
    beat = threading.Thread(target=_beat, args=(workdir, mine, stop), daemon=True, name="workdir-lock-beat")
    if mine is not None:
        beat.start()
    try:
        yield
    finally:
        stop.set()
        if mine is not None:
            beat.join(timeout=30)  # not mid-rewrite when the lock goes
            release(workdir, mine)
