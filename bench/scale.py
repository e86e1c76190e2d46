"""Fit memory and time of PaDiM, Mahalanobis and PatchCore as the training set grows (issue 12).

    nice -n 10 .venv/bin/python bench/scale.py --sizes 1000 5000 20000 --data ../shared/data/mvtec_ad/bottle

For each size N, N training images are made by augmenting bottle's train/good
(seeded random flips, 90-degree rotations, shifts of up to 8 px and a
brightness change of up to 5 %), resized to 224 px and written to disk as PNG
(``--workdir``, reused across runs), then read back as a user's MVTec-layout
folder is (``discover_mvtec`` + ``make_dataset``). Every (method, size) fit runs
in a fresh subprocess so that its peak RSS (``ru_maxrss``) is its own. Fit time
counts decoding + feature extraction + statistics / coreset; building the
backbone is excluded. EfficientNet-Lite0, ImageNet weights, batch 16; PaDiM
d = 100 (taps 3/4/6), Mahalanobis levels 1-9, PatchCore taps 4/6 with a 10 %
coreset of its ``memory_budget_mb`` sample. Scoring memory is measured on the
same folder as a test set (the first ``--score-n`` images, maps dropped as they
stream). Results append to ``bench/results/scale.jsonl``; ``--doc`` rewrites
``docs/bench_scale.md`` from that file, keeping the page's hand-written *This run* section (``--sizes --doc``:
only that; plain ``--doc`` runs the default sizes first).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from mvtec_keras.cli.common import run_main  # noqa: E402

from feature_methods import BACKBONE, METHODS as FEATURE_METHODS  # noqa: E402  (the quality bench's settings)
from pages import write_page  # noqa: E402

# The quality bench's settings; PatchCore's memory budget (its default) is named because it is under test here.
METHODS = {"padim": FEATURE_METHODS["padim"], "mahalanobis": FEATURE_METHODS["mahalanobis"],
           "patchcore": {**FEATURE_METHODS["patchcore"], "memory_budget_mb": 256}}
TARGET_RSS_MB = 1536  # PaDiM and Mahalanobis, every size
RESULTS = os.path.join(REPO, "bench", "results", "scale.jsonl")
DOC = os.path.join(REPO, "docs", "bench_scale.md")
NOTES = "## This run"  # the page's hand-written section, from this heading to the end; --doc keeps it


def make_images(data: str, n: int, root: str, size: int = 224, seed: int = 0) -> str:
    """``root/n<N>/train/good/*.png``: N augmented copies of ``data``'s train/good (idempotent)."""
    import numpy as np
    from PIL import Image

    from mvtec_keras.data import discover_mvtec

    out = os.path.join(root, f"n{n}", "train", "good")
    done = os.path.join(root, f"n{n}", ".complete")
    if os.path.isfile(done):
        return os.path.dirname(os.path.dirname(out))
    os.makedirs(out, exist_ok=True)
    sources = [s.path for s in discover_mvtec(data).train]
    base = [np.asarray(Image.open(p).convert("RGB").resize((size + 16, size + 16), Image.BILINEAR)) for p in sources]
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = base[i % len(base)]
        dy, dx = rng.integers(0, 17, 2)
        img = img[dy : dy + size, dx : dx + size]
        img = np.rot90(img, int(rng.integers(4)))
        if rng.random() < 0.5:
            img = img[:, ::-1]
        img = np.clip(img * (1.0 + rng.uniform(-0.05, 0.05)), 0, 255).astype(np.uint8)
        Image.fromarray(np.ascontiguousarray(img)).save(os.path.join(out, f"{i:06d}.png"), compress_level=1)
    open(done, "w").close()
    return os.path.dirname(os.path.dirname(out))


def run_one(method: str, folder: str, score_n: int, batch_size: int) -> dict:
    """Fit (and stream-score) one method in this process; returns its measurements."""
    from mvtec_keras.data import Preprocessing, discover_mvtec, make_dataset
    from mvtec_keras.detectors import detector_class

    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    cat = discover_mvtec(folder)
    prep = Preprocessing(size=224, color_mode="rgb")
    det = detector_class(method)(backbone=BACKBONE, weights="imagenet", input_size=224, **METHODS[method])
    det.extractor
    build_rss = rss_mb()
    t = time.perf_counter()
    det.fit(make_dataset(cat.train, prep, batch_size=batch_size, check=False), progress=False)
    fit_s = time.perf_counter() - t
    fit_rss = rss_mb()
    t, n_scored = time.perf_counter(), 0
    for _, s, _ in det.iter_score(make_dataset(cat.train[:score_n], prep, batch_size=batch_size, check=False),
                                  batch_size=batch_size):
        n_scored += len(s)
    score_s = time.perf_counter() - t
    out = {
        "method": method, "n_train": len(cat.train), "fit_s": round(fit_s, 1),
        "rss_after_build_mb": round(build_rss), "peak_rss_fit_mb": round(fit_rss),
        "n_scored": n_scored, "score_img_per_s": round(n_scored / score_s, 1), "peak_rss_total_mb": round(rss_mb()),
        "params": METHODS[method], "load_avg_end": round(os.getloadavg()[0], 1),
        "time_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    if method == "patchcore":
        out.update(bank=int(det.memory_bank_size_), sampled_patches=int(det.n_sampled_patches_),
                   train_patches=int(det.n_train_patches_))
    return out


def write_doc(rows: list) -> None:
    lines = [
        "# Feature detectors at scale: fit time and peak memory against the training-set size",
        "",
        "Generated by `bench/scale.py --doc` from `bench/results/scale.jsonl`; reproduce with",
        "",
        "```",
        "nice -n 10 .venv/bin/python bench/scale.py --sizes 1000 5000 20000 --data ../shared/data/mvtec_ad/bottle --doc",
        "```",
        "",
        "Training images: bottle's train/good, augmented (seeded flips, 90-degree rotations, shifts, brightness),",
        "224 px PNG on disk, read back as an MVTec-layout folder. EfficientNet-Lite0 (ImageNet weights), batch 16.",
        "Each fit runs in a fresh process; peak RSS is its `ru_maxrss` (backbone and TensorFlow included).",
        "Timings were taken with `nice -n 10` on a 2-core machine shared with other jobs: they are pessimistic",
        "and noisy (load average at the end of each run is shown). Scoring streams the first images of the",
        "same folder through `Detector.iter_score` (maps dropped as they come).",
        "",
        "| method | images | fit s | peak RSS fit MB | peak RSS after scoring MB | scored | score img/s | PatchCore bank / sample / patches | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["method"], r["n_train"])):
        pc = f"{r['bank']} / {r['sampled_patches']} / {r['train_patches']}" if "bank" in r else "-"
        lines.append(f"| {r['method']} | {r['n_train']} | {r['fit_s']} | {r['peak_rss_fit_mb']} | "
                     f"{r['peak_rss_total_mb']} | {r['n_scored']} | {r['score_img_per_s']} | {pc} | {r['load_avg_end']} |")
    lines += ["", "## Targets", "", "| method | measure | reached | target | met |", "|---|---|---|---|---|"]
    for m in ("padim", "mahalanobis"):
        sel = [r for r in rows if r["method"] == m]
        if sel:
            worst = max(r["peak_rss_fit_mb"] for r in sel)
            sizes = ", ".join(str(r["n_train"]) for r in sorted(sel, key=lambda r: r["n_train"]))
            ceiling = "yes" if worst <= TARGET_RSS_MB else "no"
            if len(sel) < 2:
                met = f"ceiling {ceiling}; flatness not measured (one size)"
            else:  # flat: the largest size peaks within 10 % of the smallest
                lo, hi = (r["peak_rss_fit_mb"] for r in (min(sel, key=lambda r: r["n_train"]),
                                                        max(sel, key=lambda r: r["n_train"])))
                met = f"ceiling {ceiling}; flat {'yes' if hi <= 1.1 * lo else 'no'}"
            lines.append(f"| {m} | peak RSS over sizes {sizes} | {worst} MB | <= {TARGET_RSS_MB} MB, flat | {met} |")
    pc = sorted((r for r in rows if r["method"] == "patchcore"), key=lambda r: r["n_train"])
    if len(pc) >= 2:
        a, b = pc[0], pc[-1]
        growth = (b["fit_s"] / a["fit_s"]) / (b["n_train"] / a["n_train"])
        lines.append(f"| patchcore | fit time growth {a['n_train']} -> {b['n_train']} relative to linear | "
                     f"{growth:.2f} | <= 1 (at most linear) | {'yes' if growth <= 1.0 else 'no'} |")
    sizes_run = sorted({r["n_train"] for r in rows})
    lines += ["", f"Sizes measured: {', '.join(map(str, sizes_run))}. Sizes from the issue not in the table were not run."]
    # The page's hand-written notes on the runs (load, what ran alongside, earlier rows) are not in the results:
    # write_page keeps them.
    write_page(DOC, "\n".join(lines) + "\n", NOTES)
    print(f"wrote {DOC}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "mvtec_ad", "bottle"))
    p.add_argument("--sizes", type=int, nargs="*", default=[1000, 5000, 20000],
                   help="training-set sizes to run (none: only --doc)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--workdir", default=os.path.join(REPO, "bench", "results", "scale-data"))
    p.add_argument("--score-n", type=int, default=500, help="images scored per run (scoring memory)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--doc", action="store_true", help="rewrite docs/bench_scale.md from the results file")
    p.add_argument("--one", nargs=2, metavar=("METHOD", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.score_n, args.batch_size)))
        return
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    for n in args.sizes:
        t = time.perf_counter()
        folder = make_images(args.data, n, args.workdir)
        print(f"{n} images at {folder} ({time.perf_counter() - t:.0f} s to write or find)", flush=True)
        for m in args.methods:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", m, folder,
                   "--score-n", str(args.score_n), "--batch-size", str(args.batch_size)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{m} n={n} failed:\n{res.stderr[-3000:]}", flush=True)
                continue
            row = json.loads(res.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            with open(RESULTS, "a") as f:
                f.write(json.dumps(row) + "\n")
    if args.doc:
        with open(RESULTS) as f:
            write_doc([json.loads(line) for line in f if line.strip()])


if __name__ == "__main__":
    sys.exit(run_main(main))  # bad input: one line and exit code 2
