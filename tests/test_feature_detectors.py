"""Pretrained-feature detectors (Mahalanobis, SPADE, PaDiM, PatchCore) on a tiny toy backbone."""

import numpy as np
import pytest

import keras
import tensorflow as tf
from keras import layers
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from mvtec_keras.detectors import load_detector
from mvtec_keras.detectors.components import coreset, feature_maps, gaussian, nearest, sampling
from mvtec_keras.detectors.mahalanobis import MahalanobisDetector
from mvtec_keras.detectors.padim import PadimDetector
from mvtec_keras.detectors.patchcore import PatchcoreDetector
from mvtec_keras.detectors.spade import SpadeDetector
from mvtec_keras.errors import InputError

SIZE = 32
# Same strides as the EfficientNet taps (levels 1..9).
STRIDES = {1: 2, 2: 1, 3: 2, 4: 2, 5: 2, 6: 1, 7: 2, 8: 1, 9: 1}


def toy_backbone(seed=0, width=8):
    """Nine conv levels returning {"level<i>": [B, h, w, c]}, like build_feature_extractor."""
    inp = keras.Input((None, None, 3))
    x, outs = inp, {}
    for lv in range(1, 10):
        init = keras.initializers.GlorotUniform(seed=seed + lv)
        x = layers.Conv2D(width, 3, strides=STRIDES[lv], padding="same", activation="tanh", kernel_initializer=init)(x)
        outs[f"level{lv}"] = x
    return keras.Model(inp, outs)


def normal_images(n, seed, channels=3):
    """Smooth vertical gradients with a little noise: the 'good' product."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.2, 0.8, SIZE, dtype=np.float32)[None, :, None, None]
    x = np.broadcast_to(ramp, (n, SIZE, SIZE, channels)) + rng.normal(0, 0.02, (n, SIZE, SIZE, channels))
    return np.clip(x, 0, 1).astype(np.float32)


def defective(images, seed):
    """A bright square at a random place: the defect, with its mask."""
    rng = np.random.default_rng(seed)
    x = images.copy()
    masks = np.zeros(x.shape[:3], np.uint8)
    for i in range(len(x)):
        r, c = rng.integers(4, SIZE - 12, 2)
        x[i, r : r + 8, c : c + 8] = 1.0
        masks[i, r : r + 8, c : c + 8] = 1
    return x, masks


def make(cls, **kw):
    defaults = {
        MahalanobisDetector: {},
        # sigma 4 would wash out 32-px maps
        SpadeDetector: {"k": 5, "sigma": 1.0},
        PadimDetector: {"n_features": 10, "sigma": 1.0},
        PatchcoreDetector: {"coreset_ratio": 0.25, "sigma": 1.0, "levels": (3, 4)},  # 8x8 patch grid
    }[cls]
    return cls(backbone=toy_backbone(), **{**defaults, **kw})


ALL = [MahalanobisDetector, SpadeDetector, PadimDetector, PatchcoreDetector]


@pytest.fixture(scope="module")
def data():
    train = normal_images(24, 0)
    good = normal_images(6, 1)
    bad, masks = defective(normal_images(6, 2), 3)
    return train, np.concatenate([good, bad]), np.r_[np.zeros(6), np.ones(6)], masks


# --------------------------------------------------------------------------- detectors
@pytest.mark.parametrize("cls", ALL)
def test_separates_anomalies_and_roundtrips(cls, data, tmp_path):
    train, test, labels, masks = data
    det = make(cls).fit(train, batch_size=8)
    scores, maps = det.score_batch(test)
    scores = np.asarray(scores)
    assert scores.shape == (12,) and np.isfinite(scores).all()
    assert roc_auc_score(labels, scores) == 1.0
    if cls.has_maps:
        maps = np.asarray(maps)
        assert maps.shape == (12, SIZE, SIZE)  # input resolution
        # the defect square is hotter than the rest of its image
        for m, gt in zip(maps[6:], masks):
            assert m[gt == 1].mean() > m[gt == 0].mean()
    else:
        assert maps is None

    det.save(str(tmp_path / "det"))
    back = load_detector(str(tmp_path / "det"))
    assert type(back) is cls and back.get_config() == det.get_config()
    s2, m2 = back.score_batch(test)
    np.testing.assert_allclose(np.asarray(s2), scores, rtol=1e-6)
    if cls.has_maps:
        np.testing.assert_allclose(np.asarray(m2), maps, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [MahalanobisDetector, PadimDetector])
def test_streaming_equals_one_batch(cls, data, monkeypatch):
    train = data[0]
    one = make(cls).fit(train, batch_size=len(train))
    monkeypatch.setattr(gaussian, "STATS_CHUNK", 1)  # fold every batch into the running sums
    many = make(cls).fit(train, batch_size=5)  # uneven last batch on purpose
    learned = [k for k in vars(one) if k.endswith("_") and not k.startswith("_")]
    assert learned
    for k in learned:
        a, b = getattr(one, k), getattr(many, k)
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            # Entries of an inverse covariance near 0 carry the rounding of the large ones:
            # compare relative to the array's scale too.
            x, y = np.asarray(x), np.asarray(y)
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=max(1e-6, 1e-5 * float(np.abs(y).max())), err_msg=k)


def test_grayscale_tiled_and_dataset_input(data):
    train, test = data[0], data[1]
    grey = PadimDetector(backbone=toy_backbone(), n_features=10).fit(train[..., :1], batch_size=8)
    rgb = PadimDetector(backbone=toy_backbone(), n_features=10).fit(np.repeat(train[..., :1], 3, -1), batch_size=8)
    np.testing.assert_allclose(grey.mean_, rgb.mean_, rtol=1e-6)
    ds = tf.data.Dataset.from_tensor_slices({"image": train[..., :1], "label": np.zeros(len(train), np.int32)}).batch(7)
    from_ds = PadimDetector(backbone=toy_backbone(), n_features=10).fit(ds)
    np.testing.assert_allclose(from_ds.precision_, grey.precision_, rtol=1e-4, atol=1e-4)
    res = from_ds.score(test[..., :1], batch_size=5)
    assert res.scores.shape == (12,) and res.maps.shape == (12, SIZE, SIZE)


def test_mahalanobis_levels_and_npca(data):
    train, test, labels, _ = data
    det = make(MahalanobisDetector, levels=(2, 5, 9)).fit(train)
    per = np.asarray(det.score_levels(test))
    assert per.shape == (12, 3)
    np.testing.assert_allclose(np.asarray(det.score_batch(test)[0]), per.sum(1), rtol=1e-5)
    # NPCA: fewer components, distance computed in the low-variance subspace only
    npca = make(MahalanobisDetector, levels=(9,), npca_variance=0.9).fit(train)
    k = int(npca.n_components_[0])
    assert 0 < k < 8
    feats = np.asarray(feature_maps.pooled(npca.extractor(train)["level9"]), np.float64)
    cov, _ = gaussian.ledoit_wolf(_stats(feats, fourth=True))
    vals, vecs = np.linalg.eigh(cov)
    low = vecs[:, :k]
    q = np.asarray(feature_maps.pooled(npca.extractor(test)["level9"]), np.float64)
    expect = np.sqrt(np.sum(((q - feats.mean(0)) @ low) ** 2 / vals[:k], axis=1))
    np.testing.assert_allclose(np.asarray(npca.score_levels(test))[:, 0], expect, rtol=1e-3)


def test_mahalanobis_distance_by_hand(data):
    train, test = data[0], data[1]
    det = make(MahalanobisDetector, levels=(9,)).fit(train)
    f = np.asarray(feature_maps.pooled(det.extractor(train)["level9"]), np.float64)
    q = np.asarray(feature_maps.pooled(det.extractor(test)["level9"]), np.float64)
    lw = LedoitWolf().fit(f)
    expect = np.sqrt(np.einsum("ij,jk,ik->i", q - lw.location_, lw.precision_, q - lw.location_))
    np.testing.assert_allclose(np.asarray(det.score_batch(test)[0]), expect, rtol=1e-3)


def test_spade_matches_brute_force(data):
    train, test = data[0], data[1]
    det = make(SpadeDetector, k=3, map_levels=(3,), sigma=0).fit(train)
    scores, maps = det.score_batch(test)
    feats = det.extractor(train)
    g_tr, g_te = np.asarray(feature_maps.pooled(feats["level9"])), np.asarray(feature_maps.pooled(det.extractor(test)["level9"]))
    d = np.linalg.norm(g_te[:, None] - g_tr[None], axis=-1)
    nn = np.argsort(d, axis=1)[:, :3]
    np.testing.assert_allclose(np.asarray(scores), np.take_along_axis(d, nn, 1).mean(1), rtol=1e-3)
    # pixel level: brute force over all positions of the 3 nearest images
    f_tr, f_te = np.asarray(feats["level3"]), np.asarray(det.extractor(test)["level3"])
    i = 7
    gal = f_tr[nn[i]].reshape(-1, f_tr.shape[-1])
    dmin = np.linalg.norm(f_te[i].reshape(-1, 1, f_te.shape[-1]) - gal[None], axis=-1).min(1).reshape(f_te.shape[1:3])
    up = tf.image.resize(dmin[None, ..., None], (SIZE, SIZE), "bilinear")[0, ..., 0].numpy()
    np.testing.assert_allclose(np.asarray(maps)[i], up, rtol=1e-3, atol=1e-4)
    # k is clipped to the bank size
    big = make(SpadeDetector, k=500).fit(train[:4])
    assert big.memory_bank_size_ == 4 and np.isfinite(np.asarray(big.score_batch(test)[0])).all()


def test_spade_bank_is_bounded(data):
    det = make(SpadeDetector, max_bank_images=10, seed=5).fit(data[0], batch_size=4)
    assert det.memory_bank_size_ == 10 and det.n_train_ == 24
    assert det.map_banks_[0].shape[0] == 10
    # the bank is the reservoir sample that replaying the slots on indices gives (bench/cifar10.py relies on it)
    kept = []
    for i, slot in enumerate(sampling.ReservoirSlots(10, seed=5).next(24)):  # one call: batching does not matter
        if slot == len(kept):
            kept.append(i)
        elif slot >= 0:
            kept[slot] = i
    assert len(set(kept)) == 10 and max(kept) >= 10  # a sample, not just the first ten
    expect = np.asarray(feature_maps.pooled(det.extractor(data[0][np.asarray(kept)])["level9"]))
    np.testing.assert_allclose(det.image_bank_, expect, rtol=1e-4, atol=1e-5)


def test_padim_matches_numpy_reference(data):
    train, test = data[0], data[1]
    det = make(PadimDetector, levels=(3, 4), sigma=0).fit(train)
    f = det.extractor(train)
    a, b = np.asarray(f["level3"]), np.asarray(f["level4"])
    emb = np.concatenate([a, b.repeat(2, 1).repeat(2, 2)], -1)[..., det.channel_idx_]  # nearest x2
    n, h, w, d = emb.shape
    e = emb.reshape(n, h * w, d).astype(np.float64)
    mean = e.mean(0)
    cov = np.stack([np.cov(e[:, p], rowvar=False) for p in range(h * w)]) + 0.01 * np.eye(d)
    np.testing.assert_allclose(det.mean_, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(det.precision_, np.linalg.inv(cov), rtol=1e-3, atol=1e-3)
    ft = det.extractor(test)
    et = np.concatenate([np.asarray(ft["level3"]), np.asarray(ft["level4"]).repeat(2, 1).repeat(2, 2)], -1)
    et = et[..., det.channel_idx_].reshape(len(test), h * w, d) - mean
    ref = np.sqrt(np.einsum("bpi,pij,bpj->bp", et, np.linalg.inv(cov), et)).reshape(-1, h, w)
    np.testing.assert_allclose(np.asarray(det.distance_map(test)), ref, rtol=1e-3, atol=1e-3)
    scores, maps = det.score_batch(test)
    np.testing.assert_allclose(np.asarray(scores), np.asarray(maps).max(axis=(1, 2)), rtol=1e-6)


def test_padim_has_no_python_loop_over_positions(data, monkeypatch):
    train = data[0]
    calls = []
    from mvtec_keras.detectors import padim

    real_inv = padim.batched_inverse
    monkeypatch.setattr(padim, "batched_inverse", lambda a: calls.append(np.shape(a)) or real_inv(a))
    make(PadimDetector).fit(train)
    assert calls == [(8 * 8, 10, 10)]  # one batched inverse over all positions

    # The scoring graph has the same ops whatever the number of positions.
    def n_ops(size):
        d = make(PadimDetector).fit(normal_images(4, 0)[:, :size, :size])
        fn = tf.function(d.distance_map)
        graph = fn.get_concrete_function(tf.TensorSpec((2, size, size, 3), tf.float32)).graph
        return len(graph.get_operations())

    assert n_ops(16) == n_ops(32)  # 4x more positions, same graph


def test_patchcore_bank_and_reweighting(data):
    train, test = data[0], data[1]
    det = make(PatchcoreDetector, coreset_ratio=0.1, sigma=0).fit(train)
    assert det.n_train_patches_ == len(train) * 8 * 8  # level 3 (stride 4) sets the resolution
    assert det.memory_bank_size_ == int(np.ceil(0.1 * det.n_train_patches_))
    capped = make(PatchcoreDetector, coreset_ratio=0.5, max_bank_size=7).fit(train)
    assert capped.memory_bank_size_ == 7

    # image score by hand: nearest-neighbour distances and the softmax reweighting
    f = np.asarray(det.patch_features(test), np.float64)
    bank = det.memory_bank_.astype(np.float64)
    q = f.reshape(len(test), -1, f.shape[-1])
    d = np.linalg.norm(q[:, :, None] - bank[None, None], axis=-1)  # [B, P, M]
    nn_d, nn_i = d.min(-1), d.argmin(-1)
    expect = []
    for b in range(len(test)):
        j = nn_d[b].argmax()
        star = bank[nn_i[b, j]]
        neigh = np.argsort(np.linalg.norm(bank - star, axis=1))[:9]
        dist = np.linalg.norm(bank[neigh] - q[b, j], axis=1)
        soft = np.exp(dist - dist.max()) / np.exp(dist - dist.max()).sum()
        expect.append((1 - soft[0]) * nn_d[b, j])
    scores, maps = det.score_batch(test)
    np.testing.assert_allclose(np.asarray(scores), expect, rtol=1e-3)  # matmul-form distances in float32
    h, w = det.feature_shape_
    up = tf.image.resize(nn_d.reshape(-1, h, w, 1), (SIZE, SIZE), "bilinear")[..., 0].numpy()
    np.testing.assert_allclose(np.asarray(maps), up, rtol=1e-4, atol=1e-4)


def test_patchcore_embed_dim_adaptive_pooling():
    from mvtec_keras.detectors.patchcore import _adaptive_pool_matrix

    x = np.arange(5, dtype=np.float32)
    # torch-style bins of 5 -> 3: [0,2), [1,4), [3,5)
    np.testing.assert_allclose(x @ _adaptive_pool_matrix(5, 3), [0.5, 2.0, 3.5])
    det = PatchcoreDetector(backbone=toy_backbone(), embed_dim=4, coreset_ratio=0.5).fit(normal_images(4, 0))
    assert det.memory_bank_.shape[1] == 4


def test_bad_input_raises_input_error(data):
    train = data[0]
    with pytest.raises(InputError):
        make(PatchcoreDetector, coreset_ratio=0).fit(train)
    with pytest.raises(InputError):
        make(MahalanobisDetector).fit(train[:1])
    det = make(PadimDetector).fit(train)
    with pytest.raises(InputError):
        det.score_batch(normal_images(2, 0)[:, :16, :16])  # not the training size
    with pytest.raises(InputError):
        det.score_batch(np.zeros((2, SIZE, SIZE, 2), np.float32))  # 2 channels
    with pytest.raises(InputError):
        load_detector("/nonexistent/folder")


# --------------------------------------------------------------------------- shared pieces
def _stats(x, batch=None, fourth=False):
    st = gaussian.GaussianStats(fourth=fourth, chunk=1)  # every batch folded on arrival
    for i in range(0, len(x), batch or len(x)):
        st.update(x[i : i + (batch or len(x))])
    return st


@pytest.mark.parametrize("n,p", [(40, 5), (15, 30), (200, 1)])
def test_ledoit_wolf_matches_sklearn(n, p):
    rng = np.random.default_rng(n + p)
    x = rng.normal(size=(n, p)) @ rng.normal(size=(p, p)) + 3.0  # correlated and off-centre
    cov, shrink = gaussian.ledoit_wolf(_stats(x, batch=7, fourth=True))
    ref = LedoitWolf().fit(x)
    assert shrink == pytest.approx(ref.shrinkage_, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(cov, ref.covariance_, rtol=1e-9, atol=1e-12)


def test_gaussian_stats_streaming_per_position():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 6, 4)) * [1, 10, 100, 0.1] + 50.0
    one, many = _stats(x), _stats(x, batch=4)
    ref_cov = np.stack([np.cov(x[:, p], rowvar=False) for p in range(6)])
    fast = gaussian.GaussianStats(chunk=5, product_dtype="float32")
    for i in range(0, 23, 4):
        fast.update(x[i : i + 4])
    np.testing.assert_allclose(fast.covariance(), ref_cov, rtol=1e-4, atol=1e-6 * np.abs(ref_cov).max())
    for st in (one, many):
        assert st.n == 23
        np.testing.assert_allclose(st.mean, x.mean(0), rtol=1e-12)
        np.testing.assert_allclose(st.covariance(), ref_cov, rtol=1e-10)


def test_batched_inverse():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 5, 9))
    spd = a @ a.transpose(0, 2, 1) + 0.1 * np.eye(5)
    np.testing.assert_allclose(gaussian.batched_inverse(spd), np.linalg.inv(spd), rtol=1e-9, atol=1e-9)


def test_knn_matches_brute_force():
    rng = np.random.default_rng(0)
    q, bank = rng.normal(size=(13, 6)).astype(np.float32), rng.normal(size=(101, 6)).astype(np.float32)
    full = np.linalg.norm(q[:, None] - bank[None], axis=-1)
    for k in (1, 4):
        d, i = nearest.knn(q, bank, k, max_elements=13 * 10)  # forces 11 chunks
        np.testing.assert_array_equal(np.asarray(i), np.argsort(full, 1)[:, :k])
        np.testing.assert_allclose(np.asarray(d), np.sort(full, 1)[:, :k], rtol=1e-4, atol=1e-5)


def test_upsample_blur_is_bilinear_upsampling_then_the_residual_blur():
    """The feature detectors blur with residuals.gaussian_blur (scipy's reflect, tested in test_residuals)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    maps = rng.random((2, 10, 9)).astype(np.float32)
    up = np.asarray(feature_maps.upsample_blur(maps, (40, 36), 0))
    assert up.shape == (2, 40, 36)
    np.testing.assert_allclose(up, tf.image.resize(maps[..., None], (40, 36), "bilinear").numpy()[..., 0], atol=1e-6)
    ours = np.asarray(feature_maps.upsample_blur(maps, (40, 36), 4.0))
    ref = np.stack([gaussian_filter(m.astype(np.float64), 4.0, mode="reflect", truncate=4.0) for m in up])
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def _naive_farthest(x, n, start):
    d = np.full(len(x), np.inf)
    out = [start]
    for _ in range(n - 1):
        d = np.minimum(d, ((x - x[out[-1]]) ** 2).sum(1))
        out.append(int(np.argmax(d)))
    return out


def test_coreset_hand_made_sequence():
    # points on a line, from 0: farthest is 10, then 5 (5 away), then 2.4 (2.4 away; 8 is only 2 away), then 8
    x = np.array([[0.0], [10.0], [5.0], [2.4], [8.0], [9.0], [1.0]], np.float32)
    for active in (7, 2, 1):
        assert list(coreset.greedy_coreset(x, 5, proj_dim=None, start=0, active_size=active)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("active", [16, 64, 10_000])
def test_coreset_equals_naive_farthest_point(active):
    rng = np.random.default_rng(3)
    # clustered cloud: the active-set rounds must not change the sequence
    x = (rng.normal(size=(6, 1, 5)) * 4 + rng.normal(size=(6, 80, 5))).reshape(-1, 5)
    got = coreset.greedy_coreset(x, 60, proj_dim=None, start=11, active_size=active)
    assert list(got) == _naive_farthest(x.astype(np.float64), 60, 11)
    proj = coreset.greedy_coreset(rng.normal(size=(300, 40)), 30, proj_dim=8, seed=1)
    assert len(set(proj.tolist())) == 30


# --------------------------------------------------------------------------- bounded memory (issue 12)
def test_padim_small_folds_and_inverse_blocks_equal_one_shot(data, monkeypatch):
    """Tiny fold buffers and inverse blocks (the bounded-memory path) give the one-shot fit."""
    from mvtec_keras.detectors import padim

    train = data[0]
    one = make(PadimDetector).fit(train, batch_size=len(train))
    monkeypatch.setattr(gaussian, "STATS_CHUNK_BYTES", 1)  # every batch folds, one position per block
    monkeypatch.setattr(padim, "INVERSE_BLOCK", 5)  # 64 positions in 13 uneven blocks
    small = make(PadimDetector).fit(train, batch_size=5)
    np.testing.assert_allclose(small.mean_, one.mean_, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(small.precision_, one.precision_, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(small.score_batch(data[1])[0]), np.asarray(one.score_batch(data[1])[0]),
                               rtol=1e-4)


@pytest.mark.parametrize("fourth", [False, True])
def test_gaussian_stats_merge_is_exact(fourth):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (50, 4, 6))
    whole = _stats(x, fourth=fourth)
    a, b = _stats(x[:17], fourth=fourth), _stats(x[17:] + 0.0, fourth=fourth)
    merged = a.merge(b)
    assert merged.n == 50
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-10)
    np.testing.assert_allclose(merged.covariance(), whole.covariance(), rtol=1e-9, atol=1e-12)
    if fourth:
        np.testing.assert_allclose(merged.sum_fourth(), whole.sum_fourth(), rtol=1e-9)
    empty = gaussian.GaussianStats(fourth=fourth).merge(_stats(x, fourth=fourth))
    np.testing.assert_allclose(empty.covariance(), whole.covariance(), rtol=1e-12)


def test_patch_reservoir_keeps_everything_within_capacity_then_samples():
    from mvtec_keras.detectors.patchcore import PatchReservoir

    rows = np.arange(40, dtype=np.float32)[:, None]
    r = PatchReservoir(100)
    for i in range(0, 40, 7):
        r.add(rows[i : i + 7])
    np.testing.assert_array_equal(r.rows(), rows)  # within capacity: all rows, in order
    # Beyond capacity: equal to the textbook one-row-at-a-time Algorithm R with the same draws.
    r, cap = PatchReservoir(10, seed=3), 10
    for i in range(0, 40, 7):
        r.add(rows[i : i + 7])
    rng, ref = np.random.default_rng(3), list(rows[:cap, 0])
    for lo in range(0, 40, 7):
        t0 = max(lo, cap)
        if t0 >= min(lo + 7, 40):
            continue
        t = np.arange(t0, min(lo + 7, 40))
        for tt, j in zip(t, rng.integers(0, t + 1)):
            if j < cap:
                ref[j] = float(tt)
    assert r.seen == 40 and len(r.rows()) == cap
    np.testing.assert_array_equal(r.rows()[:, 0], ref)
    # the draws depend on the stream's length only, not on its batches
    for sizes in ((40,), (1,) * 40, (3, 17, 20), (11, 29)):
        other, lo = PatchReservoir(10, seed=3), 0
        for n in sizes:
            other.add(rows[lo : lo + n])
            lo += n
        np.testing.assert_array_equal(other.rows(), r.rows())
    # roughly uniform: every row has a 10/40 chance; over many seeds each is kept ~25 % of the time
    kept = np.zeros(40)
    for seed in range(300):
        r = PatchReservoir(10, seed=seed)
        for i in range(0, 40, 7):
            r.add(rows[i : i + 7])
        kept[r.rows()[:, 0].astype(int)] += 1
    assert 0.15 < kept.min() / 300 and kept.max() / 300 < 0.35


def test_patchcore_memory_budget(data):
    train = data[0]
    base = make(PatchcoreDetector, coreset_ratio=0.25).fit(train)
    roomy = make(PatchcoreDetector, coreset_ratio=0.25, memory_budget_mb=64).fit(train)
    np.testing.assert_array_equal(roomy.memory_bank_, base.memory_bank_)  # fits the budget: same bank
    c = base.memory_bank_.shape[1]
    work = min(base.proj_dim, c)  # the budget covers each kept patch and its projection
    budget = (200 * 4 * (c + work) + 1) / 2**20  # room for exactly 200 of the 24 * 64 = 1536 patches
    tight = make(PatchcoreDetector, coreset_ratio=0.25, memory_budget_mb=budget).fit(train, batch_size=5)
    assert tight.n_train_patches_ == 1536 and tight.n_sampled_patches_ == 200
    assert tight.memory_bank_size_ == 50  # the ratio applies to the sample
    # the sample is made of real training patches
    all_patches = np.asarray(base.patch_features(train)).reshape(-1, c)
    d = np.abs(tight.memory_bank_[:, None, :] - all_patches[None]).max(-1).min(-1)
    assert d.max() < 1e-5
    with pytest.raises(InputError, match="memory_budget_mb"):
        make(PatchcoreDetector, memory_budget_mb=0).fit(train)


@pytest.mark.parametrize("cls", ALL)
def test_fit_shows_progress_bar(cls, data, capsys):
    make(cls).fit(data[0], batch_size=8, progress=True)
    err = capsys.readouterr().err
    assert "fitting:" in err and "/3 " in err  # a bar with the batch total (updates are rate-limited)


def test_iter_score_streams_what_score_returns(data):
    det = make(PadimDetector).fit(data[0])
    res = det.score(data[1], batch_size=5)
    parts = list(det.iter_score(data[1], batch_size=5))
    assert [len(s) for _, s, _ in parts] == [5, 5, 2]
    np.testing.assert_allclose(np.concatenate([s for _, s, _ in parts]), res.scores, rtol=1e-6)
    np.testing.assert_allclose(np.concatenate([m for _, _, m in parts]), res.maps, rtol=1e-6)
    assert det.score(data[1], batch_size=5, keep_maps=False).maps is None


def _pairwise(a, b):
    """float64 Euclidean distances [len(a), len(b)] from direct differences."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def test_min_distances_blocks_match_brute_force():
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(37, 5)).astype(np.float32), rng.normal(size=(101, 5)).astype(np.float32)
    expect = _pairwise(q, g).min(1)
    aug = nearest.augment_bank(g)
    for max_elements in (37, 37 * 10, 1 << 21):  # one gallery row per block, ragged blocks, one block
        got = np.asarray(nearest.min_distances(q, aug, max_elements=max_elements))
        np.testing.assert_allclose(got, expect, rtol=1e-5)


def test_spade_blocked_search_matches_brute_force(data, monkeypatch):
    """Scores and maps (three levels, several test images) against full pairwise distances, then
    top-k / min, and against the search as it was (``knn`` per image over the whole gallery).

    Tolerances: the search expands |q|^2 + |b|^2 - 2 q.b in float32 (as it always did), the
    reference takes float64 differences, so the last float32 digits differ: rtol 1e-4, plus
    atol 1e-5 because the expansion's error in a distance d grows like eps |q|^2 / d (2e-6 at
    the smallest distances here, 0.01). Against the old search, same expansion: rtol 1e-5."""
    monkeypatch.setattr(nearest, "MIN_BLOCK_ELEMENTS", 1000)  # many blocks, the last one ragged
    train, test = data[0], data[1][:5]
    k, levels = 4, (1, 3, 4)
    det = make(SpadeDetector, k=k, map_levels=levels, sigma=0).fit(train, batch_size=8)
    scores, maps = det.score_batch(test)
    f_tr, f_te = det.extractor(train), det.extractor(test)
    d = _pairwise(np.asarray(f_te["level9"]).mean((1, 2)), np.asarray(f_tr["level9"]).mean((1, 2)))
    nn = np.argsort(d, axis=1)[:, :k]
    np.testing.assert_allclose(np.asarray(scores), np.take_along_axis(d, nn, 1).mean(1), rtol=1e-4)
    ups = []
    for lv in levels:
        a_tr, a_te = np.asarray(f_tr[f"level{lv}"]), np.asarray(f_te[f"level{lv}"])
        n, h, w, c = a_tr.shape
        full = _pairwise(a_te.reshape(-1, c), a_tr.reshape(-1, c)).reshape(len(test), h * w, n, h * w)
        lvmap = np.stack([full[i][:, nn[i]].min(axis=(1, 2)) for i in range(len(test))]).reshape(-1, h, w, 1)
        ups.append(tf.image.resize(lvmap, (SIZE, SIZE), "bilinear")[..., 0].numpy())
    np.testing.assert_allclose(np.asarray(maps), np.mean(ups, axis=0), rtol=1e-4, atol=1e-5)
    # the search as it was before the blocked min: one knn (k = 1) per image and level
    old = []
    for lv, bank in zip(levels, det.map_banks_):
        q = np.asarray(f_te[f"level{lv}"])
        b, h, w, c = q.shape
        per = [np.asarray(nearest.knn(q[i].reshape(-1, c), bank[nn[i]].reshape(-1, c), 1)[0])[:, 0] for i in range(b)]
        old.append(tf.image.resize(np.stack(per).reshape(b, h, w, 1), (SIZE, SIZE), "bilinear")[..., 0].numpy())
    # float32 over two code paths (oneDNN picks kernels per CPU): relative on the map's scale, not per pixel
    np.testing.assert_allclose(np.asarray(maps), np.mean(old, axis=0), rtol=1e-4, atol=1e-4 * float(np.max(old)))


@pytest.mark.parametrize("cls", [MahalanobisDetector, PadimDetector])
def test_fit_from_statistics_of_parts_equals_one_fit(cls, data):
    """Leave-one-class-out benchmarks sum each part once and combine: same model as one fit on the union,
    and scoring from features the caller already extracted gives the detector's own scores."""
    train, test = data[0], data[1]
    whole = make(cls).fit(train)
    parts = make(cls)
    levels = parts._needed_levels()
    stats = []
    for chunk in (train[:5], train[5:12], train[12:]):
        st = parts.new_statistics()
        feats = parts._features(chunk, levels)
        parts.accumulate(st, parts.pooled_features(feats) if cls is MahalanobisDetector else parts.concat_levels(feats))
        stats.append(st)
    first = [s["gaussian"].n if isinstance(s, dict) else s[0].n for s in stats]
    parts.fit_statistics(parts.merge_statistics(stats))
    # the parts are left as they were, so another combination can use them
    assert [s["gaussian"].n if isinstance(s, dict) else s[0].n for s in stats] == first
    assert parts.n_train_ == whole.n_train_ == len(train)
    expect = whole.score(test).scores
    feats = parts._features(test, levels)
    if cls is MahalanobisDetector:
        got = np.asarray(parts.score_pooled(parts.pooled_features(feats))).sum(axis=1)
    else:
        got, maps = parts.score_concat(parts.concat_levels(feats), test.shape[1:3])
        np.testing.assert_allclose(np.asarray(maps), whole.score(test).maps, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got), expect, rtol=1e-4)
    # a part-only model differs: the combination really is of all the parts
    alone = make(cls).fit_statistics(make(cls).merge_statistics(stats[:1]))
    assert not np.allclose(alone.score(test).scores, expect, rtol=1e-3)


@pytest.mark.parametrize("n_pos,d", [(11, 5), (7, 4)])  # an odd and an even number of precision floats
def test_padim_precisions_written_over_the_sums_equal_a_separate_array(n_pos, d, monkeypatch):
    from mvtec_keras.detectors import padim

    monkeypatch.setattr(padim, "INVERSE_BLOCK", 3)  # several blocks: each written behind the reading position
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, n_pos, d)) + rng.normal(size=(1, n_pos, d))
    kept, spent = gaussian.GaussianStats(), gaussian.GaussianStats()
    kept.update(x)
    spent.update(x)
    expect = padim.precisions(kept, 0.01)
    got = padim.precisions(spent, 0.01, consume=True)
    np.testing.assert_array_equal(got, expect)
    assert got.dtype == np.float32 and got.shape == (n_pos, d, d)
    np.testing.assert_allclose(kept.covariance(), np.cov(x.reshape(40, -1).T).reshape(
        n_pos, d, n_pos, d)[np.arange(n_pos), :, np.arange(n_pos), :], rtol=1e-9)  # the kept sums are intact
    with pytest.raises(RuntimeError, match="consumed"):
        spent.covariance()
