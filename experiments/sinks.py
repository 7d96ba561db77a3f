"""Sinks measurement: train a config's LM variants, stream them through fixed caches.

Each variant of ``configs/sinks.py``'s sweep trains with
:func:`globalattn.train.train_and_evaluate` in ``<workdir>/<variant>`` (a rerun
resumes; a finished run returns its stored final metrics), is loaded back from its
checkpoint (:func:`globalattn.train.trained.load_run`) and measured: streaming
perplexity through caches of x initial + (C - x) recent tokens and the sink
metric (:mod:`globalattn.measure`). Returns the table's JSON; the report is the
config's template, rendered by experiments.render.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np

from experiments import render
from globalattn import data as data_lib
from globalattn import measure as measure_lib
from globalattn.data import charlm
from globalattn.train.config import (apply_overrides, call_sweep, sweep_configs,
                                     validate_config)
from globalattn.train.loop import train_and_evaluate
from globalattn.train.trained import load_run


def measure(module, arg: str | None, *, workdir: str, data_dir: str | None) -> dict[str, Any]:
    config = module.get_config(arg)
    if data_dir is not None:
        config = apply_overrides(config, {"data.data_dir": data_dir})
    s = config.stream
    C, xs = s.cache_size, list(s.initial_tokens)
    if any(not 0 <= x < C for x in xs):
        raise ValueError(f"stream.initial_tokens {xs} must lie in [0, cache_size={C})")
    runs = sweep_configs(config, call_sweep(module, arg))
    T = validate_config(config).seq_len
    data_lib.prepare(config.data.name, config.data.config, config.data.data_dir)
    text = charlm.split_text("test", config.data.config, config.data.data_dir)
    need = s.num_streams * s.length
    if text.size < need:
        raise ValueError(f"the test split has {text.size} characters; {s.num_streams} streams "
                         f"of {s.length} need {need}")
    streams = text[:need].reshape(s.num_streams, s.length)
    val = charlm.split_text("validation", config.data.config, config.data.data_dir)
    n_seq = min(config.sink_metric.num_sequences, (val.size - 1) // T)
    probe = val[:n_seq * T].reshape(n_seq, T)

    runs_out = []
    for name, cfg in runs:
        print(f"\n=== {name} ===", flush=True)
        trained = train_and_evaluate(cfg, os.path.join(workdir, name))
        _, model, params = load_run(os.path.join(workdir, name))
        t0 = time.perf_counter()
        ppl = {x: measure_lib.streaming_perplexity(model, params, streams, initial_tokens=x,
                                                   cache_size=C) for x in xs}
        sink = measure_lib.sink_metric(model, params, probe,
                                       threshold=config.sink_metric.threshold,
                                       local=config.sink_metric.local)
        eval_s = time.perf_counter() - t0
        print(f"{name}: streaming ppl {ppl} | sink metric {sink['metric']:.2f} | "
              f"attention to the first token {sink['mean_alpha']:.3f} | last "
              f"{config.sink_metric.local} tokens {sink['local_mass']:.3f} | "
              f"eval {eval_s:.0f} s", flush=True)
        runs_out.append({"run": name, "variant": name.split("/")[0], "seed": cfg.seed,
                         "validation/loss": trained["validation/loss"],
                         "validation/perplexity": math.exp(trained["validation/loss"]),
                         "train_s": trained["wall_time_s"], "ppl": ppl, "sink": sink,
                         "eval_s": eval_s})

    names = module.VARIANTS
    lo, hi = min(xs), max(xs)
    rows: dict[str, list[dict]] = {}
    for r in runs_out:
        rows.setdefault(r["variant"], []).append(r)
    zero = "zero_sink" in rows

    def ci(values: list[float], fmt: str) -> str:
        mean, half = render.interval(values)
        return format(mean, fmt) if len(values) == 1 else \
            f"{format(mean, fmt)} ± {format(half, fmt)}"

    columns = [["variant", ""]] + [[f"{x}+{C - x}", ""] for x in xs] + [
        [f"dense, T = {T} (val)", ""], ["sink metric", ""],
        ["attn. to 1st token", ""], [f"attn. to last {config.sink_metric.local} tokens", ""]
    ] + ([["zero-sink column mass", ".2f"]] if zero else [])
    table_rows, evict, metric, ppl_mean = [], {}, {}, {}
    for variant, group in rows.items():
        alpha = [g["sink"]["mean_alpha"] for g in group]
        row = [names.get(variant, variant)] + [ci([g["ppl"][x] for g in group], ".3f")
                                               for x in xs] + [
            ci([g["validation/perplexity"] for g in group], ".3f"),
            ci([g["sink"]["metric"] for g in group], ".2f"), ci(alpha, ".3f"),
            ci([g["sink"]["local_mass"] for g in group], ".2f")]
        if zero:
            row.append(float(np.mean([g["sink"]["sink_logit_mass"] for g in group]))
                       if variant == "zero_sink" else None)
        table_rows.append(row)
        changes = [100 * (g["ppl"][lo] / g["ppl"][hi] - 1) for g in group]
        mean, half = render.interval(changes)
        evict[variant] = {"mean": mean, "half_width": half, "each": changes}
        metric[variant] = float(np.mean([g["sink"]["metric"] for g in group]))
        ppl_mean[variant] = {f"x{x}": float(np.mean([g["ppl"][x] for g in group]))
                             for x in xs}
    values = {
        "seq_len": T, "params": measure_lib.count_params(runs[0][1]),
        "num_seeds": len(next(iter(rows.values()))),
        "tokens_seen_m": config.num_train_steps * config.batch_size * T / 1e6,
        "train_min": sum(r["train_s"] for r in runs_out) / 60,
        "eval_min": sum(r["eval_s"] for r in runs_out) / 60,
        "uniform_alpha": float(np.mean(1.0 / np.arange(1, T + 1))),
        "uniform_local": float(np.mean(np.minimum(np.arange(1, T + 1),
                                                  config.sink_metric.local)
                                       / np.arange(1, T + 1))),
        "evict_change": {v: e["mean"] for v, e in evict.items()},
        "evict": evict, "metric": metric, "ppl": ppl_mean,
        "mean_alpha": {v: float(np.mean([g["sink"]["mean_alpha"] for g in group]))
                       for v, group in rows.items()},
        "max_alpha": {v: float(max(np.max(g["sink"]["alpha"]) for g in group))
                      for v, group in rows.items()},
        "local_mass": {v: float(np.mean([g["sink"]["local_mass"] for g in group]))
                       for v, group in rows.items()}}
    all_ppl = [v for r in runs_out for v in r["ppl"].values()]

    def mean_alpha_heads(group: list[dict]) -> list[float]:
        return np.mean([np.asarray(g["sink"]["alpha"]) for g in group], 0).reshape(-1).tolist()

    figure = {"size": [10, 3.8], "panels": [
        {"kind": "lines", "xlabel": "cache: initial + recent tokens",
         "ylabel": "streaming perplexity (per char)", "xticks": [f"{x}+{C - x}" for x in xs],
         "logy": max(all_ppl) > 3 * min(all_ppl),  # a collapse, as in the paper
         "series": [{"label": names.get(v, v), "x": list(range(len(xs))),
                     "y": [render.interval([g["ppl"][x] for g in group])[0] for x in xs],
                     "yerr": [render.interval([g["ppl"][x] for g in group])[1] for x in xs]}
                    for v, group in rows.items()]},
        {"kind": "lines", "xlabel": "layer-head (layer-major)",
         "ylabel": "mean attention to the first token",
         "hlines": [{"label": "sink threshold", "y": config.sink_metric.threshold,
                     "color": "k"},
                    {"label": "uniform attention", "y": values["uniform_alpha"],
                     "color": "gray", "style": ":"}],
         "series": [{"label": names.get(v, v), "style": "o", "y": mean_alpha_heads(group)}
                    for v, group in rows.items()]}]}
    return {"values": values, "rows": runs_out, "tables": {"results": {
        "columns": columns, "rows": table_rows}}, "figures": [figure]}
