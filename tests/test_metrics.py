import time

import numpy as np
import pytest
from skimage.measure import label as sk_label
from sklearn import metrics as skm

from mvtec_keras import metrics as M
from mvtec_keras.errors import InputError


def _ties(rng, n, levels=7):
    """Scores with many ties, to exercise the handling of equal scores."""
    return rng.integers(0, levels, n).astype(np.float32) / levels


def _labels(rng, n):
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]  # both classes always present
    return y


# -- image level ---------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_image_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = _labels(rng, 60)
    for s in (rng.random(60).astype(np.float32), _ties(rng, 60)):
        assert M.image_auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
        assert M.average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
        prec, rec, thr = skm.precision_recall_curve(y, s)
        f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-300), 0)[:-1]
        got_f1, got_thr = M.f1_max(y, s)
        assert got_f1 == pytest.approx(f1.max(), abs=1e-12)
        # The returned threshold really achieves that F1.
        assert skm.f1_score(y, s >= got_thr) == pytest.approx(got_f1, abs=1e-12)


def test_f1_max_hand_case():
    # Perfect separation: F1 = 1 at the lowest defect score.
    f1, thr = M.f1_max([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])
    assert f1 == 1.0 and thr == pytest.approx(0.7)


def test_single_class_gives_nan():
    assert np.isnan(M.image_auroc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert np.isnan(M.image_auroc([1, 1], [0.1, 0.2]))
    assert np.isnan(M.average_precision([0, 0], [0.1, 0.2]))
    assert all(np.isnan(M.f1_max([0, 0], [0.1, 0.2])))
    # With only positives AP is defined (precision is 1 everywhere).
    assert M.average_precision([1, 1], [0.1, 0.2]) == 1.0


@pytest.mark.parametrize(
    "labels, scores",
    [([0, 1, 1], [0.1, 0.2]), ([0, 2], [0.1, 0.2]), ([0, 1], [0.1, np.nan]), (["a", "b"], [0.1, 0.2])],
)
def test_bad_image_inputs_raise(labels, scores):
    with pytest.raises(InputError):
        M.image_auroc(labels, scores)


def test_threshold_metrics_match_sklearn():
    rng = np.random.default_rng(3)
    y, p = _labels(rng, 50), rng.integers(0, 2, 50)
    got = M.threshold_metrics(y, p)
    tn, fp, fn, tp = skm.confusion_matrix(y, p).ravel()
    assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (tp, fp, tn, fn)
    assert got["tpr"] == pytest.approx(skm.recall_score(y, p))
    assert got["tnr"] == pytest.approx(skm.recall_score(y, p, pos_label=0))
    assert got["fpr"] == pytest.approx(1 - got["tnr"])
    assert got["precision"] == pytest.approx(skm.precision_score(y, p))
    assert got["f1"] == pytest.approx(skm.f1_score(y, p))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p))
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, p))


def test_threshold_metrics_absent_class_is_nan():
    got = M.threshold_metrics([0, 0, 0], [0, 1, 0])
    assert np.isnan(got["tpr"]) and np.isnan(got["balanced_accuracy"]) and got["precision"] == 0.0
    assert got["tnr"] == pytest.approx(2 / 3) and got["fpr"] == pytest.approx(1 / 3)
    assert got["accuracy"] == pytest.approx(2 / 3) and got["f1"] == 0.0
    got = M.threshold_metrics([1, 1], [0, 0])
    assert np.isnan(got["tnr"]) and np.isnan(got["fpr"]) and np.isnan(got["precision"]) and got["tpr"] == 0.0


def test_image_metrics_dict():
    y = [0, 0, 1, 1]
    s = [0.1, 0.6, 0.5, 0.9]
    out = M.image_metrics(y, s)
    assert out["image_auroc"] == pytest.approx(0.75)
    assert "tpr" not in out  # no threshold given, no thresholded metrics
    out = M.image_metrics(y, s, threshold=0.55)
    assert (out["tp"], out["fp"], out["tn"], out["fn"]) == (1, 1, 1, 1)
    assert out["threshold"] == 0.55 and out["balanced_accuracy"] == 0.5


# -- pixel level ---------------------------------------------------------------
def _random_masks(rng, n, h, w, p=0.15):
    return (rng.random((n, h, w)) < p).astype(np.uint8)


def test_pixel_auroc_and_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    masks = _random_masks(rng, 4, 12, 10)
    maps = _ties(rng, masks.size, levels=20).reshape(masks.shape) + 0.2 * masks
    y, s = masks.ravel(), maps.ravel()
    ref_auc = skm.roc_auc_score(y, s)
    assert M.pixel_auroc(masks, maps) == pytest.approx(ref_auc, abs=1e-12)
    out = M.pixel_metrics(masks[..., None], maps)  # a trailing channel axis is accepted
    assert out["pixel_auroc"] == pytest.approx(ref_auc, abs=1e-12)
    assert out["pixel_ap"] == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    assert out["pixel_f1_max"] == pytest.approx(M.f1_max(y, s)[0])
    assert out["aupro"] == pytest.approx(M.aupro(masks, maps), abs=1e-12)


def _reference_aupro(masks, maps, limit):
    """Slow and literal: every distinct threshold, every region, then trapezoids clipped at the limit."""
    regions = []
    for m, s in zip(masks, maps):
        lab = sk_label(m, connectivity=2)  # 8-connectivity
        regions += [s[lab == r] for r in range(1, lab.max() + 1)]
    normal = maps[masks == 0]
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        points.append((np.mean(normal >= t), np.mean([np.mean(r >= t) for r in regions])))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_aupro_matches_reference(seed, limit):
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng, 3, 9, 8, p=0.3)
    noise = _ties(rng, masks.size, levels=12) if seed % 2 else rng.random(masks.size).astype(np.float32)
    maps = noise.reshape(masks.shape) + 0.3 * masks * rng.random(masks.shape)
    assert M.aupro(masks, maps, fpr_limit=limit) == pytest.approx(_reference_aupro(masks, maps, limit), abs=1e-9)


def test_aupro_limit_on_a_curve_vertex():
    # FPR steps are multiples of 1/10 here, so limit 0.3 falls exactly on a curve point.
    masks = np.zeros((1, 4, 5), np.uint8)
    masks[0, 1:3, 1:3] = 1
    maps = np.arange(20, dtype=np.float32).reshape(1, 4, 5) / 20
    assert M.aupro(masks, maps, 0.3) == pytest.approx(_reference_aupro(masks, maps, 0.3), abs=1e-12)


def test_aupro_hand_cases():
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[0, 2:4, 2:5] = 1
    masks[1, 5:7, 1:3] = 1
    assert M.aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0)  # perfect map
    assert M.aupro(masks, 1.0 - masks) == pytest.approx(0.0)  # inverted map
    # Constant map: one jump from (0, 0) to (1, 1); the diagonal gives limit / 2.
    assert M.aupro(masks, np.zeros(masks.shape), fpr_limit=0.3) == pytest.approx(0.15)
    # No defect anywhere: undefined, not an exception.
    assert np.isnan(M.aupro(np.zeros((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4))))


def test_aupro_weights_regions_not_pixels():
    # A 1-pixel region found above every normal pixel, a 9-pixel region found below them:
    # PRO = 0.5 on FPR in [0, 1), while pixel recall would only be 0.1.
    masks = np.zeros((1, 10, 10), np.uint8)
    masks[0, 1, 1] = 1
    masks[0, 5:8, 5:8] = 1
    maps = np.full(masks.shape, 0.5)
    maps[0, 1, 1] = 1.0
    maps[0, 5:8, 5:8] = 0.0
    assert M.aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.5)


def test_aupro_uses_8_connectivity():
    # Two diagonal neighbours (one found, one missed) and one separate missed pixel.
    # 8-connected: regions {diagonal pair, single} -> PRO = (1/2 + 0) / 2 = 0.25.
    # (4-connectivity would give three regions and PRO = 1/3.)
    masks = np.zeros((1, 8, 8), np.uint8)
    masks[0, 2, 2] = masks[0, 3, 3] = masks[0, 6, 6] = 1
    maps = np.full(masks.shape, 0.5)
    maps[0, 2, 2] = 1.0
    maps[0, 3, 3] = maps[0, 6, 6] = 0.0
    assert M.aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.25)


def test_aupro_regions_do_not_connect_across_images():
    # The same pixel set in two images is two regions; one found, one missed -> 0.5.
    masks = np.zeros((2, 6, 6), np.uint8)
    masks[:, 2:4, 2:4] = 1
    maps = np.full(masks.shape, 0.5)
    maps[0, 2:4, 2:4] = 1.0
    maps[1, 2:4, 2:4] = 0.0
    assert M.aupro(masks, maps) == pytest.approx(0.5)


def test_aupro_random_maps_near_half_the_limit():
    # Uninformative maps: PRO(t) ~ FPR(t), so the normalised area is ~ limit / 2.
    rng = np.random.default_rng(1)
    masks = np.zeros((8, 32, 32), np.uint8)
    masks[:, 8:20, 10:22] = 1
    maps = rng.random(masks.shape)
    assert M.aupro(masks, maps, 0.3) == pytest.approx(0.15, abs=0.01)


@pytest.mark.parametrize(
    "masks, maps, kw",
    [
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), {}),
        (np.full((1, 4, 4), 0.5), np.zeros((1, 4, 4)), {}),
        (np.zeros((1, 4, 4)), np.full((1, 4, 4), np.inf), {}),
        (np.zeros((4, 4)), np.zeros((4, 4)), {}),
        (np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), {"fpr_limit": 0.0}),
    ],
)
def test_bad_pixel_inputs_raise(masks, maps, kw):
    with pytest.raises(InputError):
        M.aupro(masks, maps, **kw)


def test_aupro_handles_100_images_of_256(capsys):
    # Size check only (speed targets live in bench/): 100 x 256 x 256 must just run.
    rng = np.random.default_rng(0)
    masks = np.zeros((100, 256, 256), np.uint8)
    masks[::2, 100:140, 60:90] = 1
    masks[1::4, 10:14, 200:230] = 1
    maps = rng.random(masks.shape, dtype=np.float32) + 0.5 * masks
    t0 = time.perf_counter()
    value = M.aupro(masks, maps)
    elapsed = time.perf_counter() - t0
    assert 0.0 < value < 1.0
    with capsys.disabled():
        print(f"\naupro on 100x256x256: {elapsed:.2f} s")
