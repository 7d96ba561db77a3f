"""The training tables (configs/long_range.py, strategies.py, listops.py): configs, densities.

The densities the reports print (:mod:`globalattn.measure`) are checked against
a brute-force count that rebuilds every pattern in numpy from the strategy
definitions (window, CLS, first, periodic, extra tokens, BigBird blocks), not
through the library code the reports use (analytics / global_local_mask). The
quick runs through ``experiments.reproduce`` are slow tests.
"""
import json
import math
import os
import re

import jax
import numpy as np
import pytest

from globalattn import data as data_lib
from globalattn import measure
from globalattn.modules import build_model
from globalattn.train.config import (apply_overrides, call_sweep, load_config_module, sweep_configs,
                                     validate_config)

NAMES = ("long_range", "strategies", "listops")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(name: str):
    return load_config_module(os.path.join(ROOT, "configs", f"{name}.py"))


def _rows(name: str, quick: bool = False) -> dict:
    """``{run name: config}`` of a table's sweep."""
    module, arg = _module(name), "quick" if quick else None
    return dict(sweep_configs(module.get_config(arg), call_sweep(module, arg)))


def brute_pairs(config, mask: np.ndarray) -> np.ndarray:
    """Pairs per forward of each row of ``mask`` [E, T], by dense numpy masks."""
    spec = validate_config(config)
    m = spec.model_config
    n = mask.sum(-1)
    if m.arch == "perceiver":
        M, p = m.perceiver.num_latents, m.perceiver
        assert m.head == "classify" and m.pooling == "cls"
        return n * M + p.num_latent_layers * M * M + M
    if m.attention_schedule == "full":
        return m.num_layers * n.astype(np.float64) ** 2
    s, (E, T) = m.strategy, mask.shape
    G = s.num_globals
    active = config.num_active_globals
    blocks = None
    if s.name == "bigbird":
        strategy = build_model(m).strategy.clone(parent=None)
        blocks = np.asarray(strategy.apply({}, 1, T, True, method="draw_blocks"))  # fixed draw
    out = []
    for e in range(E):
        real, glob = mask[e].copy(), np.zeros(T, bool)
        idx = np.flatnonzero(real)
        if s.name == "cls":
            glob[idx[0]] = True
        elif s.name == "first":
            glob[idx[:G]] = True
        elif s.name == "periodic":
            glob[[p for p in idx if p % math.ceil(T / G) == 0][:G]] = True
        elif s.name == "extra":
            real = np.concatenate([np.ones(G, bool), real])
            glob = np.concatenate([np.ones(G, bool), np.zeros(T, bool)])
        elif s.name == "bigbird":
            bs = s.block_size
            cand = np.isin(np.arange(T) // bs, [idx[0] // bs, idx[-1] // bs]) & real
            glob[np.flatnonzero(cand)[:2 * bs if active is None else active]] = True
        else:
            assert s.name == "none"
        i = np.arange(real.size)
        valid = real[:, None] & real[None, :]
        base = glob[:, None] | glob[None, :]
        if blocks is None:
            allowed = (np.abs(i[:, None] - i[None, :]) <= m.window) | base
            out.append(m.num_layers * int((allowed & valid).sum()))
            continue
        qb = i // s.block_size
        total = 0.0
        for layer in blocks:  # [1, N, nb, r]
            per_head = []
            for head in layer[0]:
                adj = np.zeros((head.shape[0],) * 2, bool)
                adj[np.arange(head.shape[0])[:, None], head] = True
                per_head.append(((adj[qb][:, qb] | base) & valid).sum())
            total += np.mean(per_head)
        out.append(total)
    return np.asarray(out, np.float64)


def _check_density(config, mask):
    want = np.mean(brute_pairs(config, mask) / (config.model.num_layers
                                                * mask.sum(-1).astype(np.float64) ** 2))
    got = measure.density(config, mask)[1]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    return want


@pytest.mark.parametrize("quick", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_tables_validate(name, quick):
    module = _module(name)
    rows = _rows(name, quick)
    for run, config in rows.items():
        spec = validate_config(config)
        assert config.is_locked and spec.seq_len > 0
        assert run.split("/")[0] in module.LABELS  # every row is described
    kind = lambda n: re.sub(r"_L\d+$", "", n.split("/")[0])  # noqa: E731  (quick: 1 layer)
    assert {kind(n) for n in rows} <= {kind(n) for n in _rows(name)}
    if not quick:
        assert all(c.num_train_steps >= 200 for c in rows.values())
    assert module.MEASURE == "train_sweep" and "{tables[results]}" in module.REPORT


def test_listops_config_is_the_committed_table():
    """results/listops.json: 3 layers, 300 steps, window 8, 3 rows x 3 seeds (the default)."""
    rows = _rows("listops")
    variants = ["window_only", "cls_global", "full_attention"]
    assert list(rows) == [f"{v}/seed{s}" for v in variants for s in (0, 1, 2)]
    for c in rows.values():
        assert (c.model.num_layers, c.num_train_steps, c.model.window, c.model.dropout) == \
            (3, 300, 8, 0.0)
    with open(os.path.join(ROOT, "results", "listops.json")) as f:
        committed = json.load(f)
    assert [r["variant"] for r in committed["rows"]] == variants
    assert all(r["steps"] == 300 and r["layers"] == 3 and r["seeds"] == [0, 1, 2]
               for r in committed["rows"])
    assert "beyond_reach" in committed["tables"]


@pytest.mark.parametrize("name", NAMES)
def test_every_table_row_has_three_seeds(name):
    seeds: dict[str, set] = {}
    for run, config in _rows(name).items():
        seeds.setdefault(run.split("/")[0], set()).add(config.seed)
    assert all(len(s) >= 3 for s in seeds.values()), seeds


def test_long_range_window_rows_are_provably_at_chance():
    rows = {n: c for n, c in _rows("long_range").items() if n.startswith("window_only")}
    assert {c.model.num_layers for c in rows.values()} == {2, 3}
    assert {c.seed for c in rows.values()} == {0, 1, 2}
    for c in rows.values():
        task = data_lib.resolve_config(c.data.name, c.data.config)
        assert data_lib.window_cannot_solve(c.model.num_layers, c.model.window, task)
    for c in _rows("long_range").values():  # 3-layer models need warmup and lr <= 1e-3
        assert c.optim.learning_rate <= 1e-3 and c.optim.warmup_steps > 0
    main = load_config_module(os.path.join(ROOT, "configs", "long_range.py")).sweep("main")
    assert [r["name"] for r in main] == [f"{p}_L2" for p in ("window_only", "cls_global",
                                                             "extra_globals_4", "full_attention")]


def test_strategies_have_equal_budget():
    rows = {n.split("/")[0]: c for n, c in _rows("strategies").items() if n.endswith("seed0")}
    caps = {n: validate_config(c).capacity for n, c in rows.items()}
    assert caps == {"window_only": 0, "first_8": 8, "periodic_8": 8, "extra_8": 8,
                    "bigbird_8": 8, "bigbird_random_window": 8, "perceiver_8": 8,
                    "full_attention": 0}
    assert rows["bigbird_random_window"].num_active_globals == 0


@pytest.mark.parametrize("name", NAMES)
def test_density_matches_brute_force(name):
    rng = np.random.default_rng(0)
    seen = set()
    for run, config in _rows(name).items():
        if run.split("/")[0] in seen:  # seeds share the pattern
            continue
        seen.add(run.split("/")[0])
        T = validate_config(config).seq_len
        if config.data.prepend_cls:  # variable lengths (ListOps): CLS + 100..256 tokens
            lengths = rng.integers(102, T + 1, size=3)
            mask = np.arange(T)[None, :] < lengths[:, None]
        else:
            mask = np.ones((1, T), bool)
        d = _check_density(config, mask)
        assert 0 < d <= 1.0 + 1e-12 or run.startswith("extra")
        if "full_attention" in run:
            assert d == 1.0


def test_density_known_values():
    """Hand counts at T = 64, window radius 4, 2 layers (per layer: band 64*9 - 2*10)."""
    by = _rows("long_range")
    ones = np.ones((1, 64), bool)
    band = 64 * 9 - 2 * (4 + 3 + 2 + 1)
    assert measure.attention_pairs(by["window_only_L2/seed0"], ones)[0] == 2 * band
    # A global CLS adds its row and column outside its own window: 2 * (64 - 5).
    assert measure.attention_pairs(by["cls_global_L2/seed0"], ones)[0] == 2 * (band + 2 * 59)
    assert measure.attention_pairs(by["full_attention_L3/seed1"], ones)[0] == 3 * 64 ** 2


def _parse_report(path: str) -> dict[str, list[str]]:
    with open(path) as f:
        lines = [line for line in f if line.startswith("| ") and " | density | " not in line]
    rows = {}
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 12:  # the results table (the LRA table has 2 columns)
            rows[cells[0]] = cells
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_quick_run_writes_a_report(name, tmp_path):
    from experiments import reproduce  # the registry, as the command line uses it

    workdir, data_dir = str(tmp_path / "work"), str(tmp_path / "tfds")
    summary = reproduce.main([name, "--quick", "--workdir", workdir, "--data_dir", data_dir])
    report = os.path.join(workdir, f"{name}.md")
    assert os.path.exists(report) and os.path.exists(os.path.join(workdir, f"{name}.png"))
    with open(report) as f:
        text = f.read()
    assert f"python -m experiments.reproduce {name} --quick" in text
    assert "Smoke run (`--quick`)" in text
    with open(os.path.join(workdir, f"{name}.json")) as f:
        assert json.load(f)["rows"] == json.loads(json.dumps(summary["rows"]))
    rows = _rows(name, quick=True)
    parsed = _parse_report(report)
    assert list(parsed) == [run.split("/")[0] for run in rows]
    for run, config in rows.items():
        cells = parsed[run.split("/")[0]]
        for acc in cells[7:9]:
            assert math.isfinite(float(acc.split()[0]))
        config = apply_overrides(config, {"data.data_dir": data_dir})
        want = _check_density(config, measure.padding_masks(config))
        assert abs(float(cells[5]) - want) <= 5e-5
    assert [r["variant"] for r in summary["rows"]] == list(parsed)
    assert all(np.isfinite(r["test"]).all() for r in summary["rows"])
    jax.clear_caches()


def test_listops_lra_is_lras_setup_for_a_pod():
    """configs/listops.py:lra: LRA's ListOps model and schedule, data-parallel on 16 chips."""
    c = _module("listops").get_config("lra")
    spec = validate_config(c, device_count=16, process_count=4)
    m = spec.model_config
    assert (m.num_layers, m.d_model, m.num_heads, m.mlp_dim) == (6, 512, 8, 2048)
    assert (c.batch_size, c.num_train_steps, c.optim.warmup_steps, c.optim.weight_decay) == \
        (32, 5000, 1000, 0.1)
    assert abs(c.optim.learning_rate - 0.05 / 1000 ** 0.5) < 1e-12
    assert spec.seq_len == 2001 and spec.mesh_shape["data"] == 16  # 2000 tokens + CLS
    assert c.data.config == "lra" and c.data.prepend_cls


def test_beyond_reach_probe_is_blind_exactly_where_the_window_is(tmp_path):
    """Noising what a window-only CLS cannot reach changes none of its predictions (at any
    weights); with full attention the same noise changes some."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from globalattn.modules import build_model
    from globalattn.train.config import apply_overrides

    base = apply_overrides(_module("listops").get_config("test"),
                           {"data.data_dir": str(tmp_path), "model.strategy.name": "none"})
    spec = validate_config(base)
    m = spec.model_config
    reach = m.num_layers * m.window
    assert reach < spec.seq_len - 1, "the test needs tokens beyond the reach"
    T = spec.seq_len
    params = nn.unbox(build_model(m).init(jax.random.key(0), jnp.ones((1, T), jnp.int32),
                                          jnp.ones((1, T), bool))["params"])
    # Larger weights than the init's 0.02, so that random predictions vary between inputs.
    params = jax.tree_util.tree_map(lambda x: 30.0 * x, params)
    window = measure.beyond_reach_accuracy(base, params, reach=reach)
    assert window["changed"] == 0.0 and window["accuracy"] == window["accuracy_noised"]
    full = apply_overrides(base, {"model.attention_schedule": "full"})
    assert measure.beyond_reach_accuracy(full, params, reach=reach)["changed"] > 0.0
    with pytest.raises(ValueError, match=f"reach={T} must be in"):
        measure.beyond_reach_accuracy(base, params, reach=T)


@pytest.mark.parametrize("name", ["long_range", "global_count", "strategies", "listops", "sinks"])
def test_committed_training_tables_fit_the_20_minute_budget(name):
    """Each committed training table was produced in <= 20 minutes, with the machine's load
    recorded (its header states it); a slower recipe must not be committed silently."""
    with open(os.path.join(ROOT, "results", f"{name}.json")) as f:
        committed = json.load(f)
    assert committed["runtime_s"] <= 20 * 60, committed["runtime_s"]
    assert committed["host"]["cpus"] >= 1 and 0 <= committed["host"]["others_share"] <= 1
