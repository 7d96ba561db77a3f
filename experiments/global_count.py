"""E2 -- MQAR accuracy vs number of global tokens: ``python -m experiments.reproduce global_count``.

Runs ``configs/global_count.py``'s ablation through experiments/ablate.py (one
vmapped program per task size) and writes ``results/global_count.md`` + ``.png``.
Next to each accuracy it puts what the attention pattern allows, counted on the
test split itself: the fraction of queries whose key-value pair is within reach
of the window (L·w positions before the query) or held by an active global
slot (the first n positions) -- no model can beat that by more than chance on
the rest.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Any

import numpy as np

from experiments import ablate
from globalattn import data as data_lib
from globalattn.train import apply_overrides, load_config_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "global_count.py")


def reachable_fraction(name: str, data_config: str, split: str, *, data_dir: str | None,
                       num_globals: int, reach: int) -> float:
    """Fraction of query tokens whose pair's value position is global or within ``reach``.

    The value token at position 2i+1 sits right after its key; a query at p can
    read it if p - (2i+1) <= reach (the window, composed over the layers) or if
    2i+1 < num_globals (a global slot, readable by every token).
    """
    source = data_lib.data_source(name, split, data_config, data_dir)
    ok = total = 0
    for i in range(len(source)):
        ex = source[i]
        tokens, labels, mask = ex["tokens"], ex["labels"], ex["label_mask"].astype(bool)
        for p in np.flatnonzero(mask):
            (value_pos,) = np.flatnonzero(tokens[: p] == labels[p])[:1]
            ok += bool(value_pos < num_globals or p - value_pos <= reach)
            total += 1
    return ok / total


def run(*, quick: bool = False, workdir: str, results_dir: str,
        data_dir: str | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    module = load_config_module(CONFIG)
    arg = "quick" if quick else None
    config = module.get_config(arg)
    if data_dir is not None:
        config = apply_overrides(config, {"data.data_dir": data_dir})
    axes = module.ablation(arg)
    speedup = axes.pop("speedup_steps", 0)
    out = ablate.run_ablation(config, axes, workdir, speedup_steps=speedup)
    out["runtime_s"] = time.perf_counter() - start
    return write_report(out, config, workdir=workdir, results_dir=results_dir, quick=quick,
                        data_dir=data_dir)


def write_report(out: dict[str, Any], config, *, workdir: str, results_dir: str, quick: bool,
                 data_dir: str | None, note: str = "") -> dict[str, Any]:
    """Adds the reachability bounds to ``out`` and writes ``global_count.md`` / ``.png``."""
    axes = out["axes"]
    reach = config.model.num_layers * config.model.window
    bounds = {(dc, n): reachable_fraction(config.data.name, dc, "test", data_dir=data_dir,
                                          num_globals=n, reach=reach)
              for dc in axes["data_configs"] for n in axes["num_active_globals"]}
    os.makedirs(results_dir, exist_ok=True)
    shutil.copy(os.path.join(workdir, "accuracy_vs_globals.png"),
                os.path.join(results_dir, "global_count.png"))
    report = format_report(out, config, bounds, reach=reach, quick=quick,
                           runtime_s=out["runtime_s"], note=note)
    with open(os.path.join(results_dir, "global_count.md"), "w") as f:
        f.write(report)
    print(report)
    out["bounds"] = {f"{k[0]}/{k[1]}": v for k, v in bounds.items()}
    return out


def _pairs(data_config: str) -> int | None:
    return int(data_config.rsplit("_k", 1)[-1]) if "_k" in data_config else None


def observations(rows: list[dict]) -> list[str]:
    """Plain statements computed from the rows (mean over seeds), one per task size."""
    out = []
    for dc in sorted({r["data_config"] for r in rows}, key=lambda d: _pairs(d) or 0):
        k = _pairs(dc)
        if k is None:
            continue
        by_n: dict[int, list[dict]] = {}
        for r in rows:
            if r["data_config"] == dc:
                by_n.setdefault(r["num_active_globals"], []).append(r)
        acc = {n: float(np.mean([r["test"] for r in g])) for n, g in sorted(by_n.items())}
        loss = {n: float(np.mean([r["test/loss"] for r in g])) for n, g in sorted(by_n.items())}
        best = max(acc, key=acc.get)
        bound = [n for n in acc if loss[n] < np.log(k) - 0.1]
        above = [n for n in acc if n >= 2 * k]
        below = [n for n in acc if n < 2 * k]
        text = (f"K={k}: best n={best} ({100 * acc[best]:.1f}%); window only (n=0) "
                f"{100 * acc.get(0, float('nan')):.1f}%.")
        if above and below:
            verdict = ("Every n >= 2K beats" if min(acc[n] for n in above) >
                       max(acc[n] for n in below) else "Not every n >= 2K beats")
            text += (f" {verdict} every n < 2K "
                     f"(min {100 * min(acc[n] for n in above):.1f}% vs max "
                     f"{100 * max(acc[n] for n in below):.1f}%).")
        text += (f" Test loss below ln K - 0.1 = {np.log(k) - 0.1:.2f} (keys bound to values, "
                 f"not just the K candidates known): "
                 f"{'n = ' + ', '.join(map(str, bound)) if bound else 'no n'}.")
        out.append(text)
    return out


def format_report(out: dict, config, bounds: dict, *, reach: int, quick: bool,
                  runtime_s: float, note: str = "") -> str:
    m = config.model
    cmd = "python -m experiments.reproduce global_count" + (" --quick" if quick else "")
    lines = [
        "# E2: MQAR accuracy vs number of global tokens",
        "",
        f"Produced by `{cmd}` in {runtime_s / 60:.1f} min on a 2-core CPU "
        f"(`experiments/global_count.py`, config `configs/global_count.py`"
        f"{':quick' if quick else ''}).",
        "",
        "**What it mirrors.** Zoology (Arora et al. 2023) shows that attention solves MQAR "
        "while models without full token-to-token reach need state that grows with the number "
        "of pairs K. Here the model is a sliding window (radius "
        f"{m.window}, {m.num_layers} layers: a query sees at most {reach} positions back) plus "
        "the first n positions made global (`strategy=first`, capacity "
        f"{m.strategy.num_globals}, n active). The K pairs sit in the first 2K positions, so "
        "the prediction is a threshold: accuracy should approach 100% once n >= 2K and stay "
        "near the window's reach below it. There is no published table for this exact setup; "
        "the claim tested is the seed article's (global tokens restore long-range "
        "communication at O(g·n) cost).",
        "",
        f"Task: MQAR (`{config.data.name}`), V=64 tokens, T=64, K in "
        f"{{{', '.join(d.rsplit('_k', 1)[-1] for d in out['axes']['data_configs'])}}} pairs, "
        "queries at power-law gaps after the pairs. Model: "
        f"{m.num_layers} layers, d={m.d_model}, {m.num_heads} head{'s' if m.num_heads > 1 else ''}, batch "
        f"{config.batch_size}, {config.num_train_steps} steps, AdamW, warmup "
        f"{config.optim.warmup_steps}, cosine decay. All global counts of one task size "
        "train in ONE vmapped program on the same batches (`globalattn.train.ablation`; "
        "tests/test_ablation.py checks that each variant equals its separate run step for "
        "step).",
        "",
        "## Accuracy (per query token, test split) vs what the pattern can reach",
        "",
        "| K pairs | active globals n | n >= 2K | test acc % | val acc % | queries reachable % "
        "| 1/K % | test loss | ln K |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups = ablate._groups(out["rows"])
    for (dc, lr, n), group in sorted(groups.items(), key=lambda kv: (
            _pairs(kv[0][0]) or 0, kv[0][1], kv[0][2])):
        k = _pairs(dc)
        lines.append(
            f"| {k if k is not None else dc} | {n} | {'yes' if k is not None and n >= 2 * k else 'no'}"
            f" | {ablate._pct([r['test'] for r in group])} | "
            f"{ablate._pct([r['validation'] for r in group])} | {100 * bounds[(dc, n)]:.1f} | "
            + (f"{100 / k:.1f} | " if k else "- | ")
            + f"{np.mean([r['test/loss'] for r in group]):.3f} | "
            + (f"{np.log(k):.3f} |" if k else "- |"))
    lines += [
        "",
        "Queries reachable = the value of the queried pair lies within "
        f"{reach} positions before the query, or in an active global slot (counted on the test "
        "split). With n >= 1 every token is 2 hops from every other through a global, so this "
        "column only counts pairs that have their *own* path; the rest must be squeezed "
        "through the n global vectors.",
        "",
        "How to read the loss: a model that knows which K tokens are the values but not which "
        "value belongs to the queried key predicts each with probability 1/K: accuracy 1/K, "
        "loss ln K. A loss well below ln K means keys are being bound to values.",
        "",
        "## Observations (computed from the table)",
        "",
        *[f"- {o}" for o in observations(out["rows"])],
        "- One seed per setting and one run of "
        f"{config.num_train_steps} steps: the models are not converged (no setting reaches "
        "the 100% the pattern allows), and when a model leaves the 1/K plateau varies from "
        "run to run, so single points (e.g. a larger n doing worse than a smaller one) are "
        "not evidence. More steps or seeds exceed this table's 15-minute budget on 2 cores.",
        "",
        "![accuracy vs globals](global_count.png)",
        "",
        "## One program vs K runs",
        "",
        ablate.format_timings(out["timings"]),
        "",
        "Per-step speed-up = K x (seconds per step of one variant) / (seconds per step of "
        "the K-variant program), both compiled, timed in the same process on the same batch "
        "(median of 3 repeats). The machine was shared, so only ratios from the same run "
        "mean anything.",
        "",
        *_speedup_text(out["timings"]),
        "",
        f"Wall time of the whole table: {runtime_s / 60:.1f} min "
        f"({'within' if runtime_s <= 15 * 60 else 'over'} the 15-minute budget). {note}",
        "",
    ]
    return "\n".join(lines)


def _speedup_text(timings: list[dict]) -> list[str]:
    ups = [t["speedup"] for t in timings if "speedup" in t]
    if not ups:
        return []
    if max(ups) < 1.1:
        return [f"On this 2-core CPU the K-variant program is not faster per step "
                f"({min(ups):.2f}x - {max(ups):.2f}x): one small model already keeps both "
                "cores busy, so vmap cannot recover idle hardware, and XLA:CPU runs the "
                "batched (per-variant) matrix products no faster than K separate ones. One "
                "program saves K-1 compilations and input pipelines and guarantees identical "
                "batches; "
                + ("even so it took longer end to end than the estimated K separate runs here. "
                   if all(t["compile_s"] + t["train_s"] > t["K"] * (
                       t["compile_single_s"] + t["steps"] * t["single_step_s"])
                       for t in timings if "speedup" in t) else "")
                + "The case vmap is built for, a small model that leaves an accelerator "
                "mostly idle, was not measured (no GPU/TPU here)."]
    return [f"The K-variant program is {min(ups):.2f}x - {max(ups):.2f}x faster per step than "
            "running the variants one after another."]
