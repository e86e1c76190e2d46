import csv
import os

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from mvtec_keras.detectors.base import ScoreResult
from mvtec_keras.errors import InputError
from mvtec_keras.reports import (
    per_defect_table,
    plot_finetune,
    plot_history,
    plot_inspection,
    plot_level_auroc,
    plot_lr_range_test,
    plot_overlays,
    plot_pixel_roc,
    plot_roc,
    plot_score_histogram,
    save_segmentations,
    write_predictions_csv,
)
from mvtec_keras.reports import plots as plots_mod

H = W = 32


def png_size(path):
    """Size of a valid, fully written PNG (verify() fails on truncated files)."""
    assert os.path.getsize(path) > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        return im.size


def listing(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.fixture
def data():
    """Six tiny images: two good, two 'broken', two 'crack'; a bright square marks the defect."""
    rng = np.random.default_rng(0)
    n = 6
    images = rng.uniform(0.2, 0.4, size=(n, H, W, 3)).astype(np.float32)
    masks = np.zeros((n, H, W), np.uint8)
    masks[2:, 8:16, 10:20] = 1
    maps = rng.uniform(0, 0.5, size=(n, H, W)).astype(np.float32)
    maps[masks == 1] += 0.4  # defects mostly hotter than background
    images[masks == 1] = 0.9
    types = ["good", "good", "broken", "broken", "crack", "crack"]
    labels = np.array([0, 0, 1, 1, 1, 1])
    paths = [f"/d/bottle/test/{t}/{i:03d}.png" for i, t in enumerate(types)]
    scores = np.array([0.1, 0.45, 0.5, 0.9, 0.3, 0.8], np.float32)
    return dict(images=images, masks=masks, maps=maps, types=types, labels=labels, paths=paths, scores=scores)


# -- ROC and histograms --------------------------------------------------------
def test_plot_roc_writes_png(tmp_path, data):
    out = plot_roc(data["labels"], data["scores"], tmp_path / "roc.png", title="bottle")
    assert out == str(tmp_path / "roc.png")
    w, h = png_size(out)
    assert w > 100 and h > 100
    assert listing(tmp_path) == ["roc.png"]  # no temp file left


@pytest.mark.parametrize(
    "labels, scores",
    [([0, 0, 0], [0.1, 0.2, 0.3]), ([0, 1], [0.1, 0.2, 0.3]), ([0, 1], [[0.1], [0.2]])],
)
def test_plot_roc_bad_input_leaves_nothing(tmp_path, labels, scores):
    with pytest.raises(InputError):
        plot_roc(labels, scores, tmp_path / "sub" / "roc.png")
    assert listing(tmp_path) == []


def test_plot_pixel_roc_subsamples_deterministically(tmp_path, data):
    a = plot_pixel_roc(data["masks"], data["maps"], tmp_path / "a.png", max_pixels=1000)
    b = plot_pixel_roc(data["masks"], data["maps"], tmp_path / "b.png", max_pixels=1000)
    png_size(a)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()
    c = plot_pixel_roc(data["masks"], data["maps"], tmp_path / "c.png", max_pixels=1000, seed=1)
    with open(a, "rb") as fa, open(c, "rb") as fc:
        assert fa.read() != fc.read()  # the sample (and thus the curve) follows the seed
    with pytest.raises(InputError):
        plot_pixel_roc(data["masks"][:, :16], data["maps"], tmp_path / "bad.png")
    assert listing(tmp_path) == ["a.png", "b.png", "c.png"]


def test_plot_score_histogram_variants(tmp_path, data):
    a = plot_score_histogram(data["scores"], data["labels"], tmp_path / "h.png", threshold=0.47)
    b = plot_score_histogram(
        data["scores"], data["labels"], tmp_path / "h_types.png", threshold=0.47, defect_types=data["types"]
    )
    png_size(a)
    png_size(b)
    with pytest.raises(InputError):
        plot_score_histogram(data["scores"], data["labels"][:3], tmp_path / "bad.png")
    with pytest.raises(InputError):
        plot_score_histogram(data["scores"], data["labels"], tmp_path / "bad.png", defect_types=["good"])
    assert listing(tmp_path) == ["h.png", "h_types.png"]


# -- per-image figures ---------------------------------------------------------
def test_plot_overlays_full(tmp_path, data):
    seg = data["maps"] > 0.6
    out = plot_overlays(
        data["images"], data["maps"], tmp_path / "ov", paths=data["paths"], masks=data["masks"], segmentations=seg
    )
    names = [os.path.basename(p) for p in out]
    assert names == ["good_000.png", "good_001.png", "broken_002.png", "broken_003.png", "crack_004.png", "crack_005.png"]
    assert listing(tmp_path / "ov") == sorted(names)
    sizes = {png_size(p) for p in out}
    assert len(sizes) == 1  # same layout for every image


def test_plot_overlays_without_masks_or_segmentations(tmp_path, data):
    two = plot_overlays(data["images"], data["maps"], tmp_path / "two", max_images=2)
    assert [os.path.basename(p) for p in two] == ["image_0000.png", "image_0001.png"]
    three = plot_overlays(data["images"][:1], data["maps"][:1], tmp_path / "gt", masks=data["masks"][:1])
    seg_only = plot_overlays(data["images"][:1], data["maps"][:1], tmp_path / "seg", segmentations=data["masks"][:1])
    # Without any contours there is no third panel, so the figure is narrower.
    assert png_size(two[0])[0] < png_size(three[0])[0]
    assert png_size(seg_only[0])[0] == png_size(three[0])[0]


def test_plot_overlays_grayscale_and_name_sanitising(tmp_path, data):
    gray = data["images"][:3].mean(axis=-1, keepdims=True)
    paths = ["x/broken large/0 1.png", "x/broken large/0 1.png", "x/../weird$name.bmp"]
    out = plot_overlays(gray, data["maps"][:3], tmp_path, paths=paths, vmax=1.0)
    assert [os.path.basename(p) for p in out] == ["broken_large_0_1.png", "broken_large_0_1-1.png", "weird_name.png"]
    for p in out:
        png_size(p)


def test_plot_overlays_shared_colour_scale(tmp_path, data, monkeypatch):
    seen = []
    real = plots_mod.Normalize

    def spy(vmin, vmax):
        seen.append((vmin, vmax))
        return real(vmin=vmin, vmax=vmax)

    monkeypatch.setattr(plots_mod, "Normalize", spy)
    plot_overlays(data["images"], data["maps"], tmp_path)
    assert seen == [pytest.approx((float(data["maps"].min()), float(data["maps"].max())))]
    seen.clear()
    plot_overlays(data["images"], data["maps"], tmp_path, vmax=2.5)
    assert seen[0][1] == 2.5


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(maps=np.zeros((6, 16, 16))),  # map size differs from image size
        dict(masks=np.zeros((6, H, W + 1))),
        dict(segmentations=np.zeros((5, H, W))),
        dict(paths=["a.png"]),
        dict(images=np.zeros((6, H, W, 2))),  # neither gray nor RGB
    ],
)
def test_plot_overlays_bad_shapes_leave_nothing(tmp_path, data, kwargs):
    args = dict(images=data["images"], maps=data["maps"])
    args.update(kwargs)
    with pytest.raises(InputError):
        plot_overlays(out_dir=tmp_path / "ov", **args)
    assert not (tmp_path / "ov").exists()


def test_failure_midway_removes_written_and_temp_files(tmp_path, data, monkeypatch):
    real = plots_mod.Figure.savefig
    calls = []

    def flaky(self, fname, *a, **k):
        calls.append(fname)
        if len(calls) == 3:
            with open(fname, "wb") as f:  # a half-written file...
                f.write(b"\x89PNG")
            raise OSError("disk full")
        return real(self, fname, *a, **k)

    monkeypatch.setattr(plots_mod.Figure, "savefig", flaky)
    with pytest.raises(OSError):
        plot_overlays(data["images"], data["maps"], tmp_path, paths=data["paths"])
    assert len(calls) == 3
    assert listing(tmp_path) == []  # ...is removed, and so are the two finished files


def test_plot_inspection(tmp_path, data):
    rec = np.clip(data["images"] * 0.9, 0, 1)
    res = np.abs(data["images"] - rec)  # per-channel residual, averaged for display
    out = plot_inspection(data["images"], rec, res, tmp_path, names=[f"img {i}" for i in range(6)])
    assert [os.path.basename(p) for p in out] == [f"img_{i}.png" for i in range(6)]
    for p in out:
        png_size(p)
    with pytest.raises(InputError):
        plot_inspection(data["images"], rec[:, :16], res, tmp_path / "bad", names=list("abcdef"))
    with pytest.raises(InputError):
        plot_inspection(data["images"], rec, res, tmp_path / "bad", names=["a"])
    assert not (tmp_path / "bad").exists()


def test_save_segmentations_round_trip(tmp_path, data):
    seg = data["maps"] > 0.5
    out = save_segmentations(seg, tmp_path, data["paths"])
    assert os.path.basename(out[3]) == "broken_003.png"
    for p, s in zip(out, seg):
        with Image.open(p) as im:
            assert im.mode == "L"
            arr = np.asarray(im)
        np.testing.assert_array_equal(arr, s.astype(np.uint8) * 255)
    with pytest.raises(InputError):
        save_segmentations(seg, tmp_path / "bad", data["paths"][:2])
    assert not (tmp_path / "bad").exists()


# -- training figures ----------------------------------------------------------
def test_plot_history_from_dict_and_csv(tmp_path):
    hist = {"loss": [1.0, 0.5, 0.3], "val_loss": [1.1, 0.7, 0.6], "learning_rate": [1e-3, 5e-4, 1e-4]}
    out = plot_history(hist, tmp_path / "dict")
    assert [os.path.basename(p) for p in out] == ["loss.png", "learning_rate.png"]
    for p in out:
        png_size(p)

    # The layout keras.callbacks.CSVLogger writes.
    csv_path = tmp_path / "history.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "learning_rate", "loss", "val_loss"])
        for e in range(3):
            w.writerow([e, hist["learning_rate"][e], hist["loss"][e], hist["val_loss"][e]])
    out = plot_history(str(csv_path), tmp_path / "csv")
    assert listing(tmp_path / "csv") == ["learning_rate.png", "loss.png"]

    # No learning rate recorded: only the loss figure.
    out = plot_history({"loss": [1.0, 0.5]}, tmp_path / "nolr")
    assert [os.path.basename(p) for p in out] == ["loss.png"]


def test_plot_history_bad_input(tmp_path):
    with pytest.raises(InputError, match="no loss"):
        plot_history({"accuracy": [0.1, 0.2]}, tmp_path / "h")
    with pytest.raises(InputError, match="missing.csv"):
        plot_history(str(tmp_path / "missing.csv"), tmp_path / "h")
    assert listing(tmp_path) == []


def test_plot_lr_range_test(tmp_path):
    lrs = np.geomspace(1e-6, 1, 50)
    losses = 1.0 / (1 + 1e3 * lrs) + np.where(lrs > 0.1, 50 * lrs, 0)
    png_size(plot_lr_range_test(lrs, losses, tmp_path / "lr.png", suggested_lr=1e-3))
    png_size(plot_lr_range_test(lrs, losses, tmp_path / "lr_none.png", suggested_lr=None))
    with pytest.raises(InputError):
        plot_lr_range_test(np.r_[0.0, lrs[1:]], losses, tmp_path / "bad.png", 1e-3)
    assert listing(tmp_path) == ["lr.png", "lr_none.png"]


def test_plot_finetune_and_level_auroc(tmp_path):
    areas = [0, 10, 20, 40, 80]
    png_size(plot_finetune(areas, [0.5, 0.45, 0.4, 0.38, 0.3], [0.7, 0.8, 0.9, 0.85, 0.6], 20, tmp_path / "ft.png"))
    png_size(plot_level_auroc(["block2", "block3", "block4"], [0.71, 0.93, 0.88], tmp_path / "lv.png"))
    with pytest.raises(InputError):
        plot_finetune(areas, [0.5], [0.7] * 5, 20, tmp_path / "bad.png")
    with pytest.raises(InputError):
        plot_level_auroc([1, 2], [0.5], tmp_path / "bad.png")
    assert listing(tmp_path) == ["ft.png", "lv.png"]


# -- tables --------------------------------------------------------------------
def parse_table(text):
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["defect", "type"]
    rows = {}
    for ln in lines[1:]:
        if set(ln) == {"-"}:
            continue
        f = ln.split()
        rows[f[0]] = f[1:]
    return rows


def test_per_defect_table_numbers(data):
    res = ScoreResult(
        scores=data["scores"],
        maps=data["maps"],
        labels=data["labels"],
        masks=data["masks"],
        paths=data["paths"],
        defect_types=data["types"],
    )
    pred = data["scores"] > 0.47
    rows = parse_table(per_defect_table(res, predictions=pred))
    assert list(rows) == ["good", "broken", "crack", "total"]
    s, y, m, a = data["scores"], data["labels"], data["masks"], data["maps"]
    types = np.array(data["types"])
    good = types == "good"
    for t in ("broken", "crack"):
        sel = types == t
        both = sel | good
        n, mean, auroc, det, pix = rows[t]
        assert int(n) == 2
        assert float(mean) == pytest.approx(s[sel].mean(), rel=1e-3)
        assert float(auroc) == pytest.approx(roc_auc_score(y[both], s[both]), abs=1e-4)
        assert float(det) == pytest.approx(pred[sel].mean(), abs=1e-3)
        assert float(pix) == pytest.approx(roc_auc_score(m[both].ravel(), a[both].ravel()), abs=1e-4)
    # Hand check: broken scores 0.5, 0.9 beat both good (0.1, 0.45); crack 0.3 beats only 0.1.
    assert float(rows["broken"][2]) == 1.0
    assert float(rows["crack"][2]) == 0.75
    assert rows["good"][2] == "-" and rows["good"][4] == "-"
    assert float(rows["good"][3]) == 0.0  # false-alarm rate: neither good image flagged
    n, mean, auroc, det, pix = rows["total"]
    assert int(n) == 6
    assert float(auroc) == pytest.approx(roc_auc_score(y, s), abs=1e-4)
    assert float(det) == pytest.approx(0.75)  # 0.5, 0.9, 0.8 caught; 0.3 missed
    assert float(pix) == pytest.approx(roc_auc_score(m.ravel(), a.ravel()), abs=1e-4)


def test_per_defect_table_without_maps_predictions_or_types(data):
    res = ScoreResult(scores=data["scores"], labels=data["labels"])
    rows = parse_table(per_defect_table(res))
    assert list(rows) == ["good", "defective", "total"]
    assert rows["defective"][3:] == ["-", "-"]
    assert float(rows["defective"][2]) == pytest.approx(roc_auc_score(data["labels"], data["scores"]), abs=1e-4)
    with pytest.raises(InputError):
        per_defect_table(ScoreResult(scores=data["scores"]))
    with pytest.raises(InputError):
        per_defect_table(res, predictions=[1, 0])


def test_predictions_csv_round_trip(tmp_path, data):
    pred = (data["scores"] > 0.47).astype(int)
    out = write_predictions_csv(
        tmp_path / "p.csv", data["paths"], data["types"], data["scores"], pred, data["labels"]
    )
    assert listing(tmp_path) == ["p.csv"]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file", "defect_type", "score", "prediction", "truth"]
    assert [r["file"] for r in rows] == data["paths"]
    assert [r["defect_type"] for r in rows] == data["types"]
    np.testing.assert_array_equal(np.array([float(r["score"]) for r in rows], np.float32), data["scores"])
    assert [int(r["prediction"]) for r in rows] == pred.tolist()
    assert [int(r["truth"]) for r in rows] == data["labels"].tolist()
    with pytest.raises(InputError):
        write_predictions_csv(tmp_path / "bad.csv", data["paths"][:2], None, data["scores"], pred, None)
    assert listing(tmp_path) == ["p.csv"]
