"""Where metrics go: WORKDIR/metrics.jsonl (one JSON object a line, with "step"), TensorBoard, a progress bar.

Only process 0 writes. Eval metrics are written with an "eval/" prefix on their own lines.
"""

import json
import math
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tqdm
from etils import epath


def _scalar(v: Any) -> float | int:
    v = np.asarray(v)
    return int(v) if np.issubdtype(v.dtype, np.integer) else float(v)


class MetricWriter:
    """Appends metric lines; a resumed run keeps appending to the same files."""

    def __init__(self, workdir: str, total_steps: int, start_step: int = 0, show_progress: bool = True):
        self.active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not self.active:
            return
        workdir = epath.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (workdir / "metrics.jsonl").open("a")
        from tensorboardX import SummaryWriter  # imported here: only the writing process needs it

        self._tb = SummaryWriter(str(workdir / "tensorboard"))
        self._bar = tqdm.tqdm(total=total_steps, initial=start_step, disable=not show_progress, unit="step",
                              dynamic_ncols=True)
        self._last = (start_step, time.perf_counter())

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float | int]:
        """Writes one line; returns it as Python scalars."""
        line = {"step": int(step), **{k: _scalar(v) for k, v in jax.device_get(dict(metrics)).items()}}
        if not self.active:
            return line
        self._jsonl.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                      for k, v in line.items()}) + "\n")
        self._jsonl.flush()
        for k, v in line.items():
            if k != "step":
                self._tb.add_scalar(k, v, step)
        return line

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

    def close(self) -> None:
        if self.active:
            self._bar.close()
            self._jsonl.close()
            self._tb.close()
