"""The seed article's numbers, recomputed exactly (``python -m experiments.reproduce NAME``).

``seed_hops`` (hops between distant positions), ``seed_savings`` (density and
savings vs number and placement of globals), ``seed_16token`` (the 16-token
example: mask, row counts, weights from the efficient kernel) and
``seed_connectivity`` (reachable pairs by layer) each write ``<name>.md`` and PNGs.
Counting is :mod:`globalattn.analytics`; global masks come from :mod:`globalattn.patterns`.
The article (shared/seeds/000_*, "Global Tokens") has T = 4096 and "window 512",
which it reads as 256 keys per side: ``local_window_size=256``. ``--quick``:
T = 512, 32 keys per side, positions scaled by T / 4096 (a smoke test).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import globalattn  # sets the XLA flag; no array exists before this import
from globalattn import analytics as A
from globalattn import patterns as P

ARTICLE_T = 4096
RANDOM_SEED = 0  # numpy default_rng seed of the "random positions" strategy
KEY_SEED = 0  # jax.random seed of q, k, v in the 16-token example
Config = tuple[str, tuple[int, ...], bool]  # (name, global positions, causal)


@dataclasses.dataclass(frozen=True)
class Setting:
    """Sequence length T and keys per side w (the article's "window" is 2w)."""

    T: int
    w: int

    def at(self, p: int) -> int:
        """An article position (for T = 4096) scaled to this T."""
        return min(self.T - 1, round(p * self.T / ARTICLE_T))

    def kw(self, glob=(), causal: bool = False) -> dict:
        return {"local_window_size": self.w, "global_positions": glob, "is_causal": causal}


def setting(quick: bool) -> Setting:
    return Setting(512, 32) if quick else Setting(ARTICLE_T, 256)


def configs(s: Setting) -> list[Config]:
    """The global patterns of the hop and connectivity tables."""
    T, mid = s.T, s.T // 2
    per8 = tuple(range(0, T, T // 8))
    return [("no globals", (), False), ("CLS at 0", (0,), False),
            (f"global at {mid}", (mid,), False), ("first + last", (0, T - 1), False),
            ("periodic 8", per8, False), ("causal, no globals", (), True),
            ("causal, CLS at 0", (0,), True), (f"causal, global at {mid}", (mid,), True),
            (f"causal, global at {T - 1}", (T - 1,), True), ("causal, periodic 8", per8, True)]


# ---------------------------------------------------------------------------------------
# Formatting and files.


def _n(x: int) -> str:
    return f"{x:,}"


def _pct(x: float) -> str:
    return f"{100 * float(x):.2f}%"


def _hop(h: int | None) -> str:
    return "∞" if h is None else str(h)


def _verdict(ok: bool) -> str:
    return "**holds**" if ok else "**does not hold**"


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "r") -> list[str]:
    sep = "|---|" + ("---:|" if align == "r" else "---|") * (len(head) - 1)
    return (["| " + " | ".join(head) + " |", sep]
            + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""])


def _claims(ours: str, claims: Sequence[Sequence[str]]) -> list[str]:
    return ["## The article's claims", ""] + _table(["claim", ours, "verdict"], claims, "l")


def _finish(name: str, title: str, body: list[str], summary: dict, *, quick: bool,
            s: Setting | None, t0: float, workdir: str, results_dir: str) -> dict:
    """Writes ``results_dir/<name>.md`` (command and conventions on top) and a json summary."""
    summary["runtime_s"] = time.perf_counter() - t0
    cmd = f"python -m experiments.reproduce {name}" + (" --quick" if quick else "")
    head = [f"# {title}", "", f"Produced by `{cmd}` in {summary['runtime_s']:.1f} s (2-core CPU, "
            "shared).", "", "Conventions: pairs (i, j) are ordered and include i = j; full "
            "attention has T² pairs; a *hop* is one attention layer carrying information from "
            "key j to query i; bidirectional unless marked causal. Every count is exact "
            "(`globalattn.analytics`, tested against the dense mask).", ""]
    if s is not None:
        head += [f"Setting: T = {s.T}, article window {2 * s.w} = {s.w} keys on each side plus "
                 f"the token itself (`local_window_size={s.w}`).", ""]
    if quick:
        head += ["**Quick run**: a smoke test at T = 512 (32 keys per side), the article's "
                 "positions scaled by T / 4096. The article's claims are about T = 4096; only "
                 "the full run (`results/`) checks them.", ""]
    os.makedirs(workdir, exist_ok=True)
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{name}.md")
    with open(path, "w") as f:
        f.write("\n".join(head + body))
    with open(os.path.join(workdir, f"{name}.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print("\n".join(head + body) + f"\nwrote {path}")
    summary["report"] = path
    return summary


def _plot(path: str, draw: Callable[[Any], None], *, xlabel: str, ylabel: str, title: str,
          size=(7, 4.5), legend: bool = True, ticks: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig, ax = plt.subplots(figsize=size)
    draw(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if ticks:
        ax.set_xticks(range(ticks))
        ax.set_yticks(range(ticks))
    if legend:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# seed_hops

HOP_PAIRS = ((0, 4000), (0, 4095), (4095, 0), (0, 2048), (1000, 3000), (3000, 4000), (100, 300))


def run_hops(*, quick: bool, workdir: str, results_dir: str, data_dir: str | None = None
             ) -> dict[str, Any]:
    """Hop table for distant pairs, with and without global tokens; diameters."""
    del data_dir
    t0 = time.perf_counter()
    s = setting(quick)
    T, w, mid = s.T, s.w, s.T // 2
    pairs = [(s.at(a), s.at(b)) for a, b in HOP_PAIRS] + [(0, w), (0, w + 1)]
    cfgs = configs(s)[:8]  # the last two only matter for reachability
    names = [c[0] for c in cfgs]
    hops = {n: [A.hops(T, a, b, **s.kw(g, c)) for a, b in pairs] for n, g, c in cfgs}
    diam = {n: A.diameter(T, **s.kw(g, c)) for n, g, c in cfgs}
    src, dst = 0, s.at(4000)
    # One global anywhere: sweep its position (every `step`-th, plus the far endpoint).
    step = max(1, T // 256)
    sweep = {g: A.hops(T, src, dst, **s.kw((g,))) for g in sorted(set(range(0, T, step)) | {dst})}
    one_hop = [g for g, h in sweep.items() if h == 1]
    two_hop = sum(h == 2 for h in sweep.values())
    # Another reading of "window 512" and the second seed's examples.
    h_wide = A.hops(T, src, dst, local_window_size=2 * w)
    p100, p1000 = s.at(100), s.at(1000)
    seed001 = {"100_to_0_w": A.hops(T, p100, 0, local_window_size=w),
               "100_to_0_2w": A.hops(T, p100, 0, local_window_size=2 * w),
               "0_to_1000_w": A.hops(T, 0, p1000, local_window_size=w),
               "0_to_1000_2w": A.hops(T, 0, p1000, local_window_size=2 * w),
               "0_to_1000_w_mid": A.hops(T, 0, p1000, **s.kw((mid,))),
               "0_to_1000_w_cls": A.hops(T, 0, p1000, **s.kw((0,)))}

    rows = [[f"{a} → {b}", abs(b - a), math.ceil(abs(b - a) / w)]
            + [_hop(hops[n][k]) for n in names] for k, (a, b) in enumerate(pairs)]
    rows.append(["**diameter** (longest shortest path)", "", math.ceil((T - 1) / w)]
                + [diam[n] for n in names])
    h0, hg = hops["no globals"][0], hops[f"global at {mid}"][0]
    diam_glob = sorted({diam[n] for n, g, c in cfgs if g and not c})
    body = ["## Hops (fewest attention layers) from src to dst", ""]
    body += _table(["src → dst", "distance", f"⌈distance / {w}⌉"] + names, rows)
    body += ["∞ = unreachable (causal: information only flows forward). The diameter ignores "
             f"unreachable pairs. Periodic 8 = globals at every T/8 from 0; first + last = 0 and "
             f"{T - 1}.", "",
             f"Sweeping the position g of a single (bidirectional) global over g = 0, {step}, "
             f"{2 * step}, ... and g = {dst}: {src} → {dst} takes 1 hop for g in {one_hop} "
             f"(an endpoint is the global) and 2 hops for the other {two_hop} positions.", "",
             "![hops from position 0](seed_hops.png)", ""]
    sd = seed001
    claims = [
        ("000: \"4096 tokens with a window size of 512. A token at position 0 can directly see "
         "tokens up to position 256 (half the window). To reach position 4000, information must "
         "traverse roughly 16 hops\"",
         f"0 → {w}: {_hop(hops['no globals'][-2])} hop, 0 → {w + 1}: "
         f"{_hop(hops['no globals'][-1])}; {src} → {dst}: **{_hop(h0)}** = ⌈{dst}/{w}⌉",
         f"{_verdict(h0 == 16)}, exactly (not only roughly) with {w} keys per side. With "
         f"{2 * w} keys per side (a reading of the second seed's \"512 local neighbors (left and "
         f"right)\") it would be {_hop(h_wide)} hops."),
        ("000: \"adding just one global token reduces this to 2\"",
         f"global at {mid}: **{_hop(hg)}**; any single global: 1 or 2 (sweep above)",
         f"{_verdict(hg == 2)}; 1 hop when the global is an endpoint."),
        ("000: CLS \"ensures that every token is at most 2 hops from any other token\"",
         f"diameter with CLS: **{diam['CLS at 0']}**; causal CLS: **{diam['causal, CLS at 0']}**",
         f"{_verdict(diam['CLS at 0'] <= 2)} bidirectionally. Under causal masking CLS at 0 "
         "attends only itself, so it shortens only paths that start at 0 and the diameter "
         f"stays {diam['causal, CLS at 0']}."),
        ("000: \"maximum path length drops from O(n/w) to 2\"",
         f"diameter {diam['no globals']} (= ⌈{T - 1}/{w}⌉) without globals; {diam_glob} with "
         f"each bidirectional global pattern; causal, global at {mid}: "
         f"{diam[f'causal, global at {mid}']}",
         f"{_verdict(max(diam_glob) == 2)} for bidirectional attention. A causal global relays "
         "only j ≤ g ≤ i, so pairs on one side of it still walk the windows."),
        ("001: \"Position 0 ← Position 100 (need many hops through local attention)\" with "
         "\"512 local neighbors (left and right)\"",
         f"{p100} → 0: **{_hop(sd['100_to_0_2w'])}** hop with {2 * w} per side, "
         f"{_hop(sd['100_to_0_w'])} with {w}",
         f"{_verdict(sd['100_to_0_2w'] > 1)}: 100 positions lie inside one window; more than "
         f"one hop is needed only beyond {w} (or {2 * w}) positions."),
        ("001 quiz: \"How many hops to go from position 0 to position 1000 with global token? "
         "2 (via global token)\"",
         f"0 → {p1000}: **{_hop(sd['0_to_1000_w_mid'])}** via a global at {mid}; "
         f"{_hop(sd['0_to_1000_w_cls'])} if 0 is the global (CLS); without globals "
         f"{_hop(sd['0_to_1000_w'])} ({w}/side) or {_hop(sd['0_to_1000_2w'])} ({2 * w}/side)",
         f"{_verdict(sd['0_to_1000_w_mid'] == 2)} when neither endpoint is global (at most 2 in "
         "every case)."),
    ]
    body += _claims(f"ours (T = {T})", claims)

    shown = [n for n, g, c in cfgs if n in ("no globals", "CLS at 0", f"global at {mid}",
                                           "causal, no globals", f"causal, global at {mid}")]
    dists = {n: A.distances(T, 0, **s.kw(g, c)) for n, g, c in cfgs if n in shown}

    def draw(ax):
        for n in shown:
            d = np.where(dists[n] < 0, np.nan, dists[n].astype(float))
            ax.step(np.arange(T), d, where="post", label=n, ls="--" if "causal" in n else "-")

    _plot(os.path.join(results_dir, "seed_hops.png"), draw, xlabel="destination position",
          ylabel="hops from position 0", title=f"Hops from position 0, T = {T}, {w} keys per side")
    summary = {"T": T, "w": w, "pairs": pairs,
               "configs": [{"name": n, "globals": list(g), "causal": c} for n, g, c in cfgs],
               "hops": hops, "diameter": diam, "sweep_one_hop": one_hop,
               "sweep_two_hop": two_hop, "hops_wide_window": h_wide, "seed001": seed001}
    return _finish("seed_hops", "Seed article: hops between distant positions", body, summary,
                   quick=quick, s=s, t0=t0, workdir=workdir, results_dir=results_dir)


# ---------------------------------------------------------------------------------------
# seed_savings

SAVINGS_G = (0, 1, 2, 4, 8, 16, 32, 64, 128)
SAVINGS_G_QUICK = (0, 1, 2, 4, 8, 16)
STRATEGIES = ("periodic", "question", "random")


def strategy_mask(strategy: str, T: int, G: int, seed: int = RANDOM_SEED) -> np.ndarray:
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
    assert int(m.sum()) == G, (strategy, G, int(m.sum()))
    return m


def run_savings(*, quick: bool, workdir: str, results_dir: str, data_dir: str | None = None
                ) -> dict[str, Any]:
    """Pairs, density and savings vs number and placement of global tokens."""
    del data_dir
    t0 = time.perf_counter()
    s = setting(quick)
    T, T2 = s.T, s.T ** 2
    Gs = SAVINGS_G_QUICK if quick else SAVINGS_G
    band = A.allowed_pairs(T, local_window_size=s.w)

    def count(m: np.ndarray) -> int:
        return A.allowed_pairs(T, **s.kw(m))

    def bound(G: int) -> int:  # |band ∪ G rows ∪ G columns| <= sum of the parts
        return min(T2, band + 2 * G * T - G * G)

    masks = {st: {G: strategy_mask(st, T, G) for G in Gs} for st in STRATEGIES}
    pairs = {st: {G: count(m) for G, m in ms.items()} for st, ms in masks.items()}
    per = pairs["periodic"]
    added = {G: (per[G] - per[Gp]) / (G - Gp) for Gp, G in zip(Gs, Gs[1:])}
    rows = [[G, _n(per[G]), _pct(per[G] / T2), _pct(1 - per[G] / T2),
             _n(round(added[G])) if G in added else ""]
            + [f"{_n(pairs[st][G])} ({_pct(1 - pairs[st][G] / T2)})" for st in STRATEGIES[1:]]
            + [_pct(1 - bound(G) / T2)] for G in Gs]

    # The article's named strategies (token counts as stated, not scaled in --quick).
    named = [("no globals", "none", 0), ("CLS", "cls", 1), ("first + last", "first_last", 2),
             ("periodic 8", "periodic", 8), ("CLS + 63 question tokens (first 64)", "question", 64),
             ("periodic 64", "periodic", 64), (f"random 64 (seed {RANDOM_SEED})", "random", 64)]
    npairs = {label: count(strategy_mask(st, T, G)) for label, st, G in named}
    rand64 = [count(strategy_mask("random", T, 64, seed)) for seed in range(100)]
    nrows = [[label, G, _n(npairs[label]), _pct(npairs[label] / T2), _pct(1 - npairs[label] / T2)]
             for label, _, G in named]
    nrows += [["random 64, seeds 0-99 (min - max)", 64, f"{_n(min(rand64))} - {_n(max(rand64))}",
               "", f"{_pct(1 - max(rand64) / T2)} - {_pct(1 - min(rand64) / T2)}"],
              ["any placement of 64 (bound)", 64, f"≤ {_n(bound(64))}", "",
               f"≥ {_pct(1 - bound(64) / T2)}"]]
    first64, per64 = npairs["CLS + 63 question tokens (first 64)"], npairs["periodic 64"]
    p8, cls1, fl = npairs["periodic 8"], npairs["CLS"], npairs["first + last"]
    worst64 = 1 - bound(64) / T2
    body = ["## Named strategies", ""]
    body += _table(["strategy", "G", "pairs", "density", "savings"], nrows)
    body += [f"The window alone has {_n(band)} pairs. The bound counts the band, G full rows "
             "and G full columns as if disjoint (band + 2GT - G²); for G ≥ 1 it is not attained "
             "(each global row also holds band pairs), so the true worst placement saves a "
             "little more.", "", "## Savings vs number of global tokens", ""]
    body += _table(["G", "periodic: pairs", "density", "savings", "pairs added per extra global",
                    "question (CLS + G-1): pairs (savings)",
                    f"random, seed {RANDOM_SEED}: pairs (savings)", "any placement ≥"], rows)
    body += ["Periodic = every T/G-th position from 0 (`patterns.periodic`; G = 1 is CLS); "
             "question = segment 0 of a [CLS] + question + context layout "
             "(`patterns.from_segments`); random = `np.random.default_rng"
             f"({RANDOM_SEED}).choice(T, G, replace=False)` (`patterns.from_positions`). "
             "Periodic and random are almost equal (their curves overlap in the plot).", "",
             "![savings vs G](seed_savings.png)", ""]
    claims = [
        ("\"Even with 64 global tokens, we maintain over 84% savings compared to full attention\"",
         f"first 64: **{_pct(1 - first64 / T2)}**; every {T // 64}th: **{_pct(1 - per64 / T2)}**; "
         f"random (100 seeds): {_pct(1 - max(rand64) / T2)} - {_pct(1 - min(rand64) / T2)}; "
         f"any placement ≥ **{_pct(worst64)}**",
         _verdict(worst64 > 0.84) + (" for every placement of 64 globals (bound)." if worst64 > 0.84
                                     else f" at T = {T}, where 64 globals are {_pct(64 / T)} of "
                                     "the tokens.")),
        ("\"The marginal cost of additional global tokens is linear in sequence length, not "
         "quadratic\"",
         f"each extra global adds at most 2T - 1 = {_n(2 * T - 1)} pairs; measured (periodic): "
         f"{_n(round(min(added.values())))} - {_n(round(max(added.values())))} per token",
         f"{_verdict(max(added.values()) <= 2 * T - 1)}: O(T) per token, O(G·T) in all."),
        ("\"The periodic strategy with 8 global tokens has higher density (more connections) but "
         "still achieves over 80% savings\"",
         f"periodic 8: density {_pct(p8 / T2)}, savings **{_pct(1 - p8 / T2)}**; CLS: "
         f"{_pct(cls1 / T2)} / {_pct(1 - cls1 / T2)}; first + last: {_pct(fl / T2)} / "
         f"{_pct(1 - fl / T2)}",
         f"{_verdict(p8 > fl > cls1 and 1 - p8 / T2 > 0.8)}: denser than CLS and first + last, "
         f"savings {_pct(1 - p8 / T2)} vs 80%."),
        ("001: Global + Local costs \"O(g·n) + O(n·w)\"",
         f"pairs ≤ band + 2GT - G², band = {_n(band)} ≈ T(2w + 1)",
         _verdict(all(pairs[st][G] <= bound(G) for st in STRATEGIES for G in Gs))),
    ]
    body += _claims(f"ours (T = {T})", claims)

    def draw(ax):
        x = np.arange(len(Gs))
        for st, label, ms in (("periodic", "periodic (every T/G)", 8),
                              ("question", "CLS + question block (first G)", 5),
                              ("random", f"random (seed {RANDOM_SEED})", 4)):
            ax.plot(x, [100 * (1 - pairs[st][G] / T2) for G in Gs], "o-", ms=ms, label=label)
        ax.plot(x, [100 * (1 - bound(G) / T2) for G in Gs], "k:", label="any placement (bound)")
        ax.plot([x[1]], [100 * (1 - cls1 / T2)], "s", ms=10, mfc="none", label="CLS")
        ax.plot([x[2]], [100 * (1 - fl / T2)], "D", ms=10, mfc="none", label="first + last")
        for y in (84, 80):
            ax.axhline(y, color="grey", lw=0.8, ls="--")
        ax.set_xticks(x, [str(G) for G in Gs])

    _plot(os.path.join(results_dir, "seed_savings.png"), draw, xlabel="number of global tokens G",
          ylabel="savings vs full attention (%)",
          title=f"T = {T}, window {2 * s.w} ({s.w} per side)")
    summary = {"T": T, "w": s.w, "G": list(Gs), "band": band, "pairs": pairs,
               "positions": {st: {G: np.flatnonzero(m).tolist() for G, m in ms.items()}
                             for st, ms in masks.items()},
               "bound": {G: bound(G) for G in Gs + (64,)}, "named": npairs, "random64": rand64,
               "random_seed": RANDOM_SEED}
    return _finish("seed_savings", "Seed article: density and savings of global-token patterns",
                   body, summary, quick=quick, s=s, t0=t0, workdir=workdir, results_dir=results_dir)


# ---------------------------------------------------------------------------------------
# seed_16token


def sixteen_token_weights(seed: int = KEY_SEED) -> dict[str, np.ndarray]:
    """The 16-token example through :func:`globalattn.global_local_attention`.

    q, k, v ``[1, 16, 1, 8]`` ~ N(0, 1) from ``jax.random.key(seed)``; window 2
    per side, globals at 0 and 8. The weight matrix comes from the kernel itself:
    attention is linear in v, so feeding the columns of the 16 x 16 identity as
    values (two calls of H = 8 columns each) returns the weights.
    """
    T, H = 16, 8
    gm = P.from_positions((0, 8), shape=(1, T))
    q, k, v = (jax.random.normal(key, (1, T, 1, H), jnp.float32)
               for key in jax.random.split(jax.random.key(seed), 3))

    @jax.jit  # one compilation instead of dozens of eager ops
    def attn(vals):
        return globalattn.global_local_attention(q, k, vals, local_window_size=2, global_mask=gm,
                                                 max_globals=2)

    eye = jnp.eye(T, dtype=jnp.float32)[None, :, None, :]  # [1, S, 1, T]: value of key j = e_j
    weights = jnp.concatenate([attn(eye[..., c:c + H]) for c in range(0, T, H)], axis=-1)
    mask = globalattn.global_local_mask(T, local_window_size=2, global_mask=gm)
    dense_out = jax.jit(globalattn.dense_attention)(q, k, v, mask[:, None])
    def first(x):  # [1, T, 1, H] -> [T, H]
        return np.asarray(x)[0, :, 0]

    return {"q": first(q), "k": first(k), "v": first(v), "weights": first(weights),
            "out": first(attn(v)), "dense_out": first(dense_out), "mask": np.asarray(mask)[0],
            "global_mask": np.asarray(gm)[0]}


def run_16token(*, quick: bool, workdir: str, results_dir: str, data_dir: str | None = None
                ) -> dict[str, Any]:
    """Mask picture, row counts and a real attention-weight heatmap of the 16-token example."""
    del data_dir
    t0 = time.perf_counter()
    T = 16
    r = sixteen_token_weights()
    W, mask, glob = r["weights"], r["mask"], r["global_mask"]
    counts = A.row_counts(T, local_window_size=2, global_positions=glob)
    if not np.array_equal(counts, mask.sum(-1)):
        raise AssertionError("analytics.row_counts disagrees with the dense mask")
    sc = np.where(mask, r["q"].astype(np.float64) @ r["k"].T.astype(np.float64) / math.sqrt(8),
                  -np.inf)
    oracle = np.exp(sc - sc.max(-1, keepdims=True))
    oracle /= oracle.sum(-1, keepdims=True)  # float64 softmax over the masked scores
    err = float(np.abs(W - oracle).max())
    masked_zero = bool(np.all(W[~mask] == 0.0))
    row_sum_err = float(np.abs(W.sum(-1) - 1).max())
    out_err = float(np.abs(r["out"] - r["dense_out"]).max())

    idx = np.arange(T)
    in_win = np.abs(idx[:, None] - idx[None, :]) <= 2
    local = ~glob
    win_size = in_win.sum(-1)
    odd = [int(i) for i in np.flatnonzero(local & ((counts < 6) | (counts > 7)))]
    odd_txt = " and ".join(map(str, odd))
    odd_counts = " or ".join(map(str, sorted(set(counts[odd].tolist()))))
    body = ["## The pattern", "", "T = 16, window 4 in the article's sense = 2 keys on each side "
            "(`local_window_size=2`), global tokens at 0 and 8 (`patterns.from_positions`).", "",
            "![mask](seed_16token_mask.png)", ""]
    body += _table(["row"] + [str(i) for i in range(T)],
                   [["window keys"] + win_size.tolist(), ["allowed keys"] + counts.tolist()])
    body += [f"Row counts: `{counts.tolist()}`. Global rows see all {T} keys; of the 14 local "
             f"rows {int(np.sum(counts[local] == 7))} see 7, {int(np.sum(counts[local] == 6))} "
             f"see 6 and rows {odd_txt} see {odd_counts}.",
             "", "## Attention weights from the efficient kernel", "",
             f"q, k, v of shape [1, 16, 1, 8] ~ N(0, 1) from `jax.random.key({KEY_SEED})`, scale "
             "1/√8. `global_local_attention` was called with the columns of the 16 × 16 "
             "identity as values (two calls of 8 columns, since v must have q's head dim): "
             "attention is linear in v, so the output *is* the kernel's weight matrix.", "",
             f"* max |kernel − float64 softmax over the masked scores| = {err:.1e}",
             f"* masked entries exactly 0: {masked_zero} ({int((~mask).sum())} of {T * T})",
             f"* max |row sum − 1| = {row_sum_err:.1e}",
             f"* with the random v: max |global_local_attention − dense_attention| = "
             f"{out_err:.1e}",
             "", "![weights](seed_16token_weights.png)", "", "Weights rounded to 3 decimals "
             "(row = query, column = key; `.` = masked, exactly 0):", "", "```",
             "     " + "".join(f"{j:>6}" for j in range(T))]
    body += [f"{i:>3}  " + "".join(f"{W[i, j]:6.3f}" if mask[i, j] else "     ." for j in range(T))
             for i in range(T)]
    body += ["```", ""]
    g_mean = float(W[glob[None, :] & ~in_win & local[:, None]].mean())
    w_mean = float(W[in_win & local[:, None]].mean())
    full_rows = bool(np.all(W[glob] > 0))
    claims = [
        ("\"Global positions connect to all 16 tokens\"",
         f"rows 0, 8: {counts[0]}, {counts[8]} keys", _verdict(counts[0] == counts[8] == T)),
        ("\"Local positions connect to their window (4-5 tokens) plus the 2 global tokens, "
         "totaling around 6-7 connections each\"",
         f"window {sorted(set(win_size[local].tolist()))} keys; totals "
         f"{sorted(set(counts[local].tolist()))}: `{counts.tolist()}`",
         f"{_verdict(not odd)}: rows {odd_txt} have {odd_counts}. Row 15's window has only 3 keys "
         "(13-15), row 1's has 4 (0-3) and already contains global 0; \"plus the 2 global "
         "tokens\" double counts a global inside the window (rows 1, 2, 6, 7, 9, 10 add only "
         "one)."),
        ("\"The global token rows (0 and 8) have distributed attention across all positions\"",
         f"rows 0, 8: all 16 weights > 0: {full_rows} (smallest {W[glob].min():.1e}); largest "
         f"{W[0].max():.3f}, {W[8].max():.3f}", _verdict(full_rows) + " (support)."),
        ("\"The local token rows show concentrated attention within their windows, with visible "
         "bumps at columns 0 and 8\"",
         f"local rows: mean weight {g_mean:.3f} per out-of-window global key vs {w_mean:.3f} "
         "per in-window key",
         "**holds for the support**: local rows are nonzero only in the window and at columns 0 "
         "and 8. With random q and k the global columns get weight because they are allowed; "
         "their size is random, not systematically a bump"
         + (" (in this draw they get less than in-window keys on average)." if g_mean < w_mean
            else ".")),
    ]
    body += _claims("ours", claims)

    cat = np.select([in_win, glob[:, None], glob[None, :]], [1, 2, 3], 0)

    def draw_mask(ax):
        from matplotlib.colors import ListedColormap

        ax.imshow(cat, cmap=ListedColormap(["white", "tab:blue", "tab:orange", "tab:green"]),
                  vmin=0, vmax=3)
        for i in range(T):
            ax.text(T - 0.1, i, f" {counts[i]}", va="center", fontsize=8)
        ax.set_xlim(-0.5, T + 1)

    def draw_weights(ax):
        im = ax.imshow(np.where(mask, W, np.nan), cmap="viridis", vmin=0)
        for i, j in zip(*np.nonzero(mask)):
            ax.text(j, i, f"{W[i, j]:.2f}".lstrip("0"), ha="center", va="center", fontsize=5,
                    color="white" if W[i, j] < 0.5 * W.max() else "black")
        ax.figure.colorbar(im, ax=ax, fraction=0.046)

    _plot(os.path.join(results_dir, "seed_16token_mask.png"), draw_mask, xlabel="key j",
          ylabel="query i", legend=False, size=(6, 5.5), ticks=T,
          title="16 tokens, 2 per side, globals {0, 8}: blue window, orange global row,\n"
          "green global column, numbers = allowed keys per row")
    _plot(os.path.join(results_dir, "seed_16token_weights.png"), draw_weights, xlabel="key j",
          ylabel="query i", legend=False, size=(7, 6), ticks=T,
          title=f"global_local_attention weights (random q, k, key {KEY_SEED}); blank = masked")
    summary = {"row_counts": counts.tolist(), "weights": W.tolist(), "q": r["q"].tolist(),
               "k": r["k"].tolist(), "max_err_vs_softmax": err, "masked_exact_zero": masked_zero,
               "row_sum_err": row_sum_err, "out_err_vs_dense": out_err, "key_seed": KEY_SEED}
    return _finish("seed_16token", "Seed article: the 16-token example", body, summary,
                   quick=quick, s=None, t0=t0, workdir=workdir, results_dir=results_dir)


# ---------------------------------------------------------------------------------------
# seed_connectivity

SIXTEEN_CONFIGS = [("T=16, 2/side, globals {0, 8}", (0, 8), False),
                   ("T=16, 2/side, no globals", (), False),
                   ("T=16, 2/side, causal, globals {0, 8}", (0, 8), True)]
MAX_LAYERS = 16


def run_connectivity(*, quick: bool, workdir: str, results_dir: str,
                     data_dir: str | None = None) -> dict[str, Any]:
    """Reachable pairs after 1, 2, 3 (and up to 16) layers, with and without globals."""
    del data_dir
    t0 = time.perf_counter()
    s = setting(quick)
    T, T2, mid = s.T, s.T ** 2, s.T // 2
    cases = [(n, s, g, c) for n, g, c in configs(s) if n != "first + last"]
    cases += [(n, Setting(16, 2), g, c) for n, g, c in SIXTEEN_CONFIGS]
    res = {}
    for name, st, glob, causal in cases:
        curve = A.connectivity_curve(st.T, MAX_LAYERS, **st.kw(glob, causal))
        res[name] = {"counts": [r.count for r in curve], "total": curve[0].total,
                     "possible": curve[0].possible,
                     "diameter": A.diameter(st.T, **st.kw(glob, causal))}
    rows = []
    for name, st, glob, causal in cases:
        r = res[name]
        cells = [name] + [f"{_n(c)} ({_pct(c / r['total'])}"
                          + (f"; {_pct(c / r['possible'])} of possible)" if causal else ")")
                          for c in r["counts"][:3]]
        full = next((L + 1 for L, c in enumerate(r["counts"]) if c == r["possible"]), None)
        last = r["counts"][min(max(r["diameter"], 1), MAX_LAYERS) - 1]
        rows.append(cells + [r["diameter"], full or (f"never ({_pct(last / r['possible'])})"
                                                     if r["diameter"] <= MAX_LAYERS
                                                     else f"> {MAX_LAYERS}")])
    body = ["## Reachable ordered pairs (j's information at i) after L layers", ""]
    body += _table(["pattern", "layer 1", "layer 2", "layer 3", "layers until no change",
                    "first layer with all possible pairs"], rows)
    band = A.allowed_pairs(T, local_window_size=s.w)
    cls_, none_ = res["CLS at 0"]["counts"], res["no globals"]["counts"]
    cc, cn = res["causal, CLS at 0"]["counts"], res["causal, no globals"]["counts"]
    cm, cp = res[f"causal, global at {mid}"], res["causal, periodic 8"]
    pos = cm["possible"]
    bidir = [n for n, st, g, c in cases if g and not c and st is s]
    bidir_full2 = all(res[n]["counts"][1] == T2 for n in bidir)
    small, small_c = res[SIXTEEN_CONFIGS[0][0]], res[SIXTEEN_CONFIGS[2][0]]
    gap = max(abs(a - b) / pos for n in ("causal, CLS at 0", f"causal, global at {T - 1}")
              for a, b in zip(res[n]["counts"], cn))
    body += [f"Percentages are of T² = {_n(T2)}; causal rows also give the fraction of the "
             f"T(T+1)/2 = {_n(pos)} pairs a causal model could ever connect (j ≤ i). Residual "
             "connections keep a token's own information (`(A | I)^L`). Periodic 8 = globals at "
             "every T/8 from 0. Lines overlap in the plot: all bidirectional patterns with a "
             "global coincide, and causal CLS / causal global at T - 1 coincide with causal, no "
             f"globals to within {_pct(gap)} of the possible pairs.", "",
             "![reach by layer](seed_connectivity.png)", ""]
    claims = [
        ("\"After just one layer, connectivity is limited to local neighborhoods plus the "
         "global token\"",
         f"CLS, layer 1: {_n(cls_[0])} = band {_n(band)} + {_n(cls_[0] - band)} through the "
         f"global row and column ({_pct(cls_[0] / T2)})", _verdict(cls_[0] - band < 2 * T)),
        ("\"By layer 2, the global token has served its purpose as a relay: nearly all "
         "positions can reach each other\"",
         f"layer 2: **{_pct(cls_[1] / T2)}** ({_n(cls_[1])}) with each of {', '.join(bidir)}",
         f"{_verdict(bidir_full2)}, and understated: *all* pairs are connected at layer 2 "
         "(j → global → i), not nearly all."),
        ("\"By layer 3, full connectivity is achieved\"",
         f"with globals: 100% (already at 2); without: {_pct(none_[2] / T2)} at layer 3, full "
         f"after {res['no globals']['diameter']} layers",
         _verdict(cls_[2] == T2) + " (bidirectional)."),
        ("(not in the article) the same for a causal model",
         f"causal CLS at 0, layer 2: {_n(cc[1])} vs {_n(cn[1])} without globals "
         f"({_pct(cc[1] / pos)} of possible); causal global at {mid}: "
         f"**{_pct(cm['counts'][1] / pos)}** at layer 2, **{_pct(cm['counts'][2] / pos)}** at "
         f"layer 3, all after {cm['diameter']} layers; causal periodic 8: "
         f"{_pct(cp['counts'][1] / pos)} at layer 2",
         "**does not carry over** to one causal global: it relays only j ≤ g ≤ i, and CLS at 0 "
         "(which attends only itself) relays nothing."
         + (f" Periodic 8 (spacing {T // 8} = 2w) restores it: every pair j ≤ i is then within "
            "two windows or has a global between its ends." if cp["counts"][1] == pos else "")),
        ("T = 16 example (window 2 per side, globals {0, 8})",
         "bidirectional: " + ", ".join(_n(c) for c in small["counts"][:3]) + " of 256; causal: "
         + ", ".join(_n(c) for c in small_c["counts"][:3]) + f" of {small_c['possible']} possible",
         "\"nearly all by 2, full by 3\" " + _verdict(small_c["counts"][1] < small_c["possible"]
                                                     == small_c["counts"][2])
         + " exactly for the *causal* small example; bidirectional is full at 2."),
    ]
    body += _claims(f"ours (T = {T})", claims)

    def draw(ax):
        x = np.arange(1, MAX_LAYERS + 1)
        for name, st, _, causal in cases:
            if st is s:
                ax.plot(x, [100 * c / res[name]["possible"] for c in res[name]["counts"]],
                        "s--" if causal else "o-", ms=3, lw=1.2 if causal else 2.5, label=name)
        ax.set_xticks(x)

    _plot(os.path.join(results_dir, "seed_connectivity.png"), draw, xlabel="layers L",
          ylabel="reachable pairs (% of possible)", size=(8, 5),
          title=f"T = {T}, {s.w} keys per side (causal: % of the j ≤ i pairs)")
    summary = {"T": T, "w": s.w, "results": res,
               "cases": [{"name": n, "T": st.T, "w": st.w, "globals": list(g), "causal": c}
                         for n, st, g, c in cases]}
    return _finish("seed_connectivity", "Seed article: reachable pairs by layer", body, summary,
                   quick=quick, s=s, t0=t0, workdir=workdir, results_dir=results_dir)
