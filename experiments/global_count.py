"""E2 measurement: MQAR accuracy vs active global tokens, next to what the pattern can reach.

Runs a config's ``ablation()`` (one axes dict, or a list of them, e.g. one per
task size with its own global counts) through :func:`experiments.ablate.run_ablation`
(one vmapped program per task size) and adds, per (task size, n), the fraction
of test queries whose key-value pair the window (L·w positions back) or an
active global slot (the first n positions) makes directly readable
(:func:`globalattn.measure.reachable_queries`). Returns the table's JSON; the
report is ``configs/global_count.py``'s template, rendered by experiments.render.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from experiments import ablate, render
from globalattn import data as data_lib
from globalattn import measure as measure_lib
from globalattn.train import apply_overrides


def _pairs(data_config: str) -> int | None:
    """K of an MQAR config name (``v64_t64_k4`` -> 4)."""
    return int(data_config.rsplit("_k", 1)[-1]) if "_k" in data_config else None


def measure(module, arg: str | None, *, workdir: str, data_dir: str | None) -> dict[str, Any]:
    config = module.get_config(arg)
    if data_dir is not None:
        config = apply_overrides(config, {"data.data_dir": data_dir})
    specs = ablate.config_axes(module, arg)
    smoke = f"{os.path.relpath(module.__file__)}:{arg}" if arg in ("quick", "test") else None
    out = ablate.run_ablations(config, specs, workdir, smoke=smoke)
    data_configs = [dc for spec in specs for dc in spec["data_configs"]]
    seeds = {s for spec in specs for s in spec["seeds"]}
    reach = config.model.num_layers * config.model.window
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in out["rows"]:
        groups.setdefault((r["data_config"], r["num_active_globals"]), []).append(r)
    rows, values = [], {"reach": reach, "test": {}, "test_ci": {}, "loss": {}, "bound": {},
                        "num_seeds": len(seeds)}
    curves: dict[str, list[tuple[int, float, float]]] = {}
    for (dc, n), group in sorted(groups.items(), key=lambda kv: (_pairs(kv[0][0]) or 0,
                                                                  kv[0][1])):
        k = _pairs(dc)
        source = data_lib.data_source(config.data.name, "test", dc, config.data.data_dir)
        bound = measure_lib.reachable_queries(source, num_globals=n, reach=reach)
        test = [r["test"] for r in group]
        loss = float(np.mean([r["test/loss"] for r in group]))
        rows.append([k if k is not None else dc, n,
                     "-" if k is None else ("yes" if n >= 2 * k else "no"), test,
                     [r["validation"] for r in group], bound, None if k is None else 1 / k,
                     loss, None if k is None else math.log(k)])
        key = f"k{k}_n{n}" if k is not None else f"{dc}_n{n}"
        mean, half = render.interval(test)
        values["test"][key] = 100 * mean
        values["test_ci"][key] = 100 * half
        values["loss"][key] = loss
        values["bound"][key] = 100 * bound
        curves.setdefault(dc, []).append((n, 100 * mean, 100 * half))
    # The threshold: n = 2K (every pair global) against n = K (half of them), per K.
    by_key = {(_pairs(dc), n): [100 * r["test"] for r in g] for (dc, n), g in groups.items()}
    values["threshold"] = {}
    for (k, n), acc in by_key.items():
        if k is not None and n == 2 * k and (k, k) in by_key:
            d = render.difference(acc, by_key[(k, k)])
            values["threshold"][f"k{k}"] = dict(d, text=render.describe(d))
    timing_rows = []
    for t in out["timings"]:
        row = [t["data_config"], t["K"], t["steps"], t["compile_s"], t["train_s"]]
        if "speedup" in t:
            seq = t["K"] * (t["compile_single_s"] + t["steps"] * t["single_step_s"])
            row += [t["vmapped_step_s"], t["single_step_s"], f"{t['speedup']:.2f}x",
                    t["compile_s"] + t["train_s"], seq]
        else:
            row += [None, None, "not measured", t["compile_s"] + t["train_s"], None]
        timing_rows.append(row)
    ups = [t["speedup"] for t in out["timings"] if "speedup" in t]
    values.update(speedup_min=min(ups) if ups else None, speedup_max=max(ups) if ups else None,
                  pairs=", ".join(str(_pairs(d)) for d in data_configs))
    pct = "pct"
    tables = {
        "results": {"columns": [["K pairs", ""], ["active globals n", ""], ["n >= 2K", ""],
                                ["test acc %", pct], ["val acc %", pct],
                                ["queries reachable %", pct], ["1/K %", pct],
                                ["test loss", ".3f"], ["ln K", ".3f"]], "rows": rows},
        "timings": {"columns": [["task size", ""], ["K variants", ""], ["steps", ""],
                                ["compile s", ".1f"], ["train s", ".1f"],
                                ["one program, s/step", ".3f"], ["one variant, s/step", ".3f"],
                                ["per-step speed-up", ""], ["one program, s", ".0f"],
                                ["K runs, est. s", ".0f"]], "rows": timing_rows}}
    figure = {"kind": "lines", "xlabel": "active global tokens", "ylabel": "test accuracy (%)",
              "size": [6, 4], "series": [{"label": dc, "x": [n for n, _, _ in pts],
                                          "y": [a for _, a, _ in pts],
                                          "yerr": [h for _, _, h in pts]}
                                         for dc, pts in curves.items()]}
    return {"values": values, "rows": out["rows"], "timings": out["timings"],
            "axes": out["axes"], "tables": tables, "figures": [figure]}
