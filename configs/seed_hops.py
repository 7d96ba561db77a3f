"""Seed article: hops between distant positions, with and without global tokens.

A hop is one attention layer; the hop count from src to dst is the fewest
layers after which dst's output depends on src's token. T = 4096, "window 512"
read as 256 keys per side; 'quick': T = 512, 32 per side, positions scaled.

    python -m experiments.reproduce seed_hops --out=results   # -> results/seed_hops.md (seconds)
    python -m experiments.reproduce seed_hops --quick

``sweep()``: the global patterns (``globals`` positions, ``causal``).
"""
import ml_collections

from globalattn.train.config import check_arg

MEASURE = "seed_hops"
TITLE = "Seed article: hops between distant positions"
ARTICLE_T = 4096
# (src, dst) at T = 4096, scaled to T; then (0, w) and (0, w + 1), the window's edge.
HOP_PAIRS = ((0, 4000), (0, 4095), (4095, 0), (0, 2048), (1000, 3000), (3000, 4000), (100, 300))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = check_arg(arg, ("quick", "test"))
    c = ml_collections.ConfigDict()
    c.article_T = ARTICLE_T
    c.T, c.w = (512, 32) if arg else (ARTICLE_T, 256)
    c.globals = ()  # a pattern: global positions (set by the sweep)
    c.causal = False
    c.lock()
    return c


def sweep(arg: str | None = None) -> list[dict]:
    """The global patterns of the table (the last two only matter for connectivity)."""
    c = get_config(arg)
    T, mid = c.T, c.T // 2
    per8 = tuple(range(0, T, T // 8))
    return [{"name": n, "globals": g, "causal": k} for n, g, k in (
        ("no globals", (), False), ("CLS at 0", (0,), False), (f"global at {mid}", (mid,), False),
        ("first + last", (0, T - 1), False), ("periodic 8", per8, False),
        ("causal, no globals", (), True), ("causal, CLS at 0", (0,), True),
        (f"causal, global at {mid}", (mid,), True))]


REPORT = """
Conventions: pairs (i, j) are ordered and include i = j; a *hop* is one attention layer carrying information from key j to query i; bidirectional unless marked causal. Every count is exact (`globalattn.analytics`, tested against the dense mask).

Setting: T = {c[T]}, article window {v[window]} = {c[w]} keys on each side plus the token itself (`local_window_size={c[w]}`).

## Hops (fewest attention layers) from src to dst

{tables[hops]}

∞ = unreachable (causal: information only flows forward). The diameter ignores unreachable pairs. Periodic 8 = globals at every T/8 from 0; first + last = 0 and T - 1.

Sweeping the position g of a single (bidirectional) global over every {v[sweep_step]}-th position and g = {v[dst]}: {v[src]} → {v[dst]} takes 1 hop for g in {v[sweep_one_hop]} (an endpoint is the global) and 2 hops for the other {v[sweep_two_hop]} positions.

![hops from position 0](seed_hops.png)

## The article's claims

| claim | ours (T = {c[T]}) | verdict (full run, T = 4096) |
|---|---|---|
| 000: "4096 tokens with a window size of 512. A token at position 0 can directly see tokens up to position 256 (half the window). To reach position 4000, information must traverse roughly 16 hops" | 0 → {c[w]}: {v[edge_in]} hop, 0 → w + 1: {v[edge_out]}; {v[src]} → {v[dst]}: **{v[h_none]}** hops | **holds**, exactly (not only roughly) with 256 keys per side. With {v[window]} keys per side (a reading of the second seed's "512 local neighbors (left and right)") it would be {v[hops_wide_window]} hops. |
| 000: "adding just one global token reduces this to 2" | global at T/2: **{v[h_mid]}**; any single global: 1 or 2 (sweep above) | **holds**; 1 hop when the global is an endpoint. |
| 000: CLS "ensures that every token is at most 2 hops from any other token" | diameter with CLS: **{v[diameter_cls]}**; causal CLS: **{v[diameter_causal_cls]}** | **holds** bidirectionally. Under causal masking CLS at 0 attends only itself, so it shortens only paths that start at 0 and the diameter stays that of the window. |
| 000: "maximum path length drops from O(n/w) to 2" | diameter {v[diameter_none]} without globals; {v[diameter_globals]} with each bidirectional global pattern; causal, global at T/2: {v[diameter_causal_mid]} | **holds** for bidirectional attention. A causal global relays only j ≤ g ≤ i, so pairs on one side of it still walk the windows. |
| 001: "Position 0 ← Position 100 (need many hops through local attention)" with "512 local neighbors (left and right)" | {v[p100]} → 0: **{v[seed001][100_to_0_2w]}** hop with {v[window]} per side, {v[seed001][100_to_0_w]} with {c[w]} | **does not hold**: 100 positions lie inside one window; more than one hop is needed only beyond 256 (or 512) positions. |
| 001 quiz: "How many hops to go from position 0 to position 1000 with global token? 2 (via global token)" | 0 → {v[p1000]}: **{v[seed001][0_to_1000_w_mid]}** via a global at T/2; {v[seed001][0_to_1000_w_cls]} if 0 is the global (CLS); without globals {v[seed001][0_to_1000_w]} ({c[w]}/side) or {v[seed001][0_to_1000_2w]} ({v[window]}/side) | **holds** when neither endpoint is global (at most 2 in every case). |
"""
