"""implementation='pallas_tpu' (Pallas interpret mode on CPU) against the dense oracle.

Forward and gradients (q, k, v, sinks, global_qkv) over the same hypothesis
cases as the XLA path (tests/test_attention.py), with kernel block sizes drawn
small (8..24) so that every case spans several query and key blocks.

Tolerances (max abs error, unit-scale inputs): float32 forward <= 1e-5,
gradients <= 2e-5; bfloat16 inputs against the float32 oracle on the same
bf16-rounded inputs: forward <= 2e-2, gradients <= 5e-2 (probabilities are
rounded to bf16 before P @ V and dS @ K, as on the MXU).

Interpret-mode programs take ~10-20 s each to compile, so the default suite
runs two fixed cases (~40 s); the hypothesis sets and the race detector run
under ``-m slow``: ``python -m pytest -q -m slow tests/test_pallas_tpu.py``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import globalattn as ga
from globalattn.kernels import pallas_tpu as pt
from globalattn.kernels import pallas_tpu_schedule as S
from globalattn.ops import global_local as gl

F32_FWD, F32_BWD = 1e-5, 2e-5
BF16_FWD, BF16_BWD = 2e-2, 5e-2
_SCALE = 10 if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else 1


@dataclasses.dataclass
class Case:
    B: int
    T: int
    N: int
    H: int
    window: object
    causal: bool
    glob: Optional[np.ndarray]
    pad: Optional[np.ndarray]
    rb: Optional[np.ndarray]
    block_size: Optional[int]
    sinks: Optional[np.ndarray]
    use_gqkv: bool
    bq: int
    bk: int
    seed: int

    def kwargs(self):
        return dict(
            local_window_size=self.window,
            global_mask=None if self.glob is None else jnp.asarray(self.glob),
            padding_mask=None if self.pad is None else jnp.asarray(self.pad),
            is_causal=self.causal,
            random_blocks=None if self.rb is None else jnp.asarray(self.rb),
            block_size=self.block_size,
            sinks=None if self.sinks is None else jnp.asarray(self.sinks),
        )


@st.composite
def cases(draw):
    B = draw(st.integers(1, 2))
    T = draw(st.integers(1, 70))
    N = draw(st.integers(1, 3))
    H = draw(st.sampled_from([4, 8]))
    kind = draw(st.sampled_from(["sym", "asym", "zero", "huge"]))
    if kind == "sym":
        window = draw(st.integers(0, 12))
    elif kind == "asym":
        window = (draw(st.integers(0, 12)), draw(st.integers(0, 12)))
    elif kind == "zero":
        window = (0, 0)
    else:
        window = T + draw(st.integers(0, 5))
    rs = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    gkind = draw(st.sampled_from(["none", "absent", "one", "many", "all"]))
    glob = None
    if gkind == "none":
        glob = np.zeros((B, T), bool)
    elif gkind == "one":
        glob = np.zeros((B, T), bool)
        glob[np.arange(B), rs.integers(0, T, B)] = True
    elif gkind == "many":
        glob = rs.random((B, T)) < 0.2
    elif gkind == "all":
        glob = np.ones((B, T), bool)
    pad = None
    if draw(st.booleans()):
        lengths = rs.integers(0, T + 1, B)  # 0 = an all-padding example
        pad = np.arange(T)[None] < lengths[:, None]
        if draw(st.booleans()):  # left padding too
            pad = pad[:, ::-1].copy()
    rb = bs = None
    if draw(st.booleans()):
        bs = draw(st.integers(1, max(1, min(T, 9))))
        nbk = -(-T // bs)
        r = draw(st.integers(1, min(3, nbk)))
        heads = draw(st.sampled_from([1, N]))
        rb = rs.integers(0, nbk, (draw(st.sampled_from([1, B])), heads, nbk, r))  # duplicates allowed
    sinks = rs.standard_normal(N).astype(np.float32) if draw(st.booleans()) else None
    use_gqkv = glob is not None and draw(st.booleans())
    bq = draw(st.sampled_from([8, 16]))
    bk = draw(st.sampled_from([8, 16, 24]))
    return Case(B, T, N, H, window, draw(st.booleans()), glob, pad, rb, bs, sinks, use_gqkv,
                bq, bk, int(rs.integers(0, 2**31 - 1)))


def _inputs(c: Case, dtype=jnp.float32):
    rs = np.random.default_rng(c.seed)
    shape = (c.B, c.T, c.N, c.H)
    q, k, v = (jnp.asarray(rs.standard_normal(shape), dtype) for _ in range(3))
    gqkv = None
    if c.use_gqkv:
        gqkv = tuple(jnp.asarray(rs.standard_normal(shape), dtype) for _ in range(3))
    sinks = None if c.sinks is None else jnp.asarray(c.sinks)
    return q, k, v, gqkv, sinks


def _kernel(c: Case, q, k, v, gqkv, sinks, interpret=True):
    """The kernel with the case's block sizes, wrapped exactly as the dispatcher wraps it."""
    kw = c.kwargs()
    kw["sinks"] = sinks
    args = gl._resolve(q, k, v, global_qkv=gqkv, max_globals=None if c.glob is None else c.T,
                       **kw)
    out = pt.pallas_tpu_attention(args, block_q=c.bq, block_k=c.bk, interpret=interpret)
    return gl._finish(args, out)


def _oracle(c: Case, q, k, v, gqkv, sinks):
    kw = c.kwargs()
    kw["sinks"] = sinks
    return ga.global_local_reference(q, k, v, **kw, global_qkv=gqkv)


def _fwd_and_grads(fn, c, q, k, v, gqkv, sinks, cot):
    @jax.jit
    def run(q, k, v, gqkv, sinks, cot):
        out, vjp = jax.vjp(lambda *a: fn(c, *a), q, k, v, gqkv, sinks)
        return out, vjp(cot)
    return run(q, k, v, gqkv, sinks, cot)


def _assert_close_finite(a, b, tol, what):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x = np.asarray(x, np.float32)
        y = np.asarray(y, np.float32)
        assert np.all(np.isfinite(x)), f"{what}: non-finite values in kernel result"
        assert np.all(np.isfinite(y)), f"{what}: non-finite values in oracle result"
        np.testing.assert_allclose(x, y, atol=tol, rtol=0, err_msg=what)


def _check_f32(c: Case, poison: bool = False):
    q, k, v, gqkv, sinks = _inputs(c)
    cot = jnp.asarray(np.random.default_rng(c.seed + 1).standard_normal(q.shape), jnp.float32)
    out_o, g_o = _fwd_and_grads(_oracle, c, q, k, v, gqkv, sinks, cot)
    if poison:  # NaN in every padded slot must reach no output and no gradient
        bad = jnp.asarray(~c.pad)[:, :, None, None]
        q, k, v = (jnp.where(bad, jnp.nan, x) for x in (q, k, v))
        if gqkv is not None:
            gqkv = tuple(jnp.where(bad, jnp.nan, x) for x in gqkv)
    out_e, g_e = _fwd_and_grads(_kernel, c, q, k, v, gqkv, sinks, cot)
    _assert_close_finite(out_e, out_o, F32_FWD, "forward")
    _assert_close_finite(g_e, g_o, F32_BWD, "vjp")
    if c.pad is not None:  # padded query rows are exactly zero
        assert np.all(np.asarray(out_e)[~c.pad] == 0)


def _check_bf16(c: Case):
    q, k, v, gqkv, sinks = _inputs(c, jnp.bfloat16)
    cot = jnp.asarray(np.random.default_rng(c.seed + 1).standard_normal(q.shape), jnp.bfloat16)
    out_e, g_e = _fwd_and_grads(_kernel, c, q, k, v, gqkv, sinks, cot)
    assert out_e.dtype == jnp.bfloat16
    up = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)  # noqa: E731
    out_o, g_o = _fwd_and_grads(_oracle, c, *up((q, k, v, gqkv)), sinks, up(cot))
    _assert_close_finite(out_e, out_o, BF16_FWD, "bf16 forward")
    _assert_close_finite(g_e, g_o, BF16_BWD, "bf16 vjp")


def _fixed_case(seed, *, T, window, causal, random, gqkv, sinks, bq, bk, B=2, N=2, H=8):
    rs = np.random.default_rng(seed)
    glob = rs.random((B, T)) < 0.15
    glob[0, 0] = glob[-1, T - 1] = True
    pad = np.arange(T)[None] < np.array([[T - 7], [T - 3]])[:B]
    if B > 1:
        pad[1] = pad[1][::-1].copy()  # left padding
    rb = bs = None
    if random:
        bs = 5
        nbk = -(-T // bs)
        rb = rs.integers(0, nbk, (B, N, nbk, 2))
        rb[0, 0, 0] = [1, 1]  # a duplicate draw counts once
    return Case(B, T, N, H, window, causal, glob, pad, rb, bs,
                rs.standard_normal(N).astype(np.float32) if sinks else None, gqkv, bq, bk,
                seed)


# ---------------------------------------------------------------------------
# Default suite: one fixed multi-block case with every feature (~30 s).
# ---------------------------------------------------------------------------
def test_every_feature_f32_with_nan_in_padding():
    # Window, globals (per example, left and right padding), causal, sinks,
    # per-head random blocks with a duplicate draw, global_qkv; NaN in padding.
    _check_f32(_fixed_case(0, T=37, window=(5, 3), causal=True, random=True, gqkv=True,
                           sinks=True, bq=8, bk=16), poison=True)


def test_non_causal_folds_over_several_slot_blocks_f32_with_nan_in_padding():
    # Non-causal: the empty global slots (capacity T, a few used) attend every key with
    # position 0's query and must get no cotangent; blocks of 8 put the slots in 5 slot
    # blocks, so the kernels' folds of outputs, dq and slot dK / dV cross slot blocks.
    _check_f32(_fixed_case(3, T=37, window=(2, 4), causal=False, random=False, gqkv=False,
                           sinks=True, bq=8, bk=8), poison=True)


def test_token_major_head_groups_every_feature_f32_with_nan_in_padding():
    # Head dim 4 (not a multiple of the interpret-mode lane unit 8) takes the token-major
    # layout: 4 heads in groups of 2 per block (each head's scores through lane masks),
    # per-head random blocks merged into one schedule per group; NaN in padding.
    c = _fixed_case(5, T=37, window=(5, 3), causal=True, random=True, gqkv=True, sinks=True,
                    bq=8, bk=16, N=4, H=4)
    from globalattn.kernels import pallas_tpu_kernels as K
    assert K.heads_per_block(c.N, c.H, 8) == 2
    _check_f32(c, poison=True)


def test_heads_per_block_fills_lane_tiles_or_takes_every_head():
    from globalattn.kernels.pallas_tpu_kernels import heads_per_block
    assert heads_per_block(12, 64, 128) == 2
    assert heads_per_block(12, 32, 128) == 4
    assert heads_per_block(3, 64, 128) == 3  # 2 does not divide 3: the whole row
    assert heads_per_block(4, 96, 128) == 4
    assert heads_per_block(8, 256, 128) == 1


@pytest.mark.slow
def test_window_globals_padding_causal_sinks_f32_with_nan_in_padding():
    _check_f32(_fixed_case(0, T=37, window=(5, 3), causal=True, random=False, gqkv=False,
                           sinks=True, bq=8, bk=16), poison=True)


@pytest.mark.slow
def test_bf16_window_globals_random_global_qkv_sinks():
    _check_bf16(_fixed_case(2, T=29, window=(3, 6), causal=False, random=True, gqkv=True,
                            sinks=True, bq=16, bk=8))


@pytest.mark.slow
def test_random_blocks_global_qkv_sinks_f32():
    _check_f32(_fixed_case(1, T=43, window=(3, 6), causal=False, random=True, gqkv=True,
                           sinks=True, bq=16, bk=8))


@pytest.mark.slow
def test_bf16_window_globals_random_causal():
    _check_bf16(_fixed_case(2, T=29, window=4, causal=True, random=True, gqkv=False,
                            sinks=False, bq=8, bk=8))


def test_dispatcher_picks_the_kernel_and_rejects_bad_blocks():
    assert "pallas_tpu" in gl.IMPLEMENTATIONS
    q = jnp.ones((1, 16, 1, 8))
    args = gl._resolve(q, q, q, local_window_size=2, global_mask=None, padding_mask=None,
                       is_causal=False, max_globals=None, random_blocks=None, block_size=None,
                       global_qkv=None, sinks=None)
    with pytest.raises(ValueError, match="block_q must be a positive multiple of 8, got 12"):
        pt.pallas_tpu_attention(args, block_q=12)
    with pytest.raises(ValueError, match="block_q tunes the 'xla' implementation"):
        ga.global_local_attention(q, q, q, local_window_size=2, block_q=8,
                                  implementation="pallas_tpu")
    with pytest.raises(ValueError, match="chunk_rows tunes the 'xla' implementation"):
        ga.global_local_attention(q, q, q, local_window_size=2, chunk_rows=8,
                                  implementation="pallas_tpu")


def test_schedule_lists_are_sets_within_their_bound():
    # The kernel adds every listed block once: a list must hold no duplicate
    # and no row may need more blocks than its static length.
    need = np.random.default_rng(0).random((2, 3, 5, 9)) < 0.4
    ids, cnt = (np.asarray(x) for x in S.lists_from_need(jnp.asarray(need), 9))
    for idx in np.ndindex(need.shape[:-1]):
        got = ids[idx][: cnt[idx]]
        np.testing.assert_array_equal(got, np.flatnonzero(need[idx]))
        assert np.all(ids[idx][cnt[idx]:] == (got[-1] if len(got) else 0))
    T = 300

    @functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
    def most_needed(bq, bk, left, right, bs):
        nbr = -(-T // bs)
        band = S.band_need(-(-T // bq), bq, -(-T // bk), bk, left, right, T)
        draws = jax.random.randint(jax.random.key(bs), (1, 1, nbr, 3), 0, nbr)
        rand = S.random_need(S.random_ids(draws, T, bs), -(-T // bq), bq, -(-T // bk), bk, T, bs)
        return jnp.max(jnp.sum(band, -1)), jnp.max(jnp.sum(rand, -1))

    for bq, bk, left, right, bs in [(8, 24, 13, 2, 5), (128, 128, 256, 256, 64)]:
        n_band, n_rand = most_needed(bq, bk, left, right, bs)
        assert int(n_band) <= S.band_bound(bq, bk, left, right)
        assert int(n_rand) <= S.random_bound(bq, bk, bs, 3)


def test_closed_form_lists_equal_the_lists_of_their_need_matrices():
    # The kernels compute the data-independent lists from the grid indices
    # (S.IntervalLists); they must be exactly the lists of the need matrices they
    # stand for (as lists_from_need builds them: the True columns, then the last
    # one repeated, 0 for none), and so must the per-input lists of the forward
    # pass (K.split_lists).
    from globalattn.kernels import pallas_tpu_kernels as K

    def lists_of(need, L):
        ids = np.zeros(need.shape[:1] + (L,), np.int32)
        for row, cols in enumerate(need):
            cols = np.flatnonzero(cols)
            ids[row] = np.concatenate([cols, np.full(L - len(cols), cols[-1] if len(cols) else 0)])
        return ids, need.sum(-1)
    rng = np.random.default_rng(3)
    for _ in range(40):
        bq, bk = (int(x) for x in rng.choice([8, 16, 24, 128], 2))
        T = int(rng.integers(1, 700))
        left, right = (int(x) for x in rng.integers(0, 300, 2))
        lcm = math.lcm(bq, bk)
        Tp = -(-T // lcm) * lcm
        nq, nk = Tp // bq, Tp // bk
        ng, nqg = int(rng.integers(0, 3)), int(rng.integers(1, 4))
        band = S.band_need(nq, bq, nk, bk, left, right, T)
        need = np.concatenate([np.ones((nq, ng), bool), band], -1)
        cases = [
            (need, min(ng + nk, ng + S.band_bound(bq, bk, left, right)),
             lambda L: S.band_lists(nq, bq, bk, left, right, T, L, prefix=ng)),
            (band.T, min(nq, S.band_bound(bk, bq, right, left)),
             lambda L: S.band_lists_t(nk, bq, bk, left, right, T, L)),
            (np.ones((ng, nq), bool), nq, lambda L: S.full_lists(ng, bk, nq, L)),
            (np.broadcast_to(np.arange(nk) * bk < T, (nqg, nk)), nk,
             lambda L: S.full_lists(nqg, 8, -(-T // bk), L)),
            (np.broadcast_to(np.arange(nk)[:, None] * bk < T, (nk, nqg)), nqg,
             lambda L: S.full_lists(nk, bk, nqg, L, rows_below=T)),
        ]
        for i, (m, L, closed) in enumerate(cases):
            if m.shape[0] == 0:
                continue
            ids, cnt = lists_of(m, L)
            c = closed(L)
            got_ids, got_cnt = c.arrays()
            where = (i, bq, bk, T, left, right, ng)
            np.testing.assert_array_equal(got_cnt, cnt, err_msg=str(where))
            np.testing.assert_array_equal(got_ids, ids, err_msg=str(where))
            if i == 0:
                r, j = np.arange(nq)[:, None], np.arange(L)[None, :]
                seq, pre = (np.asarray(x) for x in K.split_lists(jnp.asarray(ids), ng))
                np.testing.assert_array_equal(c.seq_ids(r, j), seq, err_msg=str(where))
                if ng:
                    np.testing.assert_array_equal(c.prefix_ids(r, j), pre, err_msg=str(where))


# ---------------------------------------------------------------------------
# -m slow: the hypothesis sets of the XLA path, and the race detector.
# ---------------------------------------------------------------------------
@pytest.mark.slow
@settings(max_examples=10 * _SCALE)
@given(cases())
def test_matches_oracle_float32(c):
    _check_f32(c)


@pytest.mark.slow
@settings(max_examples=6 * _SCALE)
@given(cases())
def test_matches_oracle_bfloat16(c):
    _check_bf16(c)


@pytest.mark.slow
@settings(max_examples=6 * _SCALE)
@given(cases())
def test_nan_in_masked_slots_never_leaks(c):
    if c.pad is None:
        rs = np.random.default_rng(c.seed)
        c = dataclasses.replace(c, pad=np.arange(c.T)[None] < rs.integers(0, c.T + 1, (c.B, 1)))
    _check_f32(c, poison=True)


def _race_checked_interpreter(monkeypatch):
    """TPU interpreter parameters that detect races, raise on out-of-bounds reads
    and fill uninitialized memory with NaN; and the list of every kernel
    launch's race-detection state."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
    from jax.experimental.pallas import tpu as pltpu

    states = []
    base = ipc.RaceDetectionState

    class Recorded(base):  # every kernel launch gets a fresh state: keep them all
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            states.append(self)
    monkeypatch.setattr(ipc, "RaceDetectionState", Recorded)
    return pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise",
                                 uninitialized_memory="nan"), states


@pytest.mark.slow
@pytest.mark.parametrize("random,causal", [(False, True), (True, False)])
def test_no_races_or_out_of_bounds_under_tpu_interpreter(monkeypatch, random, causal):
    params, states = _race_checked_interpreter(monkeypatch)
    c = _fixed_case(3, T=21, window=(3, 2), causal=causal, random=random, gqkv=random,
                    sinks=True, bq=8, bk=8, B=1, N=1)
    q, k, v, gqkv, sinks = _inputs(c)
    cot = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)
    out_e, g_e = _fwd_and_grads(
        lambda c, *a: _kernel(c, *a, interpret=params), c, q, k, v, gqkv, sinks, cot)
    out_o, g_o = _fwd_and_grads(_oracle, c, q, k, v, gqkv, sinks, cot)
    jax.block_until_ready((out_e, g_e))
    assert len(states) >= 5, f"expected a race-detector state per kernel launch, got {len(states)}"
    assert not any(s.races_found for s in states)
    _assert_close_finite(out_e, out_o, F32_FWD, "forward (TPU interpreter)")
    _assert_close_finite(g_e, g_o, F32_BWD, "vjp (TPU interpreter)")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fold_gives_each_row_its_own_slot_value_non_finite_included(dtype):
    # The kernels' fold (one-hot matmul over two slot blocks of 4): a NaN or +-inf in one
    # slot's value reaches that slot's row only (0 * nan in a plain matmul reaches every row).
    from globalattn.kernels import pallas_tpu_kernels as K
    pos = jnp.asarray([[3, 5, 9, -1], [12, 14, -1, -1]], jnp.int32)  # two slot blocks
    vals = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 3)), dtype)
    vals = vals.at[0, 1, 0].set(jnp.nan).at[0, 2, 2].set(jnp.inf).at[1, 0, 1].set(-jnp.inf)
    rows = jnp.arange(16, dtype=jnp.int32)[:, None]
    refs = [pos[0][None], pos[1][None], vals[0], vals[1]]
    got = np.asarray(K._fold_rows(rows, 0, 2, refs, 1)[0])
    want = np.zeros((16, 3), np.float32)
    for p, row in zip(np.asarray(pos).ravel(), np.asarray(vals, np.float32).reshape(8, 3)):
        if p >= 0:
            want[p] = row
    np.testing.assert_array_equal(got, want)
    # The last slot block has no successor: its clamped copy must not count twice.
    got_last = np.asarray(K._fold_rows(rows, 1, 2, [pos[1][None], pos[1][None], vals[1],
                                                    vals[1]], 1)[0])
    want_last = np.where(np.isin(np.arange(16), [12, 14])[:, None], want, 0)
    np.testing.assert_array_equal(got_last, want_last)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("T", [40, 48])  # chunks of 8 rows, of 16 rows
def test_gather_rows_copies_each_row_exactly_without_races(monkeypatch, dtype, T):
    # The heads-first row gather (global slots, global rows' cotangents): every
    # row as it is (NaN, +-inf, -0), rows of one chunk, repeats, both ends of the
    # sequence; a negative position (an empty slot) gives a row of zeros, one past
    # the end is clamped like XLA's gather.
    from globalattn.kernels import pallas_tpu_kernels as K
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, T, 8)), dtype)
    x = (x.at[0, 1, 5, 2].set(jnp.nan).at[1, 0, T - 1, 0].set(-0.0)
         .at[1, 2, 17, 3].set(jnp.inf).at[0, 0, 7, 7].set(-jnp.inf))
    pos = jnp.asarray([[5, 0, T - 1, 7, 7, 1, 2, 3, 17, 33, 21, -4],
                       [T - 1, 17, 3, 4, 5, 6, 7, 8, 9, 16, 15, T + 2]], jnp.int32)
    params, states = _race_checked_interpreter(monkeypatch)
    got = np.asarray(K.gather_rows(x, pos, interpret=params).astype(jnp.float32))
    want = np.asarray(x.astype(jnp.float32))[
        np.arange(2)[:, None, None], np.arange(3)[None, :, None],
        np.clip(np.asarray(pos), 0, T - 1)[:, None, :]]
    assert not np.all(want[0, :, -1] == 0)  # row 0: what clamping -4 would have given
    want = np.where((np.asarray(pos) < 0)[:, None, :, None], np.float32(0), want)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    assert states and not any(s.races_found for s in states)


@pytest.mark.parametrize("H", [4, 8])  # token-major (rule applied before the kernels), heads-first (inside them)
def test_non_finite_keys_and_values_in_kernel_rule(H):
    # A real token's NaN / inf key or value (and global_qkv's) makes exactly the rows that
    # attend it NaN, as in the oracle. Gradients: the rule (core.non_finite_to_keys)
    # applied inside the kernels must differentiate exactly as the rule applied to k, v
    # before them (the dispatcher's way for other kernels): a NaN key row times a zero
    # probability spreads NaN through dQ there, so the NaN patterns are the kernel's;
    # every finite gradient equals the oracle's (which marks NaN rows after a finite
    # computation, so its gradients are finite).
    from globalattn.ops import core
    c = _fixed_case(11, T=21, window=(2, 1), causal=False, random=True, gqkv=True, sinks=True,
                    bq=8, bk=8, H=H)
    q, k, v, gqkv, sinks = _inputs(c)
    k = k.at[0, 9, 1, 2].set(jnp.nan).at[1, 6, 0, 0].set(jnp.inf)
    v = v.at[0, 4, 0, 3].set(-jnp.inf).at[1, 12, 1, 1].set(jnp.nan)
    gqkv = (gqkv[0], gqkv[1].at[0, 2, 0, 1].set(jnp.inf), gqkv[2].at[1, 8, 1, 0].set(jnp.nan))
    cot = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape), jnp.float32)

    def rule_first(c, q, k, v, gqkv, sinks):
        k, v = core.non_finite_to_keys(k, v)
        gqkv = (gqkv[0],) + core.non_finite_to_keys(gqkv[1], gqkv[2])
        return _kernel(c, q, k, v, gqkv, sinks)
    out_e, g_e = _fwd_and_grads(_kernel, c, q, k, v, gqkv, sinks, cot)
    out_r, g_r = _fwd_and_grads(rule_first, c, q, k, v, gqkv, sinks, cot)
    out_o, g_o = _fwd_and_grads(_oracle, c, q, k, v, gqkv, sinks, cot)
    out_o = np.asarray(out_o, np.float64)
    assert np.isnan(out_o).any() and not np.isnan(out_o).all()
    g_e, g_r, g_o = (jax.tree.leaves(g) for g in (g_e, g_r, g_o))
    assert any(np.isnan(np.asarray(x)).any() for x in g_e)  # the case reaches the gradients
    for what, x, y in [("forward", out_e, out_o)] + [
            (f"vjp {i}", a, b) for i, (a, b) in enumerate(zip(g_e, g_o))]:
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if what == "forward":
            np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=what)
        fin = np.isfinite(x)
        np.testing.assert_allclose(x[fin], y[fin], atol=F32_BWD, rtol=0, err_msg=what)
    for i, (x, y) in enumerate(zip(g_e, g_r)):
        np.testing.assert_array_equal(np.isnan(np.asarray(x)), np.isnan(np.asarray(y)),
                                      err_msg=f"vjp {i}: in-kernel rule vs rule first")
        np.testing.assert_allclose(np.nan_to_num(np.asarray(x)), np.nan_to_num(np.asarray(y)),
                                   atol=F32_BWD, rtol=0, err_msg=f"vjp {i}")
