import numpy as np
import pytest
from scipy import ndimage
from skimage.measure import label as sk_label
from skimage.segmentation import clear_border

from mvtec_keras import thresholds as T
from mvtec_keras.errors import InputError


def _smooth_maps(seed, n=4, size=24, sigma=1.5):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random((n, size, size)), (0, sigma, sigma)).astype(np.float32)


def _brute_areas(maps, thresholds, exclude_border, connectivity):
    """Literal version with scikit-image: label, clear the border, take the largest region."""
    out = np.zeros((len(maps), len(thresholds)), np.int64)
    for i, m in enumerate(maps):
        for j, t in enumerate(thresholds):
            lab = sk_label(m >= t, connectivity=2 if connectivity == 8 else 1)
            if exclude_border:
                lab = clear_border(lab)
            sizes = np.bincount(lab.ravel())[1:]
            out[i, j] = sizes.max() if sizes.size else 0
    return out


def _bump(size=64, amp=0.6, sigma=12.0):
    """A smooth hill in the centre: its regions are discs that reach the border only at low levels."""
    r2 = np.sum((np.indices((size, size)) - (size - 1) / 2) ** 2, axis=0)
    return (amp * np.exp(-r2 / (2 * sigma**2))).astype(np.float32)


# -- largest_region_areas ------------------------------------------------------
@pytest.mark.parametrize("exclude_border", [True, False])
@pytest.mark.parametrize("connectivity", [8, 4])
def test_largest_region_areas_matches_brute_force(exclude_border, connectivity):
    maps = _smooth_maps(0)
    thr = np.r_[-1.0, np.quantile(maps, np.linspace(0, 1, 30)), 2.0]  # includes trivial planes
    got = T.largest_region_areas(maps, thr, exclude_border, connectivity)
    assert got.shape == (4, thr.size)
    np.testing.assert_array_equal(got, _brute_areas(maps, thr, exclude_border, connectivity))


def test_largest_region_areas_in_chunks(monkeypatch):
    # Force several scipy calls per image; the result must not change.
    maps = _smooth_maps(1, n=2)
    thr = np.quantile(maps, np.linspace(0.05, 0.95, 17))
    full = T.largest_region_areas(maps, thr)
    monkeypatch.setattr(T.regions, "_MAX_VOXELS", 3 * 24 * 24)  # the module that labels
    np.testing.assert_array_equal(T.largest_region_areas(maps, thr), full)


def test_areas_non_increasing_without_border_exclusion():
    maps = _smooth_maps(2)
    thr = np.sort(np.quantile(maps, np.linspace(0, 1, 40)))
    areas = T.largest_region_areas(maps, thr, exclude_border=False)
    assert (np.diff(areas, axis=1) <= 0).all()
    assert (areas[:, 0] == 24 * 24).all()  # the lowest threshold keeps the whole image


def test_border_exclusion_makes_areas_non_monotone():
    # At a low level the hill's region reaches the border and is dropped; higher up it is an interior disc.
    m = _bump(size=32, sigma=8.0)[None]
    low, high = float(m[0, 0, 16]) - 1e-4, 0.3
    areas = T.largest_region_areas(m, [low, high])
    assert areas[0, 0] == 0 and areas[0, 1] > 0
    assert T.largest_region_areas(m, [low], exclude_border=False)[0, 0] > areas[0, 1]


def test_border_blob_is_ignored():
    m = np.zeros((1, 20, 20), np.float32)
    m[0, 0:6, 5:10] = 1.0  # 30 px touching the top edge
    m[0, 10:14, 8:13] = 1.0  # 20 px inside
    assert T.largest_region_areas(m, [0.5]).tolist() == [[20]]
    assert T.largest_region_areas(m, [0.5], exclude_border=False).tolist() == [[30]]


# -- classify --------------------------------------------------------------------
def test_classify_hand_case():
    maps = np.zeros((3, 20, 20), np.float32)
    maps[0, 5:10, 5:9] = 0.8  # 20 px interior blob
    maps[1, 0:6, 5:10] = 0.8  # 30 px on the border
    maps[2, 5:8, 5:8] = 0.8  # 9 px interior blob
    maps[2, 12:14, 12:14] = 0.3  # below the threshold
    pred, seg = T.classify(maps, 0.5, min_area=20)
    assert pred.tolist() == [True, False, False]
    assert seg.dtype == bool and seg.shape == maps.shape
    np.testing.assert_array_equal(seg[0], maps[0] >= 0.5)  # the deciding region only
    assert not seg[1:].any()
    assert T.classify(maps, 0.5, min_area=21)[0].tolist() == [False, False, False]
    assert T.classify(maps, 0.5, min_area=9)[0].tolist() == [True, False, True]
    assert T.classify(maps, 0.5, min_area=25, exclude_border=False)[0].tolist() == [False, True, False]
    assert T.classify(maps[..., None], np.inf, min_area=1)[0].tolist() == [False] * 3  # [N,H,W,1] accepted


def test_classify_connectivity():
    m = np.zeros((1, 10, 10), np.float32)
    m[0, 3:6, 3:6] = np.eye(3)  # three diagonal pixels
    assert T.classify(m, 0.5, 3, connectivity=8)[0].tolist() == [True]
    assert T.classify(m, 0.5, 2, connectivity=4)[0].tolist() == [False]


# -- candidate thresholds and the uint8 mode -------------------------------------
def test_uint8_candidates_are_exact_levels():
    maps = _smooth_maps(3)
    cand = T.candidate_thresholds(maps, "uint8")
    assert cand.shape == (256,) and (np.diff(cand) > 0).all()
    q = T.to_uint8(maps)
    assert q.dtype == np.uint8 and q.min() == 0 and q.max() == 255
    for k in (1, 60, 128, 200, 255):
        np.testing.assert_array_equal(maps >= cand[k], q >= k)
        # so decisions on float maps at the level equal decisions on the uint8 maps
        np.testing.assert_array_equal(T.classify(maps, cand[k], 5)[1], T.classify(q, k, 5)[1])


def test_uint8_value_range_matches_a_255_scaling():
    # Maps already in [0, 1]: value_range (0, 1) gives the classic round(map * 255).
    maps = _smooth_maps(4)
    np.testing.assert_array_equal(T.to_uint8(maps, (0, 1)), np.floor(maps.astype(np.float64) * 255 + 0.5))


def test_float_candidates_are_unique_pixel_values_dense_at_the_top():
    maps = _smooth_maps(5)
    cand = T.candidate_thresholds(maps, "float32", n=64)
    assert (np.diff(cand) > 0).all() and len(cand) <= 64
    assert cand[-1] == maps.max() and cand[0] == maps.min()
    assert np.isin(cand.astype(np.float32), maps).all()
    # Geometric spacing in the pixel count: most candidates sit in the upper decile.
    assert np.mean(cand >= np.quantile(maps, 0.9)) > 0.5


# -- the search ------------------------------------------------------------------
def _blob_sets():
    """Validation/normal maps are hills; defective maps add a 50 px interior blob (5 x 10) above them."""
    val = np.stack([_bump(amp=a) for a in (0.60, 0.62, 0.61)])
    normal = np.stack([_bump(amp=a) for a in (0.58, 0.60, 0.59)])
    defect = normal.copy()
    defect[:, 4:9, 4:14] = 0.9
    ft = np.concatenate([normal, defect])
    return val, ft, np.r_[np.zeros(3), np.ones(3)].astype(int)


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_search_finds_the_blob(dtype):
    val, ft, y = _blob_sets()
    res = T.search_min_area_threshold(val, ft, y, min_areas=range(5, 201, 5), dtype=dtype)
    assert res.score == 1.0
    assert res.min_area == 5  # all min_areas <= 50 are perfect; ties go to the smallest
    small = res.min_areas <= 50
    assert (res.balanced_accuracy[small] == 1.0).all()
    # Bigger than the blob: nothing is found at a threshold that keeps the hills quiet.
    assert (res.balanced_accuracy[~small] == 0.5).all() and (res.tpr[~small] == 0).all()
    assert (res.tnr == 1.0).all()
    # Lower thresholds are needed before a larger region appears on the validation hills.
    assert (np.diff(res.thresholds) <= 0).all() and np.isfinite(res.thresholds).all()
    pred, seg = res.classify(ft)
    assert pred.tolist() == y.astype(bool).tolist()
    assert seg[3:, 4:9, 4:14].all()
    assert T.classify(val, res.threshold, res.min_area)[0].sum() == 0  # no validation false positive


def _reference_search(val, ft, y, areas, cand):
    """Literal definition: scan candidates downwards while no validation image is flagged."""
    out = []
    for a in areas:
        k = len(cand)
        for j in range(len(cand) - 1, -1, -1):
            if T.classify(val, cand[j], a)[0].any():
                break
            k = j
        thr = cand[k] if k < len(cand) else np.inf
        pred = T.classify(ft, thr, a)[0]
        out.append((thr, (pred[y == 1].mean() + 1 - pred[y == 0].mean()) / 2))
    return np.array(out)


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_search_matches_literal_reference(dtype):
    val = _smooth_maps(6, n=3)
    ft = _smooth_maps(7, n=6)
    y = np.array([0, 1, 0, 1, 0, 1])
    areas = np.arange(1, 60, 4)
    res = T.search_min_area_threshold(val, ft, y, min_areas=areas, dtype=dtype, n_thresholds=48)
    ref = _reference_search(val, ft, y, areas, res.candidates)
    np.testing.assert_array_equal(res.thresholds, ref[:, 0])
    np.testing.assert_allclose(res.balanced_accuracy, ref[:, 1])
    best = int(np.flatnonzero(ref[:, 1] == ref[:, 1].max())[0])
    flagged = T.classify(ft, ref[best, 0], areas[best])[0].sum() if np.isfinite(ref[best, 0]) else 0
    if 0 < flagged < len(ft):
        assert not res.relaxed and (res.min_area, res.score) == (areas[best], ref[best, 1])
    else:  # the validation-safe point flags all or none: chosen on the finetune set alone
        assert res.relaxed
        assert (res.min_area, res.threshold, res.score) == _reference_relaxed(ft, y, areas, res.candidates)
        pred = T.classify(ft, res.threshold, res.min_area)[0]
        assert 0 < pred.sum() < len(ft)
    assert res.summary()["min_area"] == res.min_area


def _reference_relaxed(ft, y, areas, cand):
    """Literal definition of the relaxed search: best balanced accuracy over non-degenerate pairs;
    per min_area the threshold is the middle candidate of the longest run of the best accuracy
    (ties: the highest run); ties between min_areas: the smallest."""
    best = None
    for a in areas:
        bals = []
        for t in cand:
            pred = T.classify(ft, t, a)[0]
            bals.append((pred[y == 1].mean() + 1 - pred[y == 0].mean()) / 2 if 0 < pred.sum() < len(ft) else -1.0)
        top = max(bals)
        if top < 0:
            continue
        runs, start = [], None
        for j, b in enumerate(bals + [None]):
            if b is not None and abs(b - top) <= 1e-12:
                start = j if start is None else start
            elif start is not None:
                runs.append((start, j - 1))
                start = None
        longest = max(e - s for s, e in runs)
        s0, e0 = [r for r in runs if r[1] - r[0] == longest][-1]
        j = (s0 + e0 + 1) // 2
        if best is None or top > best[2]:
            best = (int(a), float(cand[j]), float(top))
    return best


def test_search_infinite_threshold_when_nothing_is_safe():
    # Saturated 5x5 patches in validation: min_area <= 25 flags them even at the top candidate.
    val = np.zeros((2, 20, 20), np.float32)
    val[:, 5:10, 5:10] = 1.0
    ft = np.concatenate([val, val])
    res = T.search_min_area_threshold(val, ft, [0, 0, 1, 1], min_areas=[10, 30])
    assert np.isinf(res.thresholds[0]) and res.balanced_accuracy[0] == 0.5
    assert np.isfinite(res.thresholds[1])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ft_labels": [0, 0, 0, 0, 0, 0]},
        {"ft_labels": [0, 1, 2, 0, 1, 0]},
        {"ft_labels": [0, 1]},
        {"min_areas": [0, 5]},
        {"min_areas": [2.5]},
        {"dtype": "int16"},
        {"connectivity": 6},
        {"val_maps": np.zeros((20, 20))},
        {"val_maps": np.full((1, 20, 20), np.nan)},
    ],
)
def test_search_bad_inputs_raise(kwargs):
    val, ft, y = _blob_sets()
    args = {"val_maps": val, "ft_maps": ft, "ft_labels": y, "min_areas": [5, 10]} | kwargs
    with pytest.raises(InputError):
        T.search_min_area_threshold(**args)


# -- thresholds from a false-positive rate ---------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threshold_from_fpr_is_the_conformal_quantile(dtype):
    rng = np.random.default_rng(0)
    s = rng.permutation(200).astype(dtype)
    for target in (0.01, 0.05, 0.29, 0.5):
        k = T.conformal_rank(s.size, target)
        assert k == int(np.ceil(201 * (1 - target) - 1e-9))
        t = T.threshold_from_fpr(s, target)
        # Flags exactly the scores above the k-th smallest: n - k of them.
        assert (s >= t).sum() == s.size - k and t > np.sort(s)[k - 1]
    assert T.threshold_from_fpr(s, 0.0) > s.max()
    assert T.threshold_from_fpr(np.arange(100, dtype=dtype), 0.05) == pytest.approx(95, abs=1e-4)  # rank 96
    with pytest.raises(InputError):
        T.threshold_from_fpr(s, 1.0)


@pytest.mark.parametrize("n, target", [(10, 0.1), (19, 0.1), (21, 0.05), (60, 0.05)])
def test_threshold_from_fpr_keeps_the_expected_fpr_on_new_normals_at_most_the_target(n, target):
    # The finite-sample guarantee, by simulation: n validation normals, then a new normal of the
    # same distribution; the rate it is flagged at is 1 - k / (n + 1) <= target.
    rng = np.random.default_rng(1)
    trials = 4000
    draws = rng.standard_normal((trials, n + 1))
    flagged = np.array([d[n] >= T.threshold_from_fpr(d[:n], target) for d in draws])
    expected = 1 - T.conformal_rank(n, target) / (n + 1)
    assert expected <= target + 1e-12
    assert flagged.mean() == pytest.approx(expected, abs=4 * np.sqrt(expected * (1 - expected) / trials))
    # The old floor(target * n) rule does not keep it on (10, 0.1): it allows one false positive of 10
    # (threshold at the second largest), which flags a new normal 2 times in 11.
    if (n, target) == (10, 0.1):
        old = np.array([d[n] > np.sort(d[:n])[-2] for d in draws]).mean()
        assert old > target + 0.05


def test_normal_only_rule_says_when_n_is_too_small_for_the_target():
    s = np.arange(21, dtype=np.float64)
    op = T.normal_fpr(s, 0.01)
    c = op["conformal"]
    assert not c["guaranteed"] and c["normals_needed"] == 99 and c["rank"] == 22 and op["threshold"] > s.max()
    assert c["promised_fpr"] == pytest.approx(1 / 22)
    line = T.describe(op).splitlines()[-1]
    assert line.startswith("warning: target FPR 0.01 needs at least 99 validation normals") and "21 were given" in line
    ok = T.normal_fpr(np.arange(99, dtype=np.float64), 0.01)
    assert ok["conformal"]["guaranteed"] and "warning" not in T.describe(ok)
    assert T.normals_needed(0.05) == 19 and T.normals_needed(0.1) == 9 and T.normals_needed(0.0) is None


def test_threshold_from_fpr_maps():
    # Hills of increasing height: allowing k false positives lets the threshold drop to the (k+1)-th.
    amps = np.linspace(0.2, 0.6, 9)
    val = np.stack([_bump(amp=a) for a in amps])
    cand = T.candidate_thresholds(val)
    strict = T.threshold_from_fpr_maps(val, 20, target_fpr=0.0)
    # 9 normals, target 0.2: conformal rank ceil(10 * 0.8) = 8, so one image may be flagged.
    loose = T.threshold_from_fpr_maps(val, 20, target_fpr=0.2)
    assert loose < strict
    assert T.classify(val, strict, 20)[0].sum() == 0
    assert T.classify(val, loose, 20)[0].tolist() == [False] * 8 + [True]
    # Lowest: one candidate lower flags a second image.
    below = cand[np.searchsorted(cand, loose) - 1]
    assert T.classify(val, below, 20)[0].sum() == 2
    # A target 9 normals cannot promise (rank 10 > 9) flags none of them.
    assert T.threshold_from_fpr_maps(val, 20, target_fpr=0.05) == strict
    op = T.normal_fpr_maps(val, 20, 0.05)
    assert not op["conformal"]["guaranteed"] and op["conformal"]["normals_needed"] == 19
    # With no false positive allowed it agrees with the search's threshold for that min_area.
    ft = np.concatenate([val, val])
    res = T.search_min_area_threshold(val, ft, [0] * 9 + [1] * 9, min_areas=[20])
    assert res.thresholds[0] == strict


def test_choose_map_sigma_prefers_the_blur_that_ranks_pixels_best():
    from mvtec_keras.thresholds import choose_map_sigma

    rng = np.random.RandomState(0)
    masks = np.zeros((6, 32, 32), np.uint8)
    masks[3:, 10:20, 10:20] = 1
    noisy = rng.rand(6, 32, 32).astype(np.float32) + 0.3 * masks  # weak signal in strong pixel noise
    has = np.ones(6, bool)
    best, table = choose_map_sigma(noisy, masks, has, [0, 2, 4])
    assert best > 0 and table[best] > table[0] and set(table) == {0, 2, 4}
    # Tiny one-pixel defects, exact in the raw map: any blur only loses.
    masks1 = np.zeros((6, 32, 32), np.uint8)
    masks1[3:, 16, 16] = 1
    exact = rng.rand(6, 32, 32).astype(np.float32) * 0.5 + masks1
    best, table = choose_map_sigma(exact, masks1, has, [0, 2, 4])
    assert best == 0 and table[0] == pytest.approx(1.0)
    # No mask anywhere: no choice.
    assert choose_map_sigma(exact, np.zeros_like(masks1), has, [0, 2]) == (None, {})


# -- operating-point rules ---------------------------------------------------------
def _overlapping_scores(seed=0, n_val=400, n_ft=60):
    """Normal and anomalous scores that overlap (AUROC ~0.75), as outside bottle; many validation
    normals, so their maximum lies above nearly every finetune score."""
    rng = np.random.default_rng(seed)
    val = rng.normal(0, 1, n_val)
    y = np.r_[np.zeros(n_ft // 2), np.ones(n_ft // 2)].astype(int)
    ft = rng.normal(0, 1, n_ft) + 1.0 * y
    return val, ft, y


@pytest.mark.parametrize("rule", ["balanced", "f1"])
def test_labelled_image_rules_never_flag_all_or_none(rule):
    val, ft, y = _overlapping_scores()
    # Today's "lowest threshold flagging no validation image" flags (almost) nothing here.
    assert (ft >= T.threshold_from_fpr(val, 0.0)).mean() < 0.1
    op, search = T.choose_operating_point(rule, val_scores=val, ft_scores=ft, ft_labels=y)
    assert search is None and op["rule"] == rule and op["decision"] == "image_score" and op["min_area"] is None
    assert op["chosen_on"] == "finetune split"
    pred, segs = T.decide(op, ft)
    assert segs is None and 0 < pred.sum() < len(ft)
    assert op["threshold"] > ft.min() and op["threshold"] not in ft  # never onto a sample
    lo, hi = op["threshold_interval"]
    assert lo < op["threshold"] < hi
    assert op["tpr"] == pytest.approx(pred[y == 1].mean()) and op["tnr"] == pytest.approx(1 - pred[y == 0].mean())
    # It is the best over every threshold (brute force over the split's own scores).
    best = 0.0
    for t in np.unique(ft)[1:]:
        p = ft >= t
        tp, fp = (p & (y == 1)).sum(), (p & (y == 0)).sum()
        value = (tp / 30 + 1 - fp / 30) / 2 if rule == "balanced" else 2 * tp / (tp + fp + 30)
        best = max(best, value)
    assert op["score"] == pytest.approx(best)
    assert op["score"] > (0.5 if rule == "balanced" else 0.0)


def test_image_threshold_goes_to_the_middle_of_the_interval_of_equal_accuracy():
    # Separable split: every threshold in (0.2, 0.8] is perfect. Positive scores: the geometric middle.
    y = np.array([0, 0, 0, 1, 1, 1])
    op = T.balanced_optimal(np.array([0.05, 0.1, 0.2, 0.8, 1.6, 3.2]), y)
    assert op["threshold"] == pytest.approx(0.4) and op["threshold_interval"] == [0.2, 0.8] and op["score"] == 1.0
    # Scores that can be negative: the arithmetic middle.
    op = T.balanced_optimal(np.array([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0]), y)
    assert op["threshold"] == pytest.approx(0.0)
    # The old rule (ties: highest) put it at the weakest defect's edge; a slightly weaker defect is missed there
    # but caught at the middle.
    assert T.decide(T.balanced_optimal(np.array([0.05, 0.1, 0.2, 0.8, 1.6, 3.2]), y), np.array([0.7]))[0][0]
    # Two runs of the best accuracy: the widest on the log scale wins ((1, 10] over (0.1, 0.3]), and
    # a middle that lands on a score inside the run moves to the middle of its gap.
    s = np.array([0.1, 0.3, 0.5, 1.0, 10.0, 20.0])
    yy = np.array([0, 1, 0, 0, 1, 1])
    op = T.balanced_optimal(s, yy)
    lo, hi = op["threshold_interval"]
    assert (lo, hi) == (1.0, 10.0) and op["threshold"] == pytest.approx(np.sqrt(10.0))
    s2 = np.array([0.1, 0.2, 1.0, 2.0, 4.0, 8.0])  # run (1, 4]: middle 2.0 is a sample -> middle of (1, 2]
    y2 = np.array([0, 0, 0, 1, 0, 1])
    op = T.balanced_optimal(s2, y2)
    assert op["threshold_interval"] == [1.0, 4.0] or op["threshold"] not in s2
    assert op["threshold"] not in s2


def _auto(val, ft, y, val_maps=None, ft_maps=None, **kw):
    return T.choose_operating_point("auto", val_scores=val, val_maps=val_maps, ft_scores=ft, ft_maps=ft_maps,
                                    ft_labels=y, map_decisions=val_maps is not None, **kw)


def test_auto_keeps_the_image_score_when_it_decides_better_than_the_map_regions():
    # Normals: a 3x3 spike in the middle; defects: the whole map raised (one region, touching the border,
    # so the map-region rule never flags it). The image score (the map's mean) separates them.
    val_maps = np.zeros((6, 24, 24), np.float32)
    val_maps[:, 10:13, 10:13] = 1.0
    ft_maps = np.concatenate([val_maps[:3], np.full((3, 24, 24), 0.6, np.float32)])
    y = np.r_[np.zeros(3), np.ones(3)].astype(int)
    mean = lambda m: m.mean(axis=(1, 2))  # noqa: E731
    op, search = _auto(mean(val_maps), mean(ft_maps), y, val_maps, ft_maps, min_areas=[5, 10, 20])
    assert op["decision"] == "image_score" and op["rule"] == "balanced" and op["chosen_by"] == "auto"
    assert [c["rule"] for c in op["candidates"]] == ["balanced", "search"]
    img, seg = op["candidates"]
    assert img["score"] == 1.0 and seg["score"] < 1.0 and search is not None  # the search ran, and lost
    assert "auto: best of balanced 1.000, search" in T.describe(op)
    assert T.decide(op, mean(ft_maps))[0].tolist() == y.astype(bool).tolist()


def test_auto_keeps_the_map_regions_when_they_decide_better_and_ties_go_to_the_image_score():
    # Defects: a small bright spot; normals: smooth background noise of the same maximum. The image
    # score (max) cannot separate them; a region of >= 5 px above the spot's level can.
    rng = np.random.default_rng(0)

    def normal():
        m = rng.random((24, 24)).astype(np.float32) * 0.5
        m[rng.integers(3, 21), rng.integers(3, 21)] = rng.uniform(0.9, 1.0)  # one hot pixel: a defect's max
        return m

    def defect():
        m = normal()
        m[10:13, 10:13] = 0.95
        return m

    val_maps = np.stack([normal() for _ in range(8)])
    ft_maps = np.stack([normal() for _ in range(10)] + [defect() for _ in range(10)])
    y = np.r_[np.zeros(10), np.ones(10)].astype(int)
    mx = lambda m: m.max(axis=(1, 2))  # noqa: E731
    op, search = _auto(mx(val_maps), mx(ft_maps), y, val_maps, ft_maps, min_areas=[1, 5])
    assert op["decision"] == "segmentation" and op["rule"] == "search" and search is not None
    assert op["score"] == 1.0 and op["candidates"][0]["score"] < 1.0
    # Both perfect: the image score is kept.
    sep = np.r_[mx(ft_maps)[:10], mx(ft_maps)[10:] + 1.0]
    op, _ = _auto(mx(val_maps), sep, y, val_maps, ft_maps, min_areas=[1, 5])
    assert op["decision"] == "image_score" and [c["score"] for c in op["candidates"]] == [1.0, 1.0]


def test_f1_never_flags_everything_on_a_mostly_defective_split():
    # Uninformative scores on a 90 % defective split: flagging all has the best F1 (0.947), and is refused.
    rng = np.random.default_rng(3)
    ft, y = rng.random(100), (np.arange(100) >= 10).astype(int)
    op = T.f1_optimal(ft, y)
    assert 0 < (ft >= op["threshold"]).sum() < 100


def test_search_relaxes_when_every_validation_safe_pair_flags_nothing():
    # Validation hills as high as the defects: every safe threshold is above all finetune maps.
    val = np.stack([_bump(amp=1.0, size=32, sigma=4.0)] * 3)
    normal = np.stack([_bump(amp=a, size=32, sigma=4.0) for a in (0.3, 0.4, 0.5)])
    defect = np.stack([_bump(amp=a, size=32, sigma=4.0) for a in (0.6, 0.7, 0.8)])
    ft, y = np.concatenate([normal, defect]), np.r_[np.zeros(3), np.ones(3)].astype(int)
    op, search = T.choose_operating_point("search", val_scores=val.max(axis=(1, 2)), val_maps=val, ft_maps=ft,
                                          ft_labels=y, map_decisions=True, min_areas=[5, 10])
    assert search.relaxed and op["relaxed"] and op["rule"] == "search" and op["decision"] == "segmentation"
    assert (search.tpr == 0).all()  # every validation-safe pair flags nothing
    pred, seg = T.decide(op, None, ft)
    assert pred.tolist() == y.astype(bool).tolist() and op["score"] == 1.0
    assert "relaxed" in T.describe(op)


@pytest.mark.parametrize("rule", ["auto", "search", "balanced", "f1", "fpr"])
def test_no_anomalous_image_falls_back_to_the_normal_only_rule(rule):
    rng = np.random.default_rng(1)
    val, ft = rng.random(50), rng.random(10)
    maps = rng.random((50, 8, 8)).astype(np.float32)
    for labels in (None, np.zeros(10, int)):
        op, _ = T.choose_operating_point(rule, val_scores=val, ft_scores=ft, ft_labels=labels,
                                         map_decisions=rule == "search")  # no val_maps: image scores
        assert op["rule"] == "fpr" and op["decision"] == "image_score"
        assert op["threshold"] > val.max() > ft.min()  # never the minimum score: nothing flagged here
        if rule not in ("auto", "fpr"):
            assert op["requested_rule"] == rule and "normal-only" in op["fallback"]
            assert "asked for" in T.describe(op)
    # With maps that decide, the normal-only rule thresholds the maps at a fixed min_area.
    op, _ = T.choose_operating_point("auto", val_scores=val, val_maps=maps, map_decisions=True, fpr_min_area=3)
    assert op["decision"] == "segmentation" and op["min_area"] == 3
    assert T.decide(op, None, maps)[0].mean() <= 0.01


def test_normal_fpr_is_a_quantile_of_validation_scores():
    s = np.arange(200, dtype=np.float64)
    op = T.normal_fpr(s, 0.05)
    assert op["rule"] == "fpr" and op["target_fpr"] == 0.05 and op["chosen_on"] == "200 validation normals"
    # Conformal rank ceil(201 * 0.95) = 191: the 9 scores above the 191st smallest are flagged.
    assert (s >= op["threshold"]).sum() == 9 and op["conformal"]["rank"] == 191 and op["conformal"]["guaranteed"]


def test_chi2_bound_holds_on_gaussian_samples():
    from scipy.stats import chi2

    rng = np.random.default_rng(0)
    # One level, d = 8: the squared distance of a Gaussian sample is chi2(8).
    op = T.chi2_bound({"dofs": [8], "combine": "sum"}, 0.05)
    assert op["rule"] == "chi2" and op["decision"] == "image_score"
    assert op["threshold"] == pytest.approx(np.sqrt(chi2.ppf(0.95, 8)))
    d = np.sqrt((rng.standard_normal((20000, 8)) ** 2).sum(axis=1))
    assert (d >= op["threshold"]).mean() == pytest.approx(0.05, abs=0.006)
    # Mahalanobis: sum of three levels' distances. Exact when the levels move together ...
    dofs = [4, 16, 32]
    op = T.chi2_bound({"dofs": dofs, "combine": "sum"}, 0.05)
    u = rng.random(20000)
    together = sum(np.sqrt(chi2.ppf(u, k)) for k in dofs)
    assert (together >= op["threshold"]).mean() == pytest.approx(0.05, abs=0.006)
    # ... and under the target, yet not flagging nothing, when they are independent.
    s = sum(np.sqrt((rng.standard_normal((20000, k)) ** 2).sum(axis=1)) for k in dofs)
    assert 0 < (s >= op["threshold"]).mean() <= 0.05
    # PaDiM: maximum over 100 positions.
    op = T.chi2_bound({"dofs": [10] * 100, "combine": "max"}, 0.1)
    m = np.sqrt((rng.standard_normal((2000, 100, 10)) ** 2).sum(axis=2)).max(axis=1)
    assert (m >= op["threshold"]).mean() <= 0.1
    with pytest.raises(InputError):
        T.chi2_bound({"dofs": [], "combine": "sum"})
    with pytest.raises(InputError):
        T.choose_operating_point("chi2", val_scores=s)  # not a Gaussian method


def test_search_rule_refused_for_detectors_deciding_on_the_image_score():
    val, ft, y = _blob_sets()
    with pytest.raises(InputError, match="not a summary"):
        T.choose_operating_point("search", val_scores=np.zeros(3), val_maps=val, ft_scores=np.zeros(6),
                                 ft_maps=ft, ft_labels=y, map_decisions=False)
    op, _ = T.choose_operating_point("auto", val_scores=val.max(axis=(1, 2)), val_maps=val,
                                     ft_scores=ft.max(axis=(1, 2)), ft_maps=ft, ft_labels=y, map_decisions=False)
    assert op["rule"] == "balanced" and op["decision"] == "image_score"
    with pytest.raises(InputError, match="--rule"):
        T.choose_operating_point("nonsense", val_scores=np.zeros(3))


def test_choose_score_reduction():
    y = np.array([0, 0, 1, 1])
    best, table = T.choose_score_reduction({"max": [0.1, 0.5, 0.4, 0.6], "mean": [0.1, 0.2, 0.3, 0.4]}, y)
    assert best == "mean" and table["mean"] == 1.0 and table["max"] == 0.75
    assert T.choose_score_reduction({"max": [1, 2]}, [0, 0]) == (None, {})
