"""Sequence-parallel global + local attention vs the single-device kernel.

Runs on the 8 simulated CPU devices of tests/conftest.py. The single-device
kernel is itself tested against the dense oracle (tests/test_attention.py);
here the sharded version must equal it, forward and gradients, and must
communicate nothing whose size grows with T.
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

from globalattn import global_local_attention, global_local_reference
from globalattn.sharding import (comm_bytes_per_layer, make_mesh,
                                 sequence_parallel_global_local_attention as sp_attention)

N, H = 2, 8
TOL = dict(rtol=1e-5, atol=1e-5)


def _qkv(seed: int, B: int, T: int, n: int = N):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v, ct = (jax.random.normal(kk, (B, T, n, H), jnp.float32) for kk in ks)
    return q, k, v, ct


def _masks(T: int, C: int):
    """Three examples: globals spread over shards (one on padding) with a padded
    tail; no globals, with left padding past the first C + 1 positions; a
    single global in the last shard."""
    pad = np.ones((3, T), bool)
    glob = np.zeros((3, T), bool)
    pad[0, T - C // 2 - 3:] = False  # tail padding crossing into the previous shard
    glob[0, [0, C - 1, C + 2, T // 2 + 1, T - 2]] = True  # T - 2 is padding: ignored
    pad[1, :C + 1] = False  # a fully padded shard when the chunk is C long
    glob[2, T - 1] = True
    return jnp.asarray(glob), jnp.asarray(pad)


def _with_nan_in_padding(x, pad):
    return jnp.where(pad[:, :, None, None], x, jnp.nan)


def _fwd_and_vjp(fn, q, k, v, ct):
    """(out, dq, dk, dv) for cotangent ct, compiled (eager shard_map is slow)."""
    def run(q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out,) + vjp(ct)
    return jax.jit(run)(q, k, v, ct)


def _assert_close(got, want):
    for g, w in zip(got, want):
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), **TOL)


_MAIN_T = 64


@functools.lru_cache(maxsize=None)
def _main_case(is_causal: bool):
    """Inputs, kwargs and single-device (out, dq, dk, dv), shared by all device counts."""
    glob, pad = _masks(_MAIN_T, 8)  # globals fall in different shards for P = 2, 4, 8
    q, k, v, ct = _qkv(10 + is_causal, 3, _MAIN_T)
    q, k, v = (_with_nan_in_padding(x, pad) for x in (q, k, v))  # must not leak
    kw = dict(local_window_size=(6, 3), global_mask=glob, padding_mask=pad,
              is_causal=is_causal, max_globals=6, sinks=jnp.array([0.5, -1.0]))
    want = _fwd_and_vjp(functools.partial(global_local_attention, **kw), q, k, v, ct)
    return (q, k, v, ct), kw, want


@pytest.mark.parametrize("num_devices", [2, 4, 8])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_single_device_forward_and_grads(num_devices, is_causal):
    (q, k, v, ct), kw, want = _main_case(is_causal)
    mesh = make_mesh({"seq": num_devices})
    # chunk_rows 8 at 2 and 4 devices: each device's 32 or 16 rows in several chunks.
    chunk_rows = None if num_devices == 8 else 8
    got = _fwd_and_vjp(functools.partial(sp_attention, mesh=mesh, chunk_rows=chunk_rows, **kw),
                       q, k, v, ct)
    _assert_close(got, want)
    assert np.all(np.asarray(got[0])[~np.asarray(kw["padding_mask"])] == 0)  # padded rows


def test_sink_logit_gradients_match_single_device():
    # The sink logits are the same on every device: their gradient sums all devices' rows.
    (q, k, v, ct), kw, _ = _main_case(False)
    sinks, base = kw["sinks"], {a: b for a, b in kw.items() if a != "sinks"}

    def grad(fn):
        return jax.jit(jax.grad(lambda s: jnp.vdot(fn(q, k, v, sinks=s, **base), ct)))(sinks)
    want = grad(global_local_attention)
    got = grad(functools.partial(sp_attention, mesh=make_mesh({"seq": 4}), chunk_rows=8))
    assert np.abs(np.asarray(want)).min() > 1e-3
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


@pytest.mark.parametrize("window", [0, (16, 3), (2, 16)])
def test_windows_up_to_the_chunk(window):
    T, P_ = 64, 4
    mesh = make_mesh({"seq": P_})
    glob, pad = _masks(T, T // P_)
    q, k, v, ct = _qkv(1, 3, T)
    kw = dict(local_window_size=window, global_mask=glob, padding_mask=pad, max_globals=4)
    want = _fwd_and_vjp(functools.partial(global_local_attention, **kw), q, k, v, ct)
    # Blocks of 4 in chunks of 12 rows: the last chunk of each device's 16 rows runs past them.
    got = _fwd_and_vjp(functools.partial(sp_attention, mesh=mesh, block_q=4, chunk_rows=12,
                                         **kw), q, k, v, ct)
    _assert_close(got, want)


def test_no_global_mask():
    T = 128
    mesh = make_mesh({"seq": 8})
    q, k, v, ct = _qkv(2, 2, T)
    pad = jnp.arange(T)[None, :] < jnp.array([[T], [T - 21]])
    kw = dict(local_window_size=(9, 4), padding_mask=pad)
    want = _fwd_and_vjp(functools.partial(global_local_attention, **kw), q, k, v, ct)
    got = _fwd_and_vjp(functools.partial(sp_attention, mesh=mesh, **kw), q, k, v, ct)
    _assert_close(got, want)


def test_matches_dense_oracle():
    # Guards against the kernel and this function sharing a mistake.
    T = 64
    mesh = make_mesh({"seq": 4})
    glob, pad = _masks(T, 16)
    q, k, v, _ = _qkv(3, 3, T)
    kw = dict(local_window_size=(5, 2), global_mask=glob, padding_mask=pad, is_causal=True)
    got = jax.jit(functools.partial(sp_attention, mesh=mesh, max_globals=4, **kw))(q, k, v)
    np.testing.assert_allclose(got, jax.jit(functools.partial(global_local_reference, **kw))(
        q, k, v), **TOL)


def test_global_qkv():
    T = 64
    mesh = make_mesh({"seq": 4})
    glob, pad = _masks(T, 16)
    q, k, v, ct = _qkv(4, 3, T)
    qg, kg, vg, _ = _qkv(5, 3, T)
    kw = dict(local_window_size=4, global_mask=glob, padding_mask=pad, max_globals=5)

    def run(attn):
        return _fwd_and_vjp(lambda q, k, v: attn(q, k, v, global_qkv=(2 * q, kg, vg), **kw),
                            q, k, v, ct)

    _assert_close(run(functools.partial(sp_attention, mesh=mesh)), run(global_local_attention))


def test_batch_and_head_axes_sharded():
    T = 64
    mesh = make_mesh({"data": 2, "seq": 2, "model": 2})
    glob, pad = _masks(T, 32)
    glob, pad = glob[:2], pad[:2]
    q, k, v, ct = _qkv(6, 2, T)
    kw = dict(local_window_size=(7, 2), global_mask=glob, padding_mask=pad, max_globals=5,
              sinks=jnp.array([0.1, 2.0]))
    want = _fwd_and_vjp(functools.partial(global_local_attention, **kw), q, k, v, ct)
    sp = functools.partial(sp_attention, mesh=mesh, batch_axis="data", head_axis="model", **kw)
    got = _fwd_and_vjp(sp, q, k, v, ct)
    _assert_close(got, want)
    assert got[0].sharding.is_equivalent_to(
        NamedSharding(mesh, P("data", "seq", "model", None)), 4)


def test_explicit_axes_mesh():
    T = 64
    mesh = jax.make_mesh((4,), ("seq",), axis_types=(jax.sharding.AxisType.Explicit,))
    glob, pad = _masks(T, 16)
    q, k, v, _ = _qkv(7, 3, T)
    kw = dict(local_window_size=3, global_mask=glob, padding_mask=pad, max_globals=4)
    want = jax.jit(functools.partial(global_local_attention, **kw))(q, k, v)
    with jax.set_mesh(mesh):
        got = jax.jit(functools.partial(sp_attention, mesh=mesh, **kw))(q, k, v)
    np.testing.assert_allclose(got, want, **TOL)


def test_over_capacity():
    T = 64
    mesh = make_mesh({"seq": 4})
    glob, pad = _masks(T, 16)  # example 0 has 4 real globals
    q, k, v, _ = _qkv(8, 3, T)
    kw = dict(local_window_size=3, global_mask=glob, padding_mask=pad, max_globals=3)
    with pytest.raises(ValueError, match=r"max_globals=3.*\{0: 4\}"):
        sp_attention(q, k, v, mesh=mesh, **kw)
    out = jax.jit(lambda q, k, v, g: sp_attention(q, k, v, mesh=mesh, **{**kw, "global_mask": g})
                  )(q, k, v, glob)
    assert np.all(np.isnan(out[0][pad[0]]))  # poisoned, never silently truncated
    ref = jax.jit(functools.partial(global_local_attention, **kw | dict(
        global_mask=glob.at[0].set(False))))(q, k, v)
    np.testing.assert_allclose(out[1:], ref[1:], **TOL)


# Fixed static configuration, so hypothesis examples reuse one compilation.
_HYP_T, _HYP_P = 64, 4
_HYP_KW = dict(local_window_size=(5, 7), max_globals=8)


@functools.lru_cache(maxsize=None)
def _hyp_fns(is_causal: bool):
    mesh = make_mesh({"seq": _HYP_P})
    kw = dict(_HYP_KW, is_causal=is_causal)

    def both(q, k, v, ct, g, p):
        f_ref = lambda q, k, v: global_local_attention(q, k, v, global_mask=g, padding_mask=p, **kw)
        f_sp = lambda q, k, v: sp_attention(q, k, v, mesh=mesh, global_mask=g, padding_mask=p, **kw)
        return _fwd_and_vjp(f_ref, q, k, v, ct), _fwd_and_vjp(f_sp, q, k, v, ct)

    return jax.jit(both)


@given(seed=st.integers(0, 2**16), is_causal=st.booleans(),
       globals_=st.lists(st.integers(0, _HYP_T - 1), max_size=8),
       length=st.integers(0, _HYP_T))
def test_random_masks_property(seed, is_causal, globals_, length):
    glob = jnp.zeros((1, _HYP_T), bool).at[0, jnp.array(globals_, int)].set(True)  # duplicates ok
    pad = jnp.arange(_HYP_T)[None, :] < length  # length 0: all padding
    q, k, v, ct = _qkv(seed, 1, _HYP_T)
    want, got = _hyp_fns(is_causal)(q, k, v, ct, glob, pad)
    _assert_close(got, want)


# --------------------------------------------------------------------------
# Communication: read the compiled HLO.
# --------------------------------------------------------------------------
_COLLECTIVE = re.compile(
    r"=\s*(?P<shapes>\(.*?\)|\S+)\s+(?P<op>all-gather|all-reduce|collective-permute|all-to-all|"
    r"reduce-scatter)(?:-start)?\(")
_SHAPE = re.compile(r"(?P<dtype>pred|[a-z]+\d+)\[(?P<dims>[\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4}


def _collectives(hlo: str):
    """[(op, [(dtype, dims), ...])] of every collective in compiled HLO text."""
    found = []
    for m in _COLLECTIVE.finditer(hlo):
        shapes = [(s["dtype"], tuple(int(d) for d in s["dims"].split(",") if d))
                  for s in _SHAPE.finditer(m["shapes"])]
        found.append((m["op"], shapes))
    return found


def _bytes_per_device(collectives, P_: int) -> float:
    """Same ring cost model as comm_bytes_per_layer."""
    factor = {"collective-permute": 1.0, "all-gather": (P_ - 1) / P_,
              "all-reduce": 2.0 * (P_ - 1) / P_}
    total = 0.0
    for op, shapes in collectives:
        total += factor[op] * sum(_BYTES[dt] * int(np.prod(d)) for dt, d in shapes)
    return total


def _compiled_hlo(fn, T: int, P_: int, grad: bool, B=2, G=4, window=(5, 3)):
    mesh = make_mesh({"seq": P_})
    sh = NamedSharding(mesh, P(None, "seq"))  # inputs already laid out as the function wants
    x = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32, sharding=sh)
    m = jax.ShapeDtypeStruct((B, T), jnp.bool_, sharding=sh)
    f = functools.partial(fn, mesh=mesh, local_window_size=window, max_globals=G)
    f = (lambda q, k, v, g, p, f=f: f(q, k, v, global_mask=g, padding_mask=p))
    if grad:
        f = jax.grad(lambda q, k, v, g, p, f=f: jnp.sum(f(q, k, v, g, p)), argnums=(0, 1, 2))
    return jax.jit(f).lower(x, x, x, m, m).compile().as_text()


@pytest.mark.parametrize("grad", [False, True])
def test_hlo_collectives_have_no_sequence_dimension(grad):
    # T, C = T/P chosen distinct from every other size (B=2, N=2, H=8, G=4, window 5/3, P=4).
    P_, B, G, window = 4, 2, 4, (5, 3)
    per_T = {}
    for T in (128, 256):
        cols = _collectives(_compiled_hlo(sp_attention, T, P_, grad, B, G, window))
        ops = {op for op, _ in cols}
        assert {"collective-permute", "all-reduce", "all-gather"} <= ops, ops
        for op, shapes in cols:
            for _, dims in shapes:
                assert T not in dims and T // P_ not in dims, (T, op, shapes)
        per_T[T] = sorted(cols)
    # The communication is literally the same program for both lengths.
    assert per_T[128] == per_T[256]
    if not grad:
        want = comm_bytes_per_layer(seq_len=128, num_devices=P_, local_window_size=window,
                                    max_globals=G, num_heads=N, head_dim=H, batch_size=B)
        assert _bytes_per_device(per_T[128], P_) == pytest.approx(want.ours)


def test_hlo_checker_sees_a_sequence_sized_collective():
    # The HLO test is only meaningful if it can fail: an all-gather of K is caught.
    def gather_keys(q, k, v, *, mesh, global_mask, padding_mask, **_):
        def body(k):
            return jax.lax.all_gather(k, "seq", axis=1, tiled=True)[:, :k.shape[1]]
        f = jax.shard_map(body, mesh=mesh, in_specs=P(None, "seq"), out_specs=P(None, "seq"))
        return f(k)

    cols = _collectives(_compiled_hlo(gather_keys, 128, 4, grad=False))
    assert any(128 in dims for op, shapes in cols if op == "all-gather" for _, dims in shapes)


def test_comm_bytes_worked_example():
    r = comm_bytes_per_layer(seq_len=131072, num_devices=8, local_window_size=256,
                             max_globals=64, num_heads=4, head_dim=64, bytes_per_element=4)
    assert r.halo == 512 * (2 * 4 * 64 * 4 + 1) == 1_049_088
    assert r.global_gather == 1.75 * 64 * (3 * 4 * 64 * 4 + 4) + 7 * 4 == 344_540
    assert r.global_rows == 1.75 * 64 * (4 * 64 * 4 + 2 * 4 * 4) == 118_272
    assert r.ours == 1_511_900
    assert r.ring == 7 * 16384 * (2 * 4 * 64 * 4 + 1) == 234_995_712
    r2 = comm_bytes_per_layer(seq_len=2 * 131072, num_devices=8, local_window_size=256,
                              max_globals=64, num_heads=4, head_dim=64)
    assert r2.ours == r.ours and r2.ring == 2 * r.ring


# --------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------
def test_errors():
    mesh = make_mesh({"seq": 4})
    q, k, v, _ = _qkv(9, 1, 64)
    with pytest.raises(ValueError, match=r"left=17, right=17.*64/4 = 16"):
        sp_attention(q, k, v, mesh=mesh, local_window_size=17)
    with pytest.raises(ValueError, match=r"left=0, right=20.*16"):
        sp_attention(q, k, v, mesh=mesh, local_window_size=(0, 20))
    jax.eval_shape(functools.partial(sp_attention, mesh=mesh, local_window_size=(16, 40),
                                     is_causal=True), q, k, v)  # causal: right -> 0, accepted
    with pytest.raises(ValueError, match=r"T=62 is not divisible by the 4 devices"):
        sp_attention(q[:, :62], k[:, :62], v[:, :62], mesh=mesh, local_window_size=2)
    with pytest.raises(ValueError, match=r"not supported"):
        sp_attention(q, k, v, mesh=mesh, local_window_size=2,
                     random_blocks=jnp.zeros((1, 1, 4, 1), jnp.int32), block_size=16)
    with pytest.raises(ValueError, match=r"seq_axis='sequence' is not an axis"):
        sp_attention(q, k, v, mesh=mesh, seq_axis="sequence", local_window_size=2)
    with pytest.raises(ValueError, match=r"max_globals"):
        jax.jit(lambda g: sp_attention(q, k, v, mesh=mesh, local_window_size=2, global_mask=g)
                )(jnp.zeros((1, 64), bool))
    mesh3 = make_mesh({"data": 2, "seq": 4})
    with pytest.raises(ValueError, match=r"batch B=1 is not divisible by the 2 devices"):
        sp_attention(q, k, v, mesh=mesh3, batch_axis="data", local_window_size=2)
    with pytest.raises(ValueError, match=r"needs 16 devices but only 8"):
        make_mesh({"seq": 16})
    with pytest.raises(ValueError, match=r"positive int size"):
        make_mesh({"seq": 0})
    with pytest.raises(ValueError, match=r"seq_len=100 is not divisible by num_devices=8"):
        comm_bytes_per_layer(seq_len=100, num_devices=8, local_window_size=1, max_globals=1,
                             num_heads=1, head_dim=1)
