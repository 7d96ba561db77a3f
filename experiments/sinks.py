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

    rows = []
    for name, cfg in runs:
        print(f"\n=== {name} ===", flush=True)
        trained = train_and_evaluate(cfg, os.path.join(workdir, name))
        _, model, params = load_run(os.path.join(workdir, name))
        t0 = time.perf_counter()
        ppl = {x: measure_lib.streaming_perplexity(model, params, streams, initial_tokens=x,
                                                   cache_size=C) for x in xs}
        sink = measure_lib.sink_metric(model, params, probe,
                                       threshold=config.sink_metric.threshold)
        eval_s = time.perf_counter() - t0
        print(f"{name}: streaming ppl {ppl} | sink metric {sink['metric']:.2f} | "
              f"eval {eval_s:.0f} s", flush=True)
        rows.append({"variant": name, "validation/loss": trained["validation/loss"],
                     "validation/perplexity": math.exp(trained["validation/loss"]),
                     "train_s": trained["wall_time_s"], "ppl": ppl, "sink": sink,
                     "eval_s": eval_s})

    names = module.VARIANTS
    lo, hi = min(xs), max(xs)
    zero = any(r["variant"] == "zero_sink" for r in rows)
    columns = [["variant", ""]] + [[f"{x}+{C - x}", ".4g"] for x in xs] + [
        [f"dense, T = {T} (val)", ".4g"], ["sink metric", ".2f"],
        ["attn. to 1st token, mean / max", ""]] + ([["zero-sink column mass", ".2f"]]
                                                    if zero else [])
    table_rows = []
    for r in rows:
        alpha = np.asarray(r["sink"]["alpha"])
        row = [names.get(r["variant"], r["variant"])] + [r["ppl"][x] for x in xs] + [
            r["validation/perplexity"], r["sink"]["metric"],
            f"{r['sink']['mean_alpha']:.3f} / {alpha.max():.3f}"]
        if zero:
            row.append(r["sink"]["sink_logit_mass"] if r["variant"] == "zero_sink" else None)
        table_rows.append(row)
    values = {
        "seq_len": T, "params": measure_lib.count_params(runs[0][1]),
        "tokens_seen_m": config.num_train_steps * config.batch_size * T / 1e6,
        "train_min": sum(r["train_s"] for r in rows) / 60,
        "eval_min": sum(r["eval_s"] for r in rows) / 60,
        "uniform_alpha": float(np.mean(1.0 / np.arange(1, T + 1))),
        "evict_change": {r["variant"]: 100 * (r["ppl"][lo] / r["ppl"][hi] - 1) for r in rows},
        "metric": {r["variant"]: r["sink"]["metric"] for r in rows},
        "ppl": {r["variant"]: {f"x{x}": r["ppl"][x] for x in xs} for r in rows}}
    all_ppl = [v for r in rows for v in r["ppl"].values()]
    figure = {"size": [10, 3.8], "panels": [
        {"kind": "lines", "xlabel": "cache: initial + recent tokens",
         "ylabel": "streaming perplexity (per char)", "xticks": [f"{x}+{C - x}" for x in xs],
         "logy": max(all_ppl) > 3 * min(all_ppl),  # a collapse, as in the paper
         "series": [{"label": names.get(r["variant"], r["variant"]), "x": list(range(len(xs))),
                     "y": [r["ppl"][x] for x in xs]} for r in rows]},
        {"kind": "lines", "xlabel": "layer-head (layer-major)",
         "ylabel": "mean attention to the first token",
         "hlines": [{"label": "sink threshold", "y": config.sink_metric.threshold,
                     "color": "k"}],
         "series": [{"label": names.get(r["variant"], r["variant"]), "style": "o",
                     "y": np.asarray(r["sink"]["alpha"]).reshape(-1).tolist()} for r in rows]}]}
    return {"values": values, "rows": rows, "tables": {"results": {
        "columns": columns, "rows": table_rows}}, "figures": [figure]}
