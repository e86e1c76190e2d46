"""SPADE scoring speed on one MVTec AD category, end to end and by stage.

    python bench/spade_speed.py --data ../shared/data/mvtec_ad/bottle

Same setting as ``bench/feature_methods.py`` (EfficientNet-Lite0 ImageNet weights,
256 -> crop 224, k = 50, image level 9, map levels 3/4/6). Fits on train/good, then
times scoring the test set three ways: end to end from the PNG files
(``Detector.score``), the data pipeline alone, and on images already in memory split
into backbone and nearest-neighbour search + maps. Prints wall and process CPU
seconds with the load average before and after each timing: the machine is
shared, so wall figures depend on what else runs. ``--verify N`` checks the maps
of N test images against a float64 numpy brute force (all pairwise distances, then min).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _timed(fn):
    load = os.getloadavg()[0]
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c, (load, os.getloadavg()[0])


def _line(what, n, wall, cpu, load):
    print(f"{what:<34} {n / wall:7.2f} img/s  ({wall:6.1f} s wall, {cpu:6.1f} s CPU for {n} images; "
          f"load {load[0]:.1f} -> {load[1]:.1f})", flush=True)


def brute_force_map(det, image, level_index):
    """Float64 numpy reference: the level map of one image from all pairwise distances."""
    import numpy as np

    lv = int(det.map_levels[level_index])
    feats = det.extractor(image[None])
    g = np.asarray(feats[f"level{int(det.image_level)}"], np.float64).mean(axis=(1, 2))[0]
    d_img = np.linalg.norm(det.image_bank_.astype(np.float64) - g, axis=1)
    nn = np.argsort(d_img, kind="stable")[: min(int(det.k), len(d_img))]
    q = np.asarray(feats[f"level{lv}"], np.float64)[0]
    h, w, c = q.shape
    q = q.reshape(-1, c)
    gal = det.map_banks_[level_index][nn].reshape(-1, c).astype(np.float64)
    best = np.full(len(q), np.inf)
    q_sq = (q * q).sum(1)
    for s in range(0, len(gal), 4096):  # float64: the expansion's rounding is far below float32's
        blk = gal[s : s + 4096]
        d2 = q_sq[:, None] + (blk * blk).sum(1)[None] - 2.0 * (q @ blk.T)
        best = np.minimum(best, np.sqrt(np.maximum(d2, 0.0)).min(1))
    return best.reshape(h, w)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "mvtec_ad", "bottle"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--limit", type=int, help="score only the first N test images (a slow baseline)")
    ap.add_argument("--verify", type=int, default=1, help="test images checked against a brute force (0: none)")
    args = ap.parse_args(argv)

    from mvtec_keras.cli.common import check_range
    from mvtec_keras.errors import EXIT_BAD_INPUT, InputError

    try:
        check_range(args.batch_size, "--batch-size", low=1)
        check_range(args.verify, "--verify", low=0)
        check_range(args.limit, "--limit", low=1)
        if not os.path.isdir(args.data):
            raise InputError(f"--data: {args.data} is not a folder")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    import numpy as np
    from feature_methods import BACKBONE, METHODS

    from mvtec_keras.data import Preprocessing, discover_mvtec, load_arrays, make_dataset
    from mvtec_keras.detectors import detector_class

    cat = discover_mvtec(args.data)
    prep = Preprocessing(size=256, crop=224, color_mode="rgb")
    det = detector_class("spade")(backbone=BACKBONE, weights="imagenet", input_size=224, **METHODS["spade"])
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPU cores, "
          f"SPADE {METHODS['spade']}, {BACKBONE}, batch {args.batch_size}", flush=True)
    _, wall, cpu, load = _timed(lambda: det.fit(make_dataset(cat.train, prep, batch_size=args.batch_size)))
    print(f"fit on {len(cat.train)} images: {wall:.1f} s wall (load {load[0]:.1f} -> {load[1]:.1f})", flush=True)
    test = cat.test[: args.limit] if args.limit else cat.test
    n = len(test)

    # warm: the first batch traces the search graphs (once per level shape)
    x = load_arrays(test, prep)["image"]
    det.score_batch(x[: args.batch_size])

    res, wall, cpu, load = _timed(lambda: det.score(make_dataset(test, prep, batch_size=args.batch_size)))
    _line("end to end (PNG -> scores, maps)", n, wall, cpu, load)
    _, wall, cpu, load = _timed(lambda: sum(len(b["image"]) for b in make_dataset(test, prep, args.batch_size)))
    _line("  data pipeline alone", n, wall, cpu, load)
    batches = [x[i : i + args.batch_size] for i in range(0, n, args.batch_size)]
    _, wall_b, cpu_b, load = _timed(lambda: [det._split(b) for b in batches])
    _line("  backbone alone (in memory)", n, wall_b, cpu_b, load)
    out, wall, cpu, load = _timed(lambda: [det.score_batch(b) for b in batches])
    _line("  score_batch (in memory)", n, wall, cpu, load)
    print(f"  -> search + maps ~ {(wall - wall_b) / n * 1000:.0f} ms wall, {(cpu - cpu_b) / n * 1000:.0f} ms CPU "
          "per image (score_batch minus backbone)", flush=True)
    same = np.allclose(np.concatenate([np.asarray(s) for s, _ in out]), res.scores, rtol=1e-6)
    print(f"  in-memory scores equal the end-to-end ones: {same}", flush=True)

    if args.verify:
        from mvtec_keras.detectors.components.feature_maps import resize
        from mvtec_keras.residuals import gaussian_blur

        k = min(args.verify, n)
        levels = [[brute_force_map(det, x[i], j) for j in range(len(det.map_levels))] for i in range(k)]
        ups = [np.mean([np.asarray(resize(m[None, ..., None].astype(np.float32), x.shape[1:3]))[0, ..., 0]
                        for m in per], axis=0) for per in levels]
        ref = np.asarray(gaussian_blur(np.stack(ups), det.sigma))
        got = np.asarray(det.score_batch(x[:k])[1])
        rel = np.max(np.abs(got - ref) / np.abs(ref))
        print(f"verify: maps of {k} test image(s) vs float64 brute-force distances (same upsampling and blur): "
              f"max relative difference {rel:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
