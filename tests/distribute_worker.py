"""Run by tests/test_distribute.py and tests/test_distribute_multiworker.py in a fresh process
(TensorFlow's logical devices are fixed at start-up): trains / fits the same tiny models on one
device and under MirroredStrategy over two logical CPU devices, and writes the largest differences as JSON.

    python distribute_worker.py OUT.json
    TF_CONFIG=... python distribute_worker.py OUT.json --multiworker   # one process per worker

With ``--multiworker`` every worker of the ``TF_CONFIG`` cluster trains and fits the same tiny models
under MultiWorkerMirroredStrategy (one replica each) and on one device; the chief writes the JSON, the
other workers ``OUT.json.worker<i>``.
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's package, not an installed one


def rel_err(a, b):
    """Largest max|p - q| / max|p| over pairs of arrays of two lists (shapes must agree): each array's
    error relative to its own scale, so entries near zero (Adam's second moments) do not dominate."""
    worst = 0.0
    assert len(a) == len(b), (len(a), len(b))
    for p, q in zip(a, b):
        assert p.shape == q.shape, (p.shape, q.shape)
        scale = float(np.max(np.abs(p), initial=0.0))
        diff = float(np.max(np.abs(p - q), initial=0.0))
        worst = max(worst, diff / scale if scale else diff)
    return worst


def train_state(detector):
    """Weights, and the Adam moments after the step: their first moments are 0.1 x the gradient,
    so a gradient off by the replica count shows there (Adam's update itself is scale-free)."""
    m = detector.model_
    opts = [m.g_optimizer, m.d_optimizer] if hasattr(m, "g_optimizer") else [m.optimizer]
    return [w.numpy() for w in m.weights], [v.numpy() for o in opts for v in o.variables]


def one_step(make, x, strategy):
    """One optimiser step of ``make()`` on the global batch ``x``: without, then with ``strategy``."""
    ref = make().fit(x, verbose=0)
    with strategy.scope():
        dist = make().fit(x, verbose=0)
    (w1, o1), (w2, o2) = train_state(ref), train_state(dist)
    return {"weights": rel_err(w1, w2), "optimizer": rel_err(o1, o2),
            "n_weights": len(w1), "loss": [next(iter(ref.history_.values()))[0],
                                           next(iter(dist.history_.values()))[0]]}


def training_results(strategy):
    from mvtec_keras.detectors.autoencoder import AutoencoderDetector
    from mvtec_keras.detectors.gan import GANomalyDetector

    rng = np.random.default_rng(0)
    x = rng.uniform(0.2, 0.8, (4, 32, 32, 1)).astype(np.float32)  # one global batch of 4
    return {
        # mvtecCAE: Keras' compiled loss (scaled per replica by Keras)
        "autoencoder": one_step(lambda: AutoencoderDetector("mvtecCAE", (32, 32, 1), epochs=1, batch_size=4,
                                                            learning_rate=1e-3), x, strategy),
        # GANomaly: our own train_step (scaled gradients) and BatchNorm over the global batch
        "ganomaly": one_step(lambda: GANomalyDetector(image_size=32, channels=1, latent_dim=8, filters=4,
                                                      epochs=1, batch_size=4), x, strategy),
    }


def short_last_batch(strategy):
    """5 images in batches of 4 (training and validation): the last batch (1 image) has fewer images than
    the 2 replicas, which made a replica's convolutions fail on an empty batch; it is dropped under
    several replicas."""
    from mvtec_keras.detectors.autoencoder import AutoencoderDetector
    from mvtec_keras.detectors.gan import GANomalyDetector

    x = np.random.default_rng(3).uniform(0.2, 0.8, (5, 32, 32, 1)).astype(np.float32)
    with strategy.scope():
        ae = AutoencoderDetector("mvtecCAE", (32, 32, 1), epochs=2, batch_size=4, learning_rate=1e-3).fit(x, x, verbose=0)
        gan = GANomalyDetector(image_size=32, channels=1, latent_dim=8, filters=4, epochs=2, batch_size=4).fit(
            x, x, verbose=0)  # GANs drop a short training batch anyway; here their validation's is tested
    return {"losses": ae.history_["loss"] + ae.history_["val_loss"] + gan.history_["val_con"]}


def other_gans(strategy):
    """EfficientGAN, AnoGAN and the dense AE train under the strategy (2 epochs, validation): finite losses.
    Their prior samples are drawn per replica, so they are not compared with one device step by step."""
    from mvtec_keras.detectors.gan import AnoGANDetector, DenseAEDetector, EfficientGANDetector

    x = np.random.default_rng(4).uniform(0.2, 0.8, (8, 32, 32, 1)).astype(np.float32)
    out = {}
    for name, cls in (("efficientgan", EfficientGANDetector), ("anogan", AnoGANDetector),
                      ("dense_ae", DenseAEDetector)):
        with strategy.scope():
            det = cls(image_size=32, channels=1, latent_dim=8, epochs=2, batch_size=4).fit(x, x[:4], verbose=0)
        out[name] = {k: v for k, v in det.history_.items() if k != "learning_rate"}
    return out


def feature_results(strategy):
    sys.path.insert(0, HERE)
    from test_feature_detectors import normal_images, toy_backbone

    from mvtec_keras.detectors.mahalanobis import MahalanobisDetector
    from mvtec_keras.detectors.padim import PadimDetector
    from mvtec_keras.detectors.patchcore import PatchcoreDetector

    x = normal_images(7, seed=1)  # batches of 4 and 3: the last one splits 2 + 1
    def replica_of_rows(t):  # each row of the batch: the replica that computed it
        rid = tf.distribute.get_replica_context().replica_id_in_sync_group
        return tf.zeros([tf.shape(t)[0]]) + tf.cast(rid, tf.float32)

    with strategy.scope():
        probe = PadimDetector(toy_backbone())
        out = {"split": [int(p.shape[0]) for p in probe._per_replica(lambda t: t * 1.0, x[:3])],
               "replica_of_rows": [p.numpy().tolist() for p in probe._per_replica(replica_of_rows, x[:3])]}
    for name, make, attrs in [
        ("padim", lambda: PadimDetector(toy_backbone(), levels=(1, 3), n_features=6), ("mean_", "precision_")),
        ("mahalanobis", lambda: MahalanobisDetector(toy_backbone(), levels=(3, 5)), ("means_", "precisions_")),
        # coreset_ratio 1: the bank is every sampled patch in order, so it checks the replicas' join exactly; a
        # greedy coreset on top would turn float32 differences of a few ulps into another pick at a near-tie
        ("patchcore", lambda: PatchcoreDetector(toy_backbone(), levels=(2, 3), coreset_ratio=1.0),
         ("memory_bank_",)),
    ]:
        ref = make().fit(x, batch_size=4)
        with strategy.scope():
            dist = make().fit(x, batch_size=4)
        errs = {}
        for a in attrs:
            ra, da = getattr(ref, a), getattr(dist, a)
            ra, da = (list(ra), list(da)) if isinstance(ra, list) else ([ra], [da])
            errs[a] = rel_err([np.asarray(v, np.float64) for v in ra], [np.asarray(v, np.float64) for v in da])
        if name == "padim":  # the covariance itself, from the precision (eps * I was added before inverting)
            cov = lambda d: np.linalg.inv(d.precision_.astype(np.float64))  # noqa: E731
            errs["covariance"] = rel_err([cov(ref)], [cov(dist)])
        out[name] = errs
    return out


def multiworker_split(strategy):
    """How many images of a global batch of 4 this worker's replica gets (the data sharding)."""
    from mvtec_keras.multiworker import distribute_dataset

    x = tf.data.Dataset.range(4).batch(4)
    return [int(strategy.experimental_local_results(b)[0].shape[0]) for b in distribute_dataset(strategy, x)[1]]


class _Interrupt(Exception):
    pass


def multiworker_resume(strategy, chief_dir):
    """Interrupt an autoencoder's training after its second epoch on every worker, then resume: every
    worker must restore the chief's backup and run epochs 3 and 4 only."""
    import contextlib

    import keras

    from mvtec_keras.detectors.autoencoder import AutoencoderDetector
    from mvtec_keras.multiworker import is_chief, worker_workdir

    class StopAfterTwo(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise _Interrupt()

    rng = np.random.default_rng(1)
    x, v = (rng.uniform(0.2, 0.8, (n, 32, 32, 1)).astype(np.float32) for n in (8, 4))

    def make():
        return AutoencoderDetector("mvtecCAE", (32, 32, 1), epochs=4, batch_size=4, patience=50)

    def workdir(resume):
        return contextlib.nullcontext(chief_dir) if is_chief(strategy) else worker_workdir(chief_dir, resume)

    @tf.function
    def barrier():  # an all-reduce: every worker waits here until the chief has written its backup
        return strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)

    with strategy.scope():
        with workdir(False) as w:
            try:
                make().fit(x, v, workdir=w, verbose=0, callbacks=[StopAfterTwo()])
            except _Interrupt:
                pass
        barrier()
        with workdir(True) as w:
            det = make().fit(x, v, workdir=w, resume=True, verbose=0)
    return {"epochs_trained": det.epochs_trained_, "epochs_run": len(det.history_["loss"])}


def weights_file_results(strategy, tmpdir):
    """A named backbone loading a weights file (what imagenet weights do too) fits under the strategy
    as on one device: the backbone must be built before the replicas' traced function."""
    from mvtec_keras.detectors.padim import PadimDetector
    from mvtec_keras.features.extractor import build_feature_extractor

    path = os.path.join(tmpdir, f"b0-{os.getpid()}.weights.h5")
    build_feature_extractor("efficientnet-b0", weights=None, levels=(3, 4, 6), input_size=32).save_weights(path)
    x = np.random.default_rng(2).uniform(0, 1, (5, 32, 32, 3)).astype(np.float32)

    def make():
        return PadimDetector("efficientnet-b0", weights=path, input_size=32, n_features=6)

    ref = make().fit(x, batch_size=4)
    with strategy.scope():
        dist = make().fit(x, batch_size=4)
    return {"mean_": rel_err([ref.mean_], [dist.mean_])}


def main():
    out_path = sys.argv[1]
    if "--multiworker" in sys.argv[2:]:
        from mvtec_keras import distribute
        from mvtec_keras.multiworker import is_chief

        strategy, name = distribute.make_strategy("multiworker")  # first: it starts the collective runtime
        result = {"strategy": distribute.describe(strategy, name), "replicas": distribute.replicas(strategy),
                  "split": multiworker_split(strategy), "training": training_results(strategy),
                  "features": feature_results(strategy), "short_last_batch": short_last_batch(strategy),
                  "other_gans": other_gans(strategy),
                  "weights_file": weights_file_results(strategy, os.path.dirname(out_path)),
                  "resume": multiworker_resume(strategy, os.path.join(os.path.dirname(out_path), "chief_run"))}
        task = strategy.cluster_resolver.task_id
        with open(out_path if is_chief(strategy) else f"{out_path}.worker{task}", "w") as f:
            json.dump(result, f)
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from mvtec_keras import distribute

    strategy, name = distribute.make_strategy("mirrored")
    result = {"strategy": distribute.describe(strategy, name), "replicas": distribute.replicas(strategy),
              "training": training_results(strategy), "features": feature_results(strategy),
              "short_last_batch": short_last_batch(strategy), "other_gans": other_gans(strategy),
              "weights_file": weights_file_results(strategy, os.path.dirname(out_path))}
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
