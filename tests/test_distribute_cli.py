"""train.py and extract.py started on two worker processes (TF_CONFIG on loopback) write one run equal to
a one-device run; --strategy multiworker without TF_CONFIG is one line and exit code 2."""

import json
import os
import subprocess
import sys

import pytest
from distribute_cluster import REPO, TIMEOUT, env, history, run_workers
from helpers import make_mvtec

from mvtec_keras.cli import train


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
    (_, out0, _), (_, out1, _) = run_workers(
        lambda i: [sys.executable, *args, "--strategy", "multiworker", "--out", run], tmpdirs=tmps)
    info = json.loads(open(os.path.join(run, "info.json")).read())
    assert info["training"]["strategy"] == "multiworker" and info["training"]["replicas"] == 2
    assert "strategy: multiworker, 2 replicas over 2 workers; this is worker 0" in out0
    assert "epochs as a worker; the chief writes" in out1
    assert not os.listdir(tmps[1])  # the worker's own checkpoint folder is gone
    one = str(tmp_path / "one")
    r = subprocess.run([sys.executable, *args, "--out", one, "-q"], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    h2, h1 = history(run), history(one)
    assert len(h2) == len(h1) == 2
    for a, b in zip(h2, h1):
        for key in ("loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-3), (key, a, b)


def test_extract_cli_on_two_workers_equals_one_device(tmp_path):
    """extract.py started on both workers: the chief writes the fitted PaDiM, the other worker nothing,
    and its statistics are those of a one-device fit with the same backbone weights."""
    from mvtec_keras.detectors import load_detector
    from mvtec_keras.detectors.components.backbone import EXTRACTOR_WEIGHTS

    data = make_mvtec(str(tmp_path / "cat"), n_train=8, n_good=1, n_defect=1)
    args = ["-m", "mvtec_keras.cli.extract", "-d", data, "-m", "padim", "-b", "efficientnet-b0", "--size", "64",
            "--batch-size", "4", "--param", "n_features=20"]
    one = str(tmp_path / "one")
    r = subprocess.run([sys.executable, *args, "-w", "none", "--out", one, "-q"], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    weights = os.path.join(one, EXTRACTOR_WEIGHTS)  # the same (random) backbone for the two-worker fit
    run = str(tmp_path / "run")
    (_, out0, _), (_, out1, _) = run_workers(
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
