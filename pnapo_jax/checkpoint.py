"""Orbax checkpoints of the train state together with the data iterator's position.

A checkpoint is one step directory holding `state` (step, trainable params, optimizer state, RNG) and `data`
(the grain iterator, one JSON file per process). Restoring both makes a resumed run train on exactly the
batches the interrupted run had not. A checkpoint restores onto another mesh or number of hosts too: the state
is resharded to the restoring run's layout, and the data resumes from the step's global batch. The frozen
reference is never saved: it is rebuilt from its source.
SIGTERM (TPU preemption) and SIGINT (Ctrl-C) set a flag; the loop then saves and exits cleanly. A second Ctrl-C
aborts at once (KeyboardInterrupt), for a run stuck where it cannot reach the end of a step.
"""

import contextlib
import errno
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from pnapo_jax.errors import UserError


def _disk_full(e: BaseException) -> bool:
    """An OSError, or tensorstore's ValueError that carries the OS error in its text."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return "No space left on device" in str(e) or "Disk quota exceeded" in str(e)


class Checkpointer:
    """Saves every `every_steps` steps (async), keeps the last `keep`, restores the latest finished one.

    As a context manager it closes itself; when the block failed, a save failing too (a full disk fails both) is
    one warning, and the block's own error surfaces.
    """

    def __init__(self, directory: str, cfg: ml_collections.ConfigDict, handle_sigterm: bool = True):
        self.directory = epath.Path(directory)
        self._warn_unfinished()
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
        if handle_sigterm and threading.current_thread() is threading.main_thread():
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
                logging.warning("skipping unfinished checkpoint %s (interrupted while saving)", path)

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
        """The state at `step`, placed as `abstract_state`'s shardings say; moves `data_iterator` in place."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the trainable params of `step` (export, sampling): no optimizer state is read, which for a full
        fine-tune would triple the memory needed."""
        abstract = {"params": abstract_params}
        restore = ocp.args.PyTreeRestore(abstract, ocp.checkpoint_utils.construct_restore_args(abstract),
                                         partial_restore=True)
        return self.manager.restore(step, args=ocp.args.Composite(state=restore))["state"]["params"]

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
