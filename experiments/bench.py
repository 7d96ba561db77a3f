"""Benchmark: efficient global-local attention vs dense baselines.

    python -m experiments.bench                     # the issue's table (T = 1k..64k, 128k memory run)
    python -m experiments.bench --quick             # T = 1k, 2k only (a smoke run)
    python -m experiments.bench --seq_lens=4096,8192 --globals=64 --reps=7
    python -m experiments.bench --tpu               # TPU programs compiled here (needs libtpu;
                                                    # see experiments/bench_tpu.py)
    python -m experiments.bench --peer=flax_bigbird --seq_lens=4096,8192,16384 --globals=64
                                                    # + Hugging Face's FlaxBigBird block-sparse
                                                    # attention, same run (needs
                                                    # requirements-bench.txt)

Prints a markdown table. Per (T, G): median wall time of the jitted forward and
forward+backward (``jax.value_and_grad`` w.r.t. q, k, v of ``<out, cotangent>``,
as a training step computes them: with ``jax.grad`` alone XLA may skip a
rematerialised forward whose value nothing reads) over ``--reps`` runs after a
warm-up, useful GFLOP/s, and peak memory from XLA's compiled memory analysis
(arguments + outputs + temporaries). Baselines measured in the same run:
``jax.nn.dot_product_attention`` with the equivalent dense boolean mask (the
mask is an input, built outside the timed region) and unmasked dense attention.

Peer (``--peer=flax_bigbird``): Hugging Face's ``FlaxBigBirdBlockSparseAttention``
(transformers 4.57.6, the last release with Flax models) on the same q, k, v in its
own [B, N, T, H] layout, BigBird-base's pattern: blocks of ``--bigbird_block`` (64),
3 window blocks, the first and last block global, ``--bigbird_random`` (3) random
blocks per query block. Its useful pairs are its pattern's (:func:`bigbird_pairs`),
so GFLOP/s compare the rate of useful work; times compare the forward as a user
gets it (our pattern: window radius ``--window`` plus G globals).

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
    # value_and_grad: the loss value needs the forward's output, as in training. (With
    # grad alone, a loss linear in the output lets XLA drop a rematerialised forward.)
    bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
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


BIGBIRD_REQUIREMENT = "transformers==4.57.6"


def bigbird_pairs(T: int, block: int, num_random: int) -> int:
    """Allowed (query, key) pairs of BigBird ITC as Hugging Face computes it.

    Query blocks 0 and nb-1 are global (all T keys); block 1 sees blocks 0, 1, 2 and
    the last, block nb-2 the first and nb-3 .. nb-1, each plus ``num_random`` random
    blocks; every other block its 3-block window, the first and last block and
    ``num_random`` random blocks (drawn outside those, so no key counts twice).
    """
    nb = T // block
    if T % block or nb < 2 * num_random + 5:
        raise ValueError(f"BigBird needs T a multiple of block and >= {2 * num_random + 5} "
                         f"blocks; got T={T}, block={block}, num_random={num_random}")
    return (2 * T * block + 2 * block * block * (4 + num_random)
            + (nb - 4) * block * block * (5 + num_random))


def flax_bigbird(*, N: int, H: int, block: int, num_random: int, max_len: int,
                 random_key: Optional[jax.Array] = None) -> Callable:
    """``f(q, k, v, mask)`` on [B, N, T, H] -> [B, T, N * H]: FlaxBigBird's block-sparse
    attention alone (no projections), masks built inside as its layer does.

    ``random_key`` (a ``jax.random.PRNGKey``) draws its random blocks; None runs it
    deterministic, as in the benchmark (same work, see :func:`bigbird_pairs`). Raises
    ImportError naming the requirement when transformers' Flax BigBird is not installed.
    """
    try:
        from transformers import BigBirdConfig
        from transformers.models.big_bird.modeling_flax_big_bird import (
            FlaxBigBirdBlockSparseAttention)
    except ImportError as e:
        raise ImportError(f"--peer=flax_bigbird needs {BIGBIRD_REQUIREMENT} (the last release "
                          "with Flax models): pip install -r requirements-bench.txt") from e
    if num_random < 1 or block < 1:  # its gather of random blocks divides by their count
        raise ValueError(f"FlaxBigBird needs block >= 1 and num_random >= 1; got block={block}, "
                         f"num_random={num_random}")
    config = BigBirdConfig(hidden_size=N * H, num_attention_heads=N, block_size=block,
                           num_random_blocks=num_random, attention_type="block_sparse",
                           max_position_embeddings=max_len)
    layer = FlaxBigBirdBlockSparseAttention(config)

    def attend(q, k, v, mask):
        blocked, band, from_mask, to_mask = layer.create_masks_for_block_sparse_attn(mask, block)
        out, _ = layer.apply({}, q, k, v, band, from_mask, to_mask, blocked, blocked, N, H,
                             deterministic=random_key is None, indices_prng_key=random_key,
                             output_attentions=False,
                             method=FlaxBigBirdBlockSparseAttention.bigbird_block_sparse_attention)
        return out  # [B, T, N * H]

    return attend


def peer_row(T: int, *, B: int, N: int, H: int, reps: int, block: int, num_random: int
             ) -> Dict[str, float]:
    """FlaxBigBird's forward and forward+backward at length T (same inputs as bench_row)."""
    rs = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rs.standard_normal((B, T, N, H)), jnp.float32).transpose(0, 2, 1, 3)
               for _ in range(3))
    mask = jnp.ones((B, T), jnp.float32)
    f = flax_bigbird(N=N, H=H, block=block, num_random=num_random, max_len=T)
    r = _measure(lambda q, k, v, m: f(q, k, v, m).reshape(B, T, N, H).transpose(0, 2, 1, 3),
                 (q, k, v, mask), reps)
    pairs = bigbird_pairs(T, block, num_random)
    fl = 4.0 * pairs * H * N
    return {**{f"peer_{key}": val for key, val in r.items()},
            "peer_fwd_gflops": fl / r["fwd_s"] / 1e9, "peer_fwdbwd_gflops": 3 * fl / r["fwdbwd_s"] / 1e9,
            "peer_density": pairs / T**2}


def print_peer_table(rows: List[Dict[str, object]], out=None) -> None:
    """Ours vs FlaxBigBird (rows that carry peer_* keys), with the issue's targets."""
    out = sys.stdout if out is None else out  # sys.stdout at call time
    rows = [r for r in rows if "peer_fwd_s" in r]
    if not rows:
        return
    print("\nOurs (window + G globals) vs FlaxBigBird block-sparse, same run:\n", file=out)
    hdr = ("| T | G | ours fwd ms | FlaxBigBird fwd ms | fwd: ours / FlaxBigBird time "
           "| ours fwd+bwd ms | FlaxBigBird fwd+bwd ms | useful GFLOP/s fwd+bwd ours / FlaxBigBird "
           "| ratio | ours / masked-dense (fwd+bwd GFLOP/s) |")
    print(hdr + "\n|" + "---|" * (hdr.count("|") - 1), file=out)
    for r in rows:
        masked = ("masked_fwdbwd_s" in r) and _ratio(r["masked_fwdbwd_s"] / r["sparse_fwdbwd_s"])
        print("| " + " | ".join([
            str(r["T"]), str(r["G"]), f"{r['sparse_fwd_s'] * 1e3:.1f}", f"{r['peer_fwd_s'] * 1e3:.1f}",
            f"{r['sparse_fwd_s'] / r['peer_fwd_s']:.2f}", f"{r['sparse_fwdbwd_s'] * 1e3:.1f}",
            f"{r['peer_fwdbwd_s'] * 1e3:.1f}",
            f"{r['sparse_fwdbwd_gflops']:.1f} / {r['peer_fwdbwd_gflops']:.1f}",
            _ratio(r["sparse_fwdbwd_gflops"] / r["peer_fwdbwd_gflops"]), masked or "—"]) + " |",
            file=out)
    long = [r for r in rows if r["T"] >= 4096]
    worst = max((r["sparse_fwd_s"] / r["peer_fwd_s"] for r in long), default=None)
    fwd = ("not measured (no T >= 4096)" if worst is None else
           f"{'met' if worst <= 1 else 'NOT met'} (slowest: ours {worst:.2f}x its time)")
    at8k = [r for r in rows if r["T"] == 8192]
    both = ", ".join(f"G={r['G']}: {r['sparse_fwdbwd_gflops'] / r['peer_fwdbwd_gflops']:.2f}x / "
                     + (f"{r['masked_fwdbwd_s'] / r['sparse_fwdbwd_s']:.1f}x"
                        if "masked_fwdbwd_s" in r else "masked dense not run") for r in at8k)
    print(f"\nTargets: forward no slower than FlaxBigBird at T >= 4096: {fwd}. Forward+backward "
          "useful GFLOP/s >= 1.5x FlaxBigBird's / >= 25x masked dense's at T = 8192: "
          + (both or "not measured (no T = 8192)"), file=out)


def print_table(rows: List[Dict[str, object]], out=None) -> None:
    out = sys.stdout if out is None else out  # sys.stdout at call time
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
                     G: int = 64, devices=(2, 4, 8), out=None) -> None:
    """Per-device bytes per layer (forward) of sequence-parallel attention vs a ring.

    From the cost model of :func:`globalattn.sharding.comm_bytes_per_layer`
    (which tests/test_seq_parallel.py checks against the compiled HLO).
    """
    out = sys.stdout if out is None else out  # sys.stdout at call time
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
    p.add_argument("--peer", choices=("flax_bigbird",), default=None,
                   help="also measure a peer implementation in the same run "
                        f"(flax_bigbird: needs {BIGBIRD_REQUIREMENT}, requirements-bench.txt)")
    p.add_argument("--bigbird_block", type=int, default=64, help="the peer's block size")
    p.add_argument("--bigbird_random", type=int, default=3,
                   help="the peer's random blocks per query block")
    a = p.parse_args(argv)
    if a.peer:  # fail before the first measurement, naming the requirement
        flax_bigbird(N=a.heads, H=a.head_dim, block=a.bigbird_block,
                     num_random=a.bigbird_random, max_len=1)
    if a.quick:
        a.seq_lens, a.reps, a.memory_len = "1024,2048", 2, 0
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.device_count()}, "
          f"B={a.batch} N={a.heads} H={a.head_dim} float32 local_window_size={a.window}, "
          f"median of {a.reps}")
    rows, peers = [], {}
    for T in [int(t) for t in a.seq_lens.split(",")]:
        for G in [int(g) for g in a.globals.split(",")]:
            rows.append(bench_row(T, G, window=a.window, B=a.batch, N=a.heads, H=a.head_dim,
                                  reps=a.reps, dense=T <= a.dense_max_len))
            if a.peer:  # FlaxBigBird has no G: measured once per T, shown on every G's row
                if T not in peers:
                    peers[T] = peer_row(T, B=a.batch, N=a.heads, H=a.head_dim, reps=a.reps,
                                        block=a.bigbird_block, num_random=a.bigbird_random)
                rows[-1].update(peers[T])
            print(f"  measured T={T} G={G}", file=sys.stderr, flush=True)
    print_table(rows)
    print_peer_table(rows)
    print_comm_table([int(t) for t in a.seq_lens.split(",")] + ([a.memory_len] if a.memory_len else []),
                     window=a.window, N=a.heads, H=a.head_dim, B=a.batch)
    if a.memory_len:
        r = bench_row(a.memory_len, 64, window=a.window, B=a.batch, N=a.heads, H=a.head_dim,
                      reps=1, dense=False)
        print(f"\nT={a.memory_len} G=64 forward+backward: {r['sparse_fwdbwd_s']:.2f} s, "
              f"peak memory {_fmt_mem(r['sparse_fwdbwd_mem'])} (compiled memory analysis)")


if __name__ == "__main__":
    main()
