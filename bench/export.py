#!/usr/bin/env python3
"""Export benchmark on MVTec AD bottle: parity, int8 accuracy, latency (batch 1, 2 threads), file sizes.

For each method it builds a run (extract.py for the feature methods on
EfficientNet-Lite0 with its real ImageNet weights at 224; train.py for
mvtecCAE at 256 grayscale, ``--cae-epochs`` epochs), exports it to LiteRT
float32 and int8 and to ONNX (export.py), then scores the test split with
every artefact on the *same* uint8 images at input size (resized by the
runtime as training does): image AUROC, pixel AUROC and AUPRO per artefact,
score / map differences against Keras, median latency of one image end to
end from the decoded image at input size, and file sizes.

    python bench/export.py --methods padim,mahalanobis,patchcore,mvteccae --out runs/bench_export

Run it with ``nice`` on a shared machine; the latency figures then carry the load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mvtec_keras.cli.common import run_main  # noqa: E402
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

TARGET_MS = {"padim": 15.0, "mahalanobis": 15.0, "mvteccae": 15.0, "patchcore": 40.0}


def build_run(method, data, out, cae_epochs, cae_size=256, cae_lr=None, cae_rotation=5.0, cae_precision="auto"):
    if os.path.isfile(os.path.join(out, "info.json")):
        return out
    if method == "mvteccae":
        from mvtec_keras.cli.train import cli

        lr = [] if cae_lr is None else ["--lr", str(cae_lr)]
        rc = cli(["-d", data, "-a", "mvtecCAE", "-c", "grayscale", "--size", str(cae_size), "--epochs", str(cae_epochs),
                  "--rotation", str(cae_rotation), "--precision", cae_precision, *lr, "--out", out, "-q"])
    else:
        from mvtec_keras.cli.extract import cli

        rc = cli(["-d", data, "-m", method, "-b", "efficientnet-lite0", "--out", out, "-q"])
    if rc:
        raise SystemExit(f"building the {method} run failed (exit {rc})")
    return out


def export(run, fmt, precision):
    from mvtec_keras.export.exporter import default_out, export_run
    from mvtec_keras.detectors import load_detector

    det = load_detector(run)
    path = default_out(run, det, fmt, precision)
    if not os.path.exists(path):
        t0 = time.time()
        export_run(run, fmt, precision, 100, verbose=False)
        print(f"  exported {os.path.basename(path)} in {time.time() - t0:.0f} s", flush=True)
    return path


def latency_ms(fn, x, n):
    fn(x)  # warm-up
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def evaluate(method, run, n_latency):
    from mvtec_keras import metrics
    from mvtec_keras.cli.common import category_from_info, read_info
    from mvtec_keras.detectors import load_detector
    from mvtec_keras.export.graph import float32_networks
    from mvtec_keras.runtime.images import read_image, to_model_input, to_uint8
    from mvtec_keras.runtime.model import ExportedModel

    info = read_info(run)
    prep = info["preprocessing"]
    cat = category_from_info(info)
    test = cat.test
    x = np.stack([to_uint8(to_model_input(read_image(s.path), prep)) for s in test])
    labels = np.array([s.label for s in test])
    from PIL import Image

    size = x.shape[1]
    masks = np.stack([np.zeros((size, size), np.uint8) if s.mask_path is None else
                      (np.asarray(Image.open(s.mask_path).convert("L").resize((size, size), Image.NEAREST)) > 0)
                      .astype(np.uint8) for s in test])
    det = load_detector(run)
    as_trained = None
    if float32_networks(det):  # trained in mixed precision: the exports compute in float32, so does the reference
        as_trained = load_detector(run)
        precision = as_trained.precision
    artefacts = {"keras": None, "litert_float32": export(run, "litert", "float32"),
                 "litert_int8": export(run, "litert", "int8"), "onnx": export(run, "onnx", "float32")}
    rows = {}
    ref = None
    if as_trained is not None:  # test.py's figure: the network in the precision it was trained in
        s = np.concatenate([np.asarray(as_trained.score_batch(x[i : i + 8].astype(np.float32) / 255.0)[0]).reshape(-1)
                            for i in range(0, len(x), 8)])
        rows[f"keras_{precision}"] = {"image_auroc": metrics.image_auroc(labels, s)}
        print(f"  keras_{precision}: image_auroc={rows[f'keras_{precision}']['image_auroc']:.4g}", flush=True)
    for name, path in artefacts.items():
        if path is None:
            def score(b):
                s, m = det.score_batch(b.astype(np.float32) / 255.0)
                return np.asarray(s).reshape(-1), None if m is None else np.asarray(m)
            size_b = None
        else:
            model = ExportedModel(path, num_threads=2)
            score = model.score
            size_b = os.path.getsize(path)
        s_all, m_all = [], []
        for i in range(0, len(x), 8 if path is None else 1):
            s, m = score(x[i : i + (8 if path is None else 1)])
            s_all.append(s)
            if m is not None:
                m_all.append(m)
        s = np.concatenate(s_all)
        m = np.concatenate(m_all) if m_all else None
        row = {"image_auroc": metrics.image_auroc(labels, s), "size_mb": None if size_b is None else size_b / 1e6,
               "latency_ms": latency_ms(score, x[:1], n_latency)}
        if m is not None:
            row["pixel_auroc"] = metrics.pixel_auroc(masks, m)
            row["aupro"] = metrics.aupro(masks, m)
        if ref is None:
            ref = (s, m)
        else:
            row["max_score_rel_diff"] = float(np.max(np.abs(s - ref[0]) / np.maximum(np.abs(ref[0]), 1e-12)))
            if m is not None:
                row["max_map_abs_diff"] = float(np.max(np.abs(m - ref[1])))
        rows[name] = row
        print(f"  {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if v is not None), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.path.join("..", "shared", "data", "mvtec_ad", "bottle"))
    p.add_argument("--methods", default="padim,mahalanobis,patchcore,mvteccae")
    # mvtecCAE as bench/autoencoders.py trains it for docs/bench_autoencoders.md (the README's 256 px row)
    p.add_argument("--cae-epochs", type=int, default=100)
    p.add_argument("--cae-size", type=int, default=256, help="mvtecCAE image size (its run is mvteccae_SIZE if not 256)")
    p.add_argument("--cae-lr", type=float, default=5e-4, help="mvtecCAE learning rate")
    p.add_argument("--cae-rotation", type=float, default=5.0, help="mvtecCAE train.py --rotation (degrees)")
    p.add_argument("--cae-precision", default="auto", help="mvtecCAE train.py --precision (auto: bfloat16 on a CPU "
                   "with AVX512-BF16/AMX); its exports compute in float32 either way")
    p.add_argument("--latency-runs", type=int, default=30)
    p.add_argument("--out", default=os.path.join("runs", "bench_export"))
    args = p.parse_args(argv)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from mvtec_keras.fileio import write_json

    path = os.path.join(args.out, "results.json")
    results = {}
    if os.path.isfile(path):  # methods run earlier into the same --out keep their rows
        import json

        with open(path) as f:
            results = json.load(f)
    for method in args.methods.split(","):
        load = os.getloadavg()[0]
        print(f"{method}: (load average {load:.1f} on {os.cpu_count()} cores)", flush=True)
        key = f"{method}_{args.cae_size}" if method == "mvteccae" and args.cae_size != 256 else method
        run = build_run(method, args.data, os.path.join(args.out, key), args.cae_epochs, args.cae_size, args.cae_lr,
                        args.cae_rotation, args.cae_precision)
        results[key] = evaluate(method, run, args.latency_runs)
        rows = results[key]
        rows["load_average_at_start"] = load
        drop = rows["keras"]["image_auroc"] - rows["litert_int8"]["image_auroc"]
        print(f"  int8 image AUROC drop {drop:+.4f} (target <= 0.01); int8 latency "
              f"{rows['litert_int8']['latency_ms']:.1f} ms (target <= {TARGET_MS[method]:g} ms)", flush=True)
        write_json(path, results)


if __name__ == "__main__":
    sys.exit(run_main(main))  # bad input: one line and exit code 2
