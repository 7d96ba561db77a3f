"""Metric records: stdout progress (rate, ETA), a JSONL file and TensorBoard events.

``<workdir>/metrics.jsonl`` has one JSON object per line::

    {"step": 100, "split": "train", "loss": 1.93, "accuracy": 0.31, ...,
     "steps_per_sec": 7.9, "time": 1732262400.0}

``split`` is 'train' or an eval split name. On resume, records of steps after
the restored checkpoint are dropped first, so the file reads as one unbroken
run. TensorBoard events go to ``<workdir>/tensorboard`` as ``<split>/<name>``.
Only process 0 writes.
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

    def __init__(self, workdir: str, *, tensorboard: bool = True, resume_step: int | None = None):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        self._file: TextIO = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: heavy, and optional

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)

    def _truncate_after(self, step: int) -> None:
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
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
    """Step rate and ETA over the last interval (so compile time does not skew it)."""

    def __init__(self, start_step: int, total_steps: int, stream: TextIO | None = None):
        self.total = total_steps
        self.stream = stream or sys.stdout
        self._last_step, self._last_time = start_step, time.perf_counter()

    def rate(self, step: int) -> float:
        """Steps per second since the previous call; resets the interval."""
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        return rate

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
            line += f" | {rate:.2f} steps/s | ETA {_duration(eta)}"
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
