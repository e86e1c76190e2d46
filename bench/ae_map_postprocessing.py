"""Benchmark: how post-processing of a trained autoencoder's anomaly maps changes its bottle metrics.

For a run folder written by train.py (e.g. one of bench/autoencoders.py's), scores the whole test set
once per residual map and reports pixel AUROC / AUPRO after a Gaussian blur of sigma 0, 2, 4, 8, and
image AUROC with the image score taken as the max or the mean of the (blurred) map. Exploratory: it
reads test labels, so it informs defaults for later work, it does not select them.

    python bench/ae_map_postprocessing.py -p bench/results/autoencoders/mvtecCAE-ssim-grayscale-256-mixed_bfloat16
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mvtec_keras.cli.common import run_main  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-p", "--path", required=True, help="run folder written by train.py")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0, 2, 4, 8])
    args = p.parse_args(argv)
    import numpy as np

    from mvtec_keras import metrics, residuals
    from mvtec_keras.cli.common import category_from_info, model_dir_from_arg, read_info
    from mvtec_keras.data import Preprocessing, make_dataset
    from mvtec_keras.detectors import load_detector

    model_dir = model_dir_from_arg(args.path)
    info = read_info(model_dir)
    det = load_detector(model_dir)
    cat = category_from_info(info)
    prep = Preprocessing.from_dict(info["preprocessing"])
    print(f"{model_dir}: {len(cat.test)} test images of {cat.root}")
    for method in ("ssim", "l2"):
        det.residual = method
        r = det.score(make_dataset(cat.test, prep, 8))
        for sigma in args.sigmas:
            m = r.maps if sigma == 0 else np.asarray(residuals.gaussian_blur(r.maps, sigma))
            flat = m.reshape(len(m), -1)
            print(f"residual {method} blur {sigma:g}: pixel AUROC {metrics.pixel_auroc(r.masks, m):.4f}  "
                  f"AUPRO {metrics.aupro(r.masks, m):.4f}  image AUROC max {metrics.image_auroc(r.labels, flat.max(1)):.4f}"
                  f"  mean {metrics.image_auroc(r.labels, flat.mean(1)):.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # bad input: one line and exit code 2
