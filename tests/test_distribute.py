"""tf.distribute without a GPU: MirroredStrategy over two logical CPU devices, in a fresh process
(logical devices are fixed at TF start-up), and MultiWorkerMirroredStrategy over two worker processes
on loopback, configured by TF_CONFIG (trained by mvtec_keras.multiworker's loop, as Keras 3's fit cannot
run under it).

One training step under a strategy must equal one step on one device with the same global batch;
a feature fit must give the same mean and covariance (tests/distribute_worker.py does the work).
"""

import csv
import json
import math
import os
import socket
import subprocess
import sys

import pytest
from helpers import make_mvtec

from mvtec_keras import distribute
from mvtec_keras.cli import train
from mvtec_keras.errors import InputError

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "distribute_worker.py")
TIMEOUT = 420  # seconds: a hung process must fail the test, never hang CI
#: CPU kernels differ with the per-replica batch size; errors are max|a - b| / max|a| per array
TRAIN_TOL = 1e-4


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO, **extra)
    return env


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    out = tmp_path_factory.mktemp("mirrored") / "result.json"
    r = subprocess.run([sys.executable, WORKER, str(out)], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def test_mirrored_over_two_cpu_devices(mirrored):
    assert mirrored["replicas"] == 2
    assert mirrored["strategy"] == "strategy: mirrored, 2 replicas on CPU:0, CPU:1"


@pytest.mark.parametrize("model", ["autoencoder", "ganomaly"])
def test_mirrored_step_equals_one_device_step(mirrored, model):
    res = mirrored["training"][model]
    assert res["n_weights"] > 10
    assert res["loss"][1] == pytest.approx(res["loss"][0], rel=TRAIN_TOL)
    assert res["weights"] < TRAIN_TOL
    # Adam's first moments are 0.1 x the summed gradients: a missing 1 / replicas would give 1.0 here
    assert res["optimizer"] < 10 * TRAIN_TOL


def test_feature_fit_under_mirrored_matches_one_device(mirrored):
    feats = mirrored["features"]
    assert feats["split"] == [2, 1]  # batches really are split over the two replicas
    assert feats["padim"]["mean_"] < 1e-6
    assert feats["padim"]["covariance"] < 1e-4  # float32 feature products, float64 sums
    assert feats["mahalanobis"]["means_"] < 1e-6
    assert feats["mahalanobis"]["precisions_"] < 1e-4
    assert feats["patchcore"]["memory_bank_"] < 1e-6  # replicas' patches joined before the coreset


# -- several workers: two processes on loopback --------------------------------------------------
def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _run_workers(command, n=2, tmpdirs=None):
    """Start ``command(i)`` for every worker of an n-worker TF_CONFIG cluster on loopback; wait for all."""
    workers = [f"127.0.0.1:{p}" for p in _free_ports(n)]
    procs = []
    for i in range(n):
        extra = {"TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})}
        if tmpdirs:
            extra["TMPDIR"] = str(tmpdirs[i])
        procs.append(subprocess.Popen(command(i), cwd=REPO, env=_env(**extra), stdout=subprocess.PIPE,
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


@pytest.fixture(scope="module")
def multiworker(tmp_path_factory):
    d = tmp_path_factory.mktemp("multiworker")
    _run_workers(lambda i: [sys.executable, WORKER, str(d / "result.json"), "--multiworker"])
    return [json.loads((d / name).read_text()) for name in ("result.json", "result.json.worker1")]


def test_named_backbone_with_a_weights_file_fits_under_mirrored(mirrored):
    # Regression: the backbone was built lazily inside the replicas' traced function, where loading
    # a weights file (or the imagenet weights) failed ("... defined in FuncGraph ... out of scope").
    assert mirrored["weights_file"]["mean_"] < 1e-6


def test_a_last_batch_smaller_than_the_replicas_trains(mirrored, multiworker):
    # Regression: a replica with no image failed inside its convolutions; that batch is now dropped.
    for res in (mirrored, *multiworker):
        losses = res["short_last_batch"]["losses"]
        assert len(losses) == 6 and all(math.isfinite(v) for v in losses), losses  # 2 epochs x 3 losses


def test_the_other_gans_train_under_both_strategies(mirrored, multiworker):
    for res in (mirrored, *multiworker):
        for name in ("efficientgan", "anogan", "dense_ae"):
            history = res["other_gans"][name]
            assert history and any(k.startswith("val_") for k in history), (name, history)
            assert all(len(v) == 2 and all(math.isfinite(x) for x in v) for v in history.values()), (name, history)


def test_multiworker_over_two_processes(multiworker):
    chief, worker = multiworker
    assert chief["replicas"] == worker["replicas"] == 2
    assert chief["strategy"].endswith("2 workers; this is worker 0 (writes the run)")
    assert "worker 1 (trains; the chief writes the run)" in worker["strategy"]
    assert chief["split"] == worker["split"] == [2]  # each worker gets its half of the global batch of 4


@pytest.mark.parametrize("model", ["autoencoder", "ganomaly"])
def test_multiworker_step_equals_one_device_step(multiworker, model):
    for res in (w["training"][model] for w in multiworker):
        assert res["n_weights"] > 10
        assert res["loss"][1] == pytest.approx(res["loss"][0], rel=TRAIN_TOL)
        assert res["weights"] < TRAIN_TOL
        assert res["optimizer"] < 10 * TRAIN_TOL  # a missing 1 / replicas would give 1.0


def test_feature_fit_under_multiworker_matches_one_device(multiworker):
    for w in multiworker:
        feats = w["features"]
        # a batch of 3: rows 0-1 from worker 0's replica, row 2 from worker 1's, gathered in order on both
        assert feats["split"] == [3] and feats["replica_of_rows"] == [[0.0, 0.0, 1.0]]
        assert feats["padim"]["mean_"] < 1e-6 and feats["padim"]["covariance"] < 1e-4
        assert feats["mahalanobis"]["means_"] < 1e-6 and feats["mahalanobis"]["precisions_"] < 1e-4
        assert feats["patchcore"]["memory_bank_"] < 1e-6
        assert w["weights_file"]["mean_"] < 1e-6


def test_multiworker_resume_restores_the_chiefs_backup_on_every_worker(multiworker):
    # A worker that did not restore would run 4 epochs against the chief's 2 and the cluster would hang.
    for w in multiworker:
        assert w["resume"] == {"epochs_trained": 4, "epochs_run": 2}


def _history(run):
    with open(os.path.join(run, "history.csv")) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_train_cli_on_two_workers_equals_one_device(tmp_path):
    """train.py started on both workers: the chief writes the run, the other worker nothing, and the
    losses per epoch are those of the same training on one device."""
    data = make_mvtec(str(tmp_path / "cat"), n_train=10, n_good=1, n_defect=1, channels=1)
    args = ["-m", "mvtec_keras.cli.train", "-d", data, "-a", "mvtecCAE", "-c", "grayscale", "--size", "32",
            "-b", "4", "--epochs", "2", "--val-fraction", "0.2", "--no-augment", "--lr", "1e-3"]
    tmps = [tmp_path / "tmp0", tmp_path / "tmp1"]
    for t in tmps:
        t.mkdir()
    run = str(tmp_path / "run")
    (_, out0, _), (_, out1, _) = _run_workers(
        lambda i: [sys.executable, *args, "--strategy", "multiworker", "--out", run], tmpdirs=tmps)
    info = json.loads(open(os.path.join(run, "info.json")).read())
    assert info["training"]["strategy"] == "multiworker" and info["training"]["replicas"] == 2
    assert "strategy: multiworker, 2 replicas over 2 workers; this is worker 0" in out0
    assert "epochs as a worker; the chief writes" in out1
    assert not os.listdir(tmps[1])  # the worker's own checkpoint folder is gone
    one = str(tmp_path / "one")
    r = subprocess.run([sys.executable, *args, "--out", one, "-q"], cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    h2, h1 = _history(run), _history(one)
    assert len(h2) == len(h1) == 2
    for a, b in zip(h2, h1):
        for key in ("loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-3), (key, a, b)


def test_extract_cli_on_two_workers_equals_one_device(tmp_path):
    """extract.py started on both workers: the chief writes the fitted PaDiM, the other worker nothing,
    and its statistics are those of a one-device fit with the same backbone weights."""
    from mvtec_keras.detectors import load_detector
    from mvtec_keras.detectors.feature_common import EXTRACTOR_WEIGHTS

    data = make_mvtec(str(tmp_path / "cat"), n_train=8, n_good=1, n_defect=1)
    args = ["-m", "mvtec_keras.cli.extract", "-d", data, "-m", "padim", "-b", "efficientnet-b0", "--size", "64",
            "--batch-size", "4", "--param", "n_features=20"]
    one = str(tmp_path / "one")
    r = subprocess.run([sys.executable, *args, "-w", "none", "--out", one, "-q"], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    weights = os.path.join(one, EXTRACTOR_WEIGHTS)  # the same (random) backbone for the two-worker fit
    run = str(tmp_path / "run")
    (_, out0, _), (_, out1, _) = _run_workers(
        lambda i: [sys.executable, *args, "-w", weights, "--strategy", "multiworker", "--out", run])
    info = json.loads(open(os.path.join(run, "info.json")).read())
    assert info["fit"]["strategy"] == "multiworker" and info["fit"]["replicas"] == 2
    assert "fitted as a worker; the chief writes" in out1
    a, b = load_detector(run), load_detector(one)
    for attr in ("mean_", "precision_"):
        x, y = getattr(a, attr), getattr(b, attr)
        assert abs(x - y).max() <= 1e-4 * abs(y).max(), attr


def test_multiworker_without_tf_config_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    make_mvtec(str(tmp_path / "cat"), n_train=4, n_good=1, n_defect=1)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert train.cli(["-d", str(tmp_path / "cat"), "--strategy", "multiworker", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TF_CONFIG" in err[0], err
    assert not (tmp_path / "run").exists()


# -- strategy choice (no TensorFlow devices needed) ---------------------------------------------
def test_auto_resolves_from_gpus_and_tf_config():
    two = json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}})
    one = json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}})
    assert distribute.resolve("auto", n_gpus=0, tf_config="") == "none"
    assert distribute.resolve("auto", n_gpus=1, tf_config="") == "none"
    assert distribute.resolve("auto", n_gpus=2, tf_config="") == "mirrored"
    assert distribute.resolve("auto", n_gpus=2, tf_config=one) == "mirrored"
    assert distribute.resolve("auto", n_gpus=0, tf_config=two) == "multiworker"
    assert distribute.resolve("Mirrored", n_gpus=0) == "mirrored"
    with pytest.raises(InputError, match="TF_CONFIG"):
        distribute.tf_config_workers("{not json")


def test_bogus_strategy_is_one_line_and_exit_2(capsys):
    assert train.cli(["-d", "/nonexistent", "--strategy", "bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--strategy" in err[0] and "bogus" in err[0], err


def test_global_batch_must_split_over_replicas():
    class Two:
        num_replicas_in_sync = 2

    distribute.check_global_batch(4, Two())
    with pytest.raises(InputError, match="multiple of the 2 replicas"):
        distribute.check_global_batch(5, Two())
