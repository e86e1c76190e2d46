"""Self-contained HTML reports: one folder (``report.html`` + ``report_files/``) that opens from disk.

Two reports share one renderer:

- :func:`write_run_report` -- one scored test set (written by test.py): metrics,
  image / pixel ROC, score histograms of the good images and of each defect type
  with the operating point marked, overlays of the best- and worst-scored defects
  and the highest-scored good images, the per-defect table and, for Mahalanobis,
  AUROC per feature level. It also writes ``report.json`` (the sections, with
  figure paths relative to the folder) so a comparison report can embed it.
- :func:`write_comparison_report` -- several runs (the benchmark runner, the
  main job): the results table, one ROC figure per category with every method,
  then each run's own sections.

No script, stylesheet or image comes from the network; every figure is a PNG
beside the page, referenced by a relative path.
"""

from __future__ import annotations

import csv
import html
import json
import os

import numpy as np
from matplotlib.figure import Figure

from ..errors import InputError
from ..fileio import atomic_path, write_json
from .plots import _save, plot_level_auroc, plot_overlays, plot_pixel_roc, plot_roc, plot_score_histogram
from .tables import per_defect_table

REPORT_FILE = "report.html"
REPORT_DATA = "report.json"
FILES_DIR = "report_files"
#: overlays per group (best-scored defects, worst-scored defects, highest-scored good images)
N_OVERLAYS = 3

_METRICS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO"),
            ("f1_max", "F1-max"), ("balanced_accuracy", "balanced accuracy"),
            ("oracle_balanced_accuracy", "oracle balanced accuracy (best image-score threshold, reported only)"),
            ("oracle_gap", "gap to the oracle"), ("tpr", "TPR"), ("tnr", "TNR"),
            ("fpr", "FPR on the good images"), ("target_fpr", "target FPR"),
            ("threshold", "threshold"), ("min_area", "min_area"), ("scoring_img_per_s", "scoring img/s"))

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}
.figs{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
figure{margin:0}figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.85em;color:#555}
.failed{color:#b00}pre{background:#f7f7f7;padding:.6em;overflow-x:auto}.note{color:#555;font-size:.9em}
"""


# -- building blocks -------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 10 else f"{v:.4f}"
    return html.escape(str(v))


def _table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def _render_section(sec: dict, prefix: str = "") -> str:
    """A section dict (title, metrics, figures, pre, notes) as HTML; figure paths get ``prefix``."""
    parts = [f"<h3>{html.escape(sec['title'])}</h3>"] if sec.get("title") else []
    if sec.get("metrics"):
        parts.append(_table([k for k, _ in sec["metrics"]], [[_fmt(v) for _, v in sec["metrics"]]]))
    for note in sec.get("notes", []):
        parts.append(f"<p class=\"note\">{html.escape(note)}</p>")
    if sec.get("pre"):
        parts.append(f"<pre>{html.escape(sec['pre'])}</pre>")
    if sec.get("figures"):
        figs = "".join(
            f"<figure><img src=\"{html.escape(prefix + f['path'], quote=True)}\" alt=\"{html.escape(f['caption'], quote=True)}\""
            f" loading=\"eager\"><figcaption>{html.escape(f['caption'])}</figcaption></figure>"
            for f in sec["figures"])
        parts.append(f"<div class=\"figs\">{figs}</div>")
    return "\n".join(parts)


def _write_text(path: str, text: str) -> str:
    with atomic_path(path, suffix=".html") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return path


# -- one run ---------------------------------------------------------------------
def _overlay_groups(labels: np.ndarray, scores: np.ndarray, n: int):
    """(caption, indices): the best- and worst-scored defects and the highest-scored good images."""
    bad, good = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    bad = bad[np.argsort(-scores[bad], kind="stable")]
    good = good[np.argsort(-scores[good], kind="stable")]
    groups = []
    if bad.size:
        groups.append(("best-scored defects (highest scores)", bad[:n]))
        worst = bad[::-1][:n]
        worst = worst[~np.isin(worst, bad[:n])]
        if worst.size:
            groups.append(("worst-scored defects (lowest scores: the hardest to catch)", worst))
    if good.size:
        groups.append(("highest-scored good images (closest to a false alarm)", good[:n]))
    return groups


def _level_aurocs(det, images: np.ndarray, labels: np.ndarray, batch_size: int = 16):
    """AUROC of each feature level's distance alone and of their sum (Mahalanobis)."""
    from ..metrics import image_auroc

    per = np.concatenate([np.asarray(det.score_levels(images[i : i + batch_size]))
                          for i in range(0, len(images), batch_size)])
    names = [str(int(v)) for v in det.levels] + ["sum"]
    return names, [image_auroc(labels, per[:, j]) for j in range(per.shape[1])] + [image_auroc(labels, per.sum(1))]


def write_run_report(out_dir, result: dict, res, operating_point=None, predictions=None, segmentations=None,
                     det=None, title=None, n_overlays: int = N_OVERLAYS) -> str:
    """Write ``report.html``, ``report.json`` and ``report_files/`` for one scored test set.

    ``result`` is test.py's result dict, ``res`` the :class:`~mvtec_keras.detectors.base.ScoreResult`
    (with ``images`` for overlays and Mahalanobis levels), ``operating_point`` the
    finetune.json dict (or None), ``predictions`` / ``segmentations`` its decisions.
    Returns the path of ``report.html``.
    """
    from .. import thresholds

    out_dir = os.path.abspath(out_dir)
    files = os.path.join(out_dir, FILES_DIR)
    os.makedirs(files, exist_ok=True)
    labels = np.asarray(res.labels).reshape(-1).astype(int)
    scores = np.asarray(res.scores, dtype=np.float64).reshape(-1)
    types = list(res.defect_types) if res.defect_types is not None else ["good" if v == 0 else "defective" for v in labels]
    both = 0 < labels.sum() < labels.size
    op = operating_point or {}
    sections = []

    summary = {"title": "", "metrics": [(name, result.get(k)) for k, name in _METRICS if k in result]}
    if op:
        summary["notes"] = [f"operating point: decision on {op.get('decision', 'image_score')}"
                            + (f", rule {op['rule']}" if op.get("rule") else "")
                            + (f", mode {op['mode']}" if op.get("mode") else "")
                            + ("; auto compared " + ", ".join(f"{c['rule']} ({c['score']:.3f})"
                                                              for c in op["candidates"]) + " on the finetune split"
                               if op.get("candidates") else "")]
        warning = thresholds.conformal_warning(op)
        if warning:
            summary["notes"].append(f"warning: {warning}")
        if result.get("oracle_balanced_accuracy") is not None:
            summary["notes"].append("oracle: the best balanced accuracy any image-score threshold reaches on these "
                                    "images, from their labels; a yardstick for the chosen point, never used to choose")
    else:
        summary["notes"] = ["no operating point (finetune.json) for this run: decisions are not shown"]
    sections.append(summary)

    figs = []
    if both:
        plot_roc(labels, scores, os.path.join(files, "roc.png"))
        figs.append({"caption": "image-level ROC", "path": f"{FILES_DIR}/roc.png"})
    has_mask = np.array([t == "good" or (res.masks is not None and res.masks[i].any()) for i, t in enumerate(types)])
    if res.maps is not None and res.masks is not None and has_mask.any() and res.masks[has_mask].any():
        plot_pixel_roc(res.masks[has_mask], res.maps[has_mask], os.path.join(files, "pixel_roc.png"))
        figs.append({"caption": "pixel-level ROC", "path": f"{FILES_DIR}/pixel_roc.png"})
    image_thr = op.get("threshold") if op.get("decision", "image_score") == "image_score" else None
    plot_score_histogram(scores, labels, os.path.join(files, "hist_scores.png"), threshold=image_thr,
                         defect_types=types, title="image scores by type"
                         + ("" if image_thr is not None or not op else " (decision on maps: see region areas)"))
    figs.append({"caption": "image scores: good and each defect type" + (", threshold dashed" if image_thr is not None else ""),
                 "path": f"{FILES_DIR}/hist_scores.png"})
    if op.get("decision") == "segmentation" and res.maps is not None:
        # The decision statistic of a segmentation rule: the largest region of map >= threshold.
        areas = thresholds.largest_region_areas(res.maps, [op["threshold"]])[:, 0].astype(np.float64)
        plot_score_histogram(areas, labels, os.path.join(files, "hist_areas.png"), threshold=op.get("min_area"),
                             defect_types=types, title=f"largest region of map >= {op['threshold']:.4g} (pixels)",
                             xlabel="largest region area (pixels)")
        figs.append({"caption": "decision statistic: largest region area per image, min_area dashed",
                     "path": f"{FILES_DIR}/hist_areas.png"})
    sections.append({"title": "Curves and score distributions", "figures": figs})

    sections.append({"title": "Per defect type", "pre": per_defect_table(res, predictions)})

    if det is not None and hasattr(det, "score_levels") and res.images is not None and both:
        names, au = _level_aurocs(det, res.images, labels)
        plot_level_auroc(names, au, os.path.join(files, "levels.png"), title="Mahalanobis: AUROC per level and summed")
        sections.append({"title": "Mahalanobis: AUROC per EfficientNet level",
                         "figures": [{"caption": "image AUROC of each level alone and of the sum", "path": f"{FILES_DIR}/levels.png"}],
                         "pre": "  ".join(f"{n}: {a:.4f}" for n, a in zip(names, au))})

    if res.maps is not None and res.images is not None and n_overlays > 0:
        vmax = float(np.quantile(res.maps, 0.999))
        for caption, idx in _overlay_groups(labels, scores, n_overlays):
            sub = "ov_" + caption.split()[0].replace("-", "_")
            names = [f"{types[i]}/{os.path.basename(res.paths[i]) if res.paths else i}" for i in idx]
            written = plot_overlays(res.images[idx], res.maps[idx], os.path.join(files, sub), paths=names,
                                    masks=None if res.masks is None else res.masks[idx],
                                    segmentations=None if segmentations is None else np.asarray(segmentations)[idx],
                                    vmax=vmax)
            sections.append({
                "title": f"Overlays: {caption}",
                "notes": ["image | anomaly map | regions (ground truth green, prediction red); scores: "
                          + ", ".join(f"{n} {scores[i]:.4g}" for n, i in zip(names, idx))],
                "figures": [{"caption": n, "path": os.path.relpath(p, out_dir).replace(os.sep, "/")}
                            for n, p in zip(names, written)],
            })
    elif res.maps is None:
        sections.append({"title": "Overlays", "notes": [f"{result.get('detector', 'this detector')} gives image scores only: no maps"]})

    title = title or f"{result.get('detector', 'detector')} test report"
    write_json(os.path.join(out_dir, REPORT_DATA), {"title": title, "sections": sections})
    body = "\n".join(_render_section(s) for s in sections)
    return _write_text(os.path.join(out_dir, REPORT_FILE), _page(title, body))


# -- several runs ----------------------------------------------------------------
def read_predictions(path: str):
    """(labels, scores) from a predictions.csv written by test.py."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("truth") not in ("", None)]
    return np.array([int(r["truth"]) for r in rows]), np.array([float(r["score"]) for r in rows])


def plot_roc_comparison(curves: dict, path: str, title: str) -> str:
    """One ROC figure with a curve per method; ``curves`` maps a name to (labels, scores)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    if not curves:
        raise InputError("no curves to plot")
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    for name, (y, s) in curves.items():
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, lw=2, label=f"{name} (AUROC {roc_auc_score(y, s):.4f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def write_comparison_report(out_dir, rows: list, title: str = "mvtec-keras benchmark", columns=None) -> str:
    """``report.html`` comparing runs; ``rows`` are result dicts with ``category``, ``method``,
    ``status`` and ``run_dir`` (the run folder, whose ``test/`` holds its own report)."""
    out_dir = os.path.abspath(out_dir)
    files = os.path.join(out_dir, FILES_DIR)
    os.makedirs(files, exist_ok=True)
    columns = columns or ["category", "method", "backbone", "image_auroc", "pixel_auroc", "aupro", "f1_max",
                          "balanced_accuracy", "fit_s", "scoring_img_per_s", "peak_memory_mb", "model_size_mb", "status"]
    parts = ["<h2>Results</h2>", _table(columns, [
        [(f"<span class=\"failed\">failed: {html.escape(str(r.get('error', '')))}</span>" if c == "status" and r.get("status") != "ok"
          else _fmt(r.get(c))) for c in columns] for r in rows])]
    for cat in dict.fromkeys(r["category"] for r in rows):
        parts.append(f"<h2>{html.escape(cat)}</h2>")
        cells = [r for r in rows if r["category"] == cat]
        curves = {}
        for r in cells:
            pred = os.path.join(r.get("run_dir") or "", "test", "predictions.csv")
            if r.get("status") == "ok" and os.path.isfile(pred):
                y, s = read_predictions(pred)
                if 0 < y.sum() < y.size:
                    curves[r["method"]] = (y, s)
        if curves:
            name = f"roc_{_safe(cat)}.png"
            plot_roc_comparison(curves, os.path.join(files, name), f"image-level ROC, {cat}")
            parts.append(_render_section({"figures": [{"caption": f"every method on {cat}", "path": f"{FILES_DIR}/{name}"}]}))
        for r in cells:
            parts.append(f"<h2>{html.escape(cat)} / {html.escape(r['method'])}</h2>")
            if r.get("status") != "ok":
                parts.append(f"<p class=\"failed\">failed: {html.escape(str(r.get('error', '')))}</p>")
                continue
            test_dir = os.path.join(r["run_dir"], "test")
            data = os.path.join(test_dir, REPORT_DATA)
            if not os.path.isfile(data):
                parts.append("<p class=\"note\">no run report</p>")
                continue
            prefix = os.path.relpath(test_dir, out_dir).replace(os.sep, "/") + "/"
            with open(data) as f:
                sub = json.load(f)
            parts.append(f"<p><a href=\"{html.escape(prefix + REPORT_FILE, quote=True)}\">this run's own report</a></p>")
            parts.extend(_render_section(s, prefix) for s in sub["sections"])
    return _write_text(os.path.join(out_dir, REPORT_FILE), _page(title, "\n".join(parts)))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
