"""The benchmark runner: every chosen method on every category, one cell at a time.

A cell (category x method) fits or trains the method (``extract.py`` /
``train.py``), chooses its operating point (``finetune.py``) and tests it
(``test.py``, which also writes the run's own report), all in this process.
Its row is written to ``cells/<category>/<method>/cell.json`` when it ends, so:

- resumable: a cell whose ``cell.json`` says ``ok`` for the same method spec is
  skipped; an unfinished or failed one is started again from scratch;
- failure isolation: an exception in one cell becomes a ``failed`` row with the
  error, and the other cells go on.

After each cell ``results.csv``, ``summary.md`` (the table and the mean per
method) and ``report.html`` are rewritten from all cell files.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
import traceback

from ..errors import InputError
from ..fileio import atomic_path, write_json

CELL_FILE = "cell.json"
#: test.py's own overlay figures per cell (the report draws its own selection besides)
TEST_OVERLAYS = 6
COLUMNS = ("category", "method", "backbone", "image_auroc", "pixel_auroc", "aupro", "f1_max", "balanced_accuracy",
           "oracle_balanced_accuracy", "oracle_gap", "fit_s", "scoring_img_per_s", "peak_memory_mb", "model_size_mb", "status", "error")
_MEAN_COLUMNS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "balanced_accuracy", "oracle_balanced_accuracy",
                 "oracle_gap", "fit_s", "scoring_img_per_s")


# -- categories ------------------------------------------------------------------
def _is_category(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "train", "good"))


def find_categories(root, categories: str = "all") -> list:
    """``(name, folder)`` of the MVTec-layout categories to run.

    ``root`` None means the embedded demo category; a category folder itself is
    one category; otherwise each sub-folder with ``train/good`` is one.
    """
    if root is None:
        from ..data.demo import build_demo

        found = [("demo", str(build_demo()))]
    elif not os.path.isdir(root):
        raise InputError(f"--root: folder not found: {root}")
    elif _is_category(root):
        found = [(os.path.basename(os.path.normpath(root)), os.path.abspath(root))]
    else:
        found = [(d, os.path.join(os.path.abspath(root), d)) for d in sorted(os.listdir(root))
                 if _is_category(os.path.join(root, d))]
        if not found:
            raise InputError(f"--root: no MVTec-layout category (a folder with train/good) in {root}")
    if categories.strip().lower() == "all":
        return found
    wanted = [c.strip() for c in categories.split(",") if c.strip()]
    names = {n for n, _ in found}
    missing = [c for c in wanted if c not in names]
    if missing or not wanted:
        raise InputError(f"--categories: not found under {root}: {', '.join(missing) or '(none given)'}; "
                         f"available: {', '.join(sorted(names))}")
    return [(n, p) for n, p in found if n in wanted]


# -- measurements ----------------------------------------------------------------
def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs`` 5) so a cell measures its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _model_size_mb(run_dir: str) -> float:
    """Size of what ``load_detector`` needs: the detector saved alone into a scratch folder."""
    import tempfile

    from ..detectors import load_detector

    det = load_detector(run_dir)
    tmp = tempfile.mkdtemp(prefix=".size-", dir=os.path.dirname(run_dir))
    try:
        det.save(os.path.join(tmp, "d"))
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp) for f in fs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return round(size / 2**20, 2)


# -- one cell --------------------------------------------------------------------
def run_cell(spec, category: str, data, cell_dir: str, progress=None) -> dict:
    """Fit, choose the operating point, test; returns the cell's row (raises on failure)."""
    from ..cli import extract, finetune, test, train

    run_dir = os.path.join(cell_dir, "run")

    def step(name):
        if progress is not None:
            progress.set_postfix_str(f"{category}/{spec.name}: {name}")

    row = {"category": category, "method": spec.name, "backbone": spec.backbone_name}
    measured = _reset_peak_rss()
    step("fit" if spec.family == "features" else "train")
    t0 = time.perf_counter()
    (extract if spec.family == "features" else train).main(spec.fit_argv(data, run_dir))
    fit_wall = time.perf_counter() - t0
    step("finetune")
    finetune.main(["-p", run_dir, "-q"])
    step("test")
    test.main(["-p", run_dir, "-q", "--max-overlays", str(TEST_OVERLAYS)])
    with open(os.path.join(run_dir, "test", "test_result.json")) as f:
        res = json.load(f)
    with open(os.path.join(run_dir, "info.json")) as f:
        info = json.load(f)
    fit = info.get("fit") or info.get("training") or {}
    row.update({k: res.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "balanced_accuracy",
                                        "oracle_balanced_accuracy", "oracle_gap", "scoring_img_per_s")})
    row["fit_s"] = round(float(fit.get("wall_seconds", fit_wall)), 2)
    row["peak_memory_mb"] = _peak_rss_mb()
    if not measured:
        row["peak_memory_note"] = "process peak (could not reset per cell)"
    row["model_size_mb"] = _model_size_mb(run_dir)
    return row


# -- the whole table -------------------------------------------------------------
def _read_cell(cell_dir: str):
    p = os.path.join(cell_dir, CELL_FILE)
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def run_benchmark(root, methods: list, out: str, categories: str = "all", progress: bool = True,
                  title: str = "mvtec-keras benchmark") -> list:
    """Run every (category, method) cell not finished yet; returns all rows (finished and failed)."""
    from tqdm.auto import tqdm

    cats = find_categories(root, categories)
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    cells = [(c, d, m) for c, d in cats for m in methods]
    rows = []
    bar = tqdm(cells, desc="benchmark", unit="cell", disable=not progress)
    for cat, data, spec in bar:
        cell_dir = os.path.join(out, "cells", cat, spec.name)
        done = _read_cell(cell_dir)
        if done and done.get("status") == "ok" and done.get("spec") == spec.config():
            rows.append(done["row"])
            bar.write(f"{cat}/{spec.name}: finished earlier, skipped")
            continue
        if os.path.isdir(cell_dir):
            shutil.rmtree(cell_dir)  # unfinished or failed: start the cell again from scratch
        os.makedirs(cell_dir)
        try:
            row = run_cell(spec, cat, None if data is None else data, cell_dir, progress=bar)
            row["status"], row["error"] = "ok", ""
        except (Exception, SystemExit) as e:  # one failing cell is reported; the others go on
            msg = " ".join(str(e).split())[:300] or type(e).__name__
            row = {"category": cat, "method": spec.name, "backbone": spec.backbone_name,
                   "status": "failed", "error": f"{type(e).__name__}: {msg}"}
            with open(os.path.join(cell_dir, "error.txt"), "w") as f:
                f.write(traceback.format_exc())
            bar.write(f"{cat}/{spec.name}: FAILED ({row['error']}); traceback in {cell_dir}/error.txt")
        row["run_dir"] = os.path.join(cell_dir, "run")
        write_json(os.path.join(cell_dir, CELL_FILE), {"status": row["status"], "spec": spec.config(), "row": row})
        rows.append(row)
        write_outputs(out, rows, title)
    write_outputs(out, rows, title)
    return rows


def write_outputs(out: str, rows: list, title: str = "mvtec-keras benchmark") -> None:
    """results.csv, summary.md and report.html from the rows."""
    from ..reports.html import write_comparison_report

    path = os.path.join(out, "results.csv")
    with atomic_path(path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    with atomic_path(os.path.join(out, "summary.md"), suffix=".md") as tmp:
        with open(tmp, "w") as f:
            f.write(summary_markdown(rows))
    write_comparison_report(out, rows, title=title, columns=list(COLUMNS[:-1]))


def _cell(v) -> str:
    if v is None or v == "":
        return "-"
    return f"{v:.3f}" if isinstance(v, float) and abs(v) < 10 else (f"{v:.1f}" if isinstance(v, float) else str(v))


def summary_markdown(rows: list) -> str:
    cols = COLUMNS[:-1]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = [_cell(r.get(c)) if c != "status" else (r.get("status") if r.get("status") == "ok"
                                                       else f"failed: {r.get('error', '')}") for c in cols]
        lines.append("| " + " | ".join(v.replace("|", "/") for v in vals) + " |")
    lines += ["", "Mean per method over the categories where the cell succeeded:", "",
              "| method | cells | " + " | ".join(_MEAN_COLUMNS) + " |", "|" + "---|" * (len(_MEAN_COLUMNS) + 2)]
    for m in dict.fromkeys(r["method"] for r in rows):
        ok = [r for r in rows if r["method"] == m and r.get("status") == "ok"]
        means = []
        for c in _MEAN_COLUMNS:
            v = [float(r[c]) for r in ok if r.get(c) is not None]
            means.append(_cell(sum(v) / len(v)) if v else "-")
        lines.append(f"| {m} | {len(ok)} | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"
