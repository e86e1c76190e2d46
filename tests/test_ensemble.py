"""Seed ensemble of detectors (tiny GANomaly members)."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mvtec_keras.detectors.base import detector_class, load_detector
from mvtec_keras.errors import InputError
from helpers import toy_images

MEMBER = {"image_size": 28, "channels": 1, "latent_dim": 8, "filters": 8, "epochs": 1, "steps_per_epoch": 15,
          "batch_size": 16, "learning_rate": 1e-3, "seed": 5}


@pytest.fixture(scope="module")
def data():
    return toy_images(64), toy_images(20, seed=1), toy_images(20, anomalous=True, seed=2)


@pytest.fixture(scope="module")
def fitted(data):
    train, _, _ = data
    return detector_class("ensemble")(detector="ganomaly", config=MEMBER, members=2).fit(train, verbose=0)


def test_members_get_consecutive_seeds_and_are_the_single_detectors(fitted, data):
    train, normal, _ = data
    assert [m.seed for m in fitted.members_] == [5, 6]
    single = detector_class("ganomaly")(**{**MEMBER, "seed": 6}).fit(train, verbose=0)
    np.testing.assert_allclose(fitted.members_[1].score(normal).scores, single.score(normal).scores, rtol=1e-5)
    a, b = (m.score(normal).scores for m in fitted.members_)
    assert not np.allclose(a, b)  # different seeds, different models


def test_score_is_the_mean_of_member_scores_standardised_on_normals(fitted, data):
    train, normal, anomalous = data
    x = np.concatenate([normal, anomalous])
    per_member = [m.score(x).scores for m in fitted.members_]
    train_scores = [m.score(train).scores for m in fitted.members_]
    for s, c, sc in zip(train_scores, fitted.center_, fitted.scale_):
        assert c == pytest.approx(s.mean(), rel=1e-4)
        assert sc == pytest.approx(s.std(), rel=1e-3)
    expected = np.mean([(s - c) / sc for s, c, sc in zip(per_member, fitted.center_, fitted.scale_)], axis=0)
    res = fitted.score(x)
    np.testing.assert_allclose(res.scores, expected, rtol=1e-4, atol=1e-5)
    maps = np.mean([m.score(x).maps for m in fitted.members_], axis=0)
    np.testing.assert_allclose(res.maps, maps, rtol=1e-5, atol=1e-6)
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    assert roc_auc_score(labels, res.scores) > 0.9


def test_validation_images_calibrate_when_given(data):
    train, normal, _ = data
    det = detector_class("ensemble")(detector="ganomaly", config=MEMBER, members=1,
                                     calibration_images=8).fit(train, normal, verbose=0)
    s = det.members_[0].score(normal[:8]).scores
    assert det.center_[0] == pytest.approx(s.mean(), rel=1e-4)


def test_score_of_an_image_does_not_depend_on_the_batch(fitted, data):
    _, normal, anomalous = data
    x = np.concatenate([normal, anomalous])
    alone = fitted.score_batch(x[3:4])[0].numpy()
    np.testing.assert_allclose(fitted.score(x, batch_size=7).scores[3:4], alone, rtol=1e-4)


def test_save_load_reproduces_scores(fitted, data, tmp_path):
    _, normal, anomalous = data
    x = np.concatenate([normal, anomalous])
    fitted.save(tmp_path / "ens")
    meta = json.load(open(tmp_path / "ens" / "detector.json"))
    assert meta["class"] == "ensemble" and meta["config"]["members"] == 2
    loaded = load_detector(str(tmp_path / "ens"))
    np.testing.assert_allclose(loaded.score(x).scores, fitted.score(x).scores, rtol=1e-5)
    (tmp_path / "ens" / "member_1" / "detector.json").unlink()
    with pytest.raises(InputError, match="member_1"):
        load_detector(str(tmp_path / "ens"))


@pytest.mark.parametrize("kwargs, message", [
    ({"detector": "nope"}, "unknown detector"),
    ({"detector": "ensemble"}, "cannot themselves be ensembles"),
    ({"members": 0}, "positive integer"),
    ({"calibration_images": 1}, "calibration_images"),
])
def test_bad_settings_raise_input_error(data, kwargs, message):
    det = detector_class("ensemble")(**{"detector": "ganomaly", "config": MEMBER, **kwargs})
    with pytest.raises(InputError, match=message):
        det.fit(data[0], verbose=0)
