"""Benchmark: autoencoder training and inference throughput on this CPU (no quality figures).

Training: steady-state ``model.fit`` img/s in graph mode at batch 8 on real images, for float32,
mixed_bfloat16 and (optionally) XLA. Inference: reconstruction + residual map + image score per
batch (AutoencoderDetector.score_batch), and end to end from PNG files (decode + resize included).
Weights do not change speed, so fresh models are timed. Run it on a quiet machine:

    python bench/ae_throughput.py                       # mvtecCAE at 256 grayscale, bottle images
    python bench/ae_throughput.py --archs mvtecCAE baselineCAE --xla

Writes docs/bench_ae_throughput.md and bench/results/ae_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from mvtec_keras.cli.common import run_main  # noqa: E402
from mvtec_keras.errors import InputError  # noqa: E402
from mvtec_keras.fileio import atomic_path  # noqa: E402
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "mvtec_ad", "bottle")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--archs", nargs="+", default=["mvtecCAE"])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--color", default="grayscale")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12, help="timed training steps per measurement")
    p.add_argument("--xla", action="store_true")
    p.add_argument("--doc", default=os.path.join(REPO, "docs", "bench_ae_throughput.md"))
    args = p.parse_args(argv)
    if not os.path.isdir(args.data):
        raise InputError(f"--data: folder not found: {args.data}")

    from bench.autoencoders import inference_throughput, train_throughput
    from mvtec_keras.data import Preprocessing, discover_mvtec, load_arrays, make_dataset
    from mvtec_keras.detectors.autoencoder import AutoencoderDetector

    load0 = os.getloadavg()[0]
    cat = discover_mvtec(args.data)
    prep = Preprocessing(size=args.size, color_mode=args.color)
    imgs = load_arrays(cat.train[: args.batch * args.steps], prep)["image"]
    rows = []
    for arch in args.archs:
        for precision in ("float32", "mixed_bfloat16"):
            row = {"architecture": arch, "precision": precision}
            row["train_img_s"] = train_throughput(arch, "ssim", args.color, args.size, args.batch, args.steps, False,
                                                  imgs, precision)
            if args.xla:
                row["train_img_s_xla"] = train_throughput(arch, "ssim", args.color, args.size, args.batch,
                                                          args.steps, True, imgs, precision)
            det = AutoencoderDetector(arch, prep.input_shape, precision=precision)
            det.model_ = det.build_model()
            row["inference_img_s"] = inference_throughput(det, imgs, args.batch)
            # End to end: from the PNG files of the test set (decode, resize) to scores and maps.
            ds = make_dataset(cat.test, prep, args.batch)
            det.score(ds)  # warm the pipeline's file cache and the traced function
            t = time.perf_counter()
            res = det.score(ds)
            row["end_to_end_img_s"] = len(res.scores) / (time.perf_counter() - t)
            rows.append(row)
            print(json.dumps(row), flush=True)
    load1 = os.getloadavg()[0]
    with atomic_path(os.path.join(REPO, "bench", "results", "ae_throughput.json")) as tmp, open(tmp, "w") as f:
        json.dump({"load_before": load0, "load_after": load1, "args": vars(args), "rows": rows}, f, indent=2)
    lines = [
        "# Autoencoder throughput",
        "",
        f"Machine: {os.cpu_count()} CPU cores (the project's 2-core CPU machine), TensorFlow CPU; "
        f"1-minute load average {load0:.1f} before and {load1:.1f} after the run. Date: {time.strftime('%Y-%m-%d')}.",
        f"Images: MVTec AD bottle from `../shared/data` at {args.size}x{args.size} {args.color}, batch {args.batch}.",
        "",
        "```bash",
        "python bench/ae_throughput.py " + " ".join(sys.argv[1:]),
        "```",
        "",
        "| architecture | precision | train img/s | " + ("train img/s XLA | " if args.xla else "")
        + "inference img/s (in memory) | inference img/s (from files) |",
        "|---|---|---|" + ("---|" if args.xla else "") + "---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['architecture']} | {r['precision']} | {r['train_img_s']:.1f} | "
                     + (f"{r['train_img_s_xla']:.1f} | " if args.xla else "")
                     + f"{r['inference_img_s']:.1f} | {r['end_to_end_img_s']:.1f} |")
    with atomic_path(args.doc) as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # bad input: one line and exit code 2
