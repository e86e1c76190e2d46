"""tf.distribute without a GPU: MirroredStrategy over two logical CPU devices, in a fresh process
(logical devices are fixed at TF start-up), and the choice of strategy.

One training step under the strategy must equal one step on one device with the same global batch;
a feature fit must give the same mean and covariance (tests/distribute_worker.py does the work).
Several worker processes: tests/test_distribute_multiworker.py and tests/test_distribute_cli.py (each
module's subprocesses run on their own pytest-xdist worker).
"""

import json
import math
import subprocess
import sys

import pytest
from distribute_cluster import REPO, TIMEOUT, TRAIN_TOL, WORKER, env

from mvtec_keras import distribute
from mvtec_keras.cli import train
from mvtec_keras.errors import InputError


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    out = tmp_path_factory.mktemp("mirrored") / "result.json"
    r = subprocess.run([sys.executable, WORKER, str(out)], cwd=REPO, env=env(),
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


def test_named_backbone_with_a_weights_file_fits_under_mirrored(mirrored):
    # Regression: the backbone was built lazily inside the replicas' traced function, where loading
    # a weights file (or the imagenet weights) failed ("... defined in FuncGraph ... out of scope").
    assert mirrored["weights_file"]["mean_"] < 1e-6


def test_a_last_batch_smaller_than_the_replicas_trains(mirrored):
    # Regression: a replica with no image failed inside its convolutions; that batch is now dropped.
    for res in (mirrored,):
        losses = res["short_last_batch"]["losses"]
        assert len(losses) == 6 and all(math.isfinite(v) for v in losses), losses  # 2 epochs x 3 losses


def test_the_other_gans_train_under_mirrored(mirrored):
    for res in (mirrored,):
        for name in ("efficientgan", "anogan", "dense_ae"):
            history = res["other_gans"][name]
            assert history and any(k.startswith("val_") for k in history), (name, history)
            assert all(len(v) == 2 and all(math.isfinite(x) for x in v) for v in history.values()), (name, history)


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
