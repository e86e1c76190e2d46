"""MultiWorkerMirroredStrategy without a GPU: two worker processes on loopback configured by TF_CONFIG,
trained by mvtec_keras.multiworker's loop (Keras 3's fit cannot run under it).

One training step must equal one step on one device with the same global batch; a feature fit must
give the same mean and covariance (tests/distribute_worker.py does the work).
"""

import json
import math
import sys

import pytest
from distribute_cluster import TRAIN_TOL, WORKER, run_workers


@pytest.fixture(scope="module")
def multiworker(tmp_path_factory):
    d = tmp_path_factory.mktemp("multiworker")
    run_workers(lambda i: [sys.executable, WORKER, str(d / "result.json"), "--multiworker"])
    return [json.loads((d / name).read_text()) for name in ("result.json", "result.json.worker1")]


def test_a_last_batch_smaller_than_the_replicas_trains(multiworker):
    # Regression: a replica with no image failed inside its convolutions; that batch is now dropped.
    for res in multiworker:
        losses = res["short_last_batch"]["losses"]
        assert len(losses) == 6 and all(math.isfinite(v) for v in losses), losses  # 2 epochs x 3 losses


def test_the_other_gans_train_under_multiworker(multiworker):
    for res in multiworker:
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
