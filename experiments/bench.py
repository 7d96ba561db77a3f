"""Benchmark: efficient global-local attention vs dense baselines.

    python -m experiments.bench                     # the issue's table (T = 1k..64k, 128k memory run)
    python -m experiments.bench --quick             # T = 1k, 2k only (a smoke run)
    python -m experiments.bench --seq_lens=4096,8192 --globals=64 --reps=7
    python -m experiments.bench --tpu               # TPU programs compiled here (needs libtpu;
                                                    # see experiments/bench_tpu.py)

Prints a markdown table. Per (T, G): median wall time of the jitted forward and
forward+backward (``jax.grad`` w.r.t. q, k, v) over ``--reps`` runs after a
warm-up, useful GFLOP/s, and peak memory from XLA's compiled memory analysis
(arguments + outputs + temporaries). Baselines measured in the same run:
``jax.nn.dot_product_attention`` with the equivalent dense boolean mask (the
mask is an input, built outside the timed region) and unmasked dense attention.

FLOP convention: a forward does 4*pairs*H*N useful flops (QK^T and PV, 2 each);
forward+backward counts 3x that (the backward has twice the forward's matmuls).
"Useful" pairs are the allowed (i, j) pairs of the pattern, counted exactly
(globalattn.analytics.allowed_pairs); dense attention's pairs are T^2.
Global tokens are spread evenly (positions round(k*T/G)), so most of them lie
outside each other's windows.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

import globalattn as ga
from globalattn import analytics, sharding



def _ratio(r: float) -> str:
    """A speed-up or size ratio: two decimals below 10 (0.8 never prints as 1x)."""
    return f"{r:.2f}x" if r < 10 else f"{r:.0f}x"

def _median_time(fn: Callable, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # warm-up (compile already done)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_bytes(compiled) -> Optional[int]:
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def _measure(f: Callable, args, reps: int) -> Dict[str, float]:
    """Forward and forward+backward of f(q, k, v, *rest) -> [B, T, N, H]."""
    q = args[0]
    cot = jnp.ones_like(q)

    def loss(q, k, v, *rest):
        return jnp.vdot(f(q, k, v, *rest), cot)

    fwd = jax.jit(f).lower(*args).compile()
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    return dict(
        fwd_s=_median_time(fwd, args, reps),
        fwdbwd_s=_median_time(bwd, args, reps),
        fwd_mem=_peak_bytes(fwd),
        fwdbwd_mem=_peak_bytes(bwd),
    )


def _fmt_mem(b: Optional[int]) -> str:
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


def global_positions(T: int, G: int) -> np.ndarray:
    return np.unique(np.round(np.arange(G) * T / max(G, 1)).astype(np.int64))[:G]


_FULL_CACHE: Dict[int, Dict[str, float]] = {}


def bench_row(T: int, G: int, *, window: int, B: int, N: int, H: int, reps: int,
              dense: bool) -> Dict[str, object]:
    rs = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rs.standard_normal((B, T, N, H)), jnp.float32) for _ in range(3))
    pos = global_positions(T, G)
    glob = np.zeros((B, T), bool)
    glob[:, pos] = True
    glob = jnp.asarray(glob)
    pairs = analytics.allowed_pairs(T, local_window_size=window, global_positions=pos.tolist())
    fl = 4.0 * pairs * H * N

    def sparse(q, k, v, glob):
        return ga.global_local_attention(q, k, v, local_window_size=window, global_mask=glob,
                                         max_globals=G)

    row: Dict[str, object] = dict(T=T, G=G, density=pairs / T**2)
    r = _measure(sparse, (q, k, v, glob), reps)
    row.update({f"sparse_{key}": val for key, val in r.items()})
    row["sparse_fwd_gflops"] = fl / r["fwd_s"] / 1e9
    row["sparse_fwdbwd_gflops"] = 3 * fl / r["fwdbwd_s"] / 1e9
    if dense:
        mask = ga.global_local_mask(T, local_window_size=window, global_mask=glob[:1])[:, None]

        def masked(q, k, v, mask):
            return jax.nn.dot_product_attention(q, k, v, mask=mask)

        def full(q, k, v):
            return jax.nn.dot_product_attention(q, k, v)

        r = _measure(masked, (q, k, v, mask), reps)
        row.update({f"masked_{key}": val for key, val in r.items()})
        if T not in _FULL_CACHE:  # unmasked dense attention does not depend on G
            _FULL_CACHE[T] = _measure(full, (q, k, v), reps)
        r = _FULL_CACHE[T]
        row.update({f"full_{key}": val for key, val in r.items()})
        dfl = 4.0 * T * T * H * N
        row["full_fwd_gflops"] = dfl / r["fwd_s"] / 1e9
        row["full_fwdbwd_gflops"] = 3 * dfl / r["fwdbwd_s"] / 1e9
    return row


def print_table(rows: List[Dict[str, object]], out=sys.stdout) -> None:
    hdr = ("| T | G | density | sparse fwd ms | sparse fwd+bwd ms | sparse GFLOP/s fwd / fwd+bwd "
           "| sparse peak mem fwd+bwd | masked-dense fwd+bwd ms | full-dense fwd+bwd ms "
           "| full-dense GFLOP/s fwd / fwd+bwd | speed-up vs masked (fwd+bwd) "
           "| sparse useful GFLOP/s as % of full (fwd+bwd) |")
    print(hdr, file=out)
    print("|" + "---|" * (hdr.count("|") - 1), file=out)
    for r in rows:
        dense = "masked_fwdbwd_s" in r
        cells = [
            str(r["T"]), str(r["G"]), f"{r['density']:.4f}",
            f"{r['sparse_fwd_s'] * 1e3:.1f}", f"{r['sparse_fwdbwd_s'] * 1e3:.1f}",
            f"{r['sparse_fwd_gflops']:.1f} / {r['sparse_fwdbwd_gflops']:.1f}",
            _fmt_mem(r["sparse_fwdbwd_mem"]),
            f"{r['masked_fwdbwd_s'] * 1e3:.1f}" if dense else "skipped (T^2 memory)",
            f"{r['full_fwdbwd_s'] * 1e3:.1f}" if dense else "—",
            f"{r['full_fwd_gflops']:.1f} / {r['full_fwdbwd_gflops']:.1f}" if dense else "—",
            _ratio(r['masked_fwdbwd_s'] / r['sparse_fwdbwd_s']) if dense else "—",
            f"{100 * r['sparse_fwdbwd_gflops'] / r['full_fwdbwd_gflops']:.0f}%" if dense else "—",
        ]
        print("| " + " | ".join(cells) + " |", file=out)
        out.flush()


def print_comm_table(seq_lens: List[int], *, window: int, N: int, H: int, B: int,
                     G: int = 64, devices=(2, 4, 8), out=sys.stdout) -> None:
    """Per-device bytes per layer (forward) of sequence-parallel attention vs a ring.

    From the cost model of :func:`globalattn.sharding.comm_bytes_per_layer`
    (which tests/test_seq_parallel.py checks against the compiled HLO).
    """
    print(f"\nSequence-parallel communication per device per layer (forward, float32, G={G}, "
          f"window {window} each side):\n", file=out)
    print("| T | devices | ours (halo + globals) | ring (all K/V) | ring / ours |", file=out)
    print("|---|---|---|---|---|", file=out)
    for T in seq_lens:
        for P in devices:
            if T % P or window > T // P:
                continue
            c = sharding.comm_bytes_per_layer(seq_len=T, num_devices=P, local_window_size=window,
                                              max_globals=G, num_heads=N, head_dim=H,
                                              batch_size=B)
            print(f"| {T} | {P} | {c.ours / 2**20:.2f} MiB | {c.ring / 2**20:.2f} MiB "
                  f"| {_ratio(c.ring / c.ours)} |", file=out)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--tpu" in argv:  # compiled TPU programs, measured on this host (experiments/bench_tpu.py)
        from experiments import bench_tpu
        return bench_tpu.main([a for a in argv if a != "--tpu"])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq_lens", default="1024,2048,4096,8192,16384,32768,65536")
    p.add_argument("--globals", default="1,16,64")
    p.add_argument("--window", type=int, default=256, help="local_window_size (each side)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dense_max_len", type=int, default=8192,
                   help="largest T for the dense baselines (they need T^2 memory)")
    p.add_argument("--memory_len", type=int, default=131072,
                   help="extra forward+backward run at this T, G=64, to check peak memory (0 = off)")
    p.add_argument("--quick", action="store_true", help="T = 1k, 2k; 2 reps; no memory run")
    a = p.parse_args(argv)
    if a.quick:
        a.seq_lens, a.reps, a.memory_len = "1024,2048", 2, 0
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.device_count()}, "
          f"B={a.batch} N={a.heads} H={a.head_dim} float32 local_window_size={a.window}, "
          f"median of {a.reps}")
    rows = []
    for T in [int(t) for t in a.seq_lens.split(",")]:
        for G in [int(g) for g in a.globals.split(",")]:
            rows.append(bench_row(T, G, window=a.window, B=a.batch, N=a.heads, H=a.head_dim,
                                  reps=a.reps, dense=T <= a.dense_max_len))
            print(f"  measured T={T} G={G}", file=sys.stderr, flush=True)
    print_table(rows)
    print_comm_table([int(t) for t in a.seq_lens.split(",")] + ([a.memory_len] if a.memory_len else []),
                     window=a.window, N=a.heads, H=a.head_dim, B=a.batch)
    if a.memory_len:
        r = bench_row(a.memory_len, 64, window=a.window, B=a.batch, N=a.heads, H=a.head_dim,
                      reps=1, dense=False)
        print(f"\nT={a.memory_len} G=64 forward+backward: {r['sparse_fwdbwd_s']:.2f} s, "
              f"peak memory {_fmt_mem(r['sparse_fwdbwd_mem'])} (compiled memory analysis)")


if __name__ == "__main__":
    main()
