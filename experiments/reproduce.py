"""Reproduce a paper table: ``python -m experiments.reproduce NAME [--quick]``.

    python -m experiments.reproduce sinks            # StreamingLLM sinks -> results/sinks.md
    python -m experiments.reproduce sinks --quick    # smoke run, report in the workdir
    python -m experiments.reproduce seed_hops        # seed article: hops -> results/seed_hops.md
    python -m experiments.reproduce --list

The seed article's exact numbers: seed_hops, seed_savings, seed_16token,
seed_connectivity (experiments/seed_tables.py).

A thin dispatcher: ``EXPERIMENTS`` maps a name to a function
``fn(*, quick, workdir, results_dir, data_dir) -> dict`` that lives with its
experiment. Full runs write ``results/<name>.md`` (committed when they back a
claim); ``--quick`` runs write their report into the workdir unless
``--results_dir`` says otherwise, so a smoke run never overwrites a result.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

from experiments import global_count, paper_tables, seed_tables, sinks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

Experiment = Callable[..., dict[str, Any]]

EXPERIMENTS: dict[str, Experiment] = {
    "sinks": sinks.run,
    "global_count": global_count.run,
    "seed_hops": seed_tables.run_hops,
    "seed_savings": seed_tables.run_savings,
    "seed_16token": seed_tables.run_16token,
    "seed_connectivity": seed_tables.run_connectivity,
    "long_range": paper_tables.run_long_range,
    "strategies": paper_tables.run_strategies,
    "listops": paper_tables.run_listops,
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m experiments.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help=f"one of {sorted(EXPERIMENTS)}")
    parser.add_argument("--quick", action="store_true", help="a 1-2 minute smoke run")
    parser.add_argument("--workdir", default=None,
                        help="default /tmp/globalattn_reproduce/<name>[_quick]")
    parser.add_argument("--results_dir", default=None,
                        help="default results/ (full run) or the workdir (--quick)")
    parser.add_argument("--data_dir", default=None,
                        help="TFDS data dir; default $TFDS_DATA_DIR or ~/tensorflow_datasets")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(sorted(EXPERIMENTS)))
        return {}
    if args.name not in EXPERIMENTS:
        parser.error(f"unknown experiment {args.name!r}; choose from {sorted(EXPERIMENTS)}")
    suffix = "_quick" if args.quick else ""
    workdir = args.workdir or os.path.join("/tmp/globalattn_reproduce", args.name + suffix)
    results_dir = args.results_dir or (workdir if args.quick else os.path.join(ROOT, "results"))
    return EXPERIMENTS[args.name](quick=args.quick, workdir=workdir, results_dir=results_dir,
                                  data_dir=args.data_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
