"""Feature extractor: taps, strides, pooling, preprocessing, weights files (tiny inputs, random weights)."""

import math

import keras
import numpy as np
import pytest

from mvtec_keras.errors import InputError
from mvtec_keras.features import BACKBONES, build_feature_extractor, tap_strides

B0_CHANNELS = {1: 32, 2: 16, 3: 24, 4: 40, 5: 80, 6: 112, 7: 192, 8: 320, 9: 1280}
DOC_STRIDES = {1: 2, 2: 2, 3: 4, 4: 8, 5: 16, 6: 16, 7: 32, 8: 32, 9: 32}
SIZE = 64


def _images(n=2, size=SIZE, seed=0):
    return np.random.default_rng(seed).random((n, size, size, 3), dtype=np.float32)


def _normalization(model):
    # auto-named ("normalization_3"...), so found by type
    return next(layer for layer in model.layers if isinstance(layer, keras.layers.Normalization))


@pytest.fixture(scope="module")
def b0():
    keras.utils.set_random_seed(1)
    return build_feature_extractor("efficientnet-b0", weights=None, input_size=SIZE)


@pytest.fixture(scope="module")
def lite0():
    keras.utils.set_random_seed(2)
    return build_feature_extractor("efficientnet-lite0", weights=None, input_size=SIZE)


def test_backbone_table_and_strides():
    assert [BACKBONES[f"efficientnet-b{i}"] for i in range(8)] == [224, 240, 260, 300, 380, 456, 528, 600]
    assert [BACKBONES[f"efficientnet-lite{i}"] for i in range(3)] == [224, 240, 260]
    for name in BACKBONES:
        assert tap_strides(name) == DOC_STRIDES


@pytest.mark.parametrize("fixture", ["b0", "lite0"])
def test_taps_have_documented_shapes(fixture, request):
    model = request.getfixturevalue(fixture)
    out = model(_images())
    assert sorted(out) == [f"level{i}" for i in range(1, 10)]
    strides = tap_strides("efficientnet-b0")
    for lvl, c in B0_CHANNELS.items():  # Lite0 has B0's channel counts
        side = math.ceil(SIZE / strides[lvl])
        assert tuple(out[f"level{lvl}"].shape) == (2, side, side, c), lvl


def test_tap_layers_are_stage_outputs(b0):
    # level 2 is the single block of stage 1 (no residual), level 3 stage 2's residual add.
    names = {layer.name for layer in b0.layers}
    assert {"stem_activation", "block1a_project_bn", "block2b_add", "block7a_project_bn", "top_activation"} <= names
    assert "block2a_add" not in names  # first block of a stage changes width: no residual


def test_subset_of_levels_and_pooled_match_full_maps(b0, tmp_path):
    path = str(tmp_path / "b0.weights.h5")
    b0.save_weights(path)
    x = _images(3, seed=1)
    full = b0(x)
    sub = build_feature_extractor("efficientnet-b0", weights=path, levels=(7, 3), input_size=SIZE)
    out = sub(x)
    assert sorted(out) == ["level3", "level7"]
    np.testing.assert_allclose(out["level3"], full["level3"], rtol=1e-5, atol=1e-5)
    pooled = build_feature_extractor("efficientnet-b0", weights=path, levels=(2, 9), input_size=SIZE, pooled=True)
    p = pooled(x)
    assert tuple(p["level2"].shape) == (3, 16) and tuple(p["level9"].shape) == (3, 1280)
    np.testing.assert_allclose(p["level9"], np.mean(full["level9"], axis=(1, 2)), rtol=1e-4, atol=1e-5)


def test_weights_file_round_trip(lite0, tmp_path):
    path = str(tmp_path / "lite0.weights.h5")
    lite0.save_weights(path)
    x = _images(seed=3)
    again = build_feature_extractor("efficientnet-lite0", weights=path, input_size=SIZE)
    a, b = lite0(x), again(x)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    fresh = build_feature_extractor("efficientnet-lite0", weights=None, input_size=SIZE)
    # random-init activations are tiny deep down: compare relatively
    assert not np.allclose(np.asarray(fresh(x)["level3"]), np.asarray(a["level3"]), rtol=1e-3, atol=0)


def test_shallow_weights_file_cannot_feed_deeper_extractor(tmp_path):
    shallow = build_feature_extractor("efficientnet-lite0", weights=None, levels=(1, 2), input_size=32)
    path = str(tmp_path / "shallow.weights.h5")
    shallow.save_weights(path)
    with pytest.raises(InputError, match="shallow.weights.h5"):
        build_feature_extractor("efficientnet-lite0", weights=path, levels=(9,), input_size=32)


def test_b0_normalisation_is_imagenet_mean_std(b0):
    probe = keras.Model(b0.input, _normalization(b0).output)
    x = _images(1, seed=4)
    expected = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(probe(x), expected, rtol=1e-5, atol=1e-5)


def test_lite_input_scaling(lite0):
    probe = keras.Model(lite0.input, lite0.get_layer("lite_input_scaling").output)
    x = _images(1, seed=5)
    np.testing.assert_allclose(probe(x), (255.0 * x - 127.0) / 128.0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size,kernel", [(8, 3), (8, 5), (9, 3), (9, 5)])
def test_keras_same_padding_is_tf_same(size, kernel):
    # TF SAME with stride 2 pads total max((ceil(n/2)-1)*2 + k - n, 0): the smaller half first.
    x = np.random.default_rng(6).random((1, size, size, 2), dtype=np.float32)
    same = keras.layers.DepthwiseConv2D(kernel, 2, padding="same", use_bias=False)
    same.build(x.shape)
    total = max((math.ceil(size / 2) - 1) * 2 + kernel - size, 0)
    pad = (total // 2, total - total // 2)
    valid = keras.layers.DepthwiseConv2D(kernel, 2, padding="valid", use_bias=False)
    valid.build((1, size + total, size + total, 2))
    valid.set_weights(same.get_weights())
    ref = valid(keras.layers.ZeroPadding2D((pad, pad))(x))
    np.testing.assert_allclose(same(x), ref, rtol=1e-6, atol=1e-6)


def test_bad_arguments_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="unknown backbone"):
        build_feature_extractor("resnet50", weights=None)
    with pytest.raises(InputError, match="levels"):
        build_feature_extractor("efficientnet-b0", weights=None, levels=(0, 3))
    with pytest.raises(InputError, match="not_here.h5"):
        build_feature_extractor("efficientnet-b0", weights=str(tmp_path / "not_here.h5"))
    with pytest.raises(InputError, match="unknown backbone"):
        tap_strides("efficientnet-b9")


def test_imagenet_download_failure_says_pass_a_local_file(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(InputError, match=r"efficientnetb0_notop\.h5.*local file"):
        build_feature_extractor("efficientnet-b0", weights="imagenet", input_size=32)


def test_keras_applications_legacy_h5_file(tmp_path):
    # A file in the keras.applications *_notop.h5 layout (legacy HDF5, matched layer by layer).
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    keras.utils.set_random_seed(7)
    app = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(32, 32, 3))
    norm = _normalization(app)
    norm.adapt_mean.assign([0.485, 0.456, 0.406])  # what the published files hold: std as variance
    norm.adapt_variance.assign([0.229, 0.224, 0.225])
    path = str(tmp_path / "efficientnetb0_notop.h5")
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, app)
    model = build_feature_extractor("efficientnet-b0", weights=path, levels=(9,), input_size=32)
    np.testing.assert_array_equal(
        np.asarray(model.get_layer("block5b_dwconv").kernel), np.asarray(app.get_layer("block5b_dwconv").kernel)
    )
    np.testing.assert_allclose(np.asarray(_normalization(model).adapt_variance), np.square([0.229, 0.224, 0.225]))
    with pytest.raises(InputError, match="notop"):
        build_feature_extractor("efficientnet-b1", weights=path, levels=(9,), input_size=32)
