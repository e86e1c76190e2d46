"""GANomaly options that follow the reference implementation, and the reference's (leaky) BatchNorm scoring."""

import numpy as np
import pytest
from keras import ops

from mvtec_keras.detectors import detector_class, load_detector
from mvtec_keras.detectors.gan import score_reference_leaky
from mvtec_keras.models import gans


def _images(n=16, seed=0):
    return np.random.default_rng(seed).random((n, 32, 32, 3)).astype(np.float32)


def _moving_stats(model):
    return [np.array(v) for v in model.non_trainable_variables]


@pytest.mark.parametrize("cls", [gans.GANomaly, gans.EfficientGAN])
def test_reference_leaky_batchnorm_differs_and_leaves_the_model_alone(cls):
    model = cls(32, 3, latent_dim=8, filters=4)
    x = _images()
    before = _moving_stats(model)
    honest, _ = model.anomaly_score(x)
    leaky, _ = model.anomaly_score(x, batchnorm="reference_leaky")
    # Batch statistics instead of moving statistics: other scores ...
    assert np.max(np.abs(np.asarray(honest) - np.asarray(leaky))) > 1e-3
    # ... which depend on the rest of the batch (the leak), unlike the honest ones.
    leaky_half, _ = model.anomaly_score(x[:8], batchnorm="reference_leaky")
    honest_half, _ = model.anomaly_score(x[:8])
    assert np.max(np.abs(np.asarray(leaky_half) - np.asarray(leaky)[:8])) > 1e-4
    np.testing.assert_allclose(honest_half, np.asarray(honest)[:8], rtol=1e-4, atol=1e-6)
    # The moving statistics are untouched, so honest scoring afterwards is unchanged.
    for a, b in zip(before, _moving_stats(model)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(model.anomaly_score(x)[0], honest, rtol=1e-5)
    with pytest.raises(ValueError, match="batchnorm='train'"):
        model.anomaly_score(x, batchnorm="train")


def test_score_reference_leaky_batches_in_the_given_order():
    det = detector_class("ganomaly")(image_size=32, channels=3, latent_dim=8, filters=4, epochs=1,
                                     steps_per_epoch=2, batch_size=8)
    x = _images(20)
    det.fit(x, verbose=0)
    leaky = score_reference_leaky(det, x, batch_size=8)
    assert leaky.shape == (20,)
    # Batch k holds images 8k ... 8k+7: its scores are the model's on exactly that batch.
    direct, _ = det.model_.anomaly_score(x[8:16], batchnorm="reference_leaky")
    np.testing.assert_allclose(leaky[8:16], direct, rtol=1e-4, atol=1e-6)
    honest = det.score(x).scores
    assert np.max(np.abs(honest - leaky)) > 1e-4
    # uint8 input is rescaled as in fit
    np.testing.assert_allclose(score_reference_leaky(det, (x * 255).round().astype(np.uint8), 8), leaky,
                               rtol=0.05, atol=1e-3)


def test_filters_64_matches_the_reference_widths():
    model = gans.GANomaly(32, 3, latent_dim=100, filters=64)
    convs = [layer for layer in model.encoder1.get_layer("ge_features").layers if "conv" in layer.name]
    assert [c.filters for c in convs] == [64, 128, 256]  # the reference netG encoder at isize 32, ngf 64


def test_bce_adversarial_term():
    x = _images(8)
    fm = gans.GANomaly(32, 3, latent_dim=8, filters=4)
    bce = gans.GANomaly(32, 3, latent_dim=8, filters=4, adversarial="bce")
    bce.set_weights(fm.get_weights())
    _, x_hat, _, _ = bce._forward(x, training=False)
    _, logit = bce.discriminator(x_hat, training=False)
    expected = np.mean(np.log1p(np.exp(-np.asarray(logit))))  # BCE against "real" from logits
    out = bce._loss_terms(x, training=False)
    np.testing.assert_allclose(float(out["adv"]), expected, rtol=1e-4)
    assert abs(float(fm._loss_terms(x, training=False)["adv"]) - expected) > 1e-4  # feature matching differs
    with pytest.raises(ValueError, match="adversarial='mse'"):
        gans.GANomaly(32, 3, adversarial="mse")


def test_tanh_output_works_in_minus_one_to_one():
    model = gans.GANomaly(32, 3, latent_dim=8, filters=4, tanh_output=True)
    assert model.decoder.layers[-1].activation.__name__ == "tanh"
    x = _images(8)
    x_in, x_hat, _, _ = model._forward(x, training=False)
    assert float(ops.min(x_in)) < -0.9 and float(ops.max(x_in)) > 0.9  # the nets see [-1, 1]
    assert float(ops.min(x_hat)) < 0.0  # tanh output, in the model's range
    _, x_unit = model.anomaly_score(x)
    assert 0.0 <= float(ops.min(x_unit)) and float(ops.max(x_unit)) <= 1.0  # callers still get [0, 1]
    np.testing.assert_allclose(x_unit, (np.asarray(x_hat) + 1) / 2, rtol=1e-5, atol=1e-6)
    out = model._loss_terms(x, training=False)
    np.testing.assert_allclose(float(out["con"]), np.mean(np.abs(np.asarray(x_in) - np.asarray(x_hat))), rtol=1e-5)


def test_discriminator_reinitialised_below_the_threshold():
    x = _images(16)
    base = dict(image_size=32, channels=3, latent_dim=8, filters=4, epochs=1, steps_per_epoch=3, batch_size=8)
    # A threshold above any loss: every step re-draws D (the reference's DCGAN init).
    det = detector_class("ganomaly")(**base, reinit_d_below=1e9).fit(x, verbose=0)
    assert int(det.model_.d_reinits.numpy()) == 3
    kernels = [np.asarray(v) for v in det.model_.discriminator.trainable_variables if "kernel" in v.name]
    assert all(abs(k.std() - 0.02) < 0.005 for k in kernels if k.size > 500)
    # Off by default; a tiny threshold that a real loss never reaches changes nothing.
    plain = detector_class("ganomaly")(**base).fit(x, verbose=0)
    assert not hasattr(plain.model_, "d_reinits")
    rare = detector_class("ganomaly")(**base, reinit_d_below=1e-30).fit(x, verbose=0)
    assert int(rare.model_.d_reinits.numpy()) == 0
    np.testing.assert_allclose(rare.score(x).scores, plain.score(x).scores, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="reinit_d_below"):
        gans.GANomaly(32, 3, reinit_d_below=-1)


def test_fidelity_options_survive_save_and_load(tmp_path):
    det = detector_class("ganomaly")(image_size=32, channels=3, latent_dim=8, filters=4, epochs=1,
                                     steps_per_epoch=1, batch_size=8, adversarial="bce", tanh_output=True,
                                     reinit_d_below=1e-5)
    x = _images(8)
    det.fit(x, verbose=0).save(str(tmp_path / "g"))
    back = load_detector(str(tmp_path / "g"))
    assert back.get_config() == det.get_config()
    np.testing.assert_allclose(back.score(x).scores, det.score(x).scores, rtol=1e-4, atol=1e-6)
