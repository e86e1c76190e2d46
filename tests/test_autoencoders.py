import keras
import numpy as np
import pytest

from mvtec_keras.errors import InputError
from mvtec_keras.models import AUTOENCODERS, autoencoder_info, build_autoencoder

# Smallest legal square side per model (cheap to train on CPU).
SMALL = {"mvtecCAE": 64, "baselineCAE": 64, "inceptionCAE": 64, "resnetCAE": 64, "skipCAE": 128}

# Published / brief targets at 256 x 256 grayscale; ours must be within 3 %.
TARGET_GRAY = {
    "mvtecCAE": 746_000,
    "baselineCAE": 712_000,
    "inceptionCAE": 11_500_000,
    "resnetCAE": 15_000_000,
    "skipCAE": 3_000_000,
}

# Exact grayscale counts of our designs at 256 x 256 (all weights incl. BN statistics).
EXACT_GRAY = {
    "mvtecCAE": 744_994,
    "baselineCAE": 712_197,
    "inceptionCAE": 11_521_797,
    "resnetCAE": 15_017_025,
    "skipCAE": 3_047_617,
}

# RGB adds 2 input channels to the first layer(s) and 2 output channels to the last one:
# extra = 2 * (first-layer weights per input channel) + 2 * (last-layer weights per output channel + bias)
#         + 2 * 4 for a final 3-channel BatchNormalization (gamma, beta, mean, variance).
RGB_EXTRA = {
    "mvtecCAE": 2 * (4 * 4 * 32) + 2 * (8 * 8 * 32 + 1),  # 4x4 conv in, 8x8 conv out
    "baselineCAE": 2 * (3 * 3 * 32) + 2 * (3 * 3 * 32 + 1) + 2 * 4,  # 3x3 in, 3x3 out + BN
    # first inception block: 1x1, 3x3, 5x5 convs and the pool-branch 1x1 all read the image
    "inceptionCAE": 2 * ((1 + 9 + 25 + 1) * 32) + 2 * (3 * 3 * 128 + 1) + 2 * 4,
    "resnetCAE": 2 * (7 * 7 * 64) + 2 * (4 * 4 * 32 + 1),  # bias-free 7x7 stem, 4x4 deconv out
    "skipCAE": 2 * (3 * 3 * 32) + 2 * (3 * 3 * 32 + 1),  # 3x3 conv in, 3x3 deconv out
}


def _images(n, side, channels, seed=0):
    return np.random.default_rng(seed).random((n, side, side, channels), dtype=np.float32)


@pytest.mark.parametrize("name", AUTOENCODERS)
@pytest.mark.parametrize("channels", [1, 3])
def test_param_counts_at_256(name, channels):
    model = build_autoencoder(name, (256, 256, channels))
    n = model.count_params()
    expected = EXACT_GRAY[name] + (RGB_EXTRA[name] if channels == 3 else 0)
    assert n == expected
    assert abs(EXACT_GRAY[name] - TARGET_GRAY[name]) / TARGET_GRAY[name] < 0.03
    assert abs(n - TARGET_GRAY[name]) / TARGET_GRAY[name] < 0.03
    mode = "grayscale" if channels == 1 else "rgb"
    assert autoencoder_info(name)["reference_params"][mode] == n
    assert model.output_shape == (None, 256, 256, channels)


@pytest.mark.parametrize("name", AUTOENCODERS)
@pytest.mark.parametrize("channels", [1, 3])
def test_train_step_predict_and_keras_round_trip(name, channels, tmp_path):
    side = SMALL[name]
    keras.utils.set_random_seed(0)
    model = build_autoencoder(name, (side, side, channels))
    assert type(model).__name__ == "Functional"
    x = _images(4, side, channels)
    before = [w.copy() for w in model.get_weights()]
    # Eager: one step of a 100-layer model runs far faster than tracing a train graph on a busy CPU.
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", run_eagerly=True)
    hist = model.fit(x, x, batch_size=4, epochs=1, verbose=0)
    loss = hist.history["loss"][0]
    assert np.isfinite(loss) and 0.0 < loss < 1.0
    # the single step really updated the weights
    after = model.get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))

    y = model.predict(x, verbose=0)
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.all(y > 0.0) and np.all(y < 1.0)

    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.name == name
    np.testing.assert_allclose(loaded.predict(x, verbose=0), y, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "name,shape",
    [
        ("mvtecCAE", (32, 96, 1)),
        ("baselineCAE", (128, 64, 3)),
        ("inceptionCAE", (64, 128, 1)),
        ("resnetCAE", (96, 32, 3)),
        ("skipCAE", (128, 256, 1)),
    ],
)
def test_other_legal_sizes_keep_shape(name, shape):
    assert build_autoencoder(name, shape).output_shape == (None, *shape)


def test_bottlenecks_at_256():
    m = build_autoencoder("mvtecCAE")
    assert tuple(m.get_layer("bottleneck").output.shape) == (None, 8, 8, 1)
    assert tuple(build_autoencoder("baselineCAE").get_layer("latent").output.shape) == (None, 64)
    assert tuple(build_autoencoder("inceptionCAE").get_layer("code").output.shape) == (None, 4, 4, 512)
    assert tuple(build_autoencoder("resnetCAE").get_layer("bottleneck").output.shape) == (None, 8, 8, 512)
    skip = build_autoencoder("skipCAE")
    assert tuple(skip.get_layer("latent").output.shape) == (None, 64)
    adds = [l for l in skip.layers if isinstance(l, keras.layers.Add)]
    assert sorted(l.name for l in adds) == ["skip1_add", "skip2_add"]


def _inbound_names(layer):
    return sorted(t._keras_history.operation.name for t in keras.tree.flatten(layer._inbound_nodes[0].input_tensors))


def test_resnet_every_block_adds_its_residual_branch():
    model = build_autoencoder("resnetCAE", (64, 64, 1))
    encoder_adds = [l for l in model.layers if l.name.startswith("stage") and l.name.endswith("_add")]
    assert len(encoder_adds) == 8 and all(isinstance(l, keras.layers.Add) for l in encoder_adds)
    # last block of the last stage: identity shortcut + residual branch, not the shortcut alone
    assert _inbound_names(model.get_layer("stage4_block2_add")) == ["stage4_block1_out", "stage4_block2_bn2"]
    # first block of stage 4 changes stride and width, so it projects its shortcut
    assert _inbound_names(model.get_layer("stage4_block1_add")) == ["stage4_block1_bn2", "stage4_block1_proj_bn"]

    probe = keras.Model(
        model.input,
        [model.get_layer(n).output for n in ("stage4_block1_out", "stage4_block2_bn2", "stage4_block2_out")],
    )
    x = _images(2, 64, 1, seed=1)
    shortcut, residual, out = (np.asarray(t) for t in probe(x, training=False))
    assert np.abs(residual).max() > 1e-3
    np.testing.assert_allclose(out, np.maximum(shortcut + residual, 0.0), rtol=1e-5, atol=1e-5)
    # silencing the residual branch changes the stage output
    bn = model.get_layer("stage4_block2_bn2")
    bn.gamma.assign(np.zeros(bn.gamma.shape, np.float32))
    bn.beta.assign(np.zeros(bn.beta.shape, np.float32))
    out0 = np.asarray(probe(x, training=False)[2])
    np.testing.assert_allclose(out0, np.maximum(shortcut, 0.0), rtol=1e-5, atol=1e-5)
    assert np.abs(out0 - out).max() > 1e-3


def test_names_are_case_insensitive_and_unknown_names_list_choices():
    assert build_autoencoder("MVTECcae", (32, 32, 1)).name == "mvtecCAE"
    assert autoencoder_info("SKIPcae")["name"] == "skipCAE"
    with pytest.raises(InputError) as err:
        build_autoencoder("vae")
    msg = str(err.value)
    assert "vae" in msg and all(n in msg for n in AUTOENCODERS) and "\n" not in msg
    with pytest.raises(InputError):
        autoencoder_info("nope")


@pytest.mark.parametrize(
    "name,shape",
    [
        ("mvtecCAE", (100, 96, 1)),  # not a multiple of 32
        ("mvtecCAE", (64, 64, 2)),  # neither grayscale nor RGB
        ("baselineCAE", (96, 96, 1)),  # not a multiple of 64
        ("baselineCAE", (1024, 1024, 1)),  # 16 x 16 grid cannot hold the 64-d code
        ("inceptionCAE", (32, 32, 3)),
        ("resnetCAE", (48, 48, 3)),
        ("skipCAE", (64, 64, 1)),  # below 128
        ("skipCAE", (256, 256)),  # channels missing
    ],
)
def test_illegal_shapes_raise_input_error(name, shape):
    with pytest.raises(InputError, match=name if len(shape) == 3 and shape[2] in (1, 3) else "input_shape"):
        build_autoencoder(name, shape)


def test_info_contents():
    multiples = {"mvtecCAE": 32, "baselineCAE": 64, "inceptionCAE": 64, "resnetCAE": 32, "skipCAE": 128}
    for name in AUTOENCODERS:
        info = autoencoder_info(name)
        assert info["default_size"] == (256, 256)
        assert info["size_multiple"] == multiples[name]
        assert str(multiples[name]) in info["size_constraint"]
        assert info["color_mode"] in ("grayscale", "rgb")
        assert info["loss"] in ("ssim", "mssim", "l2")
        assert info["default_input_shape"] == (256, 256, 1 if info["color_mode"] == "grayscale" else 3)
    # returned dicts are copies: callers cannot corrupt the table
    autoencoder_info("mvtecCAE")["reference_params"]["grayscale"] = 0
    assert autoencoder_info("mvtecCAE")["reference_params"]["grayscale"] == EXACT_GRAY["mvtecCAE"]


@pytest.mark.parametrize("name", AUTOENCODERS)
def test_float32_copy_of_a_mixed_precision_network_computes_like_the_float32_network(name):
    from mvtec_keras.detectors.autoencoder import AutoencoderDetector
    from mvtec_keras.models.precision import float32_model, is_mixed

    shape = (SMALL[name], SMALL[name], 1)
    mixed = AutoencoderDetector(name, shape, precision="mixed_bfloat16").build_model()
    copy = float32_model(mixed)
    assert is_mixed(mixed) and not is_mixed(copy)
    assert float32_model(copy) is copy  # a float32 network is used as it is
    reference = build_autoencoder(name, input_shape=shape)  # built under the float32 policy
    reference.set_weights(mixed.get_weights())
    x = _images(2, shape[0], 1)
    want = keras.ops.convert_to_numpy(reference(x, training=False))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(copy(x, training=False)), want, rtol=1e-5, atol=1e-6)
