"""The four seed-article tables (configs/seed_*.py, experiments/seed_tables.py), --quick.

Each report is produced through ``experiments.reproduce.main`` (JSON, then the
renderer's markdown) and its numbers
are checked against brute force on a dense numpy pattern written here from the
definition (query i may attend key j iff |i - j| <= w, or i or j is global;
and j <= i when causal): BFS for hops, boolean matrix powers for reach and
diameters, mask sums for pair counts, a float64 softmax for the weights.
"""
import json
import math

import numpy as np

import globalattn  # noqa: F401  (sets the XLA flag before any array exists)
from experiments import reproduce

T, W = 512, 32  # the --quick setting


def dense(T: int, w: int, glob, causal: bool = False) -> np.ndarray:
    g = np.zeros(T, bool)
    g[list(glob)] = True
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = (np.abs(i - j) <= w) | g[:, None] | g[None, :]
    return allowed & (j <= i) if causal else allowed


def bfs(allowed: np.ndarray, src: int) -> np.ndarray:
    """Hops from src (edge j -> i iff allowed[i, j]); -1 when unreachable."""
    a = allowed.astype(np.float32)
    dist = np.full(len(a), -1)
    dist[src] = 0
    reached = dist == 0
    d = 0
    while True:
        new = (a @ reached.astype(np.float32) > 0) & ~reached
        if not new.any():
            return dist
        d += 1
        dist[new] = d
        reached |= new


def powers(allowed: np.ndarray, max_layers: int) -> tuple[list[int], int]:
    """Non-zeros of allowed^1..allowed^max_layers, and the layer after which nothing changes."""
    a = allowed.astype(np.float32)
    r, counts, diameter = allowed.copy(), [int(allowed.sum())], None
    for L in range(1, 64):
        nxt = (a @ r.astype(np.float32)) > 0
        if diameter is None and np.array_equal(nxt, r):
            diameter = L
        r = nxt
        counts.append(int(r.sum()))
        if diameter is not None and L >= max_layers:
            return counts[:max_layers], diameter


def run(name: str, tmp_path):
    result = reproduce.main([name, "--quick", "--workdir", str(tmp_path)])
    md = (tmp_path / f"{name}.md").read_text()
    assert md.startswith("# ") and f"`python -m experiments.reproduce {name} --quick`" in md
    assert "Smoke run (`--quick`)" in md and "n/a" not in md
    assert json.loads((tmp_path / f"{name}.json").read_text())["values"] == \
        json.loads(json.dumps(result["values"]))
    return result["values"], md


def png_ok(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def row(md: str, first_cell: str) -> list[str]:
    """Cells of the markdown table row whose first cell is ``first_cell``."""
    for line in md.splitlines():
        if line.startswith(f"| {first_cell} |"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no row {first_cell!r}")


def test_seed_hops(tmp_path):
    out, md = run("seed_hops", tmp_path)
    assert png_ok(tmp_path / "seed_hops.png")
    assert (out["T"], out["w"]) == (T, W)
    for ci, cfg in enumerate(out["configs"]):
        allowed = dense(T, W, cfg["globals"], cfg["causal"])
        for k, (a, b) in enumerate(out["pairs"]):
            d = int(bfs(allowed, a)[b])
            want = None if d < 0 else d
            assert out["hops"][cfg["name"]][k] == want, (cfg, a, b)
            assert row(md, f"{a} → {b}")[3 + ci] == ("∞" if want is None else str(want))
        # Diameter = the smallest L with A^L == A^(L+1) (A includes I: the window holds i).
        assert out["diameter"][cfg["name"]] == powers(allowed, 1)[1], cfg
    assert row(md, "**diameter** (longest shortest path)")[3:] == [
        str(out["diameter"][c["name"]]) for c in out["configs"]]
    # The headline pair (0 -> 4000 scaled = 500): closed form without globals, 2 via the middle.
    k = out["pairs"].index((0, 500))
    assert out["hops"]["no globals"][k] == math.ceil(500 / W) == 16
    assert out["hops"][f"global at {T // 2}"][k] == 2
    assert out["sweep_one_hop"] == [0, 500]
    for g in (2, 100, 256, 498):
        assert bfs(dense(T, W, (g,)), 0)[500] == 2
    assert bfs(dense(T, 2 * W, ()), 0)[500] == out["hops_wide_window"] == 8


def test_seed_savings(tmp_path):
    out, md = run("seed_savings", tmp_path)
    assert png_ok(tmp_path / "seed_savings.png")
    Gs, pos = out["G"], out["positions"]
    band = int(dense(T, W, ()).sum())
    assert out["band"] == band
    for G in Gs:
        assert pos["periodic"][G] == (list(range(0, T, T // G)) if G else [])
        assert pos["question"][G] == list(range(G))
        rng = np.random.default_rng(out["random_seed"])
        assert pos["random"][G] == (sorted(rng.choice(T, G, replace=False).tolist()) if G else [])
        cells = row(md, str(G))
        for st in ("periodic", "question", "random"):
            n = int(dense(T, W, pos[st][G]).sum())
            assert out["pairs"][st][G] == n
            assert n <= band + 2 * G * T - G * G
            text = f"{n:,}" if st == "periodic" else f"{n:,} ({100 * (1 - n / T**2):.2f}%)"
            assert text in cells, (st, G, cells)
        n = out["pairs"]["periodic"][G]
        assert cells[2:4] == [f"{100 * n / T**2:.2f}%", f"{100 * (1 - n / T**2):.2f}%"]
    # The named strategies, from positions written here.
    for label, glob in (("CLS", [0]), ("first + last", [0, T - 1]),
                        ("periodic 8", range(0, T, T // 8)),
                        ("CLS + 63 question tokens (first 64)", range(64)),
                        ("periodic 64", range(0, T, T // 64))):
        n = int(dense(T, W, glob).sum())
        assert out["named"][label] == n
        assert row(md, label)[2:] == [f"{n:,}", f"{100 * n / T**2:.2f}%",
                                      f"{100 * (1 - n / T**2):.2f}%"]
    bound = band + 2 * 64 * T - 64 * 64
    assert f"≥ {100 * (1 - bound / T**2):.2f}%" in row(md, "any placement of 64 (bound)")


def test_seed_16token(tmp_path):
    out, md = run("seed_16token", tmp_path)
    for suffix in ("mask", "weights"):
        assert png_ok(tmp_path / f"seed_16token_{suffix}.png")
    mask = dense(16, 2, (0, 8))
    rows = [16, 5, 6, 7, 7, 7, 6, 6, 16, 6, 6, 7, 7, 7, 6, 5]
    assert out["row_counts"] == mask.sum(-1).tolist() == rows
    assert f"`{rows}`" in md and row(md, "allowed keys")[1:] == [str(r) for r in rows]
    Wt = np.asarray(out["weights"])
    q, k = np.asarray(out["q"], np.float64), np.asarray(out["k"], np.float64)
    assert Wt.shape == (16, 16) and q.shape == k.shape == (16, 8)
    s = np.where(mask, q @ k.T / math.sqrt(8), -np.inf)
    oracle = np.exp(s - s.max(-1, keepdims=True))
    oracle /= oracle.sum(-1, keepdims=True)
    assert np.isfinite(Wt).all()
    np.testing.assert_allclose(Wt, oracle, atol=2e-6, rtol=0)
    np.testing.assert_allclose(Wt.sum(-1), 1.0, atol=2e-6)
    assert np.all(Wt[~mask] == 0.0) and np.all(Wt[mask] > 0)
    assert out["masked_exact_zero"] is True and out["max_err_vs_softmax"] < 2e-6
    for i in (1, 8, 15):  # the printed matrix
        line = f"{i:>3}  " + "".join(f"{Wt[i, j]:6.3f}" if mask[i, j] else "     ."
                                     for j in range(16))
        assert line in md.splitlines()
    assert "rows 1 and 15 have 5" in md


def test_seed_connectivity(tmp_path):
    out, md = run("seed_connectivity", tmp_path)
    assert png_ok(tmp_path / "seed_connectivity.png")
    for case in out["cases"]:
        allowed = dense(case["T"], case["w"], case["globals"], case["causal"])
        counts, diameter = powers(allowed, 3)
        got = out["results"][case["name"]]
        assert got["counts"][:3] == counts, case
        assert got["diameter"] == diameter, case
        n = case["T"]
        assert got["possible"] == (n * (n + 1) // 2 if case["causal"] else n * n)
        cells = row(md, case["name"])
        for L in range(3):
            assert cells[1 + L].startswith(f"{counts[L]:,} ({100 * counts[L] / n**2:.2f}%")
        assert cells[4] == str(diameter)
    # Bidirectional with a global: everything by layer 2; the small causal example: full at 3.
    assert out["results"]["CLS at 0"]["counts"][1] == T * T
    assert out["results"]["T=16, 2/side, causal, globals {0, 8}"]["counts"][:3] == [68, 130, 136]


def test_seed_names_are_registered():
    for name in ("seed_hops", "seed_savings", "seed_16token", "seed_connectivity"):
        assert name in reproduce.table_names()
