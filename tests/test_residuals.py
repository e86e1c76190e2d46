import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from scipy import ndimage
from skimage.metrics import structural_similarity

from mvtec_keras import residuals as R
from mvtec_keras.errors import InputError


def smooth_pair(shape, seed=0, noise=0.08, blur=2.0):
    """Smooth random images and a noisy copy, float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    sig = (0, blur, blur) + (0,) * (len(shape) - 3)
    a = ndimage.gaussian_filter(rng.random(shape), sig)
    a = (a - a.min()) / (a.max() - a.min())
    b = np.clip(a + noise * rng.standard_normal(shape), 0, 1)
    return a.astype(np.float32), b.astype(np.float32)


def skimage_ssim(a, b):
    """skimage reference for one image [H, W, C]: (mean SSIM, map averaged over channels)."""
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, full=True)
    if a.shape[-1] == 1:
        v, s = structural_similarity(a[..., 0], b[..., 0], **kw)
        return v, s
    v, s = structural_similarity(a, b, channel_axis=-1, **kw)
    return v, s.mean(axis=-1)


# -- filters -----------------------------------------------------------------


def test_gaussian_kernel_matches_scipy_taps():
    k = R.gaussian_kernel(11, 1.5)
    impulse = np.zeros(11)
    impulse[5] = 1.0
    ref = ndimage.gaussian_filter1d(impulse, 1.5, truncate=3.5, mode="constant")  # radius 5
    np.testing.assert_allclose(k, ref, atol=1e-7)
    assert k.dtype == np.float32 and abs(k.sum() - 1) < 1e-6
    for size, sigma in [(10, 1.5), (0, 1.0), (5, 0.0)]:
        with pytest.raises(InputError):
            R.gaussian_kernel(size, sigma)


@pytest.mark.parametrize("matrix_max", [0, R.MATRIX_FILTER_MAX], ids=["convolutions", "matmuls"])
@pytest.mark.parametrize("shape,sigma", [((3, 40, 33), 4.0), ((2, 12, 9), 4.0), ((2, 20, 20), 1.3)])
def test_blur_matches_scipy_reflect(shape, sigma, matrix_max, monkeypatch):
    # (2, 12, 9) with sigma 4 has a 16 px radius: the extension reflects more than once.
    monkeypatch.setattr(R, "MATRIX_FILTER_MAX", matrix_max)  # both implementations of the separable filter
    m = np.random.default_rng(1).random(shape).astype(np.float32)
    out = np.asarray(R.gaussian_blur(m, sigma))
    ref = ndimage.gaussian_filter(m.astype(np.float64), (0, sigma, sigma), mode="reflect", truncate=4.0)
    assert out.shape == m.shape
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_blur_preserves_constant_maps_per_image():
    m = np.stack([np.full((10, 14), 0.3), np.full((10, 14), 2.5)]).astype(np.float32)
    np.testing.assert_allclose(np.asarray(R.gaussian_blur(m, 4.0)), m, atol=1e-5)
    with pytest.raises(InputError):
        R.gaussian_blur(m[..., None], 4.0)


# -- SSIM parity -------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_map_matches_skimage(channels):
    a, b = smooth_pair((2, 48, 40, channels), seed=channels)
    m = np.asarray(R.ssim_map(a, b))
    assert m.shape == (2, 48, 40)
    means = np.asarray(R.ssim(a, b))
    for i in range(2):
        v, ref = skimage_ssim(a[i], b[i])
        assert np.abs(m[i] - ref)[5:-5, 5:-5].max() < 1e-3
        # Same reflect border as skimage, so the edges agree as well.
        assert np.abs(m[i] - ref).max() < 1e-3
        assert abs(means[i] - v) < 1e-4
    assert 0.05 < means.min() < 0.9  # a non-trivial case


def test_ssim_mean_matches_tf_image_ssim():
    a, b = smooth_pair((3, 32, 32, 3), seed=5)
    np.testing.assert_allclose(np.asarray(R.ssim_metric(a, b)), tf.image.ssim(a, b, 1.0).numpy(), atol=1e-4)


def test_rgb_ssim_is_channel_mean():
    a, b = smooth_pair((1, 24, 24, 3), seed=7)
    per_channel = [np.asarray(R.ssim_map(a[..., c : c + 1], b[..., c : c + 1])) for c in range(3)]
    np.testing.assert_allclose(np.asarray(R.ssim_map(a, b)), np.mean(per_channel, axis=0),
                               rtol=1e-4, atol=1e-6)  # float32 over two code paths (oneDNN kernels differ per CPU)


# -- MS-SSIM -----------------------------------------------------------------
# Both sides compute the same float32 formula (valid-region means per scale,
# 2x2 average pooling); only the order of summation differs (separable vs 2-D
# convolution). Variance = E[x^2] - mu^2 loses ~1e-7 to cancellation and the
# division by (var + C2 ~ 1e-3) magnifies that; measured gap ~2e-5, so 1e-4.


def test_ms_ssim_at_256_matches_tf():
    a, b = smooth_pair((2, 256, 256, 3), seed=3, noise=0.05, blur=3.0)
    ours = np.asarray(R.ms_ssim(a, b))
    ref = tf.image.ssim_multiscale(a, b, 1.0, power_factors=R.MS_SSIM_WEIGHTS).numpy()
    assert 0.3 < ref.min() < 0.99
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_ms_ssim_small_images_renormalise_weights():
    # Odd sizes round up when halved: 161 -> 81 -> 41 -> 21 -> 11 still holds a window.
    assert [R.ms_ssim_scales(s, s) for s in (256, 161, 160, 64, 32, 16, 8)] == [5, 5, 4, 3, 2, 1, 1]
    a, b = smooth_pair((2, 64, 64, 1), seed=4, noise=0.05)
    w = np.asarray(R.MS_SSIM_WEIGHTS[:3])
    ref = tf.image.ssim_multiscale(a, b, 1.0, power_factors=tuple(w / w.sum())).numpy()
    np.testing.assert_allclose(np.asarray(R.mssim_metric(a, b)), ref, atol=1e-4)
    # One scale left: plain SSIM.
    a, b = smooth_pair((2, 16, 16, 1), seed=4)
    np.testing.assert_allclose(np.asarray(R.ms_ssim(a, b)), np.asarray(R.ssim(a, b)), atol=1e-6)


def test_ms_ssim_negative_contrast_is_clamped_to_zero():
    a, _ = smooth_pair((2, 32, 32, 1), seed=8)
    inv = 1.0 - a  # perfectly anti-correlated: cs < 0 at every scale
    np.testing.assert_allclose(np.asarray(R.ms_ssim(a, inv)), 0.0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(R.ms_ssim_loss(a, inv)), 1.0, atol=1e-7)


# -- identities, maps, scores ------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_identical_images_give_perfect_scores(channels):
    a, _ = smooth_pair((2, 32, 32, channels), seed=9)
    # float32 (2 mu_a mu_a + c1)(2 var_a + c2) / ((2 mu_a^2 + c1)(2 var_a + c2)): a few ulps of the
    # variance terms off 1 where the variance is tiny (seen up to 2.3e-5 on an AVX2 CPU)
    np.testing.assert_allclose(np.asarray(R.ssim_map(a, a)), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(R.ssim_metric(a, a)), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(R.mssim_metric(a, a)), 1.0, atol=1e-4)
    for name in ("ssim", "mssim", "l2"):
        loss = np.asarray(R.get_loss(name)(a, a))
        assert loss.shape == (2,)
        np.testing.assert_allclose(loss, 0.0, atol=1e-4)
    for method in ("ssim", "l2"):
        np.testing.assert_allclose(np.asarray(R.residual_map(a, a, method)), 0.0, atol=1e-4)


def test_l2_map_and_loss_match_numpy():
    a, b = smooth_pair((3, 16, 12, 3), seed=10)
    np.testing.assert_allclose(np.asarray(R.l2_map(a, b)), ((a - b) ** 2).mean(-1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(R.l2_loss(a, b)), ((a - b) ** 2).mean((1, 2, 3)), rtol=1e-5)


def test_residual_map_is_higher_where_images_differ():
    a, _ = smooth_pair((1, 40, 40, 3), seed=11, noise=0.0)
    b = a.copy()
    b[0, 15:25, 15:25] = 1.0 - b[0, 15:25, 15:25]
    for method in ("ssim", "l2"):
        m = np.asarray(R.residual_map(a, b, method))[0]
        assert m.shape == (40, 40) and m.min() >= 0
        assert m[17:23, 17:23].mean() > 10 * m[:8, :8].mean() + 1e-6
    with pytest.raises(InputError):
        R.residual_map(a, b, "l1")


def test_image_scores_hand_made():
    m = np.zeros((2, 10, 10), np.float32)
    m[0, 0, :3] = [5.0, 3.0, 1.0]
    m[1] = 1.0
    np.testing.assert_allclose(np.asarray(R.image_scores(m, "max")), [5.0, 1.0])
    np.testing.assert_allclose(np.asarray(R.image_scores(m, "mean")), [0.09, 1.0], rtol=1e-6)
    # 100 pixels, 2% -> top 2.
    np.testing.assert_allclose(np.asarray(R.image_scores(m, "topk", 0.02)), [4.0, 1.0])
    np.testing.assert_allclose(np.asarray(R.image_scores(m[..., None], "topk", 0.03)), [3.0, 1.0])
    with pytest.raises(InputError):
        R.image_scores(m, "median")
    with pytest.raises(InputError):
        R.image_scores(m, "topk", 0.0)


@pytest.mark.parametrize("reduction", ["max", "mean", "topk"])
def test_scores_do_not_depend_on_the_rest_of_the_batch(reduction):
    rng = np.random.default_rng(12)
    m = rng.random((4, 20, 20)).astype(np.float32)
    other = m.copy()
    other[1:] *= 50.0  # change every image but the first
    full = np.asarray(R.image_scores(m, reduction))
    alone = np.asarray(R.image_scores(m[:1], reduction))
    changed = np.asarray(R.image_scores(other, reduction))
    assert full.shape == (4,)
    np.testing.assert_allclose(full[0], alone[0], rtol=1e-6)
    np.testing.assert_allclose(changed[0], full[0], rtol=1e-6)
    flat = np.sort(m.reshape(4, -1), axis=1)
    ref = {"max": flat[:, -1], "mean": flat.mean(1), "topk": flat[:, -4:].mean(1)}[reduction]
    np.testing.assert_allclose(full, ref, rtol=1e-5)


@pytest.mark.parametrize("name", ["ssim", "mssim", "l2"])
def test_losses_are_per_image(name):
    a, b = smooth_pair((3, 32, 32, 1), seed=13)
    loss = R.get_loss(name)
    batch = np.asarray(loss(a, b))
    singles = np.concatenate([np.asarray(loss(a[i : i + 1], b[i : i + 1])) for i in range(3)])
    assert batch.shape == (3,) and len(set(np.round(batch, 6))) == 3
    np.testing.assert_allclose(batch, singles, atol=1e-6)


def test_get_loss_names():
    assert R.get_loss("ssim") is R.ssim_loss
    assert R.get_loss("mssim") is R.ms_ssim_loss
    assert R.get_loss("l2") is R.l2_loss
    with pytest.raises(InputError, match="mae"):
        R.get_loss("mae")


# -- training ----------------------------------------------------------------


def tiny_model():
    inp = keras.Input((32, 32, 1))
    out = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")(inp)
    return keras.Model(inp, out)


@pytest.mark.parametrize("name", ["ssim", "mssim", "l2"])
def test_losses_train_in_graph_mode(name):
    keras.utils.set_random_seed(0)
    x, _ = smooth_pair((4, 32, 32, 1), seed=14)
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=R.get_loss(name), metrics=[R.ssim_metric])
    assert not model.run_eagerly
    before = [w.numpy().copy() for w in model.trainable_weights]
    # Keras reduces the [B] per-sample values by their mean.
    per_sample = np.asarray(R.get_loss(name)(x, model.predict(x, verbose=0)))
    evaluated = model.evaluate(x, x, batch_size=4, verbose=0, return_dict=True)
    np.testing.assert_allclose(evaluated["loss"], per_sample.mean(), rtol=1e-4)
    hist = model.fit(x, x, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"][0])
    after = [w.numpy() for w in model.trainable_weights]
    assert all(np.isfinite(w).all() for w in after)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(before, after))


@pytest.mark.parametrize("name", ["ssim", "mssim", "l2"])
def test_gradients_finite_at_edge_cases(name):
    loss = R.get_loss(name)
    a, b = smooth_pair((2, 32, 32, 1), seed=15)

    @tf.function
    def grad(y_true, y_pred):
        y_pred = tf.convert_to_tensor(y_pred)
        with tf.GradientTape() as tape:
            tape.watch(y_pred)
            value = tf.reduce_mean(loss(y_true, y_pred))
        return tape.gradient(value, y_pred)

    # Ordinary pair, identical pair (loss 0), anti-correlated pair (MS-SSIM clamped).
    for pred in (b, a, 1.0 - a):
        g = grad(a, pred).numpy()
        assert np.isfinite(g).all()
    assert np.abs(grad(a, b).numpy()).max() > 0


# -- colour ------------------------------------------------------------------


def test_to_luminance_matches_pil_bt601():
    rgb = np.random.default_rng(16).integers(0, 256, (1, 8, 9, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(rgb[0]).convert("L"), np.float32)  # ITU-R 601-2 luma
    ours = np.asarray(R.to_luminance(rgb.astype(np.float32) / 255.0))[0, ..., 0] * 255.0
    assert np.abs(ours - ref).max() <= 0.51  # PIL rounds to integers
    gray = rgb[..., :1].astype(np.float32) / 255.0
    np.testing.assert_array_equal(np.asarray(R.to_luminance(gray)), gray)
    np.testing.assert_array_equal(np.asarray(R.to_rgb(gray)), np.repeat(gray, 3, axis=-1))
    with pytest.raises(InputError):
        R.to_rgb(np.zeros((1, 4, 4, 2), np.float32))


@pytest.mark.parametrize("size,sigma", [(11, 1.5), (33, 4.0), (17, 2.0)])
def test_float16_exact_taps_survive_float16_and_sum_to_one(size, sigma):
    k = R.gaussian_kernel(size, sigma)
    assert abs(k.astype(np.float16).astype(np.float64).sum() - 1) > 1e-5  # plain taps do not, once rounded
    t = R.float16_exact_taps(k)
    np.testing.assert_array_equal(t.astype(np.float16).astype(np.float32), t)
    assert t.astype(np.float64).sum() == 1.0
    np.testing.assert_array_equal(t, t[::-1])
    np.testing.assert_allclose(t, k, atol=1e-3)  # the centre tap takes up the rounding of the others
