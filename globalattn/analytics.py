"""Exact analytics of global + local attention patterns (numpy, host side).

Pattern semantics are exactly those of :func:`globalattn.global_local_mask`
for a single example (no random blocks). With ``T = seq_len``,
``(left, right) = local_window_size`` (an int w means ``(w, w)``), query i may
attend key j -- the pair (i, j) is *allowed* -- iff

* both i and j are real tokens (``padding_mask``; default all real),
* ``j <= i`` when ``is_causal``,
* and at least one of: ``i - left <= j <= i + right`` (the window, which
  contains i itself), i is global, j is global.

A pair is counted once however many of these rules allow it, so a global
token inside a window is not double counted. Global flags on padding are
ignored, as in the dense mask.

``global_positions`` is either a sequence of ints in ``[0, T)`` (duplicates
are idempotent) or a bool mask ``[T]`` (e.g. one row of a
:mod:`globalattn.patterns` helper). ``padding_mask`` is an optional bool
``[T]``, True = real. A ``[1, T]`` mask is accepted for either.

The attention graph has an edge j -> i when i may attend j: one attention
layer moves information from key j to query i. With residual connections a
token keeps its own information, so after L layers j's information has
reached i iff ``(A | I)^L [i, j]`` (boolean power; the window already puts i
in its own row, so for real tokens ``A | I == A``).

Counts are exact Python ints / int64 (never floats); densities are exact
:class:`fractions.Fraction` on request. Cost, none building a dense T x T:

* :func:`row_counts`, :func:`allowed_pairs`, :func:`density`,
  :func:`savings`: O(T) with prefix sums (closed form per row).
* :func:`distances`, :func:`hops`: BFS, O(T * alpha(T)) for any window/globals.
* :func:`connectivity_curve`, :func:`reachable_fraction`, :func:`diameter`:
  all n sources propagated together in chunks of 512 rows, O(T) per source
  per layer; T=4096 with 3 layers takes well under a second.

``window`` here is always the radius of :data:`globalattn.ops.dense.Window`.
The published claims :func:`seed_article_facts` reproduces state a window as
its total width: "window 512" means 256 tokens on each side, i.e.
``local_window_size=256``.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import numbers
from fractions import Fraction
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from globalattn.ops import validate as V
from globalattn.ops.dense import Window
Globals = Union[Sequence[int], np.ndarray]

__all__ = [
    "Reach",
    "row_counts",
    "allowed_pairs",
    "density",
    "savings",
    "distances",
    "hops",
    "reachable_fraction",
    "connectivity_curve",
    "diameter",
    "seed_article_facts",
]


# --------------------------------------------------------------------------
# Normalised pattern.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Pattern:
    T: int
    left: int
    right: int
    causal: bool
    real: np.ndarray  # bool [T]
    glob: np.ndarray  # bool [T], already restricted to real tokens

    def limits(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per query row i: window ``[lo, hi]`` and last attendable key ``lim`` (int64 [T])."""
        i = np.arange(self.T, dtype=np.int64)
        lo = np.maximum(i - self.left, 0)
        hi = np.minimum(i + self.right, self.T - 1)
        lim = i if self.causal else np.full(self.T, self.T - 1, np.int64)
        return lo, np.minimum(hi, lim), lim

    @property
    def glob_idx(self) -> np.ndarray:
        return np.flatnonzero(self.glob)

    @property
    def all_real(self) -> bool:
        return bool(self.real.all())


def _token_mask(m, T: int, name: str) -> np.ndarray:
    m = np.asarray(m)
    if m.dtype != np.bool_:
        raise ValueError(f"{name} must be boolean, got dtype {m.dtype}")
    if m.shape not in ((T,), (1, T)):
        raise ValueError(f"{name} must have shape [T] = ({T},) (or [1, T]), got {m.shape}")
    return m.reshape(T)


def _pattern(seq_len: int, local_window_size: Window, global_positions: Globals,
             is_causal: bool, padding_mask: Optional[np.ndarray]) -> _Pattern:
    T = V.check_positive_int(seq_len, "seq_len")
    left, right = V.normalize_window(local_window_size)
    if not isinstance(is_causal, (bool, np.bool_)):
        raise ValueError(f"is_causal must be a bool, got {is_causal!r}")
    real = np.ones(T, bool) if padding_mask is None else _token_mask(padding_mask, T, "padding_mask")
    g = np.asarray(global_positions)
    if g.dtype == np.bool_:
        glob = _token_mask(g, T, "global_positions (bool mask)").copy()
    elif g.size == 0:
        glob = np.zeros(T, bool)
    else:
        if not np.issubdtype(g.dtype, np.integer) or g.ndim != 1:
            raise ValueError("global_positions must be a sequence of ints or a bool mask [T], "
                             f"got dtype {g.dtype} shape {g.shape}")
        bad = g[(g < 0) | (g >= T)]
        if bad.size:
            raise ValueError(f"global_positions {bad.tolist()} out of range [0, seq_len={T})")
        glob = np.zeros(T, bool)
        glob[g] = True
    return _Pattern(T, left, right, bool(is_causal), real, glob & real)


def _prefix(x: np.ndarray) -> np.ndarray:
    """``P[k] = sum(x[:k])`` along the last axis, int64, with a leading 0."""
    out = np.zeros(x.shape[:-1] + (x.shape[-1] + 1,), np.int64)
    np.cumsum(x, axis=-1, out=out[..., 1:])
    return out


# --------------------------------------------------------------------------
# Counting.
# --------------------------------------------------------------------------
def row_counts(seq_len: int, *, local_window_size: Window, global_positions: Globals = (),
               is_causal: bool = False, padding_mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Number of allowed keys of every query row, O(T) via prefix sums.

    Returns:
      int64 ``[T]``; equals ``global_local_mask(...)[0].sum(-1)``. Padded rows are 0.

    The published 16-token example (T=16, globals at 0 and 8) is reproduced
    with ``local_window_size=2`` (a "window 4" of total width, two on each
    side)::

        row:    0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15
        count: 16  5  6  7  7  7  6  6 16  6  6  7  7  7  6  5

    Global rows see all 16 tokens; local rows see a window of 5 (3 or 4 at the
    sequence ends) plus the globals not already inside it: 6 rows have 7, 6
    rows have 6, and the two end rows 1 and 15 have 5.
    """
    p = _pattern(seq_len, local_window_size, global_positions, is_causal, padding_mask)
    lo, hi, lim = p.limits()
    R = _prefix(p.real)
    G = _prefix(p.glob)
    in_window = R[hi + 1] - R[lo]
    # Globals the row may attend (<= lim), minus those already in its window.
    extra_globals = G[lim + 1] - (G[hi + 1] - G[lo])
    local_row = in_window + extra_globals
    global_row = R[lim + 1]  # a global query attends every real key (<= i if causal)
    counts = np.where(p.glob, global_row, local_row)
    return np.where(p.real, counts, 0).astype(np.int64)


def allowed_pairs(seq_len: int, *, local_window_size: Window, global_positions: Globals = (),
                  is_causal: bool = False, padding_mask: Optional[np.ndarray] = None) -> int:
    """Exact number of allowed (query, key) pairs; ``global_local_mask(...).sum()``."""
    return int(row_counts(seq_len, local_window_size=local_window_size,
                          global_positions=global_positions, is_causal=is_causal,
                          padding_mask=padding_mask).sum())


def density(seq_len: int, *, local_window_size: Window, global_positions: Globals = (),
            is_causal: bool = False, padding_mask: Optional[np.ndarray] = None,
            exact: bool = False) -> Union[float, Fraction]:
    """``allowed_pairs / T**2`` (T**2 = full attention on the padded length).

    With ``exact=True`` returns a :class:`fractions.Fraction`.
    """
    n = allowed_pairs(seq_len, local_window_size=local_window_size,
                      global_positions=global_positions, is_causal=is_causal,
                      padding_mask=padding_mask)
    d = Fraction(n, int(seq_len) ** 2)
    return d if exact else float(d)


def savings(seq_len: int, *, local_window_size: Window, global_positions: Globals = (),
            is_causal: bool = False, padding_mask: Optional[np.ndarray] = None,
            exact: bool = False) -> Union[float, Fraction]:
    """``1 - density``: the fraction of full-attention pairs the pattern skips."""
    d = density(seq_len, local_window_size=local_window_size, global_positions=global_positions,
                is_causal=is_causal, padding_mask=padding_mask, exact=True)
    return 1 - d if exact else float(1 - d)


# --------------------------------------------------------------------------
# Shortest paths (BFS without materialising edges).
# --------------------------------------------------------------------------
def _find(nxt: List[int], x: int) -> int:
    """Smallest not-yet-visited index >= x (path-halving next-pointer forest)."""
    while nxt[x] != x:
        nxt[x] = nxt[nxt[x]]
        x = nxt[x]
    return x


def distances(seq_len: int, src: int, *, local_window_size: Window, global_positions: Globals = (),
              is_causal: bool = False, padding_mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Hop count from ``src`` to every position in the attention graph.

    BFS where j -> i when i may attend j. Each node's out-neighbours are at
    most two index intervals (its reverse window; everything after it if it
    is global) plus the global tokens; a next-unvisited pointer forest visits
    each node once, so the cost is O(T * alpha(T)) whatever the window size
    and number of globals -- no dense matrix, no edge list.

    Returns:
      int64 ``[T]``: 0 at ``src``, -1 where unreachable (padding, or before
      ``src`` under causal masking without a path).
    """
    p = _pattern(seq_len, local_window_size, global_positions, is_causal, padding_mask)
    T = p.T
    src = _check_position(src, T, "src")
    dist = np.full(T, -1, np.int64)
    if not p.real[src]:
        return dist
    # Padding is pre-removed from both forests, so it is never visited.
    nxt = [x if (x == T or p.real[x]) else x + 1 for x in range(T + 1)]
    gpos = np.flatnonzero(p.glob).tolist()
    gslot = {g: k for k, g in enumerate(gpos)}
    gnxt = list(range(len(gpos) + 1))
    queue = collections.deque()

    def visit(x: int, d: int) -> None:
        dist[x] = d
        nxt[x] = x + 1
        if x in gslot:
            gnxt[gslot[x]] = gslot[x] + 1
        queue.append(x)

    def visit_interval(a: int, b: int, d: int) -> None:
        x = _find(nxt, a)
        while x <= b:
            visit(x, d)
            x = _find(nxt, x + 1)

    visit(src, 0)
    while queue:
        j = queue.popleft()
        d = int(dist[j]) + 1
        first = j if p.causal else 0  # earliest query that may attend key j at all
        # i attends j through its window iff j - right <= i <= j + left.
        visit_interval(max(first, j - p.right), min(T - 1, j + p.left), d)
        if p.glob[j]:
            visit_interval(first, T - 1, d)  # every query attends a global key
        k = _find(gnxt, bisect.bisect_left(gpos, first))
        while k < len(gpos):  # a global query attends every key
            visit(gpos[k], d)
            k = _find(gnxt, k + 1)
    return dist


def _check_position(x, T: int, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or not 0 <= x < T:
        raise ValueError(f"{name} must be an int in [0, seq_len={T}), got {x!r}")
    return int(x)


def hops(seq_len: int, src: int, dst: int, *, local_window_size: Window,
         global_positions: Globals = (), is_causal: bool = False,
         padding_mask: Optional[np.ndarray] = None) -> Optional[int]:
    """Fewest attention layers for information at ``src`` to reach ``dst``.

    Returns:
      the shortest-path length (0 when ``src == dst``), or None when ``dst``
      is unreachable. See :func:`distances`.
    """
    d = distances(seq_len, src, local_window_size=local_window_size,
                  global_positions=global_positions, is_causal=is_causal,
                  padding_mask=padding_mask)
    d = int(d[_check_position(dst, int(seq_len), "dst")])
    return None if d < 0 else d


# --------------------------------------------------------------------------
# Multi-layer reachability.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Reach:
    """How many ordered pairs (i, j) have j's information at i after ``layers`` layers.

    Attributes:
      layers: L.
      count: exact number of pairs with ``(A | I)^L [i, j]`` true (i = j included).
      total: ``n**2`` with n real tokens (all ordered pairs).
      possible: pairs any number of layers could connect: ``n**2``, or
        ``n*(n+1)//2`` (j <= i) when causal.
    """

    layers: int
    count: int
    total: int
    possible: int

    @property
    def fraction(self) -> float:
        return self.count / self.total

    @property
    def fraction_of_possible(self) -> float:
        return self.count / self.possible

    @property
    def exact(self) -> Fraction:
        return Fraction(self.count, self.total)


def _prefix32(R: np.ndarray) -> np.ndarray:
    """int32 ``[S, T+1]`` prefix counts of a bool ``[S, T]`` (fast path for propagation)."""
    S, T = R.shape
    out = np.empty((S, T + 1), np.int32)
    out[:, 0] = 0
    # Summing a uint8 view avoids numpy's slow bool -> int casting loop.
    np.cumsum(R.view(np.uint8), axis=1, dtype=np.int32, out=out[:, 1:])
    return out


def _shifted(C: np.ndarray, k: int) -> np.ndarray:
    """``D[:, i] = C[:, clip(i + k, 0, T)]`` for prefix counts C ``[S, T+1]``.

    Slices instead of fancy indexing (several times faster): windows are
    shifts of the prefix array, clipped at both ends.
    """
    S, T = C.shape[0], C.shape[1] - 1
    out = np.empty((S, T), C.dtype)
    a = min(max(0, -k), T)          # first column whose index is not clipped at 0
    b = max(min(T, T - k), a)       # one past the last column not clipped at T
    out[:, :a] = C[:, :1]
    out[:, a:b] = C[:, a + k:b + k]
    out[:, b:] = C[:, T:]
    return out


def _first_true(M: np.ndarray, fill: int) -> np.ndarray:
    """Index of the first True in each row of bool ``[S, K]``; ``fill`` if none."""
    if M.shape[1] == 0:
        return np.full(M.shape[0], fill, np.int64)
    first = np.argmax(M, axis=1)
    return np.where(M[np.arange(M.shape[0]), first], first, fill)


def _step(p: _Pattern, R: np.ndarray) -> np.ndarray:
    """One layer: ``R'[s, i] = any_j allowed(i, j) & R[s, j]``, O(S*T).

    R is bool ``[S, T]``: row s holds the positions source s has reached.
    Row i's window is ``[max(i - left, 0), min(i + right, lim_i)]`` with
    ``lim_i`` the last key i may attend (i if causal, else T - 1): a window
    test is a difference of shifted prefix counts. Global rules only need
    the first reached key / first reached global key of each source row.
    """
    C = _prefix32(R)
    upper = 1 if p.causal else p.right + 1  # hi_i + 1 - i, before clipping at T
    out = (_shifted(C, upper) - _shifted(C, -p.left)) > 0
    gidx = p.glob_idx
    if gidx.size:
        RG = R[:, gidx]
        if p.causal:
            i = np.arange(p.T)
            first_any = _first_true(R, p.T)  # a global query i >= it sees the source
            first_g = np.append(gidx, p.T)[_first_true(RG, gidx.size)]  # every i >= it does
            out |= (p.glob & (i >= first_any[:, None])) | (i >= first_g[:, None])
        else:
            out |= (p.glob & R.any(axis=1)[:, None]) | RG.any(axis=1)[:, None]
    if not p.all_real:
        out &= p.real
    return out


def _propagate(p: _Pattern, max_layers: Optional[int], chunk: int) -> Tuple[List[int], int]:
    """Reach counts after 1..max_layers layers (None: run until every row is fixed).

    A source row that does not change in a layer never changes again (the
    step is a fixed function of the row), so it is frozen and only its count
    is carried forward; global patterns, which saturate in 2 layers, are cheap.

    Returns:
      (counts per layer -- only meaningful when ``max_layers`` is given --,
      number of layers in which some row still changed, i.e. the diameter).
    """
    sources = np.flatnonzero(p.real)
    counts = [0] * (max_layers or 0)
    last_change = 0
    for start in range(0, sources.size, chunk):
        s = sources[start:start + chunk]
        R = np.zeros((s.size, p.T), bool)
        R[np.arange(s.size), s] = True
        L = 0
        while R.shape[0] and (max_layers is None or L < max_layers):
            R_next = _step(p, R)
            changed = np.any(R_next != R, axis=1)
            if max_layers is not None:
                counts[L] += int(np.count_nonzero(R_next))
                still = int(np.count_nonzero(R_next[~changed]))
                for k in range(L + 1, max_layers):
                    counts[k] += still
            if changed.any():
                last_change = max(last_change, L + 1)
            R = R_next[changed]
            L += 1
    return counts, last_change


def connectivity_curve(seq_len: int, max_layers: int, *, local_window_size: Window,
                       global_positions: Globals = (), is_causal: bool = False,
                       padding_mask: Optional[np.ndarray] = None, chunk: int = 512) -> List[Reach]:
    """:class:`Reach` after 1, 2, ..., ``max_layers`` layers, exact.

    Propagates ``chunk`` source rows at a time (memory O(chunk * T)); rows
    that reach a fixed point are frozen. Cost O(n * T * layers) at worst.
    """
    p = _pattern(seq_len, local_window_size, global_positions, is_causal, padding_mask)
    layers = V.check_positive_int(max_layers, "max_layers")
    chunk = V.check_positive_int(chunk, "chunk")
    counts, _ = _propagate(p, layers, chunk)
    n = int(np.count_nonzero(p.real))
    possible = n * (n + 1) // 2 if p.causal else n * n
    return [Reach(L + 1, counts[L], n * n, possible) for L in range(layers)]


def reachable_fraction(seq_len: int, layers: int, *, local_window_size: Window,
                       global_positions: Globals = (), is_causal: bool = False,
                       padding_mask: Optional[np.ndarray] = None) -> Reach:
    """Exact reachability after ``layers`` layers with residuals, ``(A | I)^L``.

    Returns a :class:`Reach`; ``.fraction`` is ``count / n**2``.
    """
    return connectivity_curve(seq_len, layers, local_window_size=local_window_size,
                              global_positions=global_positions, is_causal=is_causal,
                              padding_mask=padding_mask)[-1]


def diameter(seq_len: int, *, local_window_size: Window, global_positions: Globals = (),
             is_causal: bool = False, padding_mask: Optional[np.ndarray] = None) -> int:
    """Longest shortest path over all connected pairs (0 for a single token).

    The smallest L with ``(A | I)^L == (A | I)^(L+1)``. Pairs that no number of
    layers connects are ignored; compare ``Reach.count`` with ``Reach.possible``
    to see whether the graph is fully connected. Cost O(n * T * diameter).
    """
    p = _pattern(seq_len, local_window_size, global_positions, is_causal, padding_mask)
    return _propagate(p, None, 512)[1]


# --------------------------------------------------------------------------
# Published claims about global tokens, reproduced.
# --------------------------------------------------------------------------
def seed_article_facts() -> Dict[str, Any]:
    """Exact numbers behind published claims about global tokens (hops, savings,
    a 16-token example, connectivity by layer).

    Conventions: a claim's "window W" is ``local_window_size=W // 2`` (W/2
    keys on each side plus the token itself); bidirectional unless a key says
    ``causal``; pairs are ordered (i, j) and include i == j.

    Returns a dict of exact ints / Fractions / :class:`Reach` lists:

    * ``hops`` (T=4096, window 512): 0 -> 4000 takes **16** hops without
      globals (ceil(4000 / 256)); **2** with one global at 2048 (outside both
      windows: 0 -> 2048 -> 4000). 0 -> 4095 also takes 16, the diameter.
    * ``savings_64`` (T=4096, window 512, 64 globals). The window alone has
      2_035_456 pairs. First 64 positions global: 2_522_816 pairs, savings
      222725/262144 = 84.963%. Every 64th position (0, 64, ..., 4032):
      2_492_596 pairs, savings 85.143%. Any placement has at most
      band + 2*64*4096 - 64**2 = 2_555_648 pairs, so savings >= 55553/65536 =
      84.767%: "over 84%" holds for every placement.
    * ``savings_8_periodic``: 8 globals at 0, 512, ..., 3584: 2_093_240 pairs,
      savings 87.523% (> 80%), density above CLS-only (2_043_134 pairs,
      savings 87.822%), as claimed.
    * ``sixteen_token``: T=16, window 4 (2 each side), globals {0, 8}: row
      counts ``[16, 5, 6, 7, 7, 7, 6, 6, 16, 6, 6, 7, 7, 7, 6, 5]`` (see
      :func:`row_counts`); "around 6-7" holds except the end rows 1 and 15 (5).
    * ``connectivity``: :class:`Reach` after 1, 2, 3 layers; counts out of
      T**2 (possible = T(T+1)/2 when causal):

      ======================== ============ ============ ============
      case                     layer 1      layer 2      layer 3
      ======================== ============ ============ ============
      4096, w512, no global    2_035_456    3_935_744    5_704_960
      4096, w512, CLS at 0     2_043_134    all          all
      4096, causal, none       1_019_776    1_969_920    2_854_528
      4096, causal, CLS at 0   1_023_615    1_973_503    2_857_855
      4096, causal, 2048       1_023_359    6_034_431    6_754_815
      16, w4, {0, 8}           120          all (256)    all
      16, w4, none             74           124          166
      16, causal, {0, 8}       68           130          all (136)
      ======================== ============ ============ ============

      Bidirectional with any global, layer 2 is already exactly full (every
      j -> global -> i), so "nearly all by layer 2, full by layer 3"
      understates it. Under causal masking the claim holds exactly for the
      16-token example (130/136 = 95.6% of the possible pairs at layer 2, all
      at layer 3), but not at T=4096: a causal global only relays j <= g <= i
      (71.9% of possible pairs at layer 2, 80.5% at layer 3 with g=2048), and a
      causal CLS at position 0 relays nothing (it attends only itself).
    """
    T, w = 4096, 256
    facts: Dict[str, Any] = {"convention": "article window W == local_window_size W // 2"}
    facts["hops"] = {
        "no_global_0_to_4000": hops(T, 0, 4000, local_window_size=w),
        "one_global_2048_0_to_4000": hops(T, 0, 4000, local_window_size=w, global_positions=(2048,)),
        "no_global_0_to_4095": hops(T, 0, 4095, local_window_size=w),
    }

    def pairs_info(glob) -> Dict[str, Any]:
        n = allowed_pairs(T, local_window_size=w, global_positions=glob)
        return {"pairs": n, "density": Fraction(n, T * T), "savings": 1 - Fraction(n, T * T)}

    band = allowed_pairs(T, local_window_size=w)
    bound = band + 2 * 64 * T - 64 * 64  # |band U global rows U global cols| <= sum of parts
    facts["savings_64"] = {
        "band_pairs": band,
        "first_64": pairs_info(tuple(range(64))),
        "periodic_64": pairs_info(tuple(range(0, T, 64))),
        "upper_bound_pairs": bound,
        "savings_lower_bound": 1 - Fraction(bound, T * T),
    }
    facts["savings_8_periodic"] = {
        "periodic_8": pairs_info(tuple(range(0, T, T // 8))),
        "cls_only": pairs_info((0,)),
    }
    facts["sixteen_token"] = {
        "local_window_size": 2,
        "global_positions": (0, 8),
        "row_counts": row_counts(16, local_window_size=2, global_positions=(0, 8)).tolist(),
    }

    def curve(t: int, win: int, glob: Tuple[int, ...], causal: bool) -> List[Reach]:
        return connectivity_curve(t, 3, local_window_size=win, global_positions=glob,
                                  is_causal=causal)

    facts["connectivity"] = {
        "T4096_w512_none": curve(T, w, (), False),
        "T4096_w512_cls": curve(T, w, (0,), False),
        "T4096_w512_causal_none": curve(T, w, (), True),
        "T4096_w512_causal_cls": curve(T, w, (0,), True),
        "T4096_w512_causal_2048": curve(T, w, (2048,), True),
        "T16_w4_globals_0_8": curve(16, 2, (0, 8), False),
        "T16_w4_none": curve(16, 2, (), False),
        "T16_w4_causal_globals_0_8": curve(16, 2, (0, 8), True),
    }
    return facts
