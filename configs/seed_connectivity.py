"""Seed article: reachable pairs after L layers, with and without global tokens.

Pair (i, j) is reachable after L layers when j's token can influence i's output
through L attention layers (residual connections keep a token's own
information: ``(A | I)^L``). T = 4096, 256 keys per side ('quick': T = 512, 32
per side), plus the article's 16-token example.

    python -m experiments.reproduce seed_connectivity --out=results
    python -m experiments.reproduce seed_connectivity --quick

``sweep()``: the patterns (``T``, ``w``, ``globals``, ``causal``).
"""
import ml_collections

from globalattn.train.config import check_arg

MEASURE = "seed_connectivity"
TITLE = "Seed article: reachable pairs by layer"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = check_arg(arg, ("quick", "test"))
    c = ml_collections.ConfigDict()
    c.T, c.w = (512, 32) if arg else (4096, 256)
    c.max_layers = 16
    c.globals = ()  # a pattern (set by the sweep)
    c.causal = False
    c.lock()
    return c


def sweep(arg: str | None = None) -> list[dict]:
    c = get_config(arg)
    T, mid = c.T, c.T // 2
    per8 = tuple(range(0, T, T // 8))
    rows = [("no globals", (), False), ("CLS at 0", (0,), False),
            (f"global at {mid}", (mid,), False), ("periodic 8", per8, False),
            ("causal, no globals", (), True), ("causal, CLS at 0", (0,), True),
            (f"causal, global at {mid}", (mid,), True),
            (f"causal, global at {T - 1}", (T - 1,), True), ("causal, periodic 8", per8, True)]
    out = [{"name": n, "globals": g, "causal": k} for n, g, k in rows]
    out += [{"name": n, "T": 16, "w": 2, "globals": g, "causal": k} for n, g, k in (
        ("T=16, 2/side, globals {0, 8}", (0, 8), False), ("T=16, 2/side, no globals", (), False),
        ("T=16, 2/side, causal, globals {0, 8}", (0, 8), True))]
    return out


REPORT = """
Conventions: pairs (i, j) are ordered and include i = j; full attention has T² pairs; a *hop* is one attention layer carrying information from key j to query i; bidirectional unless marked causal. Every count is exact (`globalattn.analytics`, tested against the dense mask).

Setting: T = {c[T]}, article window {v[window]} = {c[w]} keys on each side plus the token itself (`local_window_size={c[w]}`).

## Reachable ordered pairs (j's information at i) after L layers

{tables[reach]}

Percentages are of T² = {v[T2]:,}; causal rows also give the fraction of the T(T+1)/2 = {v[possible]:,} pairs a causal model could ever connect (j ≤ i). Residual connections keep a token's own information (`(A | I)^L`). Periodic 8 = globals at every T/8 from 0. Lines overlap in the plot: all bidirectional patterns with a global coincide, and causal CLS / causal global at T - 1 coincide with causal, no globals to within {v[causal_gap]:.2f}% of the possible pairs.

![reach by layer](seed_connectivity.png)

## The article's claims

| claim | ours (T = {c[T]}) | verdict (full run, T = 4096) |
|---|---|---|
| "After just one layer, connectivity is limited to local neighborhoods plus the global token" | CLS, layer 1: {v[cls][0]:,} = band {v[band]:,} + {v[cls_extra]:,} through the global row and column | **holds** |
| "By layer 2, the global token has served its purpose as a relay: nearly all positions can reach each other" | layer 2 with each bidirectional global pattern: {v[bidir_layer2]} of {v[T2]:,} | **holds**, and understated: *all* pairs are connected at layer 2 (j → global → i), not nearly all. |
| "By layer 3, full connectivity is achieved" | with globals: all pairs (already at 2); without: {v[none][2]:,} at layer 3, full after {v[diameter_none]} layers | **holds** (bidirectional). |
| (not in the article) the same for a causal model | causal CLS at 0, layer 2: {v[causal_cls][1]:,} vs {v[causal_none][1]:,} without globals; causal global at T/2: {v[causal_mid_pct][1]:.2f}% of possible at layer 2, {v[causal_mid_pct][2]:.2f}% at layer 3, all after {v[diameter_causal_mid]} layers; causal periodic 8: {v[causal_periodic8_pct][1]:.2f}% at layer 2 | **does not carry over** to one causal global: it relays only j ≤ g ≤ i, and CLS at 0 (which attends only itself) relays nothing. Periodic 8 (spacing T/8 = 2w) restores it: every pair j ≤ i is then within two windows or has a global between its ends. |
| T = 16 example (window 2 per side, globals {{0, 8}}) | bidirectional: {v[small]} of 256; causal: {v[small_causal]} of 136 possible | "nearly all by 2, full by 3" **holds** exactly for the *causal* small example; bidirectional is full at 2. |
"""
