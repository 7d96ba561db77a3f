"""Same-process timing of the ``'xla'`` path at an earlier commit against now.

    python -m experiments.bench_revision --rev=e811700        # T = 8192, G = 64, window 256

Loads ``globalattn/ops/core.py`` and ``globalattn/ops/global_local.py`` as they
were at ``--rev`` (``git show``, so run it in a git checkout) beside the current
package, then times both paths' jitted forward, ``jax.grad`` and
``jax.value_and_grad`` of ``<out, cotangent>`` on the same inputs, interleaved,
and prints a markdown table of medians. The machine is shared and its speed
drifts: only ratios within one run mean something.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import globalattn as ga
from experiments import bench


def load_revision(rev: str):
    """``global_local_attention`` of commit ``rev`` (its ops/core.py and ops/global_local.py;
    everything else from the current package)."""
    root = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix=f"globalattn_{rev}_"))
    for name in ("core", "global_local"):
        src = subprocess.run(["git", "show", f"{rev}:globalattn/ops/{name}.py"], cwd=root,
                             check=True, capture_output=True, text=True).stdout
        if name == "global_local":
            src = src.replace("from globalattn.ops import core\n",
                              f"import globalattn_rev_core_{rev} as core\n")
        (tmp / f"globalattn_rev_{name}_{rev}.py").write_text(src)
    sys.path.insert(0, str(tmp))
    modules = {}
    for name in ("core", "global_local"):
        mod_name = f"globalattn_rev_{name}_{rev}"
        spec = importlib.util.spec_from_file_location(mod_name, tmp / f"{mod_name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
        modules[name] = module
    return modules["global_local"].global_local_attention


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rev", required=True, help="the earlier commit")
    p.add_argument("--seq_len", type=int, default=8192)
    p.add_argument("--globals", type=int, default=64)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=15)
    a = p.parse_args(argv)
    T, G, N, H = a.seq_len, a.globals, a.heads, a.head_dim
    rs = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rs.standard_normal((1, T, N, H)), jnp.float32) for _ in range(3))
    glob = np.zeros((1, T), bool)
    glob[:, bench.global_positions(T, G)] = True
    glob = jnp.asarray(glob)
    cot = jnp.ones_like(q)
    progs = []
    for label, fn in ((f"at {a.rev}", load_revision(a.rev)), ("now", ga.global_local_attention)):
        def loss(q, k, v, glob, fn=fn):
            out = fn(q, k, v, local_window_size=a.window, global_mask=glob, max_globals=G)
            return jnp.vdot(out, cot)
        for mode, f in (("forward", loss),
                        ("grad", jax.grad(loss, argnums=(0, 1, 2))),
                        ("value_and_grad", jax.value_and_grad(loss, argnums=(0, 1, 2)))):
            progs.append((f"{label}, {mode}", jax.jit(f).lower(q, k, v, glob).compile()))
    for _, f in progs:
        jax.block_until_ready(f(q, k, v, glob))
    times = [[] for _ in progs]
    for _ in range(a.reps):
        for i, (_, f) in enumerate(progs):
            t0 = time.perf_counter()
            jax.block_until_ready(f(q, k, v, glob))
            times[i].append(time.perf_counter() - t0)
    print(f"T={T} G={G} window {a.window} N={N} H={H} float32, medians of {a.reps} "
          f"interleaved runs\n")
    print("| program | median ms | min ms |\n|---|---|---|")
    for (label, _), t in zip(progs, times):
        print(f"| {label} | {1e3 * statistics.median(t):.1f} | {1e3 * min(t):.1f} |")


if __name__ == "__main__":
    main()
