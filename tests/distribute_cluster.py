"""Shared by the tf.distribute tests: the environment of a fresh TensorFlow process without a GPU,
and a TF_CONFIG cluster of worker processes on loopback."""

import csv
import json
import os
import socket
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "distribute_worker.py")
#: seconds: a hung process must fail the test, never hang CI. The multiworker fixture takes about 150 s
#: on a quiet 2-core machine and runs beside the mirrored one; at 420 s it timed out on a machine also
#: running three benchmarks, which is load, not a hang.
TIMEOUT = 900
#: CPU kernels differ with the per-replica batch size; errors are max|a - b| / max|a| per array
TRAIN_TOL = 1e-4


def env(**extra):
    out = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    out.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO, **extra)
    return out


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run_workers(command, n=2, tmpdirs=None):
    """Start ``command(i)`` for every worker of an n-worker TF_CONFIG cluster on loopback; wait for all."""
    workers = [f"127.0.0.1:{p}" for p in free_ports(n)]
    procs = []
    for i in range(n):
        extra = {"TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})}
        if tmpdirs:
            extra["TMPDIR"] = str(tmpdirs[i])
        procs.append(subprocess.Popen(command(i), cwd=REPO, env=env(**extra), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:  # a worker waiting on a dead peer must not outlive the test
            p.kill()
    for i, (rc, _, err) in enumerate(results):
        assert rc == 0, f"worker {i}: {err[-3000:]}"
    return results


def history(run):
    with open(os.path.join(run, "history.csv")) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
