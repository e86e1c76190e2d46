#!/usr/bin/env python3
"""Exported file sizes of the families bench/export.py does not time, at their real configurations on bottle.

    python bench/export_sizes.py --data ../shared/data/mvtec_ad/bottle --out runs/bench_export_sizes

Each family is trained for ``--epochs`` epochs (sizes do not depend on training; parity and the int8
check are still real) with train.py / extract.py defaults, then exported with export.py to every format
and precision it supports; a refused request is listed with its one-line reason. Prints one line per
file: size, and the export's own parity figure against Keras on the validation images.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from contextlib import redirect_stderr

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mvtec_keras.cli.common import run_main  # noqa: E402
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

#: name -> (script, arguments); the autoencoders grayscale at 256 (train.py's default size), GANs at theirs
RUNS = {
    "baselineCAE": ("train", ["-a", "baselineCAE"]),
    "inceptionCAE": ("train", ["-a", "inceptionCAE"]),
    "resnetCAE": ("train", ["-a", "resnetCAE"]),
    "skipCAE": ("train", ["-a", "skipCAE"]),
    "ganomaly": ("train", ["-a", "ganomaly", "-c", "rgb"]),
    "efficientgan": ("train", ["-a", "efficientgan", "-c", "rgb"]),
    "dense_ae": ("train", ["-a", "dense_ae", "-c", "rgb"]),
    "ganomaly_x3": ("train", ["-a", "ganomaly", "-c", "rgb", "--members", "3"]),
    "spade": ("extract", ["-m", "spade", "-b", "efficientnet-lite0"]),
}
REQUESTS = [("litert", "float32"), ("litert", "float16"), ("litert", "dynamic"), ("litert", "int8"),
            ("saved_model", "float32"), ("onnx", "float32")]


def build(name, data, out, epochs):
    if os.path.isfile(os.path.join(out, "info.json")):
        return
    script, args = RUNS[name]
    if script == "train":
        from mvtec_keras.cli.train import cli

        rc = cli(["-d", data, *args, "--epochs", str(epochs), "--out", out, "-q"])
    else:
        from mvtec_keras.cli.extract import cli

        rc = cli(["-d", data, *args, "--out", out, "-q"])
    if rc:
        raise SystemExit(f"building {name} failed (exit {rc})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.path.join("..", "shared", "data", "mvtec_ad", "bottle"))
    p.add_argument("--families", default=",".join(RUNS))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--out", default=os.path.join("runs", "bench_export_sizes"))
    args = p.parse_args(argv)
    from mvtec_keras.cli.export import cli as export_cli
    from mvtec_keras.runtime.model import read_metadata

    for name in args.families.split(","):
        run = os.path.join(args.out, name)
        build(name, args.data, run, args.epochs)
        for fmt, precision in REQUESTS:
            ext = {"litert": ".tflite", "onnx": ".onnx"}.get(fmt, "")
            path = os.path.join(run, "export", f"{fmt}_{precision}{ext}")
            err = io.StringIO()
            if not os.path.exists(path):
                with redirect_stderr(err):
                    rc = export_cli(["-p", run, "--format", fmt, "--precision", precision, "--out", path, "-q"])
                if rc:
                    print(f"{name:12s} {fmt:11s} {precision:8s} refused: {err.getvalue().strip()}", flush=True)
                    continue
            meta = read_metadata(path)  # export.py's side .json: size and parity, SavedModel folders included
            par = json.dumps({k: (round(v, 8) if isinstance(v, float) else v)
                              for k, v in meta["parity"].items() if k.startswith("max_")})
            print(f"{name:12s} {fmt:11s} {precision:8s} {meta['size_bytes'] / 1e6:8.2f} MB  parity {par}", flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main))  # bad input: one line and exit code 2
