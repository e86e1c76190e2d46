"""tf.distribute without a GPU: MirroredStrategy over two logical CPU devices, in a fresh process
(logical devices are fixed at TF start-up). Multi-worker training is refused (Keras 3's fit does not
run under MultiWorkerMirroredStrategy; see mvtec_keras/distribute.py), which is tested too.

One training step under a strategy must equal one step on one device with the same global batch;
a feature fit must give the same mean and covariance (tests/distribute_worker.py does the work).
"""

import json
import os
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


def test_multiworker_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """auto with a two-worker TF_CONFIG means multiworker, which Keras 3's fit cannot run: exit 2."""
    make_mvtec(str(tmp_path / "cat"), n_train=4, n_good=1, n_defect=1)
    workers = ["127.0.0.1:1", "127.0.0.1:2"]
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": workers},
                                                "task": {"type": "worker", "index": 0}}))
    assert train.cli(["-d", str(tmp_path / "cat"), "--strategy", "auto", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "multiworker" in err[0], err
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
