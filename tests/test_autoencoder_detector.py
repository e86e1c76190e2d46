import os

import numpy as np
import pytest
from helpers import smooth_image

from mvtec_keras.detectors import load_detector
from mvtec_keras.detectors.autoencoder import AutoencoderDetector
from mvtec_keras.errors import InputError
from mvtec_keras.training import lr_range_test


def _images(n, size=32, seed=0):
    rng = np.random.RandomState(seed)
    return np.stack([smooth_image(rng, size, 1) for _ in range(n)])[..., None].astype(np.float32) / 255


@pytest.fixture(scope="module")
def fitted():
    det = AutoencoderDetector("mvtecCAE", (32, 32, 1), loss="ssim", epochs=3, batch_size=4, learning_rate=1e-3)
    return det.fit(_images(16), _images(4, seed=1), verbose=0)


def test_fit_learns_and_records_history(fitted):
    assert fitted.epochs_trained_ == 3
    assert set(fitted.history_) >= {"loss", "val_loss"}
    assert fitted.history_["loss"][-1] < fitted.history_["loss"][0]


def test_score_shapes_and_anomaly_ranking(fitted):
    normal = _images(6, seed=2)
    broken = normal.copy()
    broken[:, 10:20, 10:20, :] = 1.0  # a white square
    res_n, res_b = fitted.score(normal), fitted.score(broken)
    assert (res_b.scores > res_n.scores).all()
    assert res_n.scores.shape == (6,) and res_n.maps.shape == (6, 32, 32)
    # the map is higher inside the square than outside
    assert (res_b.maps[:, 10:20, 10:20].mean((1, 2)) > res_b.maps[:, :8, :8].mean((1, 2))).all()


def test_score_of_one_image_is_batch_independent(fitted):
    x = _images(5, seed=3)
    alone = fitted.score(x[:1]).scores[0]
    together = fitted.score(x, batch_size=5).scores[0]
    np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-6)


def test_save_load_identical(fitted, tmp_path):
    fitted.save(str(tmp_path / "det"))
    again = load_detector(str(tmp_path / "det"))
    assert isinstance(again, AutoencoderDetector) and again.get_config() == fitted.get_config()
    x = _images(4, seed=4)
    a, b = fitted.score(x), again.score(x)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.maps, b.maps)


def test_l2_residual_switch(fitted):
    x = _images(2, seed=5)
    recon = np.asarray(fitted.reconstruct(x))
    fitted.residual = "l2"
    try:
        maps = fitted.score(x).maps
    finally:
        fitted.residual = "ssim"
    np.testing.assert_allclose(maps, ((x - recon) ** 2)[..., 0], rtol=1e-4, atol=1e-6)


def test_map_sigma_blurs_the_map_only(fitted):
    from mvtec_keras import residuals

    x = _images(3, seed=6)
    raw = fitted.score(x)
    fitted.map_sigma = 2.0
    try:
        blurred = fitted.score(x)
    finally:
        fitted.map_sigma = 0.0
    np.testing.assert_allclose(blurred.maps, np.asarray(residuals.gaussian_blur(raw.maps, 2.0)), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(blurred.scores, raw.scores)  # the image score has its own blur
    assert blurred.maps.std() < raw.maps.std()


def test_bfloat16_precision_trains_and_scores_float32():
    det = AutoencoderDetector("mvtecCAE", (32, 32, 1), epochs=1, batch_size=4, precision="mixed_bfloat16")
    det.fit(_images(8), verbose=0)
    assert det.model_.layers[1].compute_dtype == "bfloat16"
    assert det.model_.layers[1].variable_dtype == "float32"
    res = det.score(_images(2))
    assert res.scores.dtype == np.float32 and np.isfinite(res.maps).all()


def test_nan_loss_is_one_clear_error():
    det = AutoencoderDetector("mvtecCAE", (32, 32, 1), loss="l2", epochs=3, batch_size=4, learning_rate=1e12)
    x = _images(8)
    x[0, 0, 0, 0] = np.nan  # a NaN pixel poisons the loss at once
    with pytest.raises(InputError, match="NaN"):
        det.fit(x, verbose=0)


def test_lr_range_test_restores_weights():
    import keras

    from mvtec_keras import residuals
    from mvtec_keras.models import build_autoencoder
    import tensorflow as tf

    model = build_autoencoder("mvtecCAE", (32, 32, 1))
    model.compile(optimizer=keras.optimizers.Adam(1e-6), loss=residuals.l2_loss)
    before = [w.numpy().copy() for w in model.weights]
    x = _images(8)
    out = lr_range_test(model, tf.data.Dataset.from_tensor_slices((x, x)).batch(4), steps=20)
    assert 1e-6 <= out["suggested_lr"] <= 1e-1
    assert len(out["lrs"]) == len(out["losses"]) <= 20
    for w, b in zip(model.weights, before):
        np.testing.assert_array_equal(w.numpy(), b)


def test_unknown_precision_rejected():
    with pytest.raises(InputError, match="--precision"):
        AutoencoderDetector("mvtecCAE", (32, 32, 1), precision="fp8").build_model()


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_continues_from_backup(tmp_path):
    import csv

    import keras

    class StopAfterTwo(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise _Interrupt()

    work = str(tmp_path / "run")
    x, v = _images(8), _images(4, seed=1)
    det = AutoencoderDetector("mvtecCAE", (32, 32, 1), epochs=4, batch_size=4, patience=50)
    with pytest.raises(_Interrupt):
        det.fit(x, v, workdir=work, verbose=0, callbacks=[StopAfterTwo()])
    assert os.path.isdir(os.path.join(work, "backup"))  # what --resume continues from

    again = AutoencoderDetector("mvtecCAE", (32, 32, 1), epochs=4, batch_size=4, patience=50)
    again.fit(x, v, workdir=work, resume=True, verbose=0)
    assert again.epochs_trained_ == 4
    assert len(again.history_["loss"]) == 2  # only epochs 3 and 4 ran in the resumed call
    with open(os.path.join(work, "history.csv")) as f:
        epochs = [int(r["epoch"]) for r in csv.DictReader(f)]
    assert epochs == [0, 1, 2, 3]
    assert not os.path.isdir(os.path.join(work, "backup"))  # finished runs drop their backup
