"""Prepared GPU device check for ``implementation='pallas_gpu'`` (one command, < 8 minutes).

    python -m experiments.bench_gpu              # on a CUDA GPU: writes results/bench_gpu.{json,md}
    python -m experiments.bench_gpu --dry-run    # anywhere (CPU: interpret mode), tiny sizes,
                                                 # writes /tmp/bench_gpu_dry.{json,md}

1. **Oracle check** at small sizes: the Pallas kernels (compiled for the GPU)
   against :func:`globalattn.global_local_reference` (float32, highest matmul
   precision), forward and gradients w.r.t. q, k, v, global_qkv and sinks,
   with every feature on (window, globals, padding, causal, sinks,
   global_qkv, random blocks). Timing starts only if every case is within
   tolerance; otherwise the errors are written and the run stops.
2. **Timing grid**, bfloat16, ``B*T = 32k`` tokens (B = 32768 // T, at least
   1), ``N*H = 2048``: median wall time of the jitted forward and
   forward+backward (grad w.r.t. q, k, v) of

   * ``pallas``: ``global_local_attention(..., implementation='pallas_gpu')``;
   * ``xla``: the same call with ``implementation='xla'``;
   * ``cudnn_local``: ``jax.nn.dot_product_attention(implementation='cudnn',
     is_causal=True, local_window_size=(w, 0))`` -- the same window with no
     globals, the lower bound for the window part (cuDNN supports only
     causal windows, so the targets are read on the causal rows);
   * ``cudnn_dense``: full attention (causal when the row is), cuDNN.

   Rows are run in priority order and stop when ``--budget`` seconds have
   passed (the rest are marked not run).

Useful TFLOP/s: a forward does ``4 * pairs * H * N * B`` useful flops (QK^T
and PV), forward+backward 3x that (as in experiments/bench.py), where
``pairs`` counts the allowed (query, key) pairs of the pattern exactly
(:func:`globalattn.analytics.allowed_pairs`). Globals are spread evenly.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from typing import Callable, Dict, List

import jax
import jax.numpy as jnp
import numpy as np

import globalattn as ga
from globalattn import analytics
from globalattn.kernels import pallas_gpu as pg

# (T, window each side, G, H, causal) in priority order. Causal rows use the
# window (w, 0) so that cuDNN's sliding window computes the same local part.
GRID = [
    (16384, 512, 64, 128, True),
    (131072, 512, 64, 128, True),
    (65536, 512, 64, 128, True),
    (32768, 512, 64, 128, True),
    (16384, 512, 256, 128, True),
    (16384, 512, 1, 128, True),
    (16384, 256, 64, 128, True),
    (16384, 512, 64, 64, True),
    (4096, 512, 64, 128, True),
    (16384, 512, 64, 128, False),
    (131072, 256, 256, 64, True),
]
DRY_GRID = [(256, 32, 4, 64, True), (192, 16, 1, 32, False)]
# After the grid, while the budget lasts: the first row's Pallas timings with
# other tiles (BlockConfig overrides), for whoever tunes the defaults next.
TILE_SWEEP = [dict(block_q=64), dict(block_k=128), dict(block_q_bwd=32, block_k_bwd=128),
              dict(block_q_bwd=128, block_k_bwd=32), dict(num_stages=2)]
TOKENS, MODEL_DIM = 32768, 2048


# ---------------------------------------------------------------------------
# Oracle check.
# ---------------------------------------------------------------------------
def _case_inputs(rs, B, T, N, H, dtype, G, bs):
    shape = (B, T, N, H)
    mk = lambda: jnp.asarray(rs.standard_normal(shape), dtype)  # noqa: E731
    q, k, v, cot = mk(), mk(), mk(), mk()
    gqkv = (mk(), mk(), mk())
    glob = np.zeros((B, T), bool)
    for b in range(B):
        glob[b, rs.choice(T, G, replace=False)] = True
    pad = np.arange(T)[None] < np.array([T - 7 * b for b in range(B)])[:, None]
    nb = -(-T // bs)
    rb = jnp.asarray(rs.integers(0, nb, (B, N, nb, 2)), jnp.int32)
    sinks = jnp.asarray(rs.standard_normal(N), jnp.float32)
    return q, k, v, gqkv, sinks, jnp.asarray(glob), jnp.asarray(pad), rb, cot


def oracle_check(dry: bool) -> List[Dict[str, object]]:
    """Max abs errors of Pallas vs the oracle, forward and gradients."""
    cases = ([(2, 40, 2, 16, (5, 3), False, "float32", 4, 8),
              (1, 37, 1, 16, (9, 0), True, "bfloat16", 3, 5)] if dry else
             [(2, 300, 2, 64, (40, 30), False, "float32", 8, 32),
              (2, 300, 2, 64, (64, 0), True, "float32", 8, 32),
              (1, 1000, 2, 128, (100, 100), False, "bfloat16", 16, 64),
              (1, 1000, 4, 64, (256, 0), True, "bfloat16", 16, 64)])
    rows = []
    for B, T, N, H, win, causal, dt, G, bs in cases:
        data = _case_inputs(np.random.default_rng(T), B, T, N, H, jnp.dtype(dt), G, bs)

        def make(impl):
            def f(q, k, v, gqkv, sinks, glob, pad, rb):
                kw = dict(local_window_size=win, global_mask=glob, padding_mask=pad,
                          is_causal=causal, random_blocks=rb, block_size=bs, sinks=sinks,
                          global_qkv=gqkv)
                if impl == "oracle":
                    return ga.global_local_reference(q, k, v, **kw)
                return ga.global_local_attention(q, k, v, **kw, max_globals=G,
                                                 implementation="pallas_gpu")

            @jax.jit
            def run(q, k, v, gqkv, sinks, glob, pad, rb, cot):
                if impl == "oracle":  # float32 oracle on the same (rounded) inputs
                    q, k, v, gqkv, cot = jax.tree.map(lambda x: x.astype(jnp.float32),
                                                      (q, k, v, gqkv, cot))
                out, vjp = jax.vjp(lambda *a: f(*a, glob, pad, rb), q, k, v, gqkv, sinks)
                return out, vjp(cot.astype(out.dtype))
            return run

        case = dict(B=B, T=T, N=N, H=H, window=list(win), causal=causal, dtype=dt, G=G,
                    block_size=bs)
        try:
            out_p, g_p = make("pallas")(*data)
            with jax.default_matmul_precision("highest"):
                out_o, g_o = make("oracle")(*data)
        except Exception as e:  # a kernel that fails to compile or run: recorded, run stops
            rows.append(dict(case, ok=False, error=f"{type(e).__name__}: {str(e)[:500]}"))
            print(f"  oracle {rows[-1]}", file=sys.stderr, flush=True)
            continue
        err = lambda a, b: max(float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32))))  # noqa: E731
                               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        finite = all(bool(np.all(np.isfinite(np.asarray(x, np.float32))))
                     for x in jax.tree.leaves((out_p, g_p)))
        tol_f, tol_b = (1e-4, 2e-4) if dt == "float32" else (2e-2, 5e-2)
        e_f, e_b = err(out_p, out_o), err(g_p, g_o)
        rows.append(dict(case, fwd_err=e_f, grad_err=e_b, tol_fwd=tol_f, tol_grad=tol_b,
                         finite=finite, ok=finite and e_f <= tol_f and e_b <= tol_b))
        print(f"  oracle {rows[-1]}", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------
def _time(compiled: Callable, args, min_reps: int, min_s: float) -> float:
    jax.block_until_ready(compiled(*args))  # warm-up
    times: List[float] = []
    while len(times) < min_reps or sum(times) < min_s:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return statistics.median(times)


def _measure(f: Callable, args, *, min_reps: int, min_s: float) -> Dict[str, object]:
    """fwd and fwd+bwd seconds of ``f(q, k, v, *rest)``, or the error that stopped it."""
    cot = jnp.ones(args[0].shape, jnp.float32)

    def loss(q, k, v, *rest):
        return jnp.vdot(f(q, k, v, *rest).astype(jnp.float32), cot)

    r: Dict[str, object] = {}
    for name, fn in (("fwd", f), ("fwdbwd", jax.grad(loss, argnums=(0, 1, 2)))):
        try:
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(*args).compile()
            r[f"{name}_compile_s"] = time.perf_counter() - t0
            r[f"{name}_s"] = _time(compiled, args, min_reps, min_s)
        except Exception as e:  # OOM or a kernel that does not compile: recorded, not hidden
            r[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return r


def _row_inputs(T: int, w: int, G: int, H: int, causal: bool, dry: bool):
    """bf16 q, k, v ``[B, T, N, H]``, evenly spread globals ``[B, T]`` and the row's record."""
    B = 1 if dry else max(1, TOKENS // T)
    N = MODEL_DIM // H if not dry else 2
    win = (w, 0) if causal else (w, w)
    rs = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rs.standard_normal((B, T, N, H)), jnp.bfloat16) for _ in range(3))
    pos = np.unique(np.round(np.arange(G) * T / max(G, 1)).astype(np.int64))[:G]
    glob = np.zeros((B, T), bool)
    glob[:, pos] = True
    pairs = analytics.allowed_pairs(T, local_window_size=win, global_positions=pos.tolist(),
                                    is_causal=causal)
    row: Dict[str, object] = dict(T=T, window=list(win), G=G, H=H, N=N, B=B, causal=causal,
                                  pairs_per_head=pairs)
    return (q, k, v, jnp.asarray(glob)), row


def _pallas_fn(win, G: int, causal: bool, config: pg.BlockConfig):
    def pallas(q, k, v, glob):
        return pg.attention(q, k, v, local_window_size=win, global_mask=glob, max_globals=G,
                            is_causal=causal, config=config)
    return pallas


def _with_tflops(r: Dict, flops: float) -> Dict:
    r = dict(r)
    if "fwd_s" in r:
        r["fwd_tflops"] = flops / r["fwd_s"] / 1e12
    if "fwdbwd_s" in r:
        r["fwdbwd_tflops"] = 3 * flops / r["fwdbwd_s"] / 1e12
    return r


def sweep_row(T: int, w: int, G: int, H: int, causal: bool, *, dry: bool, overrides: Dict,
              min_reps: int, min_s: float) -> Dict[str, object]:
    """Pallas-only timings of one row with BlockConfig ``overrides``."""
    args, row = _row_inputs(T, w, G, H, causal, dry)
    f = _pallas_fn(tuple(row["window"]), G, causal, pg.BlockConfig(**overrides))
    r = _measure(f, args, min_reps=min_reps, min_s=min_s)
    row.update(overrides=overrides, pallas=_with_tflops(
        r, 4.0 * row["pairs_per_head"] * H * row["N"] * row["B"]))
    print(f"    sweep {overrides}: {row['pallas']}", file=sys.stderr, flush=True)
    return row


def bench_row(T: int, w: int, G: int, H: int, causal: bool, *, dry: bool, cache: Dict,
              config: pg.BlockConfig, min_reps: int, min_s: float) -> Dict[str, object]:
    (q, k, v, glob), row = _row_inputs(T, w, G, H, causal, dry)
    B, N, win, pairs = row["B"], row["N"], tuple(row["window"]), row["pairs_per_head"]
    useful = {"pallas": pairs, "xla": pairs,
              "cudnn_local": analytics.allowed_pairs(T, local_window_size=(w, 0), is_causal=True),
              "cudnn_dense": T * (T + 1) // 2 if causal else T * T}
    sdpa_impl = None if dry else "cudnn"  # dry run: XLA's sdpa stands in for cuDNN

    pallas = _pallas_fn(win, G, causal, config)

    def xla(q, k, v, glob):
        return ga.global_local_attention(q, k, v, local_window_size=win, global_mask=glob,
                                         max_globals=G, is_causal=causal, implementation="xla")

    impls = {
        "pallas": (pallas, (q, k, v, glob), None),
        "xla": (xla, (q, k, v, glob), None),
        "cudnn_local": (lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=(w, 0), implementation=sdpa_impl),
            (q, k, v), ("local", T, w, H, B)),
        "cudnn_dense": (lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=sdpa_impl),
            (q, k, v), ("dense", T, causal, H, B)),
    }
    for name, (f, args, key) in impls.items():
        if key is not None and key in cache:  # baselines do not depend on G
            r = cache[key]
        else:
            r = _measure(f, args, min_reps=min_reps, min_s=min_s)
            if key is not None:
                cache[key] = r
        r = _with_tflops(r, 4.0 * useful[name] * H * N * B)
        row[name] = r
        print(f"    {name}: {r}", file=sys.stderr, flush=True)
    return row


# ---------------------------------------------------------------------------
# Rendering (from the JSON record only).
# ---------------------------------------------------------------------------
def _cell(r: Dict, key: str, fmt: str, scale: float = 1.0) -> str:
    if key in r:
        return fmt.format(r[key] * scale)
    err = r.get(key.replace("_s", "_error").replace("_tflops", "_error"))
    return f"error ({err.split(':')[0]})" if err else "n/a"


def render(rec: Dict) -> str:
    lines = [f"# Pallas GPU kernel: device check{' (DRY RUN, not a GPU measurement)' if rec['dry_run'] else ''}",
             "", f"`{rec['command']}` -- {rec['date']}; jax {rec['jax']}, backend "
             f"{rec['backend']}, device {rec['device']}.", "",
             "## Oracle check (max abs error vs global_local_reference, float32 oracle)", "",
             "| B | T | N | H | window | causal | dtype | G | random block | fwd err | grad err | tol fwd / grad | finite | within tol |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for o in rec["oracle"]:
        if "error" in o:
            lines.append(f"| {o['B']} | {o['T']} | {o['N']} | {o['H']} | {tuple(o['window'])} | "
                         f"{o['causal']} | {o['dtype']} | {o['G']} | {o['block_size']} | "
                         f"error: {o['error'][:200]} | | | | False |")
            continue
        lines.append(f"| {o['B']} | {o['T']} | {o['N']} | {o['H']} | {tuple(o['window'])} | "
                     f"{o['causal']} | {o['dtype']} | {o['G']} | {o['block_size']} | "
                     f"{o['fwd_err']:.2e} | {o['grad_err']:.2e} | {o['tol_fwd']:.0e} / "
                     f"{o['tol_grad']:.0e} | {o['finite']} | {o['ok']} |")
    lines += ["", "## Timing (bfloat16; ms = median wall time; TF/s = useful TFLOP/s)", "",
              "pallas % cuDNN-local = pallas fwd+bwd useful TFLOP/s / cuDNN local-window "
              "fwd+bwd useful TFLOP/s (target >= 50% at T >= 16k); pallas vs xla = xla fwd+bwd "
              "time / pallas fwd+bwd time (target >= 5x).", "",
              "| T | B | N | H | window | G | causal | pallas fwd ms (TF/s) | pallas fwd+bwd ms (TF/s) "
              "| xla fwd+bwd ms (TF/s) | cuDNN local fwd+bwd ms (TF/s) | cuDNN dense fwd+bwd ms (TF/s) "
              "| pallas % cuDNN-local | pallas vs xla |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def both(r, m):
        if f"{m}_s" not in r:
            return _cell(r, f"{m}_s", "")
        return f"{r[f'{m}_s'] * 1e3:.3g} ({r[f'{m}_tflops']:.3g})"

    for row in rec["rows"]:
        if "not_run" in row:
            lines.append(f"| {row['T']} | | | {row['H']} | {tuple(row['window'])} | {row['G']} | "
                         f"{row['causal']} | not run: {row['not_run']} | | | | | | |")
            continue
        p, x, cl, cd = row["pallas"], row["xla"], row["cudnn_local"], row["cudnn_dense"]
        pct = (f"{100 * p['fwdbwd_tflops'] / cl['fwdbwd_tflops']:.0f}%"
               if "fwdbwd_tflops" in p and "fwdbwd_tflops" in cl and row["causal"] else "n/a")
        vs = (f"{x['fwdbwd_s'] / p['fwdbwd_s']:.1f}x" if "fwdbwd_s" in p and "fwdbwd_s" in x
              else "n/a")
        lines.append(f"| {row['T']} | {row['B']} | {row['N']} | {row['H']} | {tuple(row['window'])} "
                     f"| {row['G']} | {row['causal']} | {both(p, 'fwd')} | {both(p, 'fwdbwd')} | "
                     f"{both(x, 'fwdbwd')} | {both(cl, 'fwdbwd')} | {both(cd, 'fwdbwd')} | {pct} | {vs} |")
    if rec.get("sweep"):
        first = rec["rows"][0]
        lines += ["", f"## Tile sweep (pallas only; T={first['T']}, window {tuple(first['window'])}, "
                  f"G={first['G']}, H={first['H']}; defaults {rec['block_config']})", "",
                  "| BlockConfig overrides | fwd ms (TF/s) | fwd+bwd ms (TF/s) |", "|---|---|---|"]
        for r in rec["sweep"]:
            lines.append(f"| {r['overrides']} | {both(r['pallas'], 'fwd')} | "
                         f"{both(r['pallas'], 'fwdbwd')} |")
    lines += ["", f"Total wall time {rec['wall_s']:.0f} s (budget {rec['budget_s']:.0f} s)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny sizes, any backend (interpret mode off-GPU), output in /tmp")
    ap.add_argument("--budget", type=float, default=360.0,
                    help="seconds after which no new timing row starts")
    ap.add_argument("--out", default=None, help="output path stem (default results/bench_gpu)")
    ap.add_argument("--config", default="",
                    help="BlockConfig overrides for the pallas rows, e.g. block_q=64,num_warps=4")
    a = ap.parse_args(argv)
    config = pg.BlockConfig(**{k: int(v) for k, v in
                               (kv.split("=") for kv in a.config.split(",") if kv)})
    t_start = time.perf_counter()
    backend = jax.default_backend()
    if not a.dry_run and backend != "gpu":
        print(f"experiments.bench_gpu needs a GPU (backend is {backend!r}); "
              "use --dry-run to exercise it elsewhere", file=sys.stderr)
        return 2
    out = a.out or ("/tmp/bench_gpu_dry" if a.dry_run else "results/bench_gpu")
    rec: Dict[str, object] = dict(
        command="python -m experiments.bench_gpu" + (" --dry-run" if a.dry_run else ""),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        jax=jax.__version__, backend=backend, device=str(jax.devices()[0].device_kind),
        dry_run=a.dry_run, budget_s=a.budget, block_config=str(config),
        oracle=[], rows=[], sweep=[])
    rec["oracle"] = oracle_check(a.dry_run)
    if all(o["ok"] for o in rec["oracle"]):
        cache: Dict = {}
        for T, w, G, H, causal in (DRY_GRID if a.dry_run else GRID):
            elapsed = time.perf_counter() - t_start
            if elapsed > a.budget:
                rec["rows"].append(dict(T=T, window=[w, 0 if causal else w], G=G, H=H,
                                        causal=causal, not_run=f"time budget ({elapsed:.0f} s)"))
                continue
            print(f"  row T={T} w={w} G={G} H={H} causal={causal}", file=sys.stderr, flush=True)
            rec["rows"].append(bench_row(T, w, G, H, causal, dry=a.dry_run, cache=cache,
                                         config=config, min_reps=2 if a.dry_run else 5,
                                         min_s=0.0 if a.dry_run else 0.5))
            jax.clear_caches()
        for overrides in ([dict(block_q=32)] if a.dry_run else TILE_SWEEP):
            if time.perf_counter() - t_start > a.budget:
                break
            rec["sweep"].append(sweep_row(*(DRY_GRID if a.dry_run else GRID)[0], dry=a.dry_run,
                                          overrides=overrides, min_reps=2 if a.dry_run else 5,
                                          min_s=0.0 if a.dry_run else 0.5))
            jax.clear_caches()
    rec["wall_s"] = time.perf_counter() - t_start
    with open(out + ".json", "w") as f:
        json.dump(rec, f, indent=1)
    md = render(rec)
    with open(out + ".md", "w") as f:
        f.write(md)
    print(md)
    return 0 if all(o["ok"] for o in rec["oracle"]) else 1


if __name__ == "__main__":
    sys.exit(main())
