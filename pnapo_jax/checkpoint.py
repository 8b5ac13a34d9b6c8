"""Orbax checkpoints of the train state together with the data iterator's position.

A checkpoint is one step directory holding `state` (step, trainable params, optimizer state, RNG) and `data`
(the grain iterator, one JSON file per process). Restoring both makes a resumed run train on exactly the
batches the interrupted run had not. A checkpoint restores onto another mesh or number of hosts too: the state
is resharded to the restoring run's layout, and the data resumes from the step's global batch. The frozen
reference is never saved: it is rebuilt from its source.

SIGTERM (TPU preemption) and SIGINT (Ctrl-C) set a flag; the loop then saves and exits cleanly. A second Ctrl-C
aborts at once (KeyboardInterrupt), for a run stuck where it cannot reach the end of a step.

A checkpoint that does not restore (a truncated array file, a lost `_METADATA` or manifest) is skipped for the
newest one that does, with a warning naming it and why; the training run then moves it aside to
`STEP.unreadable` (never deletes it) so that its step can be saved again. Readers (export, sampling) open the
directory read-only: they never delete or write anything there, not even a save in flight.
"""

import contextlib
import errno
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from pnapo_jax.errors import UserError

_MAX_REASON = 300  # characters of an orbax / tensorstore error kept in a warning (they quote whole specs)


def _disk_full(e: BaseException) -> bool:
    """An OSError, or tensorstore's ValueError that carries the OS error in its text."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return "No space left on device" in str(e) or "Disk quota exceeded" in str(e)


class Checkpointer:
    """Saves every `every_steps` steps (async), keeps the last `keep`, restores the newest one that restores.

    As a context manager it closes itself; when the block failed, a save failing too (a full disk fails both) is
    one warning, and the block's own error surfaces.

    `read_only`: for readers of a workdir another process may be training in; saving is then refused.
    """

    def __init__(self, directory: str, cfg: ml_collections.ConfigDict, handle_sigterm: bool = True,
                 read_only: bool = False):
        self.directory = epath.Path(directory)
        self.read_only = read_only
        self._warn_unfinished()
        if read_only:  # no tmp-directory cleanup: that would delete a running trainer's save in flight
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, cleanup_tmp_directories=False,
                                                   save_interval_steps=0, max_to_keep=None)
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=cfg.keep,
                save_interval_steps=cfg.every_steps,
                enable_async_checkpointing=cfg.async_save,
                create=True,
                cleanup_tmp_directories=True,
            )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.preempted = False
        self.stop_signal = ""  # the name of the signal that asked the run to stop
        self._previous_handlers = {}
        # only a training loop, which checks `should_stop`, may defer the signals (and only the main thread can)
        if handle_sigterm and not read_only and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None:
            self.close()
            return False
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.CRITICAL)  # orbax logs the failed save's traceback: the warning says it
        try:
            self.close()
        except Exception as e:  # noqa: BLE001 -- secondary: the block's error is the one to report
            logging.warning("the checkpoint in flight was not saved either: %s", str(e).splitlines()[0][:300])
        finally:
            absl_logger.setLevel(level)
        return False

    @contextlib.contextmanager
    def _disk(self) -> Iterator[None]:
        """A full disk while saving as one line: only finished saves are ever renamed, so the last one stays."""
        try:
            yield
        except (OSError, ValueError) as e:
            if not _disk_full(e):
                raise
            finished = [int(p.name) for p in self.directory.iterdir() if p.name.isdigit()
                        and (p / "_CHECKPOINT_METADATA").exists()]  # on disk: orbax lists a failed save as well
            last = f"step {max(finished)}" if finished else "none yet"
            raise UserError(f"{self.directory}: no space left on device while saving a checkpoint; the last finished "
                            f"one ({last}) is intact: free space, then rerun the same command to resume") from None

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.preempted and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: abort without saving
        logging.warning("%s: saving a checkpoint after this step, then exiting%s", name,
                        " (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else "")
        self.preempted = True
        self.stop_signal = self.stop_signal or name

    def _warn_unfinished(self) -> None:
        """Half-written step directories (a crash mid-save) are skipped by orbax; say so instead of silently."""
        if not self.directory.exists():
            return
        for path in sorted(self.directory.iterdir()):
            if ".orbax-checkpoint-tmp" in path.name or (path.name.isdigit() and not (path / "_CHECKPOINT_METADATA")
                                                         .exists()):
                logging.warning("skipping unfinished checkpoint %s (being written, or interrupted while saving)",
                                path)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def has_data_state(self, step: int) -> bool:
        """Whether `step` holds this process's data iterator position: not when another number of hosts wrote it
        (the train state itself restores onto any mesh, its shardings being the restore target's)."""
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"  # grain's handler names it so
        return (self.directory / str(step) / "data" / name).exists()

    def should_stop(self, step: int) -> bool:
        """True when this host got SIGTERM or any host reached a preemption point (multi-host TPU)."""
        if jax.process_count() == 1:
            return self.preempted
        any_sigterm = bool(multihost_utils.process_allgather(np.array(self.preempted)).any())
        return any_sigterm or self.manager.reached_preemption(step)

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        with self._disk():
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator | None) -> Any:
        """The state at `step`, or if that one does not restore at the newest older one that does (its `step`
        says which), placed as `abstract_state`'s shardings say; moves `data_iterator` in place."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restore = lambda s: self.manager.restore(s, args=ocp.args.Composite(**items))["state"]
        restored, state = self._newest_restoring([s for s in self.all_steps() if s <= step], restore)
        if restored != step and data_iterator is None:
            logging.warning("the data resumes at global batch %d, not %d: checkpoint %d was written by another "
                            "number of hosts", step, restored, restored)
        return state

    def restore_params(self, step: int | None, abstract_params: Any, key: str = "params") -> tuple[int, Any]:
        """(step, state[key]) of `step` (key: "params", or "ema" for their moving average), default the newest
        checkpoint that restores (export, sampling): no optimizer state is read, which for a full fine-tune
        would triple the memory needed."""
        abstract = {key: abstract_params}
        args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
            abstract, ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True))
        steps = self.all_steps() if step is None else [step]
        return self._newest_restoring(steps, lambda s: self.manager.restore(s, args=args)["state"][key])

    def _newest_restoring(self, steps: list[int], restore: Callable[[int], Any]) -> tuple[int, Any]:
        """(step, restore(step)) for the newest of `steps` that restores. Each newer one that does not is named
        with its error; a writer then moves it aside (kept, never deleted). None restoring is one line."""
        failed: list[tuple[int, str]] = []
        for step in sorted(steps, reverse=True):
            try:
                out = restore(step)
            except Exception as e:  # noqa: BLE001 -- orbax wraps tensorstore's read errors in a bare Exception
                cause = _read_error(e)
                if cause is None:
                    raise
                _quiet_closed_loop_callbacks()
                reason = " ".join(str(cause).split(" [tensorstore_spec")[0].split())[:_MAX_REASON]
                logging.warning("checkpoint %s does not restore, skipping it (%s)", self.directory / str(step), reason)
                failed.append((step, reason))
                continue
            if failed and not self.read_only:
                self._move_aside([s for s, _ in failed])
            if failed:
                logging.warning("restored checkpoint %d instead of %d", step, failed[0][0])
            return step, out
        if not failed:
            raise UserError(f"no checkpoint in {self.directory}")
        if len(failed) == 1:
            raise UserError(f"checkpoint {self.directory / str(failed[0][0])} does not restore (left untouched): "
                            f"{failed[0][1]}")
        reasons = "; ".join(f"step {s}: {r}" for s, r in failed)
        raise UserError(f"no checkpoint in {self.directory} restores (left untouched): {reasons}")

    def _move_aside(self, steps: list[int]) -> None:
        """Rename unreadable step directories to STEP.unreadable[-N]: kept for inspection, their steps free."""
        if jax.process_index() == 0:
            for step in steps:
                src = self.directory / str(step)
                dst, n = self.directory / f"{step}.unreadable", 1
                while dst.exists():
                    dst, n = self.directory / f"{step}.unreadable-{n}", n + 1
                try:
                    src.rename(dst)
                except (OSError, NotImplementedError) as e:  # a store without directory renames
                    raise UserError(f"checkpoint {src} does not restore and could not be moved aside to {dst} "
                                    f"({e}); move it yourself, then resume") from e
                logging.warning("moved the unreadable checkpoint %s to %s (kept, not deleted)", src, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("pnapo_jax.checkpoint.move_aside")
        self.manager.reload()

    def wait(self) -> None:
        with self._disk():
            self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for a save in flight, and gives the signals back to their previous handlers."""
        try:
            with self._disk():
                self.manager.close()
        finally:
            for sig, handler in self._previous_handlers.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)
            self._previous_handlers = {}


def _read_error(e: BaseException | None) -> BaseException | None:
    """`e` or the exception it was raised from that orbax / tensorstore raise for a missing or damaged file
    (ValueError, OSError); None for anything else, a bug that must not be taken for a damaged checkpoint."""
    while e is not None and not isinstance(e, (ValueError, OSError)):
        e = e.__cause__ or e.__context__
    return e


def _quiet_closed_loop_callbacks() -> None:
    """A failed orbax restore closes its event loop while tensorstore still completes the other reads, each then
    printing a 'RuntimeError: Event loop is closed' traceback; drop those (and only those), keep all else."""
    previous = sys.unraisablehook
    if getattr(previous, "_pnapo_quiet", False):
        return

    def hook(unraisable: Any) -> None:
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook._pnapo_quiet = True
    sys.unraisablehook = hook
