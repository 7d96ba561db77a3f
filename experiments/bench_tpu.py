"""TPU mode of the benchmark: compiled TPU programs, measured on this CPU host.

    python -m experiments.bench --tpu                       # the default grid below
    python -m experiments.bench --tpu --seq_lens=32768 --paths=pallas,splash --modes=fwdbwd

Needs libtpu (``pip install -r requirements-tpu.txt``). Every row is one
program compiled ahead of time for one chip of ``--topology`` (batch 1 per
chip, bf16, ``--heads`` heads): global + local attention with the window on
both sides and G globals spread evenly (positions round(k*T/G)), forward or
forward + backward (gradients of q, k, v).

Paths: ``xla`` (implementation='xla'), ``pallas`` (implementation='pallas_tpu'),
``splash`` (JAX's splash attention with a local mask of the same window and no
globals: the lower bound for the window part), ``dense`` (masked
``jax.nn.dot_product_attention``). Columns: HBM temporaries per chip
(``memory_analysis``), whether arguments + outputs + temporaries fit the chip,
the XLA cost model's bytes accessed (for Pallas calls the cost model uses each
kernel's own static-bound estimate), for ``pallas`` the kernel traffic counted
from its block schedule, and a roofline time per chip
``max(flops / peak, bytes / bandwidth)`` from the chip figures in
:data:`experiments.compile.CHIPS`. Nothing here ran on a TPU: times are
roofline bounds, not measurements.

Each row compiles in a subprocess with ``--timeout`` seconds; results append to
``--out`` (JSON lines) and the markdown table is rendered from it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Dict, List

_FIELDS = ("path", "mode", "T", "window", "G", "H", "N")


def _globals(T: int, G: int):
    import numpy as np
    glob = np.zeros((1, T), bool)
    glob[0, np.round(np.arange(G) * T / G).astype(int)] = True
    return glob


def schedule_bytes(T: int, N: int, H: int, G: int, window: int, itemsize: int = 2,
                   block: int = 128) -> Dict[str, float]:
    """HBM bytes the Pallas kernels move, counted from their block schedules (batch 1).

    Every visited key block is one fetch of K and V (bk x H each); per-row
    statistics and codes are counted too. The pipeline skips a fetch when a
    block index repeats, so this is what the schedule makes the kernels read
    and write.
    """
    import numpy as np

    from globalattn.kernels import pallas_tpu_schedule as S

    bq = bk = block
    Tp = S.cdiv(T, block) * block
    nq = nk = Tp // block
    band = np.asarray(S.band_need(nq, bq, nk, bk, window, window, T))
    ng = S.cdiv(G, bk)
    kv = 2 * bk * H * itemsize  # one K block and one V block
    info = 3 * bk * 4
    rows = dict(fwd=0.0, bwd=0.0)
    visits = band.sum() + nq * ng  # every query block visits every global block
    rows["fwd"] = 2 * Tp * H * itemsize + 4 * Tp + visits * (kv + info)
    # do . out: reads out, do and the row codes, writes one float32 per row; dq reads
    # q, do, lse and do . out and writes dq.
    dots = 2 * Tp * H * itemsize + 8 * Tp
    dq = dots + 3 * Tp * H * itemsize + 8 * Tp + visits * (kv + info)
    t_visits = band.sum() + ng * nq  # transposed: the same pairs
    dkv = 4 * (nk + ng) * bk * H * itemsize + t_visits * (2 * bq * H * itemsize + 8 * bq)
    rows["bwd"] = dq + dkv
    # Global rows: Gq rows against every key block.
    bqg = min(bq, S.cdiv(G, 8) * 8)
    nqg = S.cdiv(G, bqg)
    rows["fwd"] += 2 * nqg * bqg * H * itemsize + nqg * nk * (kv + info)
    rows["bwd"] += (5 * nqg * bqg * H * itemsize + nqg * nk * (kv + info)  # do . out, dq
                    + 4 * nk * bk * H * itemsize + nk * nqg * 2 * bqg * H * itemsize)
    if G:  # the sequence dkv kernel adds the global rows' dK / dV in place: read once
        rows["bwd"] += 2 * nk * bk * H * itemsize
    # Folds: the rows pass's forward and dq kernels read the global rows' outputs / dq,
    # the sequence dkv kernel the slots' dK and dV, two slot blocks (and their
    # positions) per sequence block, fetched again only when the slot block changes.
    pos = np.flatnonzero(_globals(T, G)[0])  # ascending, as the benchmark places them

    def fetches(seq_block: int, slot_block: int) -> int:
        first = np.searchsorted(pos, np.arange(0, Tp, seq_block)) // slot_block
        n_slot = max(1, S.cdiv(len(pos), slot_block))
        return sum(1 + int(np.count_nonzero(np.diff(np.minimum(first + t, n_slot - 1))))
                   for t in range(2))

    if G:
        out_rows = fetches(bq, bqg) * bqg * (H * itemsize + 4)  # out_g (fwd), dq_g (bwd)
        rows["fwd"] += out_rows
        rows["bwd"] += out_rows + fetches(bk, bk) * bk * (2 * H * itemsize + 4)
    if G and H % block == 0:
        # Heads-first: the row-gather kernel reads a chunk of 16 rows per gathered row
        # and writes the row (the q rows and K / V slots forward, the do rows backward).
        def gather(n_rows: int) -> int:
            return S.cdiv(n_rows, 16) * 16 * 17 * H * itemsize
        rows["fwd"] += gather(nqg * bqg) + 2 * gather(ng * bk)
        rows["bwd"] += gather(nqg * bqg)
    return {k: float(v) * N for k, v in rows.items()}


def measure(path: str, mode: str, T: int, window: int, G: int, H: int, N: int,
            topology: str) -> Dict[str, Any]:
    """Compiles one program; returns its row (run in a subprocess by :func:`main`)."""
    import time

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    import globalattn as ga
    from experiments import compile as aot
    from globalattn.kernels import pallas_tpu as pt

    topo = aot.tpu_topology(topology)
    chip = aot.chip_of(topo)
    mesh = aot.topology_mesh(topo, {"data": len(topo.devices)})
    B = len(topo.devices)
    glob = jnp.asarray(_globals(T, G).repeat(B, 0))

    if path in ("xla", "pallas"):
        impl = "pallas_tpu" if path == "pallas" else "xla"

        def attn(q, k, v):
            return ga.global_local_attention(q, k, v, local_window_size=window, global_mask=glob,
                                             max_globals=G, implementation=impl)
    elif path == "splash":
        from jax.experimental.pallas.ops.tpu.splash_attention import (
            splash_attention_kernel as sk, splash_attention_mask as sm)
        mask = sm.MultiHeadMask([sm.LocalMask((T, T), (window, window), 0) for _ in range(N)])
        kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1)

        def one(q, k, v):  # [T, N, H] -> splash's [N, T, H]
            q = q / jnp.sqrt(jnp.asarray(H, q.dtype))
            out = kernel(*(jnp.transpose(x, (1, 0, 2)) for x in (q, k, v)))
            return jnp.transpose(out, (1, 0, 2))

        def local(q, k, v):
            return jax.vmap(one)(q, k, v)

        def attn(q, k, v):
            return jax.shard_map(local, mesh=mesh, in_specs=(P("data"),) * 3,
                                 out_specs=P("data"), check_vma=False)(q, k, v)
    elif path == "dense":
        def attn(q, k, v):
            m = ga.global_local_mask(T, local_window_size=window, global_mask=glob)
            return jax.nn.dot_product_attention(q, k, v, mask=m[:, None], implementation="xla")
    else:
        raise ValueError(f"unknown path {path!r}")

    if mode == "fwd":
        fn = attn
    else:
        def fn(q, k, v):
            return jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32) ** 2),
                            argnums=(0, 1, 2))(q, k, v)
    x = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
    t0 = time.perf_counter()
    with pt.compile_for_tpu(), jax.set_mesh(mesh):
        lowered = jax.jit(fn).lower(x, x, x)
    compiled = lowered.compile()
    row = dict(path=path, mode=mode, T=T, window=window, G=G, H=H, N=N, topology=topology,
               compile_seconds=time.perf_counter() - t0,
               mosaic_calls=lowered.as_text().count("tpu_custom_call"),
               **aot.memory_report(compiled, chip), **aot.cost_report(compiled))
    if path == "pallas":
        sb = schedule_bytes(T, N, H, G, window)
        row["schedule_bytes"] = sb["fwd"] + (sb["bwd"] if mode == "fwdbwd" else 0.0)
    row["roofline_ms"] = 1e3 * max(row["flops"] / (chip.bf16_tflops * 1e12),
                                   row["bytes_accessed"] / (chip.hbm_gbps * 1e9))
    row["hbm_gbps"], row["bf16_tflops"] = chip.hbm_gbps, chip.bf16_tflops
    return row


def render(rows: List[Dict[str, Any]]) -> str:
    """Markdown table of the measured rows (one per compiled program)."""
    head = ("| path | mode | T | window | G | H | temporaries (GB) | fits | cost-model bytes (GiB) "
            "| schedule bytes (GiB) | roofline (ms) | compile (s) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["mode"], r["H"], r["window"], r["G"], r["T"],
                                         r["path"])):
        if "error" in r:
            lines.append(f"| {r['path']} | {r['mode']} | {r['T']} | {r['window']} | {r['G']} | "
                         f"{r['H']} | {r['error']} | | | | | |")
            continue
        sched = f"{r['schedule_bytes'] / 2**30:.2f}" if "schedule_bytes" in r else ""
        lines.append(
            f"| {r['path']} | {r['mode']} | {r['T']} | {r['window']} | {r['G']} | {r['H']} | "
            f"{r['temp_bytes'] / 1e9:.3f} | {'yes' if r['fits'] else 'NO'} | "
            f"{r['bytes_accessed'] / 2**30:.2f} | {sched} | {r['roofline_ms']:.2f} | "
            f"{r['compile_seconds']:.0f} |")
    return "\n".join(lines)


def ratios(rows: List[Dict[str, Any]]) -> str:
    """The issue's comparisons, as measured: Pallas fwd+bwd temporaries vs splash-local and XLA."""
    by = {(r["path"], r["mode"], r["T"], r["window"], r["G"], r["H"]): r
          for r in rows if "error" not in r}
    lines = ["| T | window | G | H | pallas / splash-local temporaries | xla / pallas temporaries "
             "| pallas fits one chip |", "|---|---|---|---|---|---|---|"]
    for key in sorted(k for k in by if k[0] == "pallas" and k[1] == "fwdbwd"):
        _, mode, T, w, G, H = key
        pr = by[key]
        # Splash-local has no globals: its row at any G is the same program.
        sp = next((r for k, r in by.items() if k[0] == "splash" and k[1:4] == (mode, T, w)
                   and k[5] == H), None)
        xl = by.get(("xla", mode, T, w, G, H))
        if sp is None:
            a = "n/a"
        elif sp["temp_bytes"]:
            a = f"{pr['temp_bytes'] / sp['temp_bytes']:.3f}x"
        else:  # splash-local needs no HBM temporaries: only 0 matches it
            a = "both 0" if pr["temp_bytes"] == 0 else "inf (splash 0)"
        b = f"{xl['temp_bytes'] / pr['temp_bytes']:.2f}x" if xl and pr["temp_bytes"] else "n/a"
        lines.append(f"| {T} | {w} | {G} | {H} | {a} | {b} | {'yes' if pr['fits'] else 'NO'} |")
    return "\n".join(lines)


def _grid(a) -> List[Dict[str, Any]]:
    out = []
    for mode in a.modes.split(","):
        for H in map(int, a.head_dims.split(",")):
            for window in map(int, a.windows.split(",")):
                for G in map(int, a.globals.split(",")):
                    for T in map(int, a.seq_lens.split(",")):
                        for path in a.paths.split(","):
                            if path == "dense" and T > a.dense_max:
                                continue
                            if path == "xla" and T > a.xla_max:
                                continue
                            out.append(dict(path=path, mode=mode, T=T, window=window, G=G, H=H,
                                            N=a.heads))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="v5e:1x1", help="one chip: batch 1")
    p.add_argument("--seq_lens", default="4096,8192,16384,32768,65536,131072")
    p.add_argument("--windows", default="256")
    p.add_argument("--globals", default="64")
    p.add_argument("--head_dims", default="64")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--modes", default="fwdbwd")
    p.add_argument("--paths", default="pallas,splash,xla,dense")
    p.add_argument("--dense_max", type=int, default=16384)
    p.add_argument("--xla_max", type=int, default=65536)
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--out", default="results/bench_tpu.jsonl")
    p.add_argument("--render", default=None,
                   help="comma-separated JSON-lines files: print their tables, compile nothing")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one row as JSON
    a = p.parse_args(argv)
    if a.one is not None:
        print("ROW " + json.dumps(measure(**json.loads(a.one), topology=a.topology)))
        return
    if a.render is not None:
        rows = []
        for path in a.render.split(","):
            with open(path) as f:
                rows += [json.loads(x) for x in f if x.strip()]
        print(render(rows) + "\n\n" + ratios(rows))
        return
    from experiments import compile as aot
    if not aot.libtpu_available():
        sys.exit(f"error: {aot.LIBTPU_MISSING}")
    done = set()
    if os.path.exists(a.out):
        with open(a.out) as f:
            for line in f:
                r = json.loads(line)
                done.add(tuple(r[k] for k in _FIELDS))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for spec in _grid(a):
        if tuple(spec[k] for k in _FIELDS) in done:
            continue
        cmd = [sys.executable, "-m", "experiments.bench_tpu", f"--topology={a.topology}",
               f"--one={json.dumps(spec)}"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
            rows = [json.loads(x[4:]) for x in res.stdout.splitlines() if x.startswith("ROW ")]
            row = rows[0] if rows else dict(spec, error="compile failed: " + (
                res.stderr.strip().splitlines() or ["?"])[-1][:120].replace("|", "/"))
        except subprocess.TimeoutExpired:
            row = dict(spec, error=f"compile > {a.timeout} s")
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    with open(a.out) as f:
        rows = [json.loads(x) for x in f]
    print(render(rows) + "\n\n" + ratios(rows))


if __name__ == "__main__":
    main()
