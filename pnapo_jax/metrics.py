"""Where metrics go: WORKDIR/metrics.jsonl (one JSON object a line, with "step"), TensorBoard, a progress bar.

Only process 0 writes. Eval metrics are written with an "eval/" prefix on their own lines. Everything is written
in the calling thread, so that a failing disk stops the run with one line instead of a writer thread dying
silently and the loop blocking on its queue forever.
"""

import contextlib
import errno
import json
import math
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tqdm
from etils import epath

from pnapo_jax.errors import UserError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def read_lines(path: str | epath.Path) -> list[dict[str, Any]]:
    """The lines of a metrics.jsonl; a torn last line (the writer died mid-line) is skipped, any other
    unreadable line is an error naming it."""
    path = epath.Path(path)
    text = path.read_text()
    rows = text.split("\n")
    lines = []
    for i, row in enumerate(rows):
        if not row.strip():
            continue
        try:
            lines.append(json.loads(row))
        except json.JSONDecodeError:
            if i == len(rows) - 1:  # no newline after it: the last write did not finish
                break
            raise UserError(f"{path}: line {i + 1} is not JSON ({row[:60]!r})") from None
    return lines


def _scalar(v: Any) -> float | int:
    v = np.asarray(v)
    return int(v) if np.issubdtype(v.dtype, np.integer) else float(v)


def _drop_relogged(path: epath.Path, start_step: int) -> None:
    """Keeps only the lines a run restarting at `start_step` will not log again: those up to its checkpoint (it
    logs every later step again, and the step-0 eval again when it starts from scratch). The file is rewritten
    only when something goes, via a temporary file, so a crash leaves the old or the new one."""
    if not path.exists():
        return
    text = path.read_text()
    lines = read_lines(path)
    kept = [d for d in lines if start_step > 0 and d.get("step", 0) <= start_step]
    if len(kept) == len(lines) and (not text or text.endswith("\n")):
        return
    tmp = path.parent / f"{path.name}.tmp"
    tmp.write_text("".join(json.dumps(d) + "\n" for d in kept))
    tmp.replace(path)


class MetricWriter:
    """Appends metric lines. A resumed run keeps appending to the same files, after dropping what it will log
    again (lines past its checkpoint, a torn last line), so that no step appears twice."""

    def __init__(self, workdir: str, total_steps: int, start_step: int = 0, show_progress: bool = True):
        self.active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not self.active:
            return
        workdir = epath.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.path = workdir / "metrics.jsonl"
        with self._disk(self.path):
            _drop_relogged(self.path, start_step)
            self._jsonl = self.path.open("a")
            # imported here: only the writing process needs it. EventsWriter writes synchronously (SummaryWriter's
            # thread dies on a full disk and leaves the loop blocked on its queue).
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto.event_pb2 import Event, SessionLog

            self._tb_dir = workdir / "tensorboard"
            self._tb_dir.mkdir(parents=True, exist_ok=True)
            self._tb = EventsWriter(str(self._tb_dir / "events"))
            if start_step > 0:  # TensorBoard hides what an earlier run logged past the checkpoint
                self._tb.write_event(Event(step=start_step + 1, session_log=SessionLog(status=SessionLog.START)))
            self._tb.flush()
        self._bar = tqdm.tqdm(total=total_steps, initial=start_step, disable=not show_progress, unit="step",
                              dynamic_ncols=True, desc="training")
        self._last = (start_step, time.perf_counter())

    @contextlib.contextmanager
    def _disk(self, path: epath.Path):
        """A full disk as one line (the last checkpoint stays usable: orbax only ever renames finished ones)."""
        try:
            yield
        except OSError as e:
            if e.errno not in _DISK_FULL:
                raise
            self._abandon()
            raise UserError(f"{path}: no space left on device ({e.strerror}); free space, then rerun the same "
                            "command to resume from the last checkpoint") from None

    def _abandon(self) -> None:
        """Closes the files without flushing what the full disk refused (a second error would hide the first)."""
        for f in (self._jsonl, self._tb):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self._jsonl = self._tb = None

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float | int]:
        """Writes one line; returns it as Python scalars."""
        line = {"step": int(step), **{k: _scalar(v) for k, v in jax.device_get(dict(metrics)).items()}}
        if not self.active:
            return line
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        with self._disk(self.path):
            self._jsonl.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                          for k, v in line.items()}) + "\n")
            self._jsonl.flush()
        with self._disk(self._tb_dir):
            now = time.time()
            for k, v in line.items():
                if k != "step":
                    self._tb.write_event(Event(wall_time=now, step=int(step), summary=scalar(k, v)))
            self._tb.flush()
        return line

    def phase(self, what: str) -> None:
        """Labels the progress bar with what the run is doing now (compiling, training, evaluating)."""
        if self.active:
            self._bar.set_description(what, refresh=True)

    def progress(self, step: int, line: Mapping[str, Any], pairs_per_step: int) -> None:
        """Advances the bar to `step` with loss, accuracy, pairs/s and step time over the last interval."""
        if not self.active:
            return
        last_step, last_time = self._last
        now = time.perf_counter()
        steps = max(step - last_step, 1)
        step_time = (now - last_time) / steps
        self._bar.set_postfix(loss=f"{line.get('loss', float('nan')):.4f}",
                              acc=f"{line.get('rewards/accuracies', float('nan')):.3f}",
                              pairs_s=f"{pairs_per_step / step_time:.2f}", step_s=f"{step_time:.3f}")
        self._bar.update(step - self._bar.n)
        self._last = (step, now)

    def say(self, text: str) -> None:
        """A line for the user, above the progress bar."""
        if self.active:
            self._bar.write(text)

    def close(self) -> None:
        if self.active:
            if self._bar is not None:
                self._bar.close()
            with self._disk(self.path):
                for f in (self._jsonl, self._tb):
                    if f is not None:
                        f.close()
