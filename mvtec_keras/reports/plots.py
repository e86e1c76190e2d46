"""Figures for evaluation and training runs, written as PNG files.

Every function validates its inputs before touching the disk (bad input raises
:class:`~mvtec_keras.errors.InputError`) and writes each file atomically: a temp
name in the same folder, then ``os.replace``. Functions writing several files
remove the ones they already wrote if a later one fails. Figures are drawn on
``matplotlib.figure.Figure`` with the Agg canvas, so pyplot's global state and
the user's backend are left alone.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ..errors import InputError
from ..fileio import atomic_path

#: pixel ROC curves use at most this many pixels (a fixed-seed random sample)
MAX_ROC_PIXELS = 2_000_000
_DPI = 110
_GT_COLOUR = "lime"
_PRED_COLOUR = "red"


# -- file helpers --------------------------------------------------------------
@contextlib.contextmanager
def _all_or_nothing():
    """Collect written paths; on failure remove them so no partial set remains."""
    written: list[str] = []
    try:
        yield written
    except BaseException:
        for p in written:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        raise


def _save(fig: Figure, path: str) -> str:
    path = os.path.abspath(os.fspath(path))
    ext = os.path.splitext(path)[1].lower().lstrip(".") or "png"
    with atomic_path(path, suffix="." + ext) as tmp:
        fig.savefig(tmp, format=ext, dpi=_DPI, bbox_inches="tight")
    return path


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _sanitize(name: str) -> str:
    name = _UNSAFE.sub("_", str(name)).strip("._")
    return name or "unnamed"


def _output_names(paths, n: int) -> list[str]:
    """``<defect_type>_<stem>.png`` per input path, the defect type being the parent folder.

    Without paths: ``image_0000.png``...; repeated names get ``-1``, ``-2``.
    """
    if paths is None:
        stems = [f"image_{i:04d}" for i in range(n)]
    else:
        stems = []
        for p in paths:
            p = p.decode() if isinstance(p, bytes) else os.fspath(p)
            parent = os.path.basename(os.path.dirname(p))
            stem = os.path.splitext(os.path.basename(p))[0]
            stems.append(_sanitize(f"{parent}_{stem}" if parent else stem))
    seen: dict[str, int] = {}
    names = []
    for s in stems:
        k = seen.get(s, 0)
        seen[s] = k + 1
        names.append((s if k == 0 else f"{s}-{k}") + ".png")
    return names


# -- validation helpers --------------------------------------------------------
def _vector(x, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise InputError(f"{what}: expected a non-empty 1-D array, got shape {a.shape}")
    return a


def _binary_labels(labels, scores, what="labels") -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1)
    s = _vector(scores, "scores")
    if y.shape != s.shape:
        raise InputError(f"{what}: {y.size} entries but {s.size} scores")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise InputError(f"{what}: both classes (normal and defective) are needed for a ROC curve")
    return y, s


def _images(x, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3) or a.shape[0] == 0:
        raise InputError(f"{what}: expected [N, H, W, 1 or 3] images, got shape {a.shape}")
    return np.clip(a, 0.0, 1.0)


def _maps(x, n: int, hw: tuple, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.shape != (n, *hw):
        raise InputError(f"{what}: expected shape {(n, *hw)} to match the images, got {a.shape}")
    return a


def _colour_range(maps: np.ndarray, vmax=None) -> tuple[float, float]:
    finite = maps[np.isfinite(maps)]
    vmin = float(finite.min()) if finite.size else 0.0
    if vmax is None:
        vmax = float(finite.max()) if finite.size else 1.0
    vmax = float(vmax)
    if not vmax > vmin:  # constant maps: any non-empty range renders them
        vmax = vmin + 1e-6
    return vmin, vmax


def _show_image(ax, img: np.ndarray):
    if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
    else:
        ax.imshow(img)
    ax.set_xticks([])
    ax.set_yticks([])


def _contour(ax, mask: np.ndarray, colour: str) -> bool:
    m = np.asarray(mask, dtype=np.float32)
    # A contour needs both values present; an all-0 or all-1 mask has none to draw.
    if m.min() == m.max():
        return False
    ax.contour(m, levels=[0.5], colors=[colour], linewidths=1.2)
    return True


# -- ROC curves ----------------------------------------------------------------
def _roc_figure(y: np.ndarray, s: np.ndarray, title: str, label_extra: str = "") -> Figure:
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(y, s)
    auroc = roc_auc_score(y, s)
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, lw=2, label=f"AUROC = {auroc:.4f}{label_extra}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def plot_roc(labels, scores, path, title=None) -> str:
    """Image-level ROC curve; the legend gives the AUROC. Returns the path written."""
    y, s = _binary_labels(labels, scores)
    return _save(_roc_figure(y, s, title or "image-level ROC"), path)


def plot_pixel_roc(masks, maps, path, title=None, max_pixels: int = MAX_ROC_PIXELS, seed: int = 0) -> str:
    """Pixel-level ROC from ground-truth ``masks`` and anomaly ``maps`` (both [N, H, W]).

    Above ``max_pixels`` pixels a random sample with a fixed ``seed`` is used, so the
    curve (and the AUROC shown) is deterministic; the legend then says so.
    """
    m = np.asarray(masks)
    a = np.asarray(maps, dtype=np.float32)
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if m.ndim == 4 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.shape != a.shape or a.ndim != 3:
        raise InputError(f"masks {m.shape} and maps {a.shape} must both be [N, H, W] of one shape")
    y, s = m.reshape(-1) > 0, a.reshape(-1)
    extra = ""
    if y.size > max_pixels:
        idx = np.sort(np.random.default_rng(seed).choice(y.size, size=max_pixels, replace=False))
        y, s = y[idx], s[idx]
        extra = f"\n({max_pixels:,} sampled pixels)"
    y, s = _binary_labels(y, s, what="masks")
    return _save(_roc_figure(y, s, title or "pixel-level ROC", extra), path)


# -- score distributions -------------------------------------------------------
def plot_score_histogram(scores, labels, path, threshold=None, defect_types=None, title=None,
                         xlabel="anomaly score") -> str:
    """Histograms of normal vs defective scores on shared bins.

    With ``defect_types`` the defective bars are stacked by type. ``threshold``
    (if given) is drawn as a vertical line.
    """
    s = _vector(scores, "scores")
    y = np.asarray(labels).reshape(-1).astype(bool)
    if y.shape != s.shape:
        raise InputError(f"labels: {y.size} entries but {s.size} scores")
    if defect_types is not None:
        types = np.asarray([str(t) for t in defect_types])
        if types.shape != s.shape:
            raise InputError(f"defect_types: {types.size} entries but {s.size} scores")
    finite = s[np.isfinite(s)]
    if finite.size == 0:
        raise InputError("scores: no finite values to histogram")
    bins = np.histogram_bin_edges(finite, bins=min(40, max(10, int(np.sqrt(finite.size)) * 2)))

    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    if (~y).any():
        ax.hist(s[~y], bins=bins, color="tab:blue", alpha=0.6, label=f"normal (n={int((~y).sum())})")
    if y.any():
        if defect_types is None:
            ax.hist(s[y], bins=bins, color="tab:red", alpha=0.6, label=f"defective (n={int(y.sum())})")
        else:
            names = sorted(set(types[y]))
            groups = [s[y & (types == t)] for t in names]
            colours = colormaps["tab10"](np.arange(1, len(names) + 1) % 10)
            labels_ = [f"{t} (n={g.size})" for t, g in zip(names, groups)]
            ax.hist(groups, bins=bins, stacked=True, color=colours, alpha=0.7, label=labels_)
    if threshold is not None:
        ax.axvline(float(threshold), color="k", ls="--", lw=1.5, label=f"threshold = {float(threshold):.4g}")
    ax.set(xlabel=xlabel, ylabel="images", title=title or "score distribution")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of images
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


# -- per-image figures ---------------------------------------------------------
def plot_overlays(
    images, maps, out_dir, paths=None, masks=None, segmentations=None, max_images=None, vmax=None
) -> list[str]:
    """One PNG per image: input | anomaly map over the input | contours.

    The contour panel (drawn when ``masks`` or ``segmentations`` is given) shows the
    ground truth in green and the predicted segmentation in red. All images share
    one colour scale so their maps compare directly: from the smallest map value to
    ``vmax``, which defaults to the largest finite value over all ``maps`` (pass e.g.
    a high quantile of normal maps to stop one outlier washing out the rest).
    Files are named ``<defect_type>_<stem>.png`` from ``paths`` (defect type = parent
    folder). Returns the paths written.
    """
    x = _images(images, "images")
    n, hw = x.shape[0], x.shape[1:3]
    a = _maps(maps, n, hw, "maps")
    gt = None if masks is None else _maps(masks, n, hw, "masks")
    seg = None if segmentations is None else _maps(segmentations, n, hw, "segmentations")
    if paths is not None and len(paths) != n:
        raise InputError(f"paths: {len(paths)} entries but {n} images")
    vmin, vmax = _colour_range(a, vmax)
    names = _output_names(paths, n)
    count = n if max_images is None else max(0, min(n, int(max_images)))

    norm = Normalize(vmin=vmin, vmax=vmax)
    cmap = colormaps["jet"]
    panels = 3 if (gt is not None or seg is not None) else 2
    with _all_or_nothing() as written:
        for i in range(count):
            fig = Figure(figsize=(3.3 * panels + 0.6, 3.6))
            axes = fig.subplots(1, panels)
            _show_image(axes[0], x[i])
            axes[0].set_title("input")
            _show_image(axes[1], x[i])
            axes[1].imshow(a[i], cmap=cmap, norm=norm, alpha=0.5)
            axes[1].set_title(f"anomaly map (max {np.nanmax(a[i]):.3g})")
            fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes[1], fraction=0.046, pad=0.02)
            if panels == 3:
                _show_image(axes[2], x[i])
                handles = []
                if gt is not None:
                    _contour(axes[2], gt[i], _GT_COLOUR)
                    handles.append(Line2D([], [], color=_GT_COLOUR, label="ground truth"))
                if seg is not None:
                    _contour(axes[2], seg[i], _PRED_COLOUR)
                    handles.append(Line2D([], [], color=_PRED_COLOUR, label="prediction"))
                axes[2].legend(handles=handles, loc="lower right", fontsize="small", framealpha=0.8)
                axes[2].set_title("regions")
            fig.suptitle(names[i][:-4], fontsize="medium")
            written.append(_save(fig, os.path.join(out_dir, names[i])))
    return written


def plot_inspection(images, reconstructions, residual_maps, out_dir, names) -> list[str]:
    """One PNG per image: input | reconstruction | residual (shared scale over all images).

    ``names`` gives each file's name (sanitised, ``.png`` added). Returns the paths written.
    """
    x = _images(images, "images")
    n, hw = x.shape[0], x.shape[1:3]
    r = _images(reconstructions, "reconstructions")
    if r.shape != x.shape:
        raise InputError(f"reconstructions: shape {r.shape} differs from images {x.shape}")
    res = np.asarray(residual_maps, dtype=np.float32)
    if res.ndim == 4 and res.shape[-1] > 1:  # per-channel residuals: show their mean
        res = res.mean(axis=-1)
    res = _maps(res, n, hw, "residual_maps")
    if names is None or len(names) != n:
        raise InputError(f"names: need one name per image ({n})")
    vmin, vmax = _colour_range(res)
    files = []
    seen: dict[str, int] = {}
    for nm in names:
        s = _sanitize(os.path.splitext(os.path.basename(str(nm)))[0])
        k = seen.get(s, 0)
        seen[s] = k + 1
        files.append((s if k == 0 else f"{s}-{k}") + ".png")

    with _all_or_nothing() as written:
        for i in range(n):
            fig = Figure(figsize=(10.5, 3.6))
            axes = fig.subplots(1, 3)
            _show_image(axes[0], x[i])
            axes[0].set_title("input")
            _show_image(axes[1], r[i])
            axes[1].set_title("reconstruction")
            im = axes[2].imshow(res[i], cmap="inferno", vmin=vmin, vmax=vmax)
            axes[2].set_xticks([])
            axes[2].set_yticks([])
            axes[2].set_title("residual")
            fig.colorbar(im, ax=axes[2], fraction=0.046, pad=0.02)
            fig.suptitle(files[i][:-4], fontsize="medium")
            written.append(_save(fig, os.path.join(out_dir, files[i])))
    return written


def save_segmentations(segmentations, out_dir, paths=None) -> list[str]:
    """Binary masks as 8-bit PNGs (0 / 255), named like :func:`plot_overlays`' files."""
    from PIL import Image

    seg = np.asarray(segmentations)
    if seg.ndim == 4 and seg.shape[-1] == 1:
        seg = seg[..., 0]
    if seg.ndim != 3 or seg.shape[0] == 0:
        raise InputError(f"segmentations: expected [N, H, W], got shape {seg.shape}")
    if paths is not None and len(paths) != seg.shape[0]:
        raise InputError(f"paths: {len(paths)} entries but {seg.shape[0]} segmentations")
    names = _output_names(paths, seg.shape[0])
    out = np.where(seg > 0, 255, 0).astype(np.uint8)
    with _all_or_nothing() as written:
        for m, nm in zip(out, names):
            path = os.path.abspath(os.path.join(out_dir, nm))
            with atomic_path(path, suffix=".png") as tmp:
                Image.fromarray(m, mode="L").save(tmp, format="PNG")
            written.append(path)
    return written


# -- training ------------------------------------------------------------------
def _read_history(history) -> dict[str, np.ndarray]:
    if isinstance(history, (str, os.PathLike)):
        path = os.fspath(history)
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such history file")
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise InputError(f"{path}: the history CSV has no rows")
        cols = {}
        for k in rows[0]:
            try:
                cols[k] = np.array([float(r[k]) if r[k] not in ("", None) else np.nan for r in rows])
            except ValueError:
                continue  # a non-numeric column has nothing to plot
        return cols
    if hasattr(history, "history"):  # a keras History object
        history = history.history
    if not isinstance(history, dict):
        raise InputError("history: expected a CSV path, a dict of lists or a keras History")
    return {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in history.items()}


def plot_history(history_csv_or_dict, out_dir) -> list[str]:
    """Loss curves (``loss.png``) and learning rate, log scale (``learning_rate.png``).

    Accepts a keras ``CSVLogger`` file, a ``History`` object or its ``.history``
    dict. Every column with "loss" in its name is drawn; the learning-rate figure
    is skipped when the history has no ``learning_rate`` / ``lr``.
    """
    h = _read_history(history_csv_or_dict)
    loss_keys = sorted(k for k in h if "loss" in k)
    if not loss_keys:
        raise InputError(f"history: no loss column among {sorted(h)}")
    n = max(h[k].size for k in loss_keys)
    # CSVLogger counts epochs from 0; plots count from 1.
    epochs = h["epoch"] + 1 if "epoch" in h and h["epoch"].size == n else np.arange(1, n + 1)
    lr_key = next((k for k in ("learning_rate", "lr") if k in h), None)

    figs = []
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for k in loss_keys:
        ax.plot(epochs[: h[k].size], h[k], marker="o", ms=3, ls="--" if k.startswith("val_") else "-", label=k)
    ax.set(xlabel="epoch", ylabel="loss", title="training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    figs.append((fig, "loss.png"))
    if lr_key is not None:
        lr = h[lr_key]
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        ax.plot(epochs[: lr.size], lr, marker="o", ms=3, color="tab:green")
        if np.all(lr[np.isfinite(lr)] > 0):
            ax.set_yscale("log")
        ax.set(xlabel="epoch", ylabel="learning rate", title="learning rate")
        ax.grid(alpha=0.3, which="both")
        figs.append((fig, "learning_rate.png"))
    with _all_or_nothing() as written:
        for fig, name in figs:
            written.append(_save(fig, os.path.join(out_dir, name)))
    return written


def plot_lr_range_test(lrs, losses, path, suggested_lr=None) -> str:
    """Loss against learning rate (log x) with the suggested rate marked."""
    lr = _vector(lrs, "lrs")
    loss = _vector(losses, "losses")
    if lr.shape != loss.shape:
        raise InputError(f"lrs ({lr.size}) and losses ({loss.size}) differ in length")
    if np.any(lr <= 0):
        raise InputError("lrs: learning rates must be positive for a log axis")
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(lr, loss, color="tab:blue", label="loss")
    ax.set_xscale("log")
    if suggested_lr is not None:
        ax.axvline(float(suggested_lr), color="tab:red", ls="--", label=f"suggested lr = {float(suggested_lr):.2e}")
    ax.set(xlabel="learning rate", ylabel="loss", title="learning-rate range test")
    # Losses usually explode at the end; keep the informative part in view.
    finite = loss[np.isfinite(loss)]
    if finite.size:
        lo, hi = finite.min(), np.quantile(finite, 0.95)
        if hi > lo:
            pad = 0.05 * (hi - lo)
            ax.set_ylim(lo - pad, hi + pad)
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_finetune(min_areas, thresholds, scores, best_min_area, path) -> str:
    """Threshold (left axis) and balanced accuracy (right axis) against ``min_area``."""
    area = _vector(min_areas, "min_areas")
    thr = _vector(thresholds, "thresholds")
    acc = _vector(scores, "scores")
    if not (area.shape == thr.shape == acc.shape):
        raise InputError(f"min_areas, thresholds and scores differ in length ({area.size}, {thr.size}, {acc.size})")
    order = np.argsort(area, kind="stable")
    area, thr, acc = area[order], thr[order], acc[order]
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    l1 = ax.plot(area, thr, marker="o", ms=3, color="tab:blue", label="threshold")
    ax.set(xlabel="min_area (pixels)", ylabel="threshold")
    ax2 = ax.twinx()
    l2 = ax2.plot(area, acc, marker="s", ms=3, color="tab:orange", label="balanced accuracy")
    ax2.set_ylabel("balanced accuracy")
    handles = l1 + l2
    if best_min_area is not None:
        b = int(np.argmin(np.abs(area - float(best_min_area))))
        ax.axvline(area[b], color="grey", ls=":", lw=1)
        handles += ax2.plot(
            [area[b]], [acc[b]], marker="*", ms=14, color="tab:red", ls="none",
            label=f"best: min_area={area[b]:g}, acc={acc[b]:.3f}",
        )
    ax.legend(handles=handles, loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    ax.set_title("threshold fine-tuning")
    return _save(fig, path)


def plot_level_auroc(levels, aurocs, path, title=None) -> str:
    """Bar chart of AUROC per feature level; the chance level (0.5) is dashed."""
    names = [str(v) for v in np.asarray(levels).reshape(-1)]
    au = _vector(aurocs, "aurocs")
    if len(names) != au.size:
        raise InputError(f"levels ({len(names)}) and aurocs ({au.size}) differ in length")
    fig = Figure(figsize=(max(4, 0.8 * len(names) + 2), 4))
    ax = fig.add_subplot()
    bars = ax.bar(names, au, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in au], fontsize="small")
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set(ylim=(0, 1.08), xlabel="feature level", ylabel="AUROC", title=title or "AUROC per feature level")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
