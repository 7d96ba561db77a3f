"""The one renderer: ``results/NAME.json`` -> ``NAME.md`` (+ its figures).

    python -m experiments.render results/listops.json      # rewrites results/listops.md, .png

A table's JSON (written by ``experiments.reproduce``) holds what was measured:

* ``title``, ``command``, ``quick``, ``runtime_s``, ``host`` (optional: cores and the
  share of their time other processes used during the run);
* ``values``: numbers (and names) the report's prose refers to;
* ``tables``: ``{name: {"columns": [[header, fmt], ...], "rows": [[value, ...], ...]}}``;
* ``figures``: ``[{"file": "NAME.png", "kind": "bars" | "scatter" | "lines" | "heatmap",
  ...}]`` (or ``"panels": [spec, ...]`` side by side);
* ``template``: the report body, written once by a person in the table's config
  file (``configs/NAME.py``: ``REPORT``). It is a ``str.format`` template over
  ``v`` (values), ``c`` (the config as a dict) and ``tables`` (rendered markdown):
  ``{v[test][cls_global]:.1f}``, ``{tables[results]}``.

Cell formats (``fmt``): ``""`` as text (None -> "-"), any format spec
(``",.0f"``, ``".4f"``), ``"pct"`` (a fraction, or a list of per-seed fractions as
percent with the mean's 95% interval and each seed: ``"50.0 ± 31.8 (25.0 / 75.0)"``),
``"pct2"`` (percent with 2 decimals and a % sign), ``"hop"`` (None -> ∞).

Intervals (:func:`interval`, :func:`difference`) are Student-t 95% intervals of a
mean over seeds (Welch's for a difference of two means): with 3 seeds the
half-width is 2.48 standard deviations, so they are wide by design.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

__all__ = ["cell", "describe", "difference", "interval", "markdown_table", "pct", "plot", "render",
           "render_file"]


def _values(x: Any) -> list[float]:
    vals = [x] if np.isscalar(x) or x is None else list(x)
    return [float(v) for v in vals if v is not None]


def interval(x: Any) -> tuple[float, float]:
    """``(mean, half-width)`` of the 95% Student-t interval of the mean of ``x``.

    One value (or none) has no interval: half-width NaN.
    """
    vals = _values(x)
    if not vals:
        return float("nan"), float("nan")
    if len(vals) == 1:
        return vals[0], float("nan")
    from scipy import stats

    n = len(vals)
    sem = float(np.std(vals, ddof=1)) / n ** 0.5
    return float(np.mean(vals)), float(stats.t.ppf(0.975, n - 1)) * sem


def difference(a: Any, b: Any) -> dict[str, Any]:
    """Mean(a) - mean(b) with its 95% Welch interval; ``noise``: whether it covers 0."""
    va, vb = _values(a), _values(b)
    diff = float(np.mean(va) - np.mean(vb))
    if len(va) < 2 or len(vb) < 2:
        return {"diff": diff, "half_width": float("nan"), "noise": None}
    from scipy import stats

    sa, sb = np.var(va, ddof=1) / len(va), np.var(vb, ddof=1) / len(vb)
    se = float(np.sqrt(sa + sb))
    if se == 0.0:
        return {"diff": diff, "half_width": 0.0, "noise": diff == 0.0}
    df = (sa + sb) ** 2 / (sa ** 2 / (len(va) - 1) + sb ** 2 / (len(vb) - 1))
    hw = float(stats.t.ppf(0.975, df)) * se
    return {"diff": diff, "half_width": hw, "noise": bool(abs(diff) <= hw)}


def describe(d: dict[str, Any], unit: str = "points") -> str:
    """A :func:`difference` in words: ``"+5.2 ± 1.1 points, outside noise"``."""
    if d["noise"] is None:
        return f"{d['diff']:+.1f} {unit} (one seed: no interval)"
    return (f"{d['diff']:+.1f} ± {d['half_width']:.1f} {unit}, "
            + ("within noise (the 95% interval covers 0)" if d["noise"] else "outside noise"))


def pct(x: Any) -> str:
    """A fraction, or per-seed fractions, as percent: mean ± 95% interval (each seed)."""
    vals = _values(x)
    if not vals:
        return "-"
    mean, hw = interval(vals)
    if len(vals) == 1:
        return f"{100 * mean:.1f}"
    return (f"{100 * mean:.1f} ± {100 * hw:.1f} "
            f"({' / '.join(f'{100 * v:.1f}' for v in vals)})")


def cell(value: Any, fmt: str) -> str:
    if fmt == "pct":
        return pct(value)
    if fmt == "hop":
        return "∞" if value is None else str(value)
    if value is None:
        return "-"
    if fmt == "" or isinstance(value, str):
        return str(value)
    if fmt == "pct2":
        return f"{100 * float(value):.2f}%"
    return format(value, fmt)


def markdown_table(table: dict[str, Any]) -> str:
    """``{"columns": [[header, fmt], ...], "rows": [...]}`` -> markdown (first column left)."""
    cols = table["columns"]
    align = table.get("align") or ("l" + "r" * (len(cols) - 1))
    seps = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "|".join(seps) + "|"]
    for row in table["rows"]:
        if len(row) != len(cols):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(cols)} columns")
        lines.append("| " + " | ".join(cell(v, f) for v, (_, f) in zip(row, cols)) + " |")
    return "\n".join(lines)


def _axes(ax, spec: dict[str, Any]) -> None:
    kind = spec["kind"]
    if kind == "bars":
        ax.bar(range(len(spec["labels"])), spec["values"], color="tab:blue",
               label=spec.get("label"), yerr=_yerr(spec), capsize=3)
        ax.set_xticks(range(len(spec["labels"])), spec["labels"], rotation=30, ha="right",
                      fontsize=8)
    elif kind == "scatter":
        yerr = _yerr(spec)
        for i, (x, y, label) in enumerate(zip(spec["x"], spec["y"], spec["labels"])):
            ax.errorbar(x, y, yerr=None if yerr is None else yerr[i], fmt="o", capsize=3)
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3 if i % 2 == 0 else -10),
                        textcoords="offset points")  # neighbours alternate above / below
    elif kind == "lines":
        for s in spec["series"]:
            y = [np.nan if v is None else v for v in s["y"]]
            x = s.get("x", range(len(y)))
            line, = ax.plot(x, y, s.get("style", "o-"), label=s["label"],
                            ms=s.get("ms", 4), lw=s.get("lw", 1.5),
                            drawstyle=s.get("drawstyle", "default"))
            if s.get("yerr") is not None:
                err = [np.nan if e is None else e for e in s["yerr"]]
                ax.errorbar(x, y, yerr=err, fmt="none", capsize=3, color=line.get_color())
    elif kind == "heatmap":
        m = np.array([[np.nan if v is None else v for v in r] for r in spec["matrix"]], float)
        im = ax.imshow(m, cmap=spec.get("cmap", "viridis"))
        if spec.get("annotate"):
            for (i, j), v in np.ndenumerate(m):
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.2f}".lstrip("0"), ha="center", va="center", fontsize=5,
                            color="white" if v < 0.5 * np.nanmax(m) else "black")
        ax.figure.colorbar(im, ax=ax, fraction=0.046)
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
    else:
        raise ValueError(f"unknown figure kind {kind!r}")
    for i, h in enumerate(spec.get("hlines", [])):
        ax.axhline(h["y"], ls=h.get("style", "--"), lw=1, color=h.get("color", f"C{i + 1}"),
                   label=h.get("label"))
    if spec.get("xticks"):
        ax.set_xticks(range(len(spec["xticks"])), spec["xticks"])
    if spec.get("logx"):
        ax.set_xscale("log")
    if spec.get("logy"):
        ax.set_yscale("log")
    if spec.get("ylim"):
        ax.set_ylim(*spec["ylim"])
    ax.set_xlabel(spec.get("xlabel", ""))
    ax.set_ylabel(spec.get("ylabel", ""))
    if spec.get("title"):
        ax.set_title(spec["title"], fontsize=9)
    if kind != "heatmap" and (spec.get("hlines") or kind == "lines" or spec.get("label")):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)


def _yerr(spec: dict[str, Any]) -> list[float] | None:
    """The spec's ``yerr`` (95% half-widths; None / NaN -> no bar), or None."""
    if spec.get("yerr") is None:
        return None
    return [0.0 if e is None or not np.isfinite(e) else e for e in spec["yerr"]]


def plot(spec: dict[str, Any], path: str) -> None:
    """One figure (or ``panels`` side by side) from its JSON spec."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = spec.get("panels", [spec])
    fig, axes = plt.subplots(1, len(panels), figsize=tuple(spec.get("size", (7.5, 4.4))),
                             squeeze=False)
    for ax, p in zip(axes[0], panels):
        _axes(ax, p)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _machine(host: dict[str, Any] | None) -> str:
    """Where the time was measured: the cores, and how busy other processes kept them."""
    if not host:  # results written before the load was recorded
        return " on a 2-core CPU shared with other jobs"
    share = host["others_share"]
    return (f" on a {host['cpus']}-core CPU, " + ("alone (other processes used "
            if share < 0.05 else "shared (other processes used ")
            + f"{100 * share:.0f}% of its CPU time meanwhile)")


def _header(result: dict[str, Any]) -> list[str]:
    minutes = result["runtime_s"] / 60
    head = [f"# {result['title']}", "",
            f"Produced by `{result['command']}` in "
            + (f"{minutes:.1f} min" if minutes >= 1 else f"{result['runtime_s']:.1f} s")
            + _machine(result.get("host")) + " (per-run times include compilation); "
            f"measurements in `{result['name']}.json`, rendered by `experiments.render`.", ""]
    if result["quick"]:
        head += ["**Smoke run (`--quick`)**: a tiny setting that only checks the pipeline; its "
                 "numbers back no claim. The prose below was written for the full run, whose "
                 "report is committed in `results/`.", ""]
    return head


class _Missing:
    """A value the template names but this run did not measure (e.g. a row a quick run
    skips): renders as "n/a" whatever the format spec."""

    def __getitem__(self, key: Any) -> "_Missing":
        return self

    def __format__(self, spec: str) -> str:
        return "n/a"


class _Tolerant(dict):
    def __missing__(self, key: Any) -> _Missing:
        return _Missing()


def _tolerant(x: Any) -> Any:
    if isinstance(x, dict):
        return _Tolerant({k: _tolerant(v) for k, v in x.items()})
    return x


def render(result: dict[str, Any], out_dir: str) -> str:
    """Writes ``<out_dir>/<name>.md`` and its figures; returns the markdown."""
    tables = _Tolerant({k: markdown_table(t) for k, t in result.get("tables", {}).items()})
    body = result["template"].strip("\n").format(v=_tolerant(result.get("values", {})),
                                                c=_tolerant(result.get("config", {})),
                                                tables=tables)
    md = "\n".join(_header(result)) + "\n" + body + "\n"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{result['name']}.md"), "w") as f:
        f.write(md)
    for fig in result.get("figures", []):
        plot(fig, os.path.join(out_dir, fig["file"]))
    return md


def retemplate(json_path: str) -> None:
    """Replaces the report template stored in a table's JSON with its config's ``REPORT``."""
    from globalattn.train.config import load_config_module

    with open(json_path) as f:
        result = json.load(f)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    module = load_config_module(os.path.join(root, "configs", f"{result['name']}.py"))
    result["template"] = module.REPORT
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=str)


def render_file(json_path: str) -> str:
    """Renders a table's JSON next to it."""
    with open(json_path) as f:
        result = json.load(f)
    return render(result, os.path.dirname(os.path.abspath(json_path)))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.render", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", help="results/NAME.json files")
    parser.add_argument("--retemplate", action="store_true",
                        help="first replace each JSON's report template with the current "
                        "REPORT of configs/NAME.py (prose edited after the run; the "
                        "measurements are untouched)")
    args = parser.parse_args(argv)
    for path in args.json:
        if not os.path.isfile(path):
            parser.error(f"{path}: no such file")
        if args.retemplate:
            retemplate(path)
        render_file(path)
        print(f"wrote {os.path.splitext(path)[0]}.md")


if __name__ == "__main__":
    main(sys.argv[1:])
