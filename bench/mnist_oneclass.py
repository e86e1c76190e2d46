"""MNIST one-class benchmarks for GANomaly, EfficientGAN and the dense autoencoder.

Protocols (AUROC on the MNIST test set, 1 = anomaly):
  a  one digit anomalous, the nine others normal (train on their training images),
  b  one digit normal, the nine others anomalous,
  c  digits 7 and 8 normal, digit 2 anomalous (test set restricted to 2, 7, 8).

Every run trains for a fixed number of optimiser steps and keeps the last
weights: no model selection, no score normalisation, no look at test labels.
Runs are ordered seed by seed, and the JSON of raw results is rewritten after
each run, so a partial run is still usable.

    .venv/bin/python bench/mnist_oneclass.py                     # everything
    .venv/bin/python bench/mnist_oneclass.py --protocols a --digits 9 --seeds 0
    .venv/bin/python bench/mnist_oneclass.py --report bench/results/mnist_oneclass.json

Tuning never touches the test set: ``--split holdout`` trains on 50,000 training
images and evaluates on the other 10,000 (a fixed split of the training set), and
``--set model.option=value`` changes a preset for such a study.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from mvtec_keras.cli.common import parse_scoped_options  # noqa: E402
from mvtec_keras.data.mnist import load_mnist, one_class_split  # noqa: E402
from mvtec_keras.errors import EXIT_BAD_INPUT, InputError  # noqa: E402
from mvtec_keras.fileio import atomic_path  # noqa: E402

# Fixed training budgets, sized for a shared 2-core CPU (see docs/bench_mnist.md).
# Input size as in each model's reference MNIST setup: the official GANomaly code feeds 32 x 32
# (here zero-padded, so strokes keep their scale), EfficientGAN and the classic Keras AE use 28 x 28.
PRESETS = {
    "ganomaly": {"steps": 1000, "batch_size": 64, "latent_dim": 16, "filters": 16, "learning_rate": 1e-3,
                 "image_size": 32},
    "efficientgan": {"steps": 400, "batch_size": 64, "latent_dim": 32, "filters": 16, "learning_rate": 1e-3},
    "dense_ae": {"steps": 1000, "batch_size": 256, "latent_dim": 32, "learning_rate": 1e-3},
}
PROTOCOL_MODELS = {"a": ("ganomaly", "efficientgan", "dense_ae"), "b": ("ganomaly", "efficientgan", "dense_ae"),
                   "c": ("efficientgan",)}


def _ints(text, flag):
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{flag}={text!r}: expected comma-separated integers") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/mnist", help="folder with the four MNIST idx .gz files")
    p.add_argument("--protocols", default="a,b,c", help="comma-separated subset of a,b,c")
    p.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9", help="digits for protocols a and b")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--models", default="ganomaly,efficientgan,dense_ae",
                   help="protocol c only ever runs efficientgan")
    p.add_argument("--steps", type=int, default=None, help="override every model's training steps")
    p.add_argument("--members", type=int, default=1,
                   help="K > 1: each run is a seed ensemble of K detectors (mvtec_keras 'ensemble'); run seed s "
                        "trains members with seeds s*K ... s*K+K-1, so different runs share no member")
    p.add_argument("--split", default="test", choices=("test", "holdout"),
                   help="test: evaluate on the MNIST test set; holdout: train on 50,000 training images and "
                        "evaluate on the other 10,000 (for tuning without the test set)")
    p.add_argument("--set", action="append", default=[], metavar="MODEL.OPTION=VALUE",
                   help="override a preset, e.g. --set ganomaly.latent_dim=100 (repeatable)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="minutes: start no new run after this much wall time (results say what ran)")
    p.add_argument("--out", default="bench/results/mnist_oneclass.json")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in --out and skip them (same protocol, case, model, seed)")
    p.add_argument("--report", nargs="+", default=None,
                   help="only print the markdown tables of these results JSONs (their runs pooled)")
    a = p.parse_args(argv)
    a.protocols = [v for v in a.protocols.split(",") if v]
    if not a.protocols or set(a.protocols) - set(PROTOCOL_MODELS):
        raise InputError(f"--protocols={','.join(a.protocols)}: choose from a, b, c")
    a.digits, a.seeds = _ints(a.digits, "--digits"), _ints(a.seeds, "--seeds")
    if not a.digits or not set(a.digits) <= set(range(10)):
        raise InputError("--digits: give digits between 0 and 9")
    a.models = [v for v in a.models.split(",") if v]
    if not a.models or set(a.models) - set(PRESETS):
        raise InputError(f"--models={','.join(a.models)}: choose from {', '.join(PRESETS)}")
    if a.steps is not None and a.steps < 1:
        raise InputError("--steps must be positive")
    if a.members < 1:
        raise InputError("--members must be positive")
    a.overrides = parse_scoped_options(a.set, PRESETS)
    return a


HOLDOUT = 10_000


def holdout_split(x_train, y_train, x_test, y_test):
    """A fixed split of the training set: (50,000 to train on, 10,000 to evaluate on). The test set is unused."""
    order = np.random.default_rng(20261129).permutation(len(x_train))
    keep, held = order[HOLDOUT:], order[:HOLDOUT]
    return x_train[keep], y_train[keep], x_train[held], y_train[held]


def plan(args):
    """The ordered list of runs: seed by seed, so that early seeds complete first."""
    runs = []
    for seed in args.seeds:
        for proto in args.protocols:
            cases = [("7,8 vs 2", [7, 8], [2])] if proto == "c" else [
                (str(d), [v for v in range(10) if v != d], [d]) if proto == "a" else (str(d), [d], None)
                for d in args.digits]
            for case, normal, anomalous in cases:
                for model in args.models:
                    if model in PROTOCOL_MODELS[proto]:
                        runs.append(dict(protocol=proto, case=case, normal=normal, anomalous=anomalous,
                                         model=model, seed=seed))
    return runs


def make_detector(run, steps_override=None, overrides=None, members=1):
    """The untrained detector of one run (its constructor only stores settings)."""
    from mvtec_keras.detectors.base import detector_class

    preset = {"image_size": 28, **PRESETS[run["model"]], **(overrides or {}).get(run["model"], {})}
    steps = steps_override or preset.pop("steps")
    preset.pop("steps", None)
    config = dict(channels=1, epochs=1, steps_per_epoch=steps, seed=run["seed"] * members, **preset)
    if members == 1:
        return detector_class(run["model"])(**config)
    return detector_class("ensemble")(detector=run["model"], config=config, members=members)


def run_one(run, data, steps_override, overrides=None, members=1):
    det = make_detector(run, steps_override, overrides, members)
    member = det.member_configs()[0] if members > 1 else det.get_config()
    steps = member["steps_per_epoch"]
    train, test, labels = one_class_split(*data, normal_digits=run["normal"], anomaly_digits=run["anomalous"],
                                          image_size=member["image_size"])
    import keras

    marks = []  # batch-end times: steady-state speed excludes graph tracing in the first step
    clock = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: marks.append(time.perf_counter()))
    t0 = time.perf_counter()
    det.fit(train, verbose=0, callbacks=[clock])
    train_s = time.perf_counter() - t0
    steady = (len(marks) - 1) / (marks[-1] - marks[0]) if len(marks) > 1 else float("nan")
    t0 = time.perf_counter()
    scores = det.score(test, batch_size=500).scores
    score_s = time.perf_counter() - t0
    histories = [m.history_ for m in det.members_] if members > 1 else [det.history_]
    final_losses = [{k: v[-1] for k, v in h.items()} for h in histories]
    extra = {}
    if members > 1:  # each member on its own, to compare with single runs of the same seed
        extra["member_aurocs"] = [float(roc_auc_score(labels, m.score(test, batch_size=500).scores))
                                  for m in det.members_]
    return {**{k: v for k, v in run.items() if k not in ("normal", "anomalous")},
            "auroc": float(roc_auc_score(labels, scores)), "steps": steps * members, "train_s": train_s,
            "steps_per_s": steps * members / train_s, "steady_steps_per_s": steady, "score_s": score_s,
            "n_train": len(train), "n_test": len(test),
            "final_losses": final_losses[0] if members == 1 else final_losses,
            "config": det.get_config(),
            "members": members, **extra}


def _key(run, config) -> tuple:
    return run["protocol"], run["case"], run["model"], run["seed"], json.dumps(_full(run, config), sort_keys=True)


def _full(run, config) -> dict:
    """``config`` plus the constructor defaults of options it predates, so that adding a
    detector option (with a default) does not orphan the runs recorded before it existed."""
    import inspect

    from mvtec_keras.detectors.base import detector_class

    def filled(name, cfg):
        params = inspect.signature(detector_class(name).__init__).parameters
        defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
        return {**{k: v for k, v in defaults.items() if k not in cfg}, **cfg}

    if run.get("members", 1) > 1:
        config = {**config, "config": filled(run["model"], config["config"])}
    else:
        config = filled(run["model"], config)
    return json.loads(json.dumps(config))


def current_runs(results: dict) -> list:
    """The runs made with the file's current presets (older settings are kept but not tabulated)."""
    keep = []
    for r in results["runs"]:
        run = {**r, "normal": None, "anomalous": None}
        expected = make_detector(run, results.get("steps_override"), results.get("overrides"),
                                 r.get("members", 1)).get_config()
        if _key(run, r["config"]) == _key(run, expected):
            keep.append(r)
    return keep


def markdown(results: dict) -> str:
    """Per-protocol tables: AUROC mean ± std over seeds per digit, plus timing."""
    rows = current_runs(results)
    out = []
    if len(rows) < len(results["runs"]):
        out += [f"({len(results['runs']) - len(rows)} older runs in the file used other settings and are "
                "left out.)", ""]
    for proto in ("a", "b", "c"):
        sub = [r for r in rows if r["protocol"] == proto]
        if not sub:
            continue
        models = _labels(sub)
        cases = sorted({r["case"] for r in sub})
        title = {"a": "(a) one digit anomalous, nine normal", "b": "(b) one digit normal, nine anomalous",
                 "c": "(c) digits 7, 8 normal, digit 2 anomalous"}[proto]
        out += [f"### Protocol {title}", "", "| case | " + " | ".join(models) + " |",
                "|---|" + "---|" * len(models)]
        means = {m: [] for m in models}
        for case in cases:
            cells = []
            for m in models:
                v = [r["auroc"] for r in sub if _label(r) == m and r["case"] == case]
                if v:
                    means[m].append(np.mean(v))
                    cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f} (n={len(v)})")
                else:
                    cells.append("–")
            out.append(f"| {case} | " + " | ".join(cells) + " |")
        if len(cases) > 1:
            out.append("| **mean** | " + " | ".join(
                f"**{np.mean(means[m]):.3f}**" if means[m] else "–" for m in models) + " |")
        out.append("")
    out += _ensemble_table(rows)
    out += ["### Training cost (this CPU, per run)", "", "| model | steps | batch | mean train s | steps/s "
            "(incl. tracing) | steady steps/s | mean scoring s (10k images) | runs |", "|---|---|---|---|---|---|---|---|"]
    for m in _labels(rows):
        sub = [r for r in rows if _label(r) == m]
        if sub:
            batch = sub[0]["config"].get("config", sub[0]["config"])["batch_size"]
            out.append(f"| {m} | {sub[0]['steps']} | {batch} | "
                       f"{np.mean([r['train_s'] for r in sub]):.1f} | "
                       f"{np.mean([r['steps_per_s'] for r in sub]):.1f} | "
                       f"{np.mean([r['steady_steps_per_s'] for r in sub]):.1f} | "
                       f"{_fmt(np.mean([r['score_s'] for r in sub if r['n_test'] == 10000] or [np.nan]))} | "
                       f"{len(sub)} |")
    return "\n".join(out)


def _ensemble_table(rows) -> list:
    """Each seed ensemble against its own members, each member scored alone (same training runs)."""
    ens = [r for r in rows if r.get("members", 1) > 1]
    if not ens:
        return []
    out = ["### Seed ensembles against their own members", "",
           "| protocol | case | model | ensemble AUROC, mean ± std (runs) | members alone, mean ± std (models) | gain |",
           "|---|---|---|---|---|---|"]
    for proto, case, label in sorted({(r["protocol"], r["case"], _label(r)) for r in ens}):
        sub = [r for r in ens if (r["protocol"], r["case"], _label(r)) == (proto, case, label)]
        e = [r["auroc"] for r in sub]
        m = [a for r in sub for a in r["member_aurocs"]]
        out.append(f"| {proto} | {case} | {label} | {np.mean(e):.3f} ± {np.std(e):.3f} ({len(e)}) | "
                   f"{np.mean(m):.3f} ± {np.std(m):.3f} ({len(m)}) | {np.mean(e) - np.mean(m):+.3f} |")
    return out + [""]


def _label(run) -> str:
    """Table column of a run: the model, with "× K" for a seed ensemble of K members."""
    k = run.get("members", 1)
    return run["model"] if k == 1 else f"{run['model']} × {k}"


def _labels(rows) -> list:
    return sorted({_label(r) for r in rows}, key=lambda lab: (list(PRESETS).index(lab.split(" ")[0]), lab))


def _fmt(v):
    return "–" if np.isnan(v) else f"{v:.1f}"


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.report:
            pooled = None
            for path in args.report:
                if not os.path.isfile(path):
                    raise InputError(f"{path}: results file not found")
                res = json.load(open(path))
                pooled = res if pooled is None else {**pooled, "runs": pooled["runs"] + res["runs"]}
            print(markdown(pooled))
            return 0
        data = load_mnist(args.data)
        if args.split == "holdout":
            data = holdout_split(*data)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    import keras
    import tensorflow as tf

    runs = plan(args)
    session = {"command": " ".join(["python", *sys.argv]), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "load_avg_at_start": os.getloadavg()}
    results = {
        "env": {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
                "cpus": os.cpu_count()},
        "presets": PRESETS, "steps_override": args.steps, "split": args.split, "overrides": args.overrides,
        "members": args.members,
        "sessions": [], "runs": [],
    }
    if args.resume and os.path.isfile(args.out):
        previous = json.load(open(args.out))
        if previous.get("split", "test") != args.split:
            print(f"error: {args.out} holds --split {previous.get('split', 'test')} runs; cannot resume",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
        # A run is done when one with the same case, seed and full detector config is in the file;
        # runs made with other settings stay in the file but are left out of the tables.
        done = {_key(r, r["config"]) for r in previous["runs"]}
        runs = [{**r, "members": args.members} for r in runs]
        runs = [r for r in runs
                if _key(r, make_detector(r, args.steps, args.overrides, args.members).get_config()) not in done]
        results = {**previous, "presets": PRESETS, "steps_override": args.steps, "overrides": args.overrides,
                   "members": args.members}
    results["sessions"].append(session)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    t_start = time.perf_counter()
    for i, run in enumerate(runs, 1):
        if args.time_limit is not None and time.perf_counter() - t_start > 60 * args.time_limit:
            session["stopped_early"] = f"time limit reached: {i - 1} of {len(runs)} planned runs done"
            print(session["stopped_early"], flush=True)
            break
        r = run_one(run, data, args.steps, args.overrides, args.members)
        results["runs"].append(r)
        session["wall_s"] = time.perf_counter() - t_start
        with atomic_path(args.out) as tmp, open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        print(f"[{i}/{len(runs)}] protocol {r['protocol']} case {r['case']:>8} {_label(r):<12} seed {r['seed']} "
              f"AUROC {r['auroc']:.3f}  train {r['train_s']:.1f}s ({r['steps_per_s']:.1f} steps/s)  "
              f"score {r['score_s']:.1f}s  total {session['wall_s'] / 60:.1f} min", flush=True)
    with atomic_path(args.out) as tmp, open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {args.out} ({len(results['runs'])} runs in all; this session "
          f"{session.get('wall_s', 0) / 60:.1f} min)\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
