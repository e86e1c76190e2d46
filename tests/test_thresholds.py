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
    monkeypatch.setattr(T, "_MAX_VOXELS", 3 * 24 * 24)
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
    assert (res.min_area, res.score) == (areas[best], ref[best, 1])
    assert res.summary()["min_area"] == res.min_area


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
def test_threshold_from_fpr_is_lowest_with_rate_at_most_target(dtype):
    rng = np.random.default_rng(0)
    s = (rng.integers(0, 30, 200) / 30).astype(dtype)  # many ties
    for target in (0.0, 0.01, 0.05, 0.29, 0.5):
        t = T.threshold_from_fpr(s, target)
        assert np.mean(s >= t) <= target
        # The next value down (the largest score below t) would exceed the target.
        assert np.mean(s >= s[s < t].max()) > target
    assert T.threshold_from_fpr(s, 0.0) > s.max()
    assert T.threshold_from_fpr(np.arange(100, dtype=dtype), 0.05) == pytest.approx(94, abs=1e-4)
    with pytest.raises(InputError):
        T.threshold_from_fpr(s, 1.0)


def test_threshold_from_fpr_maps():
    # Hills of increasing height: allowing k false positives lets the threshold drop to the (k+1)-th.
    val = np.stack([_bump(amp=a) for a in (0.3, 0.4, 0.5, 0.6)])
    cand = T.candidate_thresholds(val)
    strict = T.threshold_from_fpr_maps(val, 20, target_fpr=0.0)
    loose = T.threshold_from_fpr_maps(val, 20, target_fpr=0.25)
    assert loose < strict
    assert T.classify(val, strict, 20)[0].sum() == 0
    assert T.classify(val, loose, 20)[0].tolist() == [False, False, False, True]
    # Lowest: one candidate lower flags a second image.
    below = cand[np.searchsorted(cand, loose) - 1]
    assert T.classify(val, below, 20)[0].sum() == 2
    # With no false positive allowed it agrees with the search's threshold for that min_area.
    ft = np.concatenate([val, val])
    res = T.search_min_area_threshold(val, ft, [0] * 4 + [1] * 4, min_areas=[20])
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
