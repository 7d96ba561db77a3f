"""Ablations in ONE compiled program per task size: jax.vmap over global counts, seeds, lrs.

    python -m experiments.ablate --config=configs/global_count.py --workdir=/tmp/ablate
    python -m experiments.ablate --config=configs/global_count.py:quick --workdir=/tmp/ablate_q \\
        --num_active_globals=0,8,16 --seeds=0 --learning_rates=1e-3,2e-3 --data_configs=v64_t64_k4

The axes come from the config file's ``ablation(arg)`` (a dict with
``num_active_globals``, ``seeds``, ``learning_rates`` and ``data_configs``, the
task sizes, or a list of such dicts, run one after another into
``WORKDIR/partI``); a flag given on the command line replaces that axis (in
every entry). ``--config.*``
overrides apply first. For each data config, every (global count, seed, lr)
variant is trained by one vmapped program on the same batches
(globalattn.train.ablation); then ``--speedup_steps`` steps of that program are
timed against one variant alone (0 skips it).

Writes to the workdir: ``results.json`` (every variant, timings), ``results.md``
(the table) and ``accuracy_vs_globals.png`` (one line per task size and lr).
A ``:quick`` or ``:test`` config is a smoke run: the progress output, the first
line of ``results.md`` and ``results.json`` (``"smoke_run": true``) say so.
Progress lines give the ETA of each task size's whole K-variant program
(compilation excluded).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Sequence

from absl import flags
from ml_collections import config_flags

import globalattn  # noqa: F401  (XLA workaround before any array)
from globalattn.train import ablation, apply_overrides, load_config_module
from globalattn.train.cli import config_flag_values, parse_flags

AXES = ("num_active_globals", "seeds", "learning_rates", "data_configs")
_HEADLINE = ("accuracy", "exact_match")


def headline(final: dict[str, Any], split: str) -> float | None:
    for name in _HEADLINE:
        if f"{split}/{name}" in final:
            return final[f"{split}/{name}"]
    return None


def run_ablation(config, axes: dict[str, Sequence], workdir: str, *, speedup_steps: int = 0,
                 print_fn: Callable[[str], None] | None = print,
                 smoke: str | None = None) -> dict[str, Any]:
    """Trains the grid for each data config; returns and writes ``results.json``.

    Args:
      smoke: for a smoke run (a ``:quick`` / ``:test`` config), what it is, e.g.
        ``'configs/global_count.py:quick'``: printed at the start, the first line
        of ``results.md``, and ``results.json``'s ``smoke_run`` / ``smoke_config``.

    Returns:
      ``{'rows': [one dict per variant and task size], 'timings': [per task size],
      'smoke_run': bool, ...}``.
    """
    missing = [a for a in AXES if not axes.get(a)]
    if missing:
        raise ValueError(f"ablation axes {missing} are empty or missing; got {axes}")
    os.makedirs(workdir, exist_ok=True)
    note = (f"**Smoke run ({smoke})**: the numbers mean nothing." if smoke else None)
    if print_fn and note:
        print_fn(note)
    rows, timings = [], []
    variants = ablation.grid(axes["num_active_globals"], axes["seeds"], axes["learning_rates"])
    for data_config in axes["data_configs"]:
        cfg = apply_overrides(config, {"data.config": data_config})
        if print_fn:
            print_fn(f"== {cfg.data.name}/{data_config}: {len(variants)} variants in one program")
        t = time.perf_counter()
        result = ablation.train_variants(cfg, variants, print_fn=print_fn)
        timing = {"data_config": data_config, "K": len(variants), "steps": cfg.num_train_steps,
                  "compile_s": result.compile_s, "train_s": result.train_s,
                  "total_s": time.perf_counter() - t}
        if speedup_steps:
            timing.update(ablation.time_steps(cfg, variants, speedup_steps))
        timings.append(timing)
        for v, final in zip(result.variants, result.final):
            rows.append({"data_config": data_config, "num_active_globals": v.num_active_globals,
                         "seed": v.seed, "learning_rate": v.learning_rate,
                         "strategy": cfg.model.strategy.name, "capacity": result.spec.capacity,
                         "validation": headline(final, "validation"),
                         "test": headline(final, "test"), **final})
    out = {"smoke_run": bool(smoke), "smoke_config": smoke,
           "config": json.loads(config.to_json_best_effort()),
           "axes": {k: list(v) for k, v in axes.items()}, "rows": rows, "timings": timings}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(out, f, indent=2)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write((note + "\n\n" if note else "") + format_table(rows) + "\n\n"
                + format_timings(timings) + "\n")
    split = "test" if any(r["test"] is not None for r in rows) else "validation"
    plot(rows, os.path.join(workdir, "accuracy_vs_globals.png"), split)
    return out


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by (task size, lr, global count): the seeds of one setting."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["data_config"], r["learning_rate"], r["num_active_globals"]),
                       []).append(r)
    return out


def _pct(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    mean = 100 * sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ({', '.join(f'{100 * v:.1f}' for v in vals)})"


def format_table(rows: list[dict]) -> str:
    """Markdown: one line per (task size, lr, global count); mean over seeds (each seed)."""
    lines = ["| task size | lr | active globals | seeds | val acc % | test acc % | "
             "skipped steps | diverged |", "|---|---|---|---|---|---|---|---|"]
    for (data_config, lr, n), group in sorted(_groups(rows).items()):
        lines.append(
            f"| {data_config} | {lr:g} | {n} | {len(group)} | "
            f"{_pct([r['validation'] for r in group])} | {_pct([r['test'] for r in group])} | "
            f"{sum(r['nonfinite_steps'] for r in group)} | "
            f"{sum(r['diverged'] for r in group)} |")
    return "\n".join(lines)


def format_timings(timings: list[dict]) -> str:
    """Markdown: per task size, the program's times and (if measured) the comparison.

    "K runs, est. s" = K x (compile of one variant + steps x its s/step): what running the
    variants one after another would take, from the same-process measurement.
    """
    lines = ["| task size | K variants | steps | compile s | train s | one program, s/step | "
             "one variant, s/step | per-step speed-up | one program, s | K runs, est. s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in timings:
        if "speedup" in t:
            seq = t["K"] * (t["compile_single_s"] + t["steps"] * t["single_step_s"])
            sp = (f"{t['vmapped_step_s']:.3f} | {t['single_step_s']:.3f} | {t['speedup']:.2f}x | "
                  f"{t['compile_s'] + t['train_s']:.0f} | {seq:.0f}")
        else:
            sp = f"- | - | not measured | {t['compile_s'] + t['train_s']:.0f} | -"
        lines.append(f"| {t['data_config']} | {t['K']} | {t['steps']} | {t['compile_s']:.1f} | "
                     f"{t['train_s']:.1f} | {sp} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, split: str = "test") -> None:
    """Accuracy vs active global tokens, one line per (task size, lr), mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple, list[tuple[int, float]]] = {}
    for (data_config, lr, n), group in sorted(_groups(rows).items()):
        vals = [r[split] for r in group if r[split] is not None]
        if vals:
            lines.setdefault((data_config, lr), []).append((n, 100 * sum(vals) / len(vals)))
    lrs = {lr for _, lr in lines}
    fig, ax = plt.subplots(figsize=(6, 4))
    for (data_config, lr), pts in lines.items():
        xs, ys = zip(*sorted(pts))
        label = data_config if len(lrs) == 1 else f"{data_config}, lr {lr:g}"
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("active global tokens")
    ax.set_ylabel(f"{split} accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(title="task size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def config_axes(module, arg: str | None) -> list[dict[str, Any]]:
    """The config file's ``ablation(arg)`` as a list of axes dicts ([] if it has none).

    A config may return one dict or a list (e.g. one entry per task size, each with
    its own global counts); each entry is a separate grid.
    """
    fn = getattr(module, "ablation", None)
    if fn is None:
        return []
    specs = fn(arg)
    return [dict(specs)] if isinstance(specs, dict) else [dict(s) for s in specs]


def run_ablations(config, specs: Sequence[dict[str, Any]], workdir: str, *,
                  speedup_steps: int | None = None, smoke: str | None = None,
                  print_fn: Callable[[str], None] | None = print) -> dict[str, Any]:
    """:func:`run_ablation` for each axes dict (``workdir/partI`` when several).

    Each dict may carry its own ``speedup_steps`` (``speedup_steps`` overrides it).
    Returns ``{'rows', 'timings', 'axes': [per entry]}``, the entries' concatenated.
    """
    out: dict[str, Any] = {"smoke_run": bool(smoke), "smoke_config": smoke, "rows": [],
                           "timings": [], "axes": []}
    for i, spec in enumerate(specs):
        axes = dict(spec)
        steps = axes.pop("speedup_steps", 0) if speedup_steps is None else speedup_steps
        axes.pop("speedup_steps", None)
        part = run_ablation(config, axes, os.path.join(workdir, f"part{i}")
                            if len(specs) > 1 else workdir, speedup_steps=steps,
                            smoke=smoke, print_fn=print_fn)
        out["rows"] += part["rows"]
        out["timings"] += part["timings"]
        out["axes"].append(part["axes"])
    if len(specs) > 1:
        note = f"**Smoke run ({smoke})**: the numbers mean nothing.\n\n" if smoke else ""
        with open(os.path.join(workdir, "results.md"), "w") as f:
            f.write(note + format_table(out["rows"]) + "\n\n" + format_timings(out["timings"])
                    + "\n")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv if argv is None else argv)
    fv, config_flag = config_flag_values(argv, None, "Config file with an ablation().")
    workdir = flags.DEFINE_string("workdir", None, "Output directory.", flag_values=fv)
    axis_flags = [
        flags.DEFINE_list("num_active_globals", None, "Global counts, e.g. 0,4,16.",
                          flag_values=fv),
        flags.DEFINE_list("seeds", None, "Seeds, e.g. 0,1.", flag_values=fv),
        flags.DEFINE_list("learning_rates", None, "Peak learning rates, e.g. 1e-3,2e-3.",
                          flag_values=fv),
        flags.DEFINE_list("data_configs", None, "Task sizes (data.config names).", flag_values=fv)]
    speedup = flags.DEFINE_integer("speedup_steps", None, "Steps to time vmapped vs one variant "
                                   "(default: the config's ablation(); 0 = skip).", flag_values=fv)
    parse_flags(argv, required=("config", "workdir"), usage=__doc__, flag_values=fv)
    path, _, arg = config_flags.get_config_filename(fv["config"]).partition(":")
    specs = config_axes(load_config_module(path), arg or None) or [{}]
    parse = {"num_active_globals": int, "seeds": int, "learning_rates": float,
             "data_configs": str}
    for name, flag in zip(AXES, axis_flags):
        if flag.value is not None:
            try:
                values = [parse[name](x) for x in flag.value]
            except ValueError:
                print(f"error: --{name}={','.join(flag.value)}: not a list of "
                      f"{parse[name].__name__}", file=sys.stderr)
                sys.exit(2)
            for axes in specs:
                axes[name] = values
    out = run_ablations(config_flag.value, specs, workdir.value, speedup_steps=speedup.value,
                        smoke=f"{path}:{arg}" if arg in ("quick", "test") else None)
    with open(os.path.join(workdir.value, "results.md")) as f:
        print(f.read())
    return out


if __name__ == "__main__":
    main()
