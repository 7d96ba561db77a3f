"""The README main job: a config's sweep, run one variant after another, then a table.

    python -m experiments.main                      # configs/long_range.py, /tmp/globalattn_main
    python -m experiments.main --config=configs/long_range.py:quick --workdir=/tmp/lr_quick
    python -m experiments.main --config=configs/listops.py --config.num_train_steps=500

Each variant trains in ``<workdir>/<variant>`` (rerunning resumes, and a
finished variant is only re-evaluated); ``--config.*`` overrides apply to every
variant before the sweep's own overrides. The table is also written to
``<workdir>/results.json``.
"""
from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from globalattn.train.cli import parse_flags
from globalattn.train.config import (call_sweep, load_config_module, sweep_configs,
                                     validate_config)
from globalattn.train.loop import train_and_evaluate

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "long_range.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                          "Experiment config file with a sweep().")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/globalattn_main", "Output directory.")

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
    parse_flags(sys.argv if argv is None else argv)
    path, _, arg = config_flags.get_config_filename(flags.FLAGS["config"]).partition(":")
    runs = call_sweep(load_config_module(path), arg or None)
    if not runs:
        print(f"error: {path} defines no sweep()", file=sys.stderr)
        sys.exit(2)
    try:
        variants = sweep_configs(_CONFIG.value, runs)
        for _, config in variants:
            validate_config(config)
    except (KeyError, TypeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    rows = []
    for name, config in variants:
        print(f"\n=== {name} ===", flush=True)
        result = train_and_evaluate(config, os.path.join(_WORKDIR.value, name))
        strategy = config.model.strategy
        rows.append({"variant": name, "strategy": strategy.name,
                     "capacity": validate_config(config).capacity,
                     "validation": _headline(result, "validation"),
                     "test": _headline(result, "test"), "step": result["step"],
                     "wall_time_s": result["wall_time_s"], "metrics": result})
        if result["preempted"]:
            break
    table = format_table(rows)
    print(f"\n{path}: {config.data.name}/{config.data.config}, {config.num_train_steps} steps\n")
    print(table)
    with open(os.path.join(_WORKDIR.value, "results.json"), "w") as f:
        json.dump(rows, f, indent=2, default=str)
    return rows


if __name__ == "__main__":
    main()
