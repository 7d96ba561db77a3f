"""The one renderer: ``results/NAME.json`` -> ``NAME.md`` (+ its figures).

    python -m experiments.render results/listops.json      # rewrites results/listops.md, .png

A table's JSON (written by ``experiments.reproduce``) holds what was measured:

* ``title``, ``command``, ``quick``, ``runtime_s``;
* ``values``: numbers (and names) the report's prose refers to;
* ``tables``: ``{name: {"columns": [[header, fmt], ...], "rows": [[value, ...], ...]}}``;
* ``figures``: ``[{"file": "NAME.png", "kind": "bars" | "scatter" | "lines" | "heatmap",
  ...}]`` (or ``"panels": [spec, ...]`` side by side);
* ``template``: the report body, written once by a person in the table's config
  file (``configs/NAME.py``: ``REPORT``). It is a ``str.format`` template over
  ``v`` (values), ``c`` (the config as a dict) and ``tables`` (rendered markdown):
  ``{v[test][cls_global]:.1f}``, ``{tables[results]}``.

Cell formats (``fmt``): ``""`` as text (None -> "-"), any format spec
(``",.0f"``, ``".4f"``), ``"pct"`` (a fraction or a list of per-seed fractions as
percent: ``"50.0 (25.0 / 75.0)"``), ``"pct2"`` (percent with 2 decimals and a %
sign), ``"hop"`` (None -> ∞).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

__all__ = ["cell", "markdown_table", "pct", "plot", "render", "render_file"]


def pct(x: Any) -> str:
    """A fraction, or per-seed fractions, as percent: mean (each seed) when several."""
    vals = [x] if np.isscalar(x) or x is None else list(x)
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    mean = f"{100 * float(np.mean(vals)):.1f}"
    return mean if len(vals) == 1 else f"{mean} ({' / '.join(f'{100 * v:.1f}' for v in vals)})"


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
               label=spec.get("label"))
        ax.set_xticks(range(len(spec["labels"])), spec["labels"], rotation=30, ha="right",
                      fontsize=8)
    elif kind == "scatter":
        for x, y, label in zip(spec["x"], spec["y"], spec["labels"]):
            ax.scatter(x, y)
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    elif kind == "lines":
        for s in spec["series"]:
            y = [np.nan if v is None else v for v in s["y"]]
            ax.plot(s.get("x", range(len(y))), y, s.get("style", "o-"), label=s["label"],
                    ms=s.get("ms", 4), lw=s.get("lw", 1.5),
                    drawstyle=s.get("drawstyle", "default"))
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


def _header(result: dict[str, Any]) -> list[str]:
    minutes = result["runtime_s"] / 60
    head = [f"# {result['title']}", "",
            f"Produced by `{result['command']}` in "
            + (f"{minutes:.1f} min" if minutes >= 1 else f"{result['runtime_s']:.1f} s")
            + " on a 2-core CPU shared with other jobs (per-run times include compilation); "
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


def render_file(json_path: str) -> str:
    """Renders a table's JSON next to it."""
    with open(json_path) as f:
        result = json.load(f)
    return render(result, os.path.dirname(os.path.abspath(json_path)))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.render", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", help="results/NAME.json files")
    args = parser.parse_args(argv)
    for path in args.json:
        if not os.path.isfile(path):
            parser.error(f"{path}: no such file")
        render_file(path)
        print(f"wrote {os.path.splitext(path)[0]}.md")


if __name__ == "__main__":
    main(sys.argv[1:])
