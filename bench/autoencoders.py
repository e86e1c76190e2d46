"""Benchmark: the autoencoder pipeline (train -> finetune -> test) on a real MVTec AD category.

Reads the data from ../shared/data/mvtec_ad/<category> (never copied into the repo), runs the same
package code as train.py / finetune.py / test.py, measures throughput, and writes
docs/bench_autoencoders.md plus raw JSON under bench/results/.

    python bench/autoencoders.py                       # mvtecCAE + baselineCAE on bottle
    python bench/autoencoders.py --configs mvtecCAE:ssim:grayscale:256 --epochs 80
    python bench/autoencoders.py --configs mvtecCAE:ssim:rgb:128:mixed_bfloat16 --evaluate-only  # finetune + test again

A config is ARCH:LOSS:COLOR:SIZE[:PRECISION] (float32 or mixed_bfloat16). Throughput figures are steady-state (after a warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def machine() -> str:
    load = os.getloadavg()[0]
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load:.1f} at start"


def train_throughput(arch, loss, color, size, batch, steps, jit, images, precision="float32"):
    """Steady-state training img/s of model.fit in graph mode on in-memory real images."""
    import keras

    from mvtec_keras import residuals
    from mvtec_keras.models import build_autoencoder

    x = images[: batch * steps]
    while len(x) < batch * steps:
        x = __import__("numpy").concatenate([x, images])[: batch * steps]
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        model = build_autoencoder(arch, (size, size, 1 if color == "grayscale" else 3))
    finally:
        keras.config.set_dtype_policy(previous)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=residuals.get_loss(loss), jit_compile=jit)
    model.fit(x[: batch * 3], x[: batch * 3], batch_size=batch, verbose=0)  # trace + warm up
    t = time.perf_counter()
    model.fit(x, x, batch_size=batch, verbose=0, shuffle=False)
    return len(x) / (time.perf_counter() - t)


def inference_throughput(detector, images, batch, repeats=3):
    """img/s of reconstruction + residual map + image score, on in-memory batches."""
    import numpy as np

    batches = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]
    detector.score_batch(batches[0])  # trace
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for b in batches:
            s, m = detector.score_batch(b)
            np.asarray(m)
        best = max(best, len(batches) * batch / (time.perf_counter() - t))
    return best


def run_config(cfg, args, results_dir):
    from mvtec_keras.cli import train
    from mvtec_keras.data import Preprocessing, discover_mvtec, load_arrays
    from mvtec_keras.detectors import load_detector

    arch, loss, color, size, precision = (cfg.split(":") + ["float32"])[:5]
    size = int(size)
    name = f"{arch}-{loss}-{color}-{size}-{precision}"
    if args.rotation != 5.0 or args.flip:  # non-default augmentation is part of the config's name
        name += f"-rot{args.rotation:g}" + ("-flip" if args.flip else "")
    out = os.path.join(results_dir, name)
    if args.evaluate_only:
        # Finetune + test again on the model an earlier run of this script trained (same config).
        result = os.path.join(results_dir, f"result_{name}.json")
        if not (os.path.isfile(result) and os.path.isdir(out)):
            print(f"error: --evaluate-only: no trained run for {name} in {results_dir}; train it first",
                  file=sys.stderr)
            raise SystemExit(2)
        with open(result) as f:
            row = json.load(f)
        return _evaluate(row, out)
    if os.path.exists(out):
        import shutil

        shutil.rmtree(out)
    cat = discover_mvtec(args.data)
    prep = Preprocessing(size=size, color_mode=color)
    imgs = load_arrays(cat.train[: args.batch * 8], prep)["image"]
    row = {"config": name, "architecture": arch, "loss": loss, "color": color, "size": size, "precision": precision,
           "rotation": args.rotation, "flip": args.flip, "seed": args.seed}

    print(f"== {name}: training throughput (graph mode, batch {args.batch})", flush=True)
    row["train_img_s"] = train_throughput(arch, loss, color, size, args.batch, 8, False, imgs, precision)
    if args.xla:
        row["train_img_s_xla"] = train_throughput(arch, loss, color, size, args.batch, 8, True, imgs, precision)
    print(f"   {row['train_img_s']:.1f} img/s" + (f", XLA {row['train_img_s_xla']:.1f} img/s" if args.xla else ""))

    print(f"== {name}: train.py (up to {args.epochs} epochs, early stopping)", flush=True)
    t0 = time.time()
    train.main(["-d", args.data, "-a", arch, "-l", loss, "-c", color, "--size", str(size), "-b", str(args.batch),
                "--epochs", str(args.epochs), "--lr", args.lr, "--patience", str(args.patience), "--out", out,
                "--precision", precision, "--rotation", str(args.rotation), *(["--flip"] if args.flip else []),
                "--seed", str(args.seed), "-q"])
    row["train_wall_s"] = time.time() - t0
    info = json.load(open(os.path.join(out, "info.json")))
    row["epochs"] = info["training"]["epochs_trained"]
    row["train_img_s_end_to_end"] = info["training"]["images_per_second"]

    det = load_detector(out)
    row["inference_img_s"] = inference_throughput(det, imgs, args.batch)
    print(f"   {row['epochs']} epochs in {row['train_wall_s']:.0f} s; inference {row['inference_img_s']:.1f} img/s")
    return _evaluate(row, out)


def _evaluate(row, out):
    """finetune.py then test.py for each residual map; the metrics go into ``row``."""
    from mvtec_keras.cli import finetune, test

    loss = row["loss"]
    for method in (["ssim", "l2"] if loss != "l2" else ["l2", "ssim"]):
        t0 = time.time()
        finetune.main(["-p", out, "-m", method, "-q"])
        ft_s = time.time() - t0
        t0 = time.time()
        test.main(["-p", out, "-q"])
        test_s = time.time() - t0
        res = json.load(open(os.path.join(out, "test", "test_result.json")))
        ft = json.load(open(os.path.join(out, "finetune.json")))
        row[f"residual_{method}"] = {
            **{k: res.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "tpr", "tnr", "balanced_accuracy",
                                       "min_area", "threshold", "n_images", "map_sigma")},
            "map_sigma_search": ft.get("map_sigma_search"),
            "finetune_balanced_accuracy": ft.get("score"),
            "finetune_s": ft_s,
            "test_s": test_s,
        }
        r = row[f"residual_{method}"]
        print(f"   residual {method}: image AUROC {r['image_auroc']:.3f}, pixel AUROC {r['pixel_auroc']:.3f}, "
              f"AUPRO {r['aupro']:.3f}, balanced acc {r['balanced_accuracy']:.3f} "
              f"(finetune {ft_s:.0f} s, test {test_s:.0f} s)", flush=True)
    return row


def _without_doc(command: str) -> str:
    """The recorded command minus ``--doc PATH`` (where the page went does not change results)."""
    words = command.split()
    out, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w == "--doc":
            skip = True
        else:
            out.append(w)
    return " ".join(out)


def _sigma(m) -> str:
    """The map blur test.py used, and the finetune split's pixel AUROC per candidate."""
    if m.get("map_sigma") is None:
        return "0 (raw map)"
    search = m.get("map_sigma_search") or {}
    return f"{m['map_sigma']:g}" + (" (" + ", ".join(f"{k}: {v:.3f}" for k, v in search.items()) + ")"
                                     if search else "")


def write_markdown(rows, path):
    lines = [
        "# Autoencoder benchmark",
        "",
        "Data: MVTec AD `bottle` read from `../shared/data/mvtec_ad/bottle` (209 train/good, 83 test).",
        f"Date: {time.strftime('%Y-%m-%d')}. Machine: the project's 2-core CPU machine; the load average at the",
        "start of each run is in the last table (other jobs ran beside these, so throughput here is a lower",
        "bound: see docs/bench_ae_throughput.md for quiet-machine throughput).",
        "",
        "Reproduce (one command per config; each run regenerates this page from all results so far):",
        "",
        "```bash",
        *sorted({_without_doc(r.get("command", "python bench/autoencoders.py")) for r in rows}),
        *sorted({_without_doc(r["evaluate_command"]) for r in rows if r.get("evaluate_command")}),
        "```",
        "",
        "Training img/s: steady-state `model.fit` in graph mode on in-memory images at the given batch;",
        "end to end: epochs x train images / wall time of train.py (data pipeline, validation, callbacks).",
        "Inference img/s: reconstruction + residual map + image score per batch of in-memory images.",
        "Metrics come from test.py on the test set minus the finetune split (20 % of each type).",
        "Map blur σ: the Gaussian blur of the anomaly map that finetune.py chose by pixel AUROC on the",
        "finetune split (candidates and their finetune-split AUROC in brackets); rows evaluated before",
        "finetune.py chose a blur used the raw map. `--evaluate-only` re-runs finetune + test on a trained model.",
        "",
        "| config | train img/s | XLA img/s | end-to-end train img/s | epochs | train wall s | inference img/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        xla = f"{r['train_img_s_xla']:.1f}" if "train_img_s_xla" in r else "-"
        lines.append(f"| {r['config']} | {r['train_img_s']:.1f} | {xla} | {r['train_img_s_end_to_end']:.1f} | "
                     f"{r['epochs']} | {r['train_wall_s']:.0f} | {r['inference_img_s']:.1f} |")
    lines += ["", "| config | residual map | map blur σ | image AUROC | pixel AUROC | AUPRO | TPR | TNR | balanced acc |"
              " min_area | test images | finetune s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for method in ("ssim", "l2"):
            m = r.get(f"residual_{method}")
            if not m:
                continue
            lines.append(
                f"| {r['config']} | {method} | {_sigma(m)} | {m['image_auroc']:.3f} | {m['pixel_auroc']:.3f} | {m['aupro']:.3f} | "
                f"{m['tpr']:.3f} | {m['tnr']:.3f} | {m['balanced_accuracy']:.3f} | {m['min_area']} | "
                f"{m['n_images']} | {m['finetune_s']:.1f} |"
            )
    scored = [(m["pixel_auroc"], r["config"], method) for r in rows for method in ("ssim", "l2")
              if (m := r.get(f"residual_{method}")) and m.get("pixel_auroc") is not None]
    if scored:
        best = max(scored)
        lines += ["", f"Best pixel AUROC: **{best[0]:.3f}** ({best[1]}, {best[2]} residual map; target 0.90)."]
    lines += ["", "| config | machine at start |", "|---|---|"]
    lines += [f"| {r['config']} | {r.get('machine', '-')} |" for r in rows]
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--configs", nargs="+", default=["mvtecCAE:ssim:grayscale:256", "baselineCAE:ssim:grayscale:256"])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--patience", type=int, default=12)
    p.add_argument("--lr", default="2e-4")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rotation", type=float, default=5.0, help="train.py --rotation (augmentation, degrees)")
    p.add_argument("--flip", action="store_true", help="train.py --flip")
    p.add_argument("--seed", type=int, default=0, help="train.py --seed")
    p.add_argument("--evaluate-only", action="store_true",
                   help="skip training: finetune + test again the models this script trained before")
    p.add_argument("--xla", action="store_true", help="also measure training throughput with jit_compile=True")
    p.add_argument("--doc", default=os.path.join(REPO, "docs", "bench_autoencoders.md"))
    args = p.parse_args(argv)
    if not os.path.isdir(args.data):
        raise InputError(f"--data: folder not found: {args.data}")
    results_dir = os.path.join(REPO, "bench", "results", "autoencoders")
    os.makedirs(results_dir, exist_ok=True)
    started = machine()
    for c in args.configs:
        row = run_config(c, args, results_dir)
        command = "python bench/autoencoders.py " + " ".join(sys.argv[1:])
        if args.evaluate_only:
            row["evaluate_command"] = command
        else:
            row["machine"] = started
            row["command"] = command
        with atomic_path(os.path.join(results_dir, f"result_{row['config']}.json")) as tmp, open(tmp, "w") as f:
            json.dump(row, f, indent=2)
    # The doc covers every config measured so far (one result file each), so configs can run separately.
    rows = []
    for name in sorted(os.listdir(results_dir)):
        if name.startswith("result_") and name.endswith(".json"):
            with open(os.path.join(results_dir, name)) as f:
                rows.append(json.load(f))
    write_markdown(rows, args.doc)
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # bad input: one line and exit code 2
