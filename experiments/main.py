"""The README main job: a config's sweep, run one variant after another, then a table.

    python -m experiments.main          # configs/long_range.py:main in /tmp/globalattn_main
    python -m experiments.main --config=configs/long_range.py:quick --workdir=/tmp/lr_quick
    python -m experiments.main --config=configs/mqar.py --config.num_train_steps=500

Each variant trains in ``<workdir>/<variant>`` (rerunning resumes; a finished
variant is neither retrained nor re-evaluated: its ``final_metrics.json`` is
used); ``--config.*`` overrides apply to every variant before the sweep's own
overrides. The workdir is printed at the start and the end; it holds
``results.json`` (the table), and per variant
``metrics.jsonl``, ``final_metrics.json``, ``checkpoints/`` and, when
``config.tensorboard``, TensorBoard events (``tensorboard --logdir <workdir>``).
"""
from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from globalattn import data as data_lib
from globalattn.train.cli import config_flag_values, parse_flags
from globalattn.train.config import (call_sweep, load_config_module, sweep_configs,
                                     validate_config)
from globalattn.train.loop import train_and_evaluate

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "long_range.py:main")

_HEADLINE = ("accuracy", "exact_match")  # the first metric a task reports


def _headline(metrics: dict, split: str) -> float | None:
    for name in _HEADLINE:
        if f"{split}/{name}" in metrics:
            return metrics[f"{split}/{name}"]
    return None


def format_table(rows: list[dict]) -> str:
    """A fixed-width table: variant, strategy, validation / test headline metric, time."""
    header = ["variant", "strategy", "G", "val acc %", "test acc %", "steps", "time s"]
    lines = [header]
    for r in rows:
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
        lines.append([r["variant"], r["strategy"], str(r["capacity"]), pct(r["validation"]),
                      pct(r["test"]), str(r["step"]), f"{r['wall_time_s']:.0f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    fmt = lambda line: "  ".join(c.ljust(w) for c, w in zip(line, widths))  # noqa: E731
    return "\n".join([fmt(lines[0]), fmt(["-" * w for w in widths])] + [fmt(x) for x in lines[1:]])


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv if argv is None else argv)
    fv, config_flag = config_flag_values(argv, _DEFAULT_CONFIG,
                                         "Experiment config file with a sweep().")
    workdir_flag = flags.DEFINE_string("workdir", "/tmp/globalattn_main", "Output directory.",
                                       flag_values=fv)
    parse_flags(argv, usage=__doc__, flag_values=fv)
    path, _, arg = config_flags.get_config_filename(fv["config"]).partition(":")
    runs = call_sweep(load_config_module(path), arg or None)
    if not runs:
        print(f"error: {path} defines no sweep()", file=sys.stderr)
        sys.exit(2)
    try:
        variants = sweep_configs(config_flag.value, runs)
        for _, config in variants:
            validate_config(config)
    except (KeyError, TypeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    workdir = os.path.abspath(workdir_flag.value)
    print(f"workdir: {workdir} ({len(variants)} variants of {path}{':' + arg if arg else ''})",
          flush=True)
    rows = []
    for name, config in variants:
        print(f"\n=== {name} ===", flush=True)
        result = train_and_evaluate(config, os.path.join(workdir, name))
        strategy = config.model.strategy
        rows.append({"variant": name, "strategy": strategy.name,
                     "capacity": validate_config(config).capacity,
                     "validation": _headline(result, "validation"),
                     "test": _headline(result, "test"), "step": result["step"],
                     "wall_time_s": result["wall_time_s"], "metrics": result})
        if result["preempted"]:
            break
    table = format_table(rows)
    meta = data_lib.task_metadata(config.data.name, config.data.config)
    smoke = " (a smoke run: the numbers mean nothing)" if arg in ("quick", "test") else ""
    print(f"\n{path}{':' + arg if arg else ''}: {config.data.name}/{config.data.config}, "
          f"{config.num_train_steps} steps{smoke}\n")
    print(table)
    if meta.num_classes:
        print(f"\nchance level: {100 / meta.num_classes:.1f}% ({meta.num_classes} classes, "
              "uniform guessing)")
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(rows, f, indent=2, default=str)
    print(f"\nworkdir: {workdir} (results.json; per variant metrics.jsonl, "
          "final_metrics.json, checkpoints/)", flush=True)
    return rows


if __name__ == "__main__":
    main()
