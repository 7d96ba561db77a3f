"""Seed-article measurements: exact counts for ``configs/seed_*.py``, as JSON.

Each function takes the table's config module and arg, measures with
:mod:`globalattn.analytics` (global masks from :mod:`globalattn.patterns`) and
returns ``{"values", "tables", "figures"}`` for :mod:`experiments.render`; the
prose is the config's template. ``MEASUREMENTS`` maps a config's ``MEASURE``
to its function.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import globalattn  # sets the XLA flag; no array exists before this import
from globalattn import analytics as A
from globalattn import patterns as P
from globalattn.train.config import sweep_configs


def _kw(c, glob=(), causal: bool = False) -> dict:
    return {"local_window_size": c.w, "global_positions": tuple(glob), "is_causal": causal}


def _at(c, p: int) -> int:
    """An article position (for T = 4096) scaled to ``c.T``."""
    return min(c.T - 1, round(p * c.T / 4096))


def _patterns(module, arg):
    return sweep_configs(module.get_config(arg), module.sweep(arg))


def _pct_cells(count: int, total: int, possible: int | None) -> str:
    out = f"{count:,} ({100 * count / total:.2f}%"
    return out + (f"; {100 * count / possible:.2f}% of possible)" if possible else ")")


# ---------------------------------------------------------------------------------------


def hops(module, arg, **_) -> dict[str, Any]:
    """Hop table for distant pairs and diameters; a sweep of one global's position."""
    c = module.get_config(arg)
    T, w = c.T, c.w
    pairs = [(_at(c, a), _at(c, b)) for a, b in module.HOP_PAIRS] + [(0, w), (0, w + 1)]
    cfgs = [(n, p.globals, p.causal) for n, p in _patterns(module, arg)]
    names = [n for n, _, _ in cfgs]
    hop = {n: [A.hops(T, a, b, **_kw(c, g, k)) for a, b in pairs] for n, g, k in cfgs}
    diam = {n: A.diameter(T, **_kw(c, g, k)) for n, g, k in cfgs}
    src, dst, mid = 0, _at(c, 4000), T // 2
    step = max(1, T // 256)
    sweep = {g: A.hops(T, src, dst, **_kw(c, (g,))) for g in sorted(set(range(0, T, step))
                                                                      | {dst})}
    p100, p1000 = _at(c, 100), _at(c, 1000)
    seed001 = {"100_to_0_w": A.hops(T, p100, 0, local_window_size=w),
               "100_to_0_2w": A.hops(T, p100, 0, local_window_size=2 * w),
               "0_to_1000_w": A.hops(T, 0, p1000, local_window_size=w),
               "0_to_1000_2w": A.hops(T, 0, p1000, local_window_size=2 * w),
               "0_to_1000_w_mid": A.hops(T, 0, p1000, **_kw(c, (mid,))),
               "0_to_1000_w_cls": A.hops(T, 0, p1000, **_kw(c, (0,)))}
    rows = [[f"{a} → {b}", abs(b - a), math.ceil(abs(b - a) / w)] + [hop[n][i] for n in names]
            for i, (a, b) in enumerate(pairs)]
    rows.append(["**diameter** (longest shortest path)", "", math.ceil((T - 1) / w)]
                + [diam[n] for n in names])
    by_id = dict(zip(("none", "cls", "mid", "first_last", "periodic8", "causal_none",
                      "causal_cls", "causal_mid"), names))
    values = {
        "T": T, "w": w, "window": 2 * w, "pairs": pairs, "src": src, "dst": dst,
        "configs": [{"name": n, "globals": list(g), "causal": k} for n, g, k in cfgs],
        "hops": hop, "diameter": diam, "sweep_step": step,
        "sweep_one_hop": [g for g, h in sweep.items() if h == 1],
        "sweep_two_hop": sum(h == 2 for h in sweep.values()),
        "hops_wide_window": A.hops(T, src, dst, local_window_size=2 * w), "seed001": seed001,
        "p100": p100, "p1000": p1000, "edge_in": hop[by_id["none"]][-2],
        "edge_out": hop[by_id["none"]][-1], "h_none": hop[by_id["none"]][0],
        "h_mid": hop[by_id["mid"]][0],
        "diameter_globals": sorted({diam[n] for n, g, k in cfgs if g and not k}),
        **{f"diameter_{i}": diam[n] for i, n in by_id.items()}}
    columns = [["src → dst", ""], ["distance", ""], [f"⌈distance / {w}⌉", ""]] + [
        [n, "hop"] for n in names]
    shown = [by_id[i] for i in ("none", "cls", "mid", "causal_none", "causal_mid")]
    series = []
    for n, g, k in cfgs:
        if n in shown:
            d = A.distances(T, 0, **_kw(c, g, k))
            # A step function: its change points (and the last position) draw it exactly.
            xs = [0] + [i for i in range(1, T) if d[i] != d[i - 1]] + [T - 1]
            series.append({"label": n, "x": xs, "style": "--" if k else "-",
                           "drawstyle": "steps-post", "ms": 0,
                           "y": [None if d[i] < 0 else int(d[i]) for i in xs]})
    figure = {"kind": "lines", "series": series, "xlabel": "destination position",
              "ylabel": "hops from position 0", "size": [7, 4.5],
              "title": f"Hops from position 0, T = {T}, {w} keys per side"}
    return {"values": values, "tables": {"hops": {"columns": columns, "rows": rows}},
            "figures": [figure]}


def strategy_mask(strategy: str, T: int, G: int, seed: int = 0) -> np.ndarray:
    """bool ``[T]`` global mask with exactly G globals, from :mod:`globalattn.patterns`.

    ``periodic``: every T/G-th position from 0 (needs G | T); ``question``: [CLS]
    then G - 1 question tokens, i.e. positions 0..G-1 as segment 0 of a
    question/context layout; ``random``: G distinct positions from
    ``np.random.default_rng(seed)``; ``cls`` (G=1); ``first_last`` (G=2).
    """
    shape = (1, T)
    if G == 0:
        return np.zeros(T, bool)
    if strategy == "periodic" and T % G == 0:
        m = P.periodic(None, T // G, shape=shape)
    elif strategy == "question":
        m = P.from_segments(jnp.asarray((np.arange(T) >= G).astype(np.int32)[None]), (0,))
    elif strategy == "random":
        pos = np.random.default_rng(seed).choice(T, size=G, replace=False)
        m = P.from_positions(sorted(pos.tolist()), shape=shape)
    elif strategy == "cls" and G == 1:
        m = P.cls(shape=shape)
    elif strategy == "first_last" and G == 2:
        m = P.first_last(shape=shape)
    else:
        raise ValueError(f"strategy {strategy!r} cannot place G={G} globals in T={T}")
    m = np.asarray(m)[0]
    if int(m.sum()) != G:
        raise ValueError(f"strategy {strategy!r} placed {int(m.sum())} globals, not G={G}")
    return m


def savings(module, arg, **_) -> dict[str, Any]:
    """Pairs, density and savings vs number and placement of global tokens."""
    c = module.get_config(arg)
    T, T2, Gs = c.T, c.T ** 2, tuple(c.num_globals)
    strategies = [p.strategy for _, p in _patterns(module, arg)]
    band = A.allowed_pairs(T, local_window_size=c.w)

    def count(m: np.ndarray) -> int:
        return A.allowed_pairs(T, **_kw(c, np.flatnonzero(m)))

    def bound(G: int) -> int:  # |band ∪ G rows ∪ G columns| <= sum of the parts
        return min(T2, band + 2 * G * T - G * G)

    masks = {st: {G: strategy_mask(st, T, G, c.random_seed) for G in Gs} for st in strategies}
    pairs = {st: {G: count(m) for G, m in ms.items()} for st, ms in masks.items()}
    per = pairs["periodic"]
    added = {G: (per[G] - per[Gp]) / (G - Gp) for Gp, G in zip(Gs, Gs[1:])}
    rows = [[G, per[G], per[G] / T2, 1 - per[G] / T2, added.get(G)]
            + [f"{pairs[st][G]:,} ({100 * (1 - pairs[st][G] / T2):.2f}%)"
               for st in strategies[1:]] + [1 - bound(G) / T2] for G in Gs]
    named = [("no globals", "none", 0), ("CLS", "cls", 1), ("first + last", "first_last", 2),
             ("periodic 8", "periodic", 8), ("CLS + 63 question tokens (first 64)", "question", 64),
             ("periodic 64", "periodic", 64), (f"random 64 (seed {c.random_seed})", "random", 64)]
    npairs = {label: count(strategy_mask(st, T, G, c.random_seed)) if G else band
              for label, st, G in named}
    rand64 = [count(strategy_mask("random", T, 64, s)) for s in range(c.num_random_seeds)]
    nrows = [[label, G, f"{npairs[label]:,}", npairs[label] / T2, 1 - npairs[label] / T2]
             for label, _, G in named]
    nrows += [[f"random 64, seeds 0-{c.num_random_seeds - 1} (min - max)", 64,
               f"{min(rand64):,} - {max(rand64):,}", None,
               f"{100 * (1 - max(rand64) / T2):.2f}% - {100 * (1 - min(rand64) / T2):.2f}%"],
              ["any placement of 64 (bound)", 64, f"≤ {bound(64):,}", None,
               f"≥ {100 * (1 - bound(64) / T2):.2f}%"]]
    ids = {"cls": "CLS", "first_last": "first + last", "periodic8": "periodic 8"}
    values = {
        "T": T, "w": c.w, "window": 2 * c.w, "G": list(Gs), "band": band, "pairs": pairs,
        "positions": {st: {G: np.flatnonzero(m).tolist() for G, m in ms.items()}
                      for st, ms in masks.items()},
        "bound": {G: bound(G) for G in Gs + (64,)}, "named": npairs, "random64": rand64,
        "random_seed": c.random_seed, "max_added": 2 * T - 1,
        "added_min": min(added.values()), "added_max": max(added.values()),
        "density": {i: 100 * npairs[n] / T2 for i, n in ids.items()},
        "savings": {i: 100 * (1 - npairs[n] / T2) for i, n in ids.items()},
        "savings64": {"question": 100 * (1 - npairs[named[4][0]] / T2),
                      "periodic": 100 * (1 - npairs["periodic 64"] / T2),
                      "random_min": 100 * (1 - max(rand64) / T2),
                      "random_max": 100 * (1 - min(rand64) / T2),
                      "bound": 100 * (1 - bound(64) / T2)},
        "within_bound": all(pairs[st][G] <= bound(G) for st in strategies for G in Gs)}
    tables = {
        "named": {"columns": [["strategy", ""], ["G", ""], ["pairs", ""], ["density", "pct2"],
                              ["savings", "pct2"]], "rows": nrows},
        "savings": {"columns": [["G", ""], ["periodic: pairs", ","], ["density", "pct2"],
                                ["savings", "pct2"], ["pairs added per extra global", ",.0f"],
                                ["question (CLS + G-1): pairs (savings)", ""],
                                [f"random, seed {c.random_seed}: pairs (savings)", ""],
                                ["any placement ≥", "pct2"]], "rows": rows}}
    x = list(range(len(Gs)))
    series = [{"label": label, "x": x, "ms": ms,
               "y": [100 * (1 - pairs[st][G] / T2) for G in Gs]}
              for st, label, ms in (("periodic", "periodic (every T/G)", 8),
                                    ("question", "CLS + question block (first G)", 5),
                                    ("random", f"random (seed {c.random_seed})", 4))]
    series.append({"label": "any placement (bound)", "x": x, "style": "k:",
                   "y": [100 * (1 - bound(G) / T2) for G in Gs]})
    figure = {"kind": "lines", "series": series, "xticks": [str(G) for G in Gs],
              "xlabel": "number of global tokens G", "ylabel": "savings vs full attention (%)",
              "title": f"T = {T}, window {2 * c.w} ({c.w} per side)", "size": [7, 4.5],
              "hlines": [{"y": 84, "color": "grey", "label": "84%"},
                         {"y": 80, "color": "grey", "style": ":", "label": "80%"}]}
    return {"values": values, "tables": tables, "figures": [figure]}


def sixteen_token_weights(c) -> dict[str, np.ndarray]:
    """The 16-token example through :func:`globalattn.global_local_attention`.

    q, k, v ``[1, T, 1, H]`` ~ N(0, 1) from ``jax.random.key(c.key_seed)``. Attention
    is linear in v, so feeding the columns of the T x T identity as values (T / H
    calls of H columns each) returns the weight matrix.
    """
    T, H = c.T, c.head_dim
    gm = P.from_positions(tuple(c.globals), shape=(1, T))
    q, k, v = (jax.random.normal(key, (1, T, 1, H), jnp.float32)
               for key in jax.random.split(jax.random.key(c.key_seed), 3))

    @jax.jit  # one compilation instead of dozens of eager ops
    def attn(vals):
        return globalattn.global_local_attention(q, k, vals, local_window_size=c.w,
                                                 global_mask=gm, max_globals=len(c.globals))

    eye = jnp.eye(T, dtype=jnp.float32)[None, :, None, :]  # [1, S, 1, T]: value of key j = e_j
    weights = jnp.concatenate([attn(eye[..., i:i + H]) for i in range(0, T, H)], axis=-1)
    mask = globalattn.global_local_mask(T, local_window_size=c.w, global_mask=gm)
    dense_out = jax.jit(globalattn.dense_attention)(q, k, v, mask[:, None])

    def first(x):  # [1, T, 1, H] -> [T, H]
        return np.asarray(x)[0, :, 0]

    return {"q": first(q), "k": first(k), "v": first(v), "weights": first(weights),
            "out": first(attn(v)), "dense_out": first(dense_out), "mask": np.asarray(mask)[0],
            "global_mask": np.asarray(gm)[0]}


def sixteen_token(module, arg, **_) -> dict[str, Any]:
    """Mask picture, row counts and the kernel's attention weights of the 16-token example."""
    c = module.get_config(arg)
    T = c.T
    r = sixteen_token_weights(c)
    W, mask, glob = r["weights"], r["mask"], r["global_mask"]
    counts = A.row_counts(T, local_window_size=c.w, global_positions=glob)
    if not np.array_equal(counts, mask.sum(-1)):
        raise AssertionError("analytics.row_counts disagrees with the dense mask")
    sc = np.where(mask, r["q"].astype(np.float64) @ r["k"].T.astype(np.float64)
                  / math.sqrt(c.head_dim), -np.inf)
    oracle = np.exp(sc - sc.max(-1, keepdims=True))
    oracle /= oracle.sum(-1, keepdims=True)  # float64 softmax over the masked scores
    idx = np.arange(T)
    in_win = np.abs(idx[:, None] - idx[None, :]) <= c.w
    local = ~glob
    text = ["     " + "".join(f"{j:>6}" for j in range(T))] + [
        f"{i:>3}  " + "".join(f"{W[i, j]:6.3f}" if mask[i, j] else "     ." for j in range(T))
        for i in range(T)]
    values = {
        "row_counts": counts.tolist(), "weights": W.tolist(), "q": r["q"].tolist(),
        "k": r["k"].tolist(), "max_err_vs_softmax": float(np.abs(W - oracle).max()),
        "masked_exact_zero": bool(np.all(W[~mask] == 0.0)), "num_masked": int((~mask).sum()),
        "row_sum_err": float(np.abs(W.sum(-1) - 1).max()),
        "out_err_vs_dense": float(np.abs(r["out"] - r["dense_out"]).max()),
        "key_seed": c.key_seed, "weights_text": "\n".join(text),
        "row_counts_globals": ", ".join(str(counts[g]) for g in c.globals),
        "window_sizes": sorted(set(in_win.sum(-1)[local].tolist())),
        "global_rows_positive": bool(np.all(W[glob] > 0)),
        "global_rows_min": float(W[glob].min()),
        "mean_global_key": float(W[glob[None, :] & ~in_win & local[:, None]].mean()),
        "mean_window_key": float(W[in_win & local[:, None]].mean())}
    cat = np.select([in_win, glob[:, None], glob[None, :]], [1, 2, 3], 0)
    tables = {"counts": {"columns": [["row", ""]] + [[str(i), ""] for i in range(T)],
                         "rows": [["window keys"] + in_win.sum(-1).tolist(),
                                  ["allowed keys"] + counts.tolist()]}}
    figures = [
        {"file": "seed_16token_mask.png", "kind": "heatmap", "matrix": cat.tolist(),
         "cmap": "tab10", "size": [6, 5.5], "xlabel": "key j", "ylabel": "query i",
         "title": "16 tokens, 2 per side, globals {0, 8}: window (1), global row (2), "
                  "global column (3)"},
        {"file": "seed_16token_weights.png", "kind": "heatmap", "annotate": True,
         "matrix": np.where(mask, W, np.nan).tolist(), "size": [7, 6], "xlabel": "key j",
         "ylabel": "query i",
         "title": f"global_local_attention weights (random q, k, key {c.key_seed}); "
                  "blank = masked"}]
    figures[1]["matrix"] = [[None if np.isnan(x) else x for x in row]
                            for row in figures[1]["matrix"]]
    return {"values": values, "tables": tables, "figures": figures}


def connectivity(module, arg, **_) -> dict[str, Any]:
    """Reachable pairs after 1, 2, 3 (and up to ``max_layers``) layers."""
    c = module.get_config(arg)
    T, T2, L = c.T, c.T ** 2, c.max_layers
    cases = _patterns(module, arg)
    res = {}
    for name, p in cases:
        curve = A.connectivity_curve(p.T, L, **_kw(p, p.globals, p.causal))
        res[name] = {"counts": [r.count for r in curve], "total": curve[0].total,
                     "possible": curve[0].possible,
                     "diameter": A.diameter(p.T, **_kw(p, p.globals, p.causal))}
    rows = []
    for name, p in cases:
        r = res[name]
        full = next((i + 1 for i, n in enumerate(r["counts"]) if n == r["possible"]), None)
        last = r["counts"][min(max(r["diameter"], 1), L) - 1]
        rows.append([name] + [_pct_cells(n, r["total"], r["possible"] if p.causal else None)
                              for n in r["counts"][:3]]
                    + [r["diameter"], full or (f"never ({100 * last / r['possible']:.2f}%)"
                                               if r["diameter"] <= L else f"> {L}")])
    names = [n for n, _ in cases]
    mid = T // 2
    pid = {"none": "no globals", "cls": "CLS at 0", "causal_none": "causal, no globals",
           "causal_cls": "causal, CLS at 0", "causal_mid": f"causal, global at {mid}",
           "causal_periodic8": "causal, periodic 8"}
    band = A.allowed_pairs(T, local_window_size=c.w)
    cn = res[pid["causal_none"]]["counts"]
    pos = res[pid["causal_mid"]]["possible"]
    bidir = [n for n, p in cases if p.globals and not p.causal and p.T == T]
    values = {
        "T": T, "w": c.w, "window": 2 * c.w, "T2": T2, "possible": pos, "band": band,
        "results": res, "cases": [{"name": n, "T": p.T, "w": p.w, "globals": list(p.globals),
                                   "causal": p.causal} for n, p in cases],
        **{i: res[n]["counts"][:3] for i, n in pid.items()},
        **{f"{i}_pct": [100 * x / pos for x in res[n]["counts"][:3]]
           for i, n in pid.items() if i.startswith("causal")},
        "cls_extra": res[pid["cls"]]["counts"][0] - band,
        "diameter_none": res[pid["none"]]["diameter"],
        "diameter_causal_mid": res[pid["causal_mid"]]["diameter"],
        "bidir_layer2": ", ".join(f"{n} {res[n]['counts'][1]:,}" for n in bidir),
        "causal_gap": 100 * max(abs(a - b) / pos for n in (pid["causal_cls"],
                                                           f"causal, global at {T - 1}")
                                for a, b in zip(res[n]["counts"], cn)),
        "small": ", ".join(f"{x:,}" for x in res[names[-3]]["counts"][:3]),
        "small_causal": ", ".join(f"{x:,}" for x in res[names[-1]]["counts"][:3])}
    columns = [["pattern", ""], ["layer 1", ""], ["layer 2", ""], ["layer 3", ""],
               ["layers until no change", ""], ["first layer with all possible pairs", ""]]
    x = list(range(1, L + 1))
    series = [{"label": n, "x": x, "style": "s--" if p.causal else "o-", "ms": 3,
               "lw": 1.2 if p.causal else 2.5,
               "y": [100 * k / res[n]["possible"] for k in res[n]["counts"]]}
              for n, p in cases if p.T == T]
    figure = {"kind": "lines", "series": series, "xlabel": "layers L",
              "ylabel": "reachable pairs (% of possible)", "size": [8, 5],
              "title": f"T = {T}, {c.w} keys per side (causal: % of the j ≤ i pairs)"}
    return {"values": values, "tables": {"reach": {"columns": columns, "rows": rows}},
            "figures": [figure]}


MEASUREMENTS = {"seed_hops": hops, "seed_savings": savings, "seed_16token": sixteen_token,
                "seed_connectivity": connectivity}
