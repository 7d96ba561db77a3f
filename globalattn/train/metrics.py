"""Metric records: stdout progress (rate, ETA), a JSONL file and TensorBoard events.

``<workdir>/metrics.jsonl`` has one JSON object per line::

    {"step": 100, "split": "train", "loss": 1.93, "accuracy": 0.31, ...,
     "steps_per_sec": 7.9, "time": 1732262400.0}

``split`` is 'train' or an eval split name. On resume, records of steps after
the restored checkpoint are dropped first, so the file reads as one unbroken
run; when the final evaluation is redone, the evaluation records at the
restored step are dropped too (``redo_evals``). ``steps_per_sec`` is absent
from an interval with no timed step (the compiling first step is not timed).
TensorBoard events go to ``<workdir>/tensorboard`` as ``<split>/<name>`` (each
writer opens a new events file). Only process 0 writes.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping, TextIO

import jax

__all__ = ["MetricWriter", "Progress", "read_jsonl"]


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """All records of a metrics file (empty list if it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    f = float(v)
    return f if math.isfinite(f) else repr(f)  # JSON has no NaN; "nan" / "inf" as strings


class MetricWriter:
    """Writes metric records to JSONL (+ TensorBoard); a no-op on processes other than 0."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, resume_step: int | None = None,
                 redo_evals: bool = False):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step, redo_evals)
        self._file: TextIO = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: heavy, and optional

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)

    def _truncate_after(self, step: int, drop_evals_at_step: bool = False) -> None:
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) < step or (
            r.get("step", 0) == step and not (drop_evals_at_step and r.get("split") != "train"))]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(self.path + ".tmp", self.path)

    def write(self, step: int, split: str, values: Mapping[str, Any]) -> None:
        if not self.active:
            return
        record = {"step": int(step), "split": split, **{k: _jsonable(v) for k, v in values.items()},
                  "time": time.time()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if not self.active:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """Step rate and ETA of one run (one ``train_and_evaluate`` call) over the last interval.

    Timing starts at :meth:`start`, which the loop calls once the first step has
    compiled and run (and again after each mid-run evaluation), so neither
    compilation nor evaluation counts: the ETA is for this run's remaining
    training steps only (not its final evaluation, not other runs of a sweep).
    """

    def __init__(self, start_step: int, total_steps: int, stream: TextIO | None = None):
        self.total = total_steps
        self.stream = stream or sys.stdout
        self._last_step, self._last_time = start_step, None

    @property
    def started(self) -> bool:
        return self._last_time is not None

    def start(self, step: int) -> None:
        """Starts (or restarts) the timed interval at ``step``."""
        self._last_step, self._last_time = step, time.perf_counter()

    def rate(self, step: int) -> float | None:
        """Steps per second in the timed interval, then a new interval starts.

        None before :meth:`start` or when no step was timed.
        """
        if self._last_time is None:
            return None
        now = time.perf_counter()
        steps, seconds = step - self._last_step, now - self._last_time
        self._last_step, self._last_time = step, now
        return steps / max(seconds, 1e-9) if steps > 0 else None

    def print(self, step: int, split: str, values: Mapping[str, Any], rate: float | None = None
              ) -> None:
        if jax.process_index() != 0:
            return
        shown = " | ".join(f"{k} {_fmt(v)}" for k, v in values.items())
        line = f"[{split:>10}] step {step:>6}/{self.total}"
        if shown:
            line += f" | {shown}"
        if rate is not None and rate > 0:
            eta = (self.total - step) / rate
            line += f" | {rate:.2f} steps/s | ETA {_duration(eta)} (this run's training)"
        print(line, file=self.stream, flush=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"
