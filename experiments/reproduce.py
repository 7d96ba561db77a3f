"""Reproduce a results table: ``python -m experiments.reproduce NAME [--quick] [--out=results]``.

    python -m experiments.reproduce --list
    python -m experiments.reproduce seed_hops --out=results   # rewrite results/seed_hops.*
    python -m experiments.reproduce listops --quick           # smoke run, in the workdir

A table is a config file, ``configs/NAME.py``: ``get_config(arg)`` plus a
``sweep()`` (or ``ablation()``), ``MEASURE`` (what to run: ``train_sweep``,
``ablation``, ``lm_streaming`` or a seed-article measurement), and ``REPORT``,
the prose template. This command runs the sweep (``arg = 'quick'`` with
``--quick``), writes every measured number to ``NAME.json`` and renders it
(:mod:`experiments.render`) to ``NAME.md`` and its figure.

Runs train in ``--workdir`` (default ``/tmp/globalattn_reproduce/NAME[_quick]``);
the JSON and report go there too unless ``--out`` names another directory:
committed results are written only with ``--out=results``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from typing import Any, Callable

import globalattn  # noqa: F401  (the XLA workaround before any array exists)
from experiments import global_count, render, seed_tables, sinks
from globalattn import data as data_lib
from globalattn import measure
from globalattn.train.config import (apply_overrides, call_sweep, load_config_module,
                                     sweep_configs, validate_config)
from globalattn.train.loop import train_and_evaluate
from globalattn.train.trained import load_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def _task_values(config) -> dict[str, Any]:
    task = data_lib.resolve_config(config.data.name, config.data.config)
    out = {k: v for k, v in task.params().items() if isinstance(v, (int, float, str, bool))}
    meta = task.metadata()
    out.update(name=task.name, seq_len=validate_config(config).seq_len,
               num_classes=meta.num_classes)
    if meta.num_classes:
        p = 1 / meta.num_classes
        out["chance"] = 100 * p
        if "num_test" in out:  # standard error (points) of a chance-level test accuracy
            out["chance_se"] = 100 * (p * (1 - p) / out["num_test"]) ** 0.5
    return out


def table_values(module, config) -> dict[str, Any]:
    """What a training table's prose quotes besides its rows: the task, the config's EXTRA."""
    values: dict[str, Any] = {"task": _task_values(config)}
    for extra in getattr(module, "EXTRA", ()):
        values[extra] = EXTRAS[extra](config)
    if "majority" in values:  # the prose and figure quote it in percent
        for split in ("validation", "test"):
            values[f"majority_{split}_pct"] = 100 * values["majority"][split]
    return values


def train_sweep(module, arg: str | None, *, workdir: str, data_dir: str | None
                ) -> dict[str, Any]:
    """Trains every sweep entry from scratch; one row per variant (seeds grouped).

    A sweep entry named ``VARIANT/seedK`` is seed K of row VARIANT; the module's
    ``LABELS`` give each row's description and the published row it mirrors.
    """
    config = module.get_config(arg)
    if data_dir is not None:
        config = apply_overrides(config, {"data.data_dir": data_dir})
    runs = sweep_configs(config, call_sweep(module, arg))
    for _, cfg in runs:
        validate_config(cfg)  # every row checked before the first one trains
    t0 = time.perf_counter()
    fresh = not data_lib.get_builder(config.data.name, config.data.config,
                                     config.data.data_dir).is_prepared()
    data_lib.prepare(config.data.name, config.data.config, config.data.data_dir)
    values = {"data_s": time.perf_counter() - t0, "data_fresh": fresh,
              **table_values(module, config)}
    rows: dict[str, dict[str, Any]] = {}
    for name, cfg in runs:
        variant = name.split("/")[0]
        print(f"\n=== {name} ===", flush=True)
        wd = os.path.join(workdir, name)
        shutil.rmtree(wd, ignore_errors=True)  # from scratch: the wall time is the run's
        result = train_and_evaluate(cfg, wd)
        if result["preempted"]:  # a partial table would mislead: stop, rerun later
            raise RuntimeError(f"{name} was preempted at step {result['step']}; rerun the "
                               "command (rows restart)")
        if variant not in rows:
            spec = validate_config(cfg)
            m = spec.model_config
            pairs, dens = measure.density(cfg, measure.padding_masks(cfg))
            label, mirrors = module.LABELS[variant]
            active = cfg.num_active_globals
            rows[variant] = {
                "variant": variant, "label": label.format(c=cfg, seq_len=spec.seq_len),
                "mirrors": mirrors, "layers": m.num_layers if m.arch == "encoder" else None,
                "capacity": spec.capacity,
                "active_globals": spec.capacity if active is None else active,
                "pairs": pairs, "density": dens, "params": measure.count_params(cfg),
                "seeds": [], "validation": [], "test": [], "steps": result["step"],
                "wall_time_s": []}
        r = rows[variant]
        r["seeds"].append(cfg.seed)
        for split in ("validation", "test"):
            r[split].append(result.get(f"{split}/accuracy"))
        r["wall_time_s"].append(result["wall_time_s"])
        if getattr(module, "BEYOND_REACH", False):  # does the model use what a window misses?
            reach = cfg.model.num_layers * cfg.model.window  # what window only's CLS sees
            probe = measure.beyond_reach_accuracy(cfg, load_run(wd)[2], reach=reach)
            print(f"{name}: test accuracy {probe['accuracy']:.4f}, with every token beyond "
                  f"position {reach} noised {probe['accuracy_noised']:.4f} "
                  f"({probe['changed']:.1%} of predictions changed)", flush=True)
            r.setdefault("reach", reach)
            r.setdefault("test_noised", []).append(probe["accuracy_noised"])
            r.setdefault("changed", []).append(probe["changed"])
    return sweep_result(module, list(rows.values()), values)


def sweep_result(module, rows_list: list[dict], values: dict[str, Any]) -> dict[str, Any]:
    """The table JSON of a trained sweep: its rows, per-row values, results table, figure."""
    values["test"] = {r["variant"]: 100 * _mean(r["test"]) for r in rows_list}
    values["test_ci"] = {r["variant"]: 100 * render.interval(r["test"])[1] for r in rows_list}
    values["validation"] = {r["variant"]: 100 * _mean(r["validation"]) for r in rows_list}
    values["compare"] = compare(module, {r["variant"]: r["test"] for r in rows_list})
    values["params"] = {r["variant"]: r["params"] for r in rows_list}
    values["density"] = {r["variant"]: r["density"] for r in rows_list}
    values["num_rows"] = len(rows_list)
    values["num_seeds"] = len(rows_list[0]["seeds"])
    columns = [["variant", ""], ["what", ""], ["L", ""], ["G", ""], ["pairs / forward", ",.0f"],
               ["density", ".4f"], ["params", ","], ["val acc %", "pct"], ["test acc %", "pct"],
               ["steps", ""], ["time s / run", ".0f"], ["published row it mirrors", ""]]
    table = {"columns": columns, "align": "llrrrrrrrrrl", "rows": [
        [r["variant"], r["label"], r["layers"],
         str(r["capacity"]) if r["active_globals"] == r["capacity"]
         else f"{r['active_globals']} of {r['capacity']}", r["pairs"], r["density"],
         r["params"], r["validation"], r["test"], r["steps"], _mean(r["wall_time_s"]),
         r["mirrors"]] for r in rows_list]}
    tables = {"results": table}
    if all("test_noised" in r for r in rows_list):
        values["test_noised"] = {r["variant"]: 100 * _mean(r["test_noised"]) for r in rows_list}
        values["changed"] = {r["variant"]: 100 * _mean(r["changed"]) for r in rows_list}
        values["reach"] = rows_list[0]["reach"]
        values["noise_drop"] = {r["variant"]: dict(render.difference(
            [100 * x for x in r["test"]], [100 * x for x in r["test_noised"]]))
            for r in rows_list}
        tables["beyond_reach"] = {
            "columns": [["variant", ""], ["test acc %", "pct"],
                        [f"tokens beyond {values['reach']} noised: test acc %", "pct"],
                        ["predictions changed %", "pct"]],
            "rows": [[r["variant"], r["test"], r["test_noised"], r["changed"]]
                     for r in rows_list]}
    return {"values": values, "rows": rows_list, "tables": tables,
            "figures": [_figure(module, rows_list, values)]}


def compare(module, test: dict[str, list]) -> dict[str, dict[str, Any]]:
    """The config's ``COMPARE`` pairs ``(a, b)``: test accuracy difference a - b in points
    with its 95% interval, and ``text`` saying whether it is within noise."""
    out = {}
    for a, b in getattr(module, "COMPARE", ()):
        if a not in test or b not in test:
            continue
        d = render.difference([100 * x for x in test[a] if x is not None],
                              [100 * x for x in test[b] if x is not None])
        out[f"{a}_vs_{b}"] = dict(d, text=render.describe(d))
    return out


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return float(sum(xs) / len(xs)) if xs else float("nan")


def _figure(module, rows: list[dict], values: dict) -> dict[str, Any]:
    """The config's ``FIGURE`` (kind, reference lines) filled with the rows' test accuracy."""
    spec = dict(module.FIGURE)
    acc = [100 * _mean(r["test"]) for r in rows]
    spec["yerr"] = [100 * render.interval(r["test"])[1] for r in rows]
    hlines = [dict(h, y=h["y"] if isinstance(h["y"], (int, float)) else _lookup(values, h["y"]))
              for h in spec.get("hlines", [])]
    spec.update(hlines=hlines, ylabel="test accuracy % (mean, 95% interval)",
                ylim=[0, 118 if max(acc + [h["y"] for h in hlines]) > 60 else 60])
    if spec["kind"] == "scatter":
        spec.update(x=[r["density"] for r in rows], y=acc, labels=[r["variant"] for r in rows])
    else:
        spec.update(labels=[r["variant"] for r in rows], values=acc, label="ours (test)")
    return spec


def _lookup(values: dict, path: str) -> float:
    node: Any = values
    for part in path.split("."):
        node = node[part]
    return float(node)


EXTRAS: dict[str, Callable[..., Any]] = {
    "majority": measure.majority_baseline,
    "train_length": lambda c: float(measure.padding_masks(c, "train").sum(-1).mean())
    - int(bool(c.data.prepend_cls)),
}
RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "train_sweep": train_sweep,
    "ablation": global_count.measure,
    "lm_streaming": sinks.measure,
    **seed_tables.MEASUREMENTS,
}


def table_names() -> list[str]:
    """Config files that define a results table (a ``MEASURE``)."""
    names = []
    for f in sorted(os.listdir(CONFIGS)):
        if f.endswith(".py") and not f.startswith("_"):
            with open(os.path.join(CONFIGS, f)) as fh:
                if "\nMEASURE = " in fh.read():
                    names.append(f[:-3])
    return names


def _cpu_counters() -> tuple[float, float] | None:
    """(CPU seconds the whole machine was busy, CPU seconds of this process and its
    waited-for children) since boot / start; None where /proc/stat is absent."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is in user
    own = sum(getattr(resource.getrusage(who), field) for who in
              (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) for field in ("ru_utime", "ru_stime"))
    return busy, own


def host_load(start: tuple[float, float] | None, wall_s: float) -> dict[str, Any] | None:
    """How much of the machine other processes used while a table ran.

    ``others_share`` = (busy CPU seconds of the machine - this process's) / (cores x
    wall time): 0 means the table had the machine to itself, so its time is its own.
    """
    end = _cpu_counters()
    if start is None or end is None or wall_s <= 0:
        return None
    cpus = os.cpu_count() or 1
    others = max(0.0, (end[0] - start[0]) - (end[1] - start[1]))
    return {"cpus": cpus, "own_cpu_s": end[1] - start[1], "others_cpu_s": others,
            "others_share": others / (cpus * wall_s)}


def run(name: str, *, quick: bool = False, workdir: str | None = None, out: str | None = None,
        data_dir: str | None = None) -> dict[str, Any]:
    """Runs table ``name``; writes ``<out>/<name>.json`` and renders it. Returns the JSON."""
    start, counters = time.perf_counter(), _cpu_counters()
    module = load_config_module(os.path.join(CONFIGS, f"{name}.py"))
    workdir = workdir or os.path.join("/tmp/globalattn_reproduce", name + ("_quick" if quick
                                                                            else ""))
    out = out or workdir
    os.makedirs(workdir, exist_ok=True)
    arg = "quick" if quick else None
    result = RUNNERS[module.MEASURE](module, arg, workdir=workdir, data_dir=data_dir)
    flags = (" --quick" if quick else "") + (f" --data_dir={data_dir}" if data_dir else "") + (
        " --out=results" if os.path.abspath(out) == os.path.join(ROOT, "results") else "")
    runtime = time.perf_counter() - start
    result.update(name=name, title=module.TITLE, quick=quick, template=module.REPORT,
                  command=f"python -m experiments.reproduce {name}{flags}",
                  runtime_s=runtime, host=host_load(counters, runtime),
                  config=json.loads(module.get_config(arg).to_json_best_effort()))
    for i, fig in enumerate(result.get("figures", [])):
        fig.setdefault("file", f"{name}.png" if i == 0 else f"{name}_{i}.png")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    md = render.render_file(path)
    print("\n" + md + f"\nwrote {path} and {name}.md", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m experiments.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="a table (see --list)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of the table's pipeline (tiny setting)")
    parser.add_argument("--workdir", default=None,
                        help="where runs train; default /tmp/globalattn_reproduce/NAME[_quick]")
    parser.add_argument("--out", default=None,
                        help="where NAME.json / .md / figures go; default the workdir "
                        "(--out=results rewrites the committed table)")
    parser.add_argument("--data_dir", default=None,
                        help="TFDS data dir; default $TFDS_DATA_DIR or ~/tensorflow_datasets")
    parser.add_argument("--list", action="store_true", help="list the tables and exit")
    args = parser.parse_args(argv)
    names = table_names()
    if args.list:
        print("\n".join(names))
        return {}
    if args.name not in names:
        parser.error(f"unknown table {args.name!r}; choose from {names}")
    out = args.out
    if out is not None and not os.path.isabs(out):
        out = os.path.join(os.getcwd(), out)
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"--out={args.out} is a file, not a directory")
    if args.workdir is not None and os.path.exists(args.workdir) \
            and not os.path.isdir(args.workdir):
        parser.error(f"--workdir={args.workdir} is a file, not a directory")
    return run(args.name, quick=args.quick, workdir=args.workdir, out=out,
               data_dir=args.data_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
