"""experiments/render.py: the one renderer of results JSON, and every table's template."""
import json
import os
import time

import numpy as np
import pytest

from experiments import render, reproduce
from globalattn.train.config import load_config_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLES = ("seed_hops", "seed_savings", "seed_16token", "seed_connectivity", "long_range",
          "global_count", "strategies", "listops", "sinks")


def test_cells_and_tables():
    assert render.pct([0.25, 0.75]) == "50.0 ± 317.7 (25.0 / 75.0)" and render.pct(0.5) == "50.0"
    assert render.pct([None]) == "-"
    assert render.cell(None, "hop") == "∞" and render.cell(3, "hop") == "3"
    assert render.cell(0.12345, "pct2") == "12.35%" and render.cell(1234.5, ",.0f") == "1,234"
    assert render.cell(None, ".2f") == "-" and render.cell("8 of 9", ".2f") == "8 of 9"
    md = render.markdown_table({"columns": [["name", ""], ["acc %", "pct"]],
                                "rows": [["a", [0.5, 0.7]], ["b", 0.25]]})
    assert md.splitlines() == ["| name | acc % |", "|---|---:|", "| a | 60.0 ± 127.1 (50.0 / 70.0) |",
                               "| b | 25.0 |"]
    with pytest.raises(ValueError, match="2 cells for 1 columns"):
        render.markdown_table({"columns": [["x", ""]], "rows": [[1, 2]]})


def _result(quick: bool) -> dict:
    return {"name": "demo", "title": "Demo", "command": "python -m experiments.reproduce demo",
            "quick": quick, "runtime_s": 90.0, "config": {"model": {"window": 4}},
            "values": {"acc": {"a": 61.25}},
            "template": "Window {c[model][window]}; a {v[acc][a]:.1f}%, b {v[acc][b]:.1f}%.\n\n"
                        "{tables[results]}\n",
            "tables": {"results": {"columns": [["name", ""]], "rows": [["a"]]}},
            "figures": [
                {"file": "demo.png", "kind": "bars", "labels": ["a", "b"], "values": [1, 2],
                 "hlines": [{"label": "chance", "y": 1.5}]},
                {"file": "demo_panels.png", "panels": [
                    {"kind": "lines", "series": [{"label": "s", "y": [1, None, 3]}]},
                    {"kind": "scatter", "x": [0.1, 1], "y": [2, 3], "labels": ["p", "q"],
                     "logx": True},
                    {"kind": "heatmap", "matrix": [[1, None], [0.5, 0.2]], "annotate": True}]}]}


@pytest.mark.parametrize("quick", [False, True])
def test_render_writes_markdown_and_figures(tmp_path, quick):
    path = tmp_path / "demo.json"
    path.write_text(json.dumps(_result(quick)))
    md = render.render_file(str(path))
    assert md == (tmp_path / "demo.md").read_text()
    assert md.startswith("# Demo\n\nProduced by `python -m experiments.reproduce demo` in 1.5 min")
    # A value this run did not measure renders as n/a, never as a guess.
    assert "Window 4; a 61.2%, b n/a%." in md and "| name |\n|---|\n| a |" in md
    assert ("Smoke run (`--quick`)" in md) == quick
    for name in ("demo.png", "demo_panels.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "on a 2-core CPU shared with other jobs" in md  # no load recorded: assume shared


@pytest.mark.parametrize("share,text", [(0.01, "alone (other processes used 1% of its CPU"),
                                        (0.3, "shared (other processes used 30% of its CPU")])
def test_header_states_how_busy_the_machine_was(tmp_path, share, text):
    result = dict(_result(False), host={"cpus": 2, "own_cpu_s": 150.0,
                                        "others_cpu_s": share * 180, "others_share": share})
    path = tmp_path / "demo.json"
    path.write_text(json.dumps(result))
    assert f"in 1.5 min on a 2-core CPU, {text} time meanwhile)" in render.render_file(str(path))


def test_host_load_counts_this_process_and_not_others():
    start = reproduce._cpu_counters()
    t0, c0 = time.perf_counter(), time.process_time()
    # Busy until this process has used 0.5 s of CPU (not of wall time: on a loaded machine
    # half a second of wall time may hold much less of it).
    while time.process_time() - c0 < 0.5:
        pass
    host = reproduce.host_load(start, time.perf_counter() - t0)
    assert host["own_cpu_s"] >= 0.4 and host["cpus"] == os.cpu_count()
    assert 0.0 <= host["others_share"] <= 1.0


def test_render_cli_rejects_a_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        render.main([str(tmp_path / "nope.json")])
    assert info.value.code == 2 and "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("name", TABLES)
def test_every_table_is_a_config_with_a_template(name):
    """configs/NAME.py: get_config + sweep/ablation, MEASURE, TITLE, a REPORT that renders."""
    module = load_config_module(os.path.join(ROOT, "configs", f"{name}.py"))
    assert module.MEASURE in reproduce.RUNNERS
    assert f"python -m experiments.reproduce {name}" in module.__doc__
    assert callable(getattr(module, "sweep", None) or getattr(module, "ablation", None))
    config = json.loads(module.get_config().to_json_best_effort())
    body = module.REPORT.format(v=render._tolerant({}), c=render._tolerant(config),
                                tables=render._Tolerant())
    assert body.strip() and "{v[" not in body and "{tables[" not in body
    assert name in reproduce.table_names()


def test_reproduce_lists_every_table_and_rejects_bad_paths(tmp_path, capsys):
    assert set(TABLES) == set(reproduce.table_names())
    afile = tmp_path / "file"
    afile.write_text("")
    for argv, message in (([], "unknown table None"), (["nope"], "unknown table 'nope'"),
                          (["seed_hops", f"--workdir={afile}"], "is a file"),
                          (["seed_hops", f"--out={afile}"], "is a file")):
        with pytest.raises(SystemExit) as info:
            reproduce.main(argv)
        assert info.value.code == 2
        assert message in capsys.readouterr().err


def test_intervals_are_student_t_and_welch():
    mean, half = render.interval([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2) = 4.303
    assert mean == 2.0 and abs(half - 4.3027 / 3 ** 0.5) < 1e-3
    assert np.isnan(render.interval([5.0])[1]) and np.isnan(render.interval([])[0])
    same = render.difference([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])
    assert same["diff"] == -0.5 and same["noise"] is True
    apart = render.difference([10.0, 11.0, 12.0], [1.0, 2.0, 3.0])
    # Welch with equal variances and sizes: se = sqrt(2/3), df = 4, t = 2.776.
    assert apart["diff"] == 9.0 and apart["noise"] is False
    assert abs(apart["half_width"] - 2.7764 * (2 / 3) ** 0.5) < 1e-3
    assert render.difference([100.0] * 3, [100.0] * 3) == {"diff": 0.0, "half_width": 0.0,
                                                          "noise": True}
    assert render.difference([1.0], [2.0])["noise"] is None  # one seed: no interval
