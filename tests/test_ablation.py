"""One vmapped program trains K variants exactly like K separate runs.

The reference is the library's ordinary training loop
(:func:`globalattn.train.train_and_evaluate`) run once per variant with the
config :func:`ablation.variant_config` describes; the vmapped program must give
the same per-step losses and gradient norms and the same final evaluation.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from globalattn.train import ablation, apply_overrides, load_config, train_and_evaluate
from globalattn.train.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    c = load_config(os.path.join(ROOT, "configs", "long_range.py:test"))
    return apply_overrides(c, {
        "data.data_dir": str(tmp_path_factory.mktemp("tfds")),
        "model.strategy.name": "extra", "model.strategy.num_globals": 2,
        "model.dropout": 0.1,  # the per-variant dropout keys must match too
        "num_train_steps": 5, "optim.warmup_steps": 2, "log_every": 1,
        "nonfinite.inject_at_steps": (2,),  # and the non-finite policy
        "seed": 7})


# Every axis varies: global count (incl. 0 and the full capacity), seed, learning rate.
VARIANTS = [ablation.Variant(0, 0, 1e-3), ablation.Variant(2, 1, 3e-3),
            ablation.Variant(1, 0, 2e-3)]


@pytest.mark.slow  # ~2 min on 2 cores; .ci/run runs it with -m slow
def test_vmapped_variants_equal_separate_runs(config, tmp_path):
    result = ablation.train_variants(config, VARIANTS, print_fn=None)
    assert result.train["loss"].shape == (5, 3)
    assert np.array_equal(result.train["finite"][:, 0], [1, 1, 0, 1, 1])
    for k, variant in enumerate(VARIANTS):
        workdir = str(tmp_path / variant.name)
        single = train_and_evaluate(ablation.variant_config(config, variant), workdir)
        records = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
                   if r["split"] == "train"]
        assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
        # The skipped step (index 2) logs no loss average in the single run.
        for name in ("loss", "grad_norm", "learning_rate"):
            got = [result.train[name][i, k] for i, r in enumerate(records) if name in r]
            want = [r[name] for r in records if name in r]
            assert len(want) >= 4, name
            np.testing.assert_allclose(got, want, rtol=2e-5, err_msg=f"{variant.name} {name}")
        assert result.final[k]["nonfinite_steps"] == single["nonfinite_steps"] == 1
        assert not result.final[k]["diverged"]
        for name in ("validation/loss", "validation/accuracy"):
            np.testing.assert_allclose(result.final[k][name], single[name], rtol=2e-5,
                                       err_msg=f"{variant.name} {name}")
            assert np.isfinite(result.final[k][name])
        with open(os.path.join(workdir, "config.json")) as f:
            assert json.load(f)["data"]["shuffle_seed"] == 7  # the batches of the ablation
    # The variants really differ (no accidental sharing of parameters or rates).
    assert len({round(float(x), 6) for x in result.train["loss"][-1]}) == 3


def test_grid_and_variant_errors(config):
    g = ablation.grid([0, 2], [0, 1], [1e-3])
    assert [v.name for v in g] == ["g0_s0_lr0.001", "g2_s0_lr0.001", "g0_s1_lr0.001",
                                   "g2_s1_lr0.001"]
    with pytest.raises(ValueError, match="seeds is empty"):
        ablation.grid([0], [], [1e-3])
    bad = [
        ([ablation.Variant(3, 0, 1e-3)], r"g3_s0_lr0.001'\]: num_active_globals outside "
                                         r"\[0, capacity G=2\]"),
        ([ablation.Variant(0, 0, 1e-3)] * 2, "appear more than once"),
        ([ablation.Variant(0, 0, 0.0)], "learning_rate must be a finite number > 0"),
        ([ablation.Variant(0, -1, 1e-3)], r"seed outside \[0, 2\*\*31\)"),
        ([], "no variants"),
    ]
    for variants, message in bad:
        with pytest.raises(ValueError, match=message):
            ablation.train_variants(config, variants, print_fn=None)


@pytest.mark.slow  # ~1 min on 2 cores; .ci/run runs it with -m slow
def test_ablate_cli_writes_table_plot_and_timings(tmp_path, capsys):
    from experiments import ablate

    workdir = tmp_path / "ablate"
    argv = ["ablate", f"--config={ROOT}/configs/global_count.py:test", f"--workdir={workdir}",
            f"--config.data.data_dir={tmp_path / 'tfds'}", "--num_active_globals=0,4,8",
            "--speedup_steps=2"]
    out = ablate.main(argv)  # in-process: the --config.* overrides come from argv alone
    rows = out["rows"]
    assert [(r["num_active_globals"], r["seed"]) for r in rows] == [(0, 0), (4, 0), (8, 0)]
    assert all(0.0 <= r["validation"] <= 1.0 and r["test"] is None for r in rows)
    (timing,) = out["timings"]
    assert timing["K"] == 3 and timing["vmapped_step_s"] > 0 and timing["single_step_s"] > 0
    table = (workdir / "results.md").read_text()
    assert table.startswith("**Smoke run (") and "global_count.py:test" in table.splitlines()[0]
    assert "| tiny | 0.003 | 4 | 1 |" in table and "per-step speed-up" in table
    assert (workdir / "accuracy_vs_globals.png").stat().st_size > 1000
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["axes"]["num_active_globals"] == [0, 4, 8]
    assert saved["smoke_run"] is True and saved["smoke_config"].endswith("global_count.py:test")
    printed = capsys.readouterr().out
    assert printed.startswith("**Smoke run (")  # before any training output
    # Progress: the ETA is the whole 3-variant program's.
    assert "steps/s of all 3 variants; ETA 0:00:00 for the whole 3-variant program's training" \
        in printed


def test_ablate_axis_errors(config):
    from experiments import ablate

    with pytest.raises(ValueError, match=r"ablation axes \['seeds'\] are empty"):
        ablate.run_ablation(config, {"num_active_globals": [0], "seeds": [],
                                     "learning_rates": [1e-3], "data_configs": ["tiny"]},
                            "/tmp/unused_ablate")


@pytest.mark.slow
def test_reproduce_global_count_quick(tmp_path):
    from experiments import reproduce

    out = reproduce.main(["global_count", "--quick", "--workdir", str(tmp_path / "w"),
                          "--data_dir", str(tmp_path / "tfds")])
    report = (tmp_path / "w" / "global_count.md").read_text()
    assert "python -m experiments.reproduce global_count --quick" in report
    assert "Smoke run (`--quick`)" in report
    assert len(out["rows"]) == 4 and all(np.isfinite(r["test"]) for r in out["rows"])
    assert [t["data_config"] for t in out["timings"]] == ["v64_t64_k2", "v64_t64_k4"]
    # With every pair's value position global, every query is reachable.
    bound = out["values"]["bound"]
    assert bound["k2_n4"] == 100.0 and bound["k4_n8"] == 100.0
    assert 0.0 < bound["k4_n0"] < 100.0
    assert (tmp_path / "w" / "global_count.png").exists()
    assert (tmp_path / "w" / "global_count.json").exists()


def test_reachable_queries_counts_window_and_global_paths(tmp_path):
    from globalattn import data as data_lib
    from globalattn.measure import reachable_queries

    source = data_lib.data_source("mqar", "test", "tiny", str(tmp_path / "tfds"))
    none = reachable_queries(source, num_globals=0, reach=0)
    window = reachable_queries(source, num_globals=0, reach=4)
    every = reachable_queries(source, num_globals=8, reach=0)
    assert none == 0.0 and 0.0 < window < 1.0 and every == 1.0  # tiny: K = 4, 2K = 8
