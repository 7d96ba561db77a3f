"""Tests for globalattn.analytics: exact counts, hops and reachability.

Oracles: the dense boolean pattern ``globalattn.global_local_mask`` for
counts, a numpy BFS / boolean matrix power over that dense pattern for paths,
and closed forms for the T=4096 seed-article numbers.
"""
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import globalattn
from globalattn import analytics as A


# --------------------------------------------------------------------------
# Random small patterns and dense oracles.
# --------------------------------------------------------------------------
@st.composite
def small_patterns(draw):
    """kwargs for the analytics functions plus seq_len, all in their public forms.

    T comes from a few fixed lengths so the eager dense oracle's compilations
    are reused across examples; windows range from 0 to beyond T.
    """
    T = draw(st.sampled_from([1, 2, 5, 8, 13, 20]))
    if draw(st.booleans()):
        window = draw(st.integers(0, T + 2))
    else:
        window = (draw(st.integers(0, T + 2)), draw(st.integers(0, T + 2)))
    glob_idx = draw(st.lists(st.integers(0, T - 1), max_size=4))  # duplicates allowed
    if draw(st.booleans()):
        glob = tuple(glob_idx)
    else:
        glob = np.zeros(T, bool)
        glob[glob_idx] = True
    pad = None
    if draw(st.booleans()):
        pad = np.array(draw(st.lists(st.booleans(), min_size=T, max_size=T)), bool)
    return dict(seq_len=T, local_window_size=window, global_positions=glob,
                is_causal=draw(st.booleans()), padding_mask=pad)


def dense(kw) -> np.ndarray:
    """bool [T, T] from the library's dense oracle, allowed[i, j] = i may attend j."""
    T = kw["seq_len"]
    g = np.asarray(kw["global_positions"])
    gm = g if g.dtype == bool else np.isin(np.arange(T), g)
    pad = kw["padding_mask"]
    m = globalattn.global_local_mask(
        T, local_window_size=kw["local_window_size"], global_mask=gm[None],
        padding_mask=None if pad is None else pad[None], is_causal=kw["is_causal"])
    return np.asarray(m[0])


def bfs_dense(allowed: np.ndarray, src: int) -> np.ndarray:
    """Plain queue BFS over the dense matrix: edge j -> i iff allowed[i, j]."""
    T = allowed.shape[0]
    dist = np.full(T, -1)
    if not allowed[src].any():  # padded source: no edges at all
        return dist
    dist[src] = 0
    frontier = [src]
    while frontier:
        nxt = []
        for j in frontier:
            for i in np.flatnonzero(allowed[:, j]):
                if dist[i] < 0:
                    dist[i] = dist[j] + 1
                    nxt.append(i)
        frontier = nxt
    return dist


def reach_counts_dense(allowed: np.ndarray, layers: int):
    """Non-zeros of the boolean powers allowed^1..allowed^layers (int matmul, clipped)."""
    A_ = allowed.astype(np.int64)
    R = A_.copy()
    out = [int(np.count_nonzero(R))]
    for _ in range(layers - 1):
        R = np.minimum(A_ @ R, 1)
        out.append(int(np.count_nonzero(R)))
    return out


def call(fn, kw, *args):
    kw = dict(kw)
    T = kw.pop("seq_len")
    return fn(T, *args, **kw)


# --------------------------------------------------------------------------
# Counting against the dense mask.
# --------------------------------------------------------------------------
@given(small_patterns())
def test_counts_match_dense_mask(kw):
    m = dense(kw)
    T = kw["seq_len"]
    counts = call(A.row_counts, kw)
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, m.sum(-1))
    n = call(A.allowed_pairs, kw)
    assert isinstance(n, int) and n == int(m.sum())
    assert call(A.density, dict(kw, exact=True)) == Fraction(n, T * T)
    assert call(A.savings, dict(kw, exact=True)) == 1 - Fraction(n, T * T)
    assert call(A.density, kw) == pytest.approx(n / T ** 2)


def test_counts_match_dense_mask_medium_periodic():
    # Beyond hypothesis' sizes: T=600, window (37, 5), every 50th global, causal and not.
    for causal in (False, True):
        kw = dict(seq_len=600, local_window_size=(37, 5),
                  global_positions=tuple(range(3, 600, 50)), is_causal=causal, padding_mask=None)
        np.testing.assert_array_equal(call(A.row_counts, kw), dense(kw).sum(-1))


def test_closed_forms_at_4096():
    T, w, g = 4096, 256, 64
    band = T * (2 * w + 1) - w * (w + 1)  # sum over rows of the clipped window
    assert A.allowed_pairs(T, local_window_size=w) == band == 2_035_456
    # First g global: g full rows + g full columns - g^2 overlap + the band on
    # the remaining (T - g) x (T - g) block, which is a band of length T - g.
    first = 2 * g * T - g * g + (T - g) * (2 * w + 1) - w * (w + 1)
    assert A.allowed_pairs(T, local_window_size=w, global_positions=range(g)) == first == 2_522_816
    # Causal band: i - w <= j <= i.
    causal = T * (w + 1) - w * (w + 1) // 2
    assert A.allowed_pairs(T, local_window_size=w, is_causal=True) == causal


# --------------------------------------------------------------------------
# Hops against a dense BFS.
# --------------------------------------------------------------------------
@given(small_patterns(), st.data())
def test_distances_match_dense_bfs(kw, data):
    T = kw["seq_len"]
    src = data.draw(st.integers(0, T - 1))
    dst = data.draw(st.integers(0, T - 1))
    want = bfs_dense(dense(kw), src)
    got = call(A.distances, kw, src)
    np.testing.assert_array_equal(got, want)
    h = call(A.hops, kw, src, dst)
    assert h == (None if want[dst] < 0 else int(want[dst]))


def test_distances_match_dense_bfs_at_4096():
    # Level-synchronous BFS over the 4096 x 4096 dense mask (16 MB) as the oracle.
    kw = dict(seq_len=4096, local_window_size=(200, 311), global_positions=(1500, 3000),
              is_causal=False, padding_mask=None)
    for src, glob in ((0, ()), (17, (1500, 3000))):
        k = dict(kw, global_positions=glob)
        mm = dense(k).astype(np.float32)  # float matvec: BLAS, exact for 0/1 sums < 2^24
        reached = np.zeros(4096, bool)
        reached[src] = True
        want = np.full(4096, -1)
        want[src] = 0
        d = 0
        while True:
            new = (mm @ reached.astype(np.float32) > 0) & ~reached
            if not new.any():
                break
            d += 1
            want[new] = d
            reached |= new
        np.testing.assert_array_equal(call(A.distances, k, src), want)


def test_hops_edge_cases():
    assert A.hops(10, 3, 3, local_window_size=0) == 0
    assert A.hops(10, 3, 4, local_window_size=0) is None  # window 0, no globals: isolated
    assert A.hops(10, 3, 4, local_window_size=0, global_positions=(7,)) == 2
    # Causal: information only flows forward.
    assert A.hops(10, 5, 2, local_window_size=3, is_causal=True) is None
    assert A.hops(10, 2, 9, local_window_size=3, is_causal=True) == 3
    # (left, right): a hop moves information forward by `left`, backward by `right`.
    assert A.hops(100, 0, 99, local_window_size=(11, 1)) == 9
    assert A.hops(100, 99, 0, local_window_size=(11, 1)) == 99
    pad = np.ones(10, bool)
    pad[5] = False
    assert A.hops(10, 5, 0, local_window_size=2, padding_mask=pad) is None
    assert A.hops(10, 0, 5, local_window_size=2, padding_mask=pad) is None
    assert A.hops(10, 0, 9, local_window_size=2, padding_mask=pad) == 5  # 0-2-4-6-8-9
    pad[4:7] = False  # a gap wider than the window cuts the chain ...
    assert A.hops(10, 0, 9, local_window_size=2, padding_mask=pad) is None
    # ... unless a global relays; a global flag on padding is ignored.
    assert A.hops(10, 0, 9, local_window_size=2, padding_mask=pad, global_positions=(5,)) is None
    assert A.hops(10, 0, 9, local_window_size=2, padding_mask=pad, global_positions=(2,)) == 2


# --------------------------------------------------------------------------
# Reachability against dense matrix powers.
# --------------------------------------------------------------------------
@given(small_patterns())
def test_connectivity_matches_matrix_power(kw):
    m = dense(kw)
    want = reach_counts_dense(m, 4)
    got = call(A.connectivity_curve, dict(kw, chunk=3), 4)  # small chunk: exercise chunking
    assert [r.count for r in got] == want
    n = int(m.diagonal().sum())  # real tokens attend themselves
    for r in got:
        assert r.total == n * n
        assert r.possible == (n * (n + 1) // 2 if kw["is_causal"] else n * n)
        assert 0 <= r.count <= r.possible
    r2 = call(A.reachable_fraction, kw, 2)
    assert r2.count == want[1] and r2.layers == 2
    # Diameter: the largest finite dense-BFS distance.
    dmax = max([int(bfs_dense(m, s).max()) for s in range(kw["seq_len"])] + [0])
    assert call(A.diameter, kw) == dmax


def test_band_reach_is_widened_band():
    # Without globals L layers of a w-window reach exactly a (L*w)-window.
    for L, r in enumerate(A.connectivity_curve(4096, 3, local_window_size=256), start=1):
        assert r.count == A.allowed_pairs(4096, local_window_size=256 * L)


# --------------------------------------------------------------------------
# The seed article.
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def facts():
    return A.seed_article_facts()


def test_seed_hops(facts):
    assert facts["hops"] == {"no_global_0_to_4000": 16, "one_global_2048_0_to_4000": 2,
                             "no_global_0_to_4095": 16}
    # 2048 is outside both windows, so the 2 hops go through the global token.
    assert A.hops(4096, 0, 2048, local_window_size=256) > 1
    assert A.diameter(4096, local_window_size=256, global_positions=(2048,)) == 2


def test_seed_savings(facts):
    s = facts["savings_64"]
    assert s["band_pairs"] == 2_035_456
    assert s["first_64"]["pairs"] == 2_522_816
    assert s["first_64"]["savings"] == Fraction(222725, 262144)
    assert s["periodic_64"]["pairs"] == 2_492_596
    assert s["upper_bound_pairs"] == 2_555_648
    assert s["savings_lower_bound"] == Fraction(55553, 65536)
    for key in ("first_64", "periodic_64"):
        assert s[key]["savings"] > Fraction(84, 100)  # "over 84%"
        assert s[key]["pairs"] <= s["upper_bound_pairs"]
    p8, cls = facts["savings_8_periodic"]["periodic_8"], facts["savings_8_periodic"]["cls_only"]
    assert (p8["pairs"], cls["pairs"]) == (2_093_240, 2_043_134)
    assert p8["savings"] > Fraction(80, 100) and p8["density"] > cls["density"]


def test_seed_sixteen_token_rows(facts):
    rows = facts["sixteen_token"]["row_counts"]
    assert rows == [16, 5, 6, 7, 7, 7, 6, 6, 16, 6, 6, 7, 7, 7, 6, 5]
    m = globalattn.global_local_mask(16, local_window_size=2,
                                     global_mask=np.isin(np.arange(16), [0, 8])[None])
    assert np.asarray(m[0]).sum(-1).tolist() == rows


def test_seed_connectivity(facts):
    c = {k: [r.count for r in v] for k, v in facts["connectivity"].items()}
    full = 4096 * 4096
    assert c["T4096_w512_none"] == [2_035_456, 3_935_744, 5_704_960]
    assert c["T4096_w512_cls"] == [2_043_134, full, full]  # full already at layer 2
    assert c["T4096_w512_causal_none"] == [1_019_776, 1_969_920, 2_854_528]
    assert c["T4096_w512_causal_cls"] == [1_023_615, 1_973_503, 2_857_855]
    assert c["T4096_w512_causal_2048"] == [1_023_359, 6_034_431, 6_754_815]
    assert c["T16_w4_globals_0_8"] == [120, 256, 256]
    assert c["T16_w4_none"] == [74, 124, 166]
    assert c["T16_w4_causal_globals_0_8"] == [68, 130, 136]
    causal16 = facts["connectivity"]["T16_w4_causal_globals_0_8"]
    assert causal16[2].count == causal16[2].possible == 136  # causal: full at layer 3


# --------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("fn, args, kwargs, match", [
    (A.allowed_pairs, (0,), dict(local_window_size=1), "seq_len must be a positive int, got 0"),
    (A.allowed_pairs, (8,), dict(local_window_size=-1), "local_window_size must be >= 0, got -1"),
    (A.allowed_pairs, (8,), dict(local_window_size=1, global_positions=(2, 8)),
     r"global_positions \[8\] out of range \[0, seq_len=8\)"),
    (A.allowed_pairs, (8,), dict(local_window_size=1, global_positions=(-1,)), r"\[-1\] out of range"),
    (A.allowed_pairs, (8,), dict(local_window_size=1, global_positions=(1.5,)), "sequence of ints"),
    (A.allowed_pairs, (8,), dict(local_window_size=1, global_positions=np.ones(7, bool)),
     r"shape \[T\] = \(8,\)"),
    (A.allowed_pairs, (8,), dict(local_window_size=1, padding_mask=np.ones(8)),
     "padding_mask must be boolean, got dtype float64"),
    (A.allowed_pairs, (8,), dict(local_window_size=1, is_causal="yes"), "is_causal must be a bool"),
    (A.hops, (8, 0, 8), dict(local_window_size=1), r"dst must be an int in \[0, seq_len=8\), got 8"),
    (A.hops, (8, -1, 3), dict(local_window_size=1), r"src must be an int in \[0, seq_len=8\), got -1"),
    (A.reachable_fraction, (8, 0), dict(local_window_size=1), "max_layers must be a positive int, got 0"),
    (A.connectivity_curve, (8, 2), dict(local_window_size=1, chunk=0), "chunk must be a positive int"),
])
def test_bad_input_raises(fn, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)
