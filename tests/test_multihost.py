"""Two processes on localhost train like one: jax.distributed + process-local data.

Each process gets 4 simulated CPU devices (8 in all) and builds only its half
of every global batch; ``jax.make_array_from_process_local_data`` assembles the
global batch on a data2 x fsdp4 mesh spanning both processes (CPU collectives:
gloo). The losses must equal a single-process run on the same mesh.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np

import sharded_worker as W

HERE = os.path.dirname(os.path.abspath(__file__))
MESH = {"data": 2, "fsdp": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    out = str(tmp_path / "losses.json")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the worker sets its own
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(HERE, "sharded_worker.py"), "train",
         "--mesh", ",".join(f"{k}={v}" for k, v in MESH.items()), "--steps", "3",
         "--devices", "4", "--out", out, "--coordinator", f"localhost:{port}",
         "--num-processes", "2", "--process-id", str(i)],
        cwd=os.path.dirname(HERE), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:  # never leave a rank waiting on a dead peer
            if p.poll() is None:
                p.kill()
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]
    results = [json.load(open(f"{out}.{i}")) for i in range(2)]
    for i, r in enumerate(results):
        assert (r["process_count"], r["device_count"], r["local_device_count"]) == (2, 8, 4)
        assert r["rows"] == [4 * i, 4 * i + 4]  # each process read only its half
    np.testing.assert_allclose(results[0]["losses"], results[1]["losses"], rtol=0)

    single, _ = W.train(MESH, 3)  # this process: 8 local devices, same global mesh
    np.testing.assert_allclose(results[0]["losses"], single, rtol=1e-5)
