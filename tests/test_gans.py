"""GAN-family models and detectors: training, scoring, persistence (tiny sizes)."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from mvtec_keras.detectors.base import detector_class, load_detector
from mvtec_keras.detectors.gan import _KeepBest
from mvtec_keras.errors import InputError
from mvtec_keras.models import gans
from helpers import toy_images

TINY = {"latent_dim": 8, "filters": 8}
MODELS = {
    "ganomaly": (gans.GANomaly, TINY),
    "efficientgan": (gans.EfficientGAN, TINY),
    "anogan": (gans.AnoGAN, {**TINY, "search_steps": 5}),
    "dense_ae": (gans.DenseAutoencoder, {"latent_dim": 8, "hidden": (32,)}),
}
DETECTOR_OPTS = {
    "ganomaly": TINY,
    "efficientgan": TINY,
    "anogan": {**TINY, "search_steps": 30},
    "dense_ae": {"latent_dim": 8, "hidden": (32,)},
}


def _compile(model):
    if isinstance(model, gans.DenseAutoencoder):
        model.compile(optimizer="adam")
    else:
        model.compile()


def test_base_grid():
    assert gans.base_grid(28) == (7, 2)
    assert gans.base_grid(32) == (4, 3)
    assert gans.base_grid(256) == (4, 6)
    with pytest.raises(ValueError):
        gans.base_grid(30)


@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("name", list(MODELS))
def test_models_train_with_finite_losses(name, size):
    keras.utils.set_random_seed(0)
    cls, kw = MODELS[name]
    model = cls(image_size=size, channels=1, **kw)
    _compile(model)
    x = np.random.default_rng(0).uniform(0, 1, (16, size, size, 1)).astype(np.float32)
    before = [w.copy() for w in model.get_weights()]
    # with validation images, as train.py passes them (AnoGAN's evaluation used to fail on an empty log)
    hist = model.fit(x, batch_size=8, epochs=1, verbose=0, validation_data=x[:8])
    assert hist.history and all(np.isfinite(v[-1]) for v in hist.history.values())
    assert any(k.startswith("val_") for k in hist.history), hist.history
    # Training moved the weights.
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    scores, x_hat = model.anomaly_score(x[:3])
    assert scores.shape == (3,) and x_hat.shape == (3, size, size, 1)
    assert np.all(np.isfinite(np.asarray(scores)))


@pytest.mark.parametrize("name", list(MODELS))
def test_models_build_at_64_rgb(name):
    cls, kw = MODELS[name]
    model = cls(image_size=64, channels=3, **kw)
    scores, x_hat = model.anomaly_score(np.full((2, 64, 64, 3), 0.5, np.float32))
    assert scores.shape == (2,) and x_hat.shape == (2, 64, 64, 3)
    assert 0.0 <= float(np.min(x_hat)) and float(np.max(x_hat)) <= 1.0  # sigmoid output


def test_generator_sizes_for_all_supported_sizes():
    for size in gans.SUPPORTED_SIZES:
        dec = gans.conv_decoder(size, 3, 4, 2, "g")
        enc = gans.conv_encoder(size, 3, 4, 2, "e")
        assert dec.output_shape == (None, size, size, 3)
        assert enc.output_shape == (None, 4)


def test_ganomaly_score_is_mean_squared_latent_distance():
    model = gans.GANomaly(image_size=28, channels=1, **TINY)
    x = toy_images(4)
    z = model.encoder1(x).numpy()
    z_hat = model.encoder2(model.decoder(z)).numpy()
    scores, _ = model.anomaly_score(x)
    np.testing.assert_allclose(scores, ((z - z_hat) ** 2).mean(axis=1), rtol=1e-5)


def test_efficientgan_score_formula():
    model = gans.EfficientGAN(image_size=28, channels=1, score_weight=0.25, **TINY)
    x = toy_images(3)
    z = model.encoder(x).numpy()
    x_hat = model.generator(z).numpy()
    f_real = model.discriminator([x, z])[0].numpy()
    f_fake = model.discriminator([x_hat, z])[0].numpy()
    expected = 0.75 * np.abs(x - x_hat).reshape(3, -1).mean(1) + 0.25 * np.abs(f_real - f_fake).mean(1)
    np.testing.assert_allclose(model.anomaly_score(x)[0], expected, rtol=1e-5)


def test_dense_ae_score_is_mse():
    model = gans.DenseAutoencoder(image_size=28, channels=1, latent_dim=4, hidden=(16,))
    x = toy_images(3)
    x_hat = model(x).numpy()
    np.testing.assert_allclose(model.anomaly_score(x)[0], ((x - x_hat) ** 2).reshape(3, -1).mean(1), rtol=1e-5)


def test_anogan_latent_search_lowers_the_loss():
    keras.utils.set_random_seed(1)
    x = toy_images(4)
    kw = dict(image_size=28, channels=1, **TINY)
    start = gans.AnoGAN(search_steps=0, **kw)
    searched = gans.AnoGAN(search_steps=40, search_lr=0.1, **kw)
    searched.set_weights(start.get_weights())
    s0, _ = start.anomaly_score(x)
    s1, _ = searched.anomaly_score(x)
    # Starting from z = 0, 40 Adam steps must improve every image's fit.
    assert np.all(np.asarray(s1) < np.asarray(s0) - 1e-4)


def test_keras_model_save_load_and_resume(tmp_path):
    keras.utils.set_random_seed(0)
    model = gans.GANomaly(image_size=28, channels=1, **TINY)
    model.compile(learning_rate=1e-3)
    x = toy_images(16)
    model.fit(x, batch_size=8, epochs=1, verbose=0)
    path = str(tmp_path / "g.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(model.anomaly_score(x)[0], loaded.anomaly_score(x)[0])
    # Optimizer state came back too, so training resumes where it stopped.
    assert int(loaded.g_optimizer.iterations) == int(model.g_optimizer.iterations) == 2
    np.testing.assert_array_equal(loaded.g_optimizer.variables[2].numpy(), model.g_optimizer.variables[2].numpy())
    loaded.fit(x, batch_size=8, epochs=1, verbose=0)
    assert int(loaded.g_optimizer.iterations) == 4
    assert gans.GANomaly.from_config(model.get_config()).get_config() == model.get_config()


# -- detectors ---------------------------------------------------------------

@pytest.fixture(scope="module")
def fitted():
    """Each detector fitted on toy normals; (detectors, test images, labels)."""
    train = toy_images(256, seed=1)
    x = np.concatenate([toy_images(20, seed=2), toy_images(20, anomalous=True, seed=3)])
    y = np.r_[np.zeros(20), np.ones(20)]
    dets = {}
    for name, opts in DETECTOR_OPTS.items():
        det = detector_class(name)(image_size=28, channels=1, epochs=2, steps_per_epoch=40, batch_size=16,
                                   learning_rate=1e-3, seed=0, **opts)
        dets[name] = det.fit(train, verbose=0)
    return dets, x, y


@pytest.mark.parametrize("name", list(DETECTOR_OPTS))
def test_detector_separates_obvious_anomalies(fitted, name):
    dets, x, y = fitted
    res = dets[name].score(x, batch_size=16)
    assert res.scores.shape == (40,) and res.maps.shape == (40, 28, 28)
    assert roc_auc_score(y, res.scores) > 0.9
    # Maps are |x - x_hat| averaged over channels, so they also light up on anomalies.
    assert res.maps[y == 1].mean() > res.maps[y == 0].mean()
    assert len(dets[name].history_["d_loss" if name != "dense_ae" else "loss"]) == 2


@pytest.mark.parametrize("name", list(DETECTOR_OPTS))
def test_detector_save_load_reproduces_scores(fitted, name, tmp_path):
    dets, x, _ = fitted
    det = dets[name]
    det.save(str(tmp_path / name))
    meta = json.load(open(tmp_path / name / "detector.json"))
    assert meta["class"] == name and meta["config"] == det.get_config()
    loaded = load_detector(str(tmp_path / name))
    a, b = det.score(x, batch_size=16), loaded.score(x, batch_size=16)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.maps, b.maps)


@pytest.mark.parametrize("name", list(DETECTOR_OPTS))
def test_score_of_an_image_does_not_depend_on_the_batch(fitted, name):
    dets, x, _ = fitted
    det = dets[name]
    alone = np.concatenate([np.asarray(det.score_batch(x[i : i + 1])[0]) for i in (0, 25)])
    in_batch = np.asarray(det.score_batch(x)[0])[[0, 25]]
    shuffled = np.asarray(det.score_batch(x[::-1])[0])[[39, 14]]
    np.testing.assert_allclose(alone, in_batch, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(alone, shuffled, rtol=1e-4, atol=1e-6)


def test_fit_accepts_a_dataset_of_dicts():
    train = toy_images(40, size=32)
    ds = tf.data.Dataset.from_tensor_slices(
        {"image": train, "label": np.zeros(40, np.int32), "path": np.array(["p"] * 40)}).batch(10)
    det = detector_class("ganomaly")(image_size=32, channels=1, epochs=1, batch_size=8, **TINY)
    sizes = []
    probe = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: sizes.append(b))
    det.fit(ds, validation=ds, verbose=0, callbacks=[probe])
    # 40 images re-batched by 8 = 5 steps in one epoch; validation ran on the normals.
    assert sizes == [0, 1, 2, 3, 4]
    assert "val_con" in det.history_
    scores, maps = det.score_batch(train[:3])
    assert scores.shape == (3,) and maps.shape == (3, 32, 32)


def test_seed_makes_training_reproducible():
    train = toy_images(32)
    kw = dict(image_size=28, channels=1, epochs=1, steps_per_epoch=3, batch_size=8, seed=7, **TINY)
    a = detector_class("efficientgan")(**kw).fit(train, verbose=0)
    b = detector_class("efficientgan")(**kw).fit(train, verbose=0)
    np.testing.assert_allclose(a.score_batch(train[:4])[0], b.score_batch(train[:4])[0], rtol=1e-5)


def test_keep_best_restores_lowest_validation_epoch():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    cb = _KeepBest("val_rec")
    cb.set_model(model)
    for epoch, val in enumerate([3.0, 1.0, 2.0]):
        model.set_weights([np.full((2, 1), epoch, np.float32), np.zeros(1, np.float32)])
        cb.on_epoch_end(epoch, {"val_rec": val})
    cb.on_train_end()
    np.testing.assert_array_equal(model.get_weights()[0], np.ones((2, 1)))


def test_best_val_selection_runs_and_needs_validation():
    train = toy_images(32)
    det = detector_class("dense_ae")(image_size=28, channels=1, epochs=3, batch_size=8, selection="best_val",
                                     latent_dim=4, hidden=(16,))
    with pytest.raises(InputError, match="validation"):
        det.fit(train, verbose=0)
    det.fit(train, validation=toy_images(16, seed=5), verbose=0)
    best = int(np.argmin(det.history_["val_loss"]))
    assert det.selected_epoch_ == best + 1
    # The kept weights reproduce the best epoch's validation loss.
    val = toy_images(16, seed=5)
    x_hat = det.model_(val).numpy()
    eps = 1e-7
    x_hat = np.clip(x_hat, eps, 1 - eps)
    bce = -(val * np.log(x_hat) + (1 - val) * np.log(1 - x_hat)).mean()
    np.testing.assert_allclose(bce, det.history_["val_loss"][best], rtol=1e-3)


def test_bad_input_raises_input_error():
    det = detector_class("ganomaly")(image_size=30, channels=1, **TINY)
    with pytest.raises(InputError, match="image_size"):
        det.fit(toy_images(8, size=32), verbose=0)
    det = detector_class("ganomaly")(image_size=28, channels=1, **TINY)
    with pytest.raises(InputError, match="expects"):
        det.fit(toy_images(8, size=32), verbose=0)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        det.fit(toy_images(8) * 300, verbose=0)
    with pytest.raises(InputError, match="loss"):
        detector_class("dense_ae")(loss="hinge").fit(toy_images(8), verbose=0)
    det = detector_class("anogan")(image_size=28, channels=1, selection="best_val", **TINY)
    with pytest.raises(InputError, match="best_val"):
        det.fit(toy_images(8), validation=toy_images(8), verbose=0)


def test_check_options_finds_a_bad_option_before_fitting():
    for kwargs, match in [({"adversarial": "hinge"}, "adversarial"), ({"selection": "best"}, "selection"),
                          ({"image_size": 30}, "image_size")]:
        with pytest.raises(InputError, match=match):
            detector_class("ganomaly")(**{"image_size": 28, "channels": 1, **TINY, **kwargs}).check_options()
    with pytest.raises(InputError, match="best_val"):
        detector_class("anogan")(image_size=28, channels=1, selection="best_val", **TINY).check_options()
    det = detector_class("ganomaly")(image_size=28, channels=1, adversarial="bce", **TINY)
    assert det.check_options() is det and not det.is_fitted  # a good config passes and stays unfitted


def test_detector_config_roundtrip():
    det = detector_class("efficientgan")(image_size=32, channels=3, score_weight=0.3, seed=4)
    cfg = det.get_config()
    assert cfg["score_weight"] == 0.3 and cfg["seed"] == 4 and cfg["image_size"] == 32
    assert type(det).from_config(cfg).get_config() == cfg
    assert not det.is_fitted
