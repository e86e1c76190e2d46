"""Device report and --precision auto (issue 12); each policy's numerics checked on the CPU."""

import numpy as np
import pytest

import keras

from mvtec_keras import devices
from mvtec_keras.detectors.autoencoder import AutoencoderDetector


def test_auto_precision_rules():
    assert devices.auto_precision(gpus=[("NVIDIA H100", (9, 0))]) == "mixed_float16"
    assert devices.auto_precision(gpus=[("V100", (7, 0)), ("A100", (8, 0))]) == "mixed_float16"
    assert devices.auto_precision(gpus=[("P100", (6, 0))]) == "float32"  # no tensor cores
    assert devices.auto_precision(gpus=[("A100", (8, 0)), ("P100", (6, 0))]) == "float32"  # the slowest decides
    assert devices.auto_precision(gpus=[("unknown", None)]) == "float32"
    assert devices.auto_precision(gpus=[], cpu_bf16=True) == "mixed_bfloat16"
    assert devices.auto_precision(gpus=[], cpu_bf16=False) == "float32"
    assert devices.cpu_has_bfloat16("flags : fpu avx512f avx512_bf16") and not devices.cpu_has_bfloat16("flags : avx2")
    assert devices.auto_precision() in devices.PRECISIONS  # this machine


def test_describe_names_the_devices():
    assert devices.describe(gpus=[]).startswith("devices: CPU")
    line = devices.describe(gpus=[("NVIDIA H200", (9, 0)), ("NVIDIA H200", (9, 0))])
    assert "GPU:0 NVIDIA H200 (compute capability 9.0)" in line and "GPU:1" in line
    assert "devices:" in devices.describe()


@pytest.mark.parametrize("policy,rtol", [("mixed_bfloat16", 5e-2), ("mixed_float16", 5e-3)])
def test_policy_numerics_close_to_float32(policy, rtol):
    """Same weights, same batch: the low-precision loss, outputs (float32) and one training step
    (loss scaling for float16) track float32 within the policy's precision."""
    x = np.random.default_rng(0).random((4, 32, 32, 1)).astype(np.float32)
    runs = {}
    for p in ("float32", policy):
        det = AutoencoderDetector("mvtecCAE", (32, 32, 1), precision=p, seed=0)
        model = det.build_model()
        det._compile(model, 1e-3)
        y = model(x)
        assert keras.backend.standardize_dtype(y.dtype) == "float32"  # outputs and losses in float32
        if p == "mixed_float16":
            assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        loss0 = float(model.evaluate(x, x, verbose=0, return_dict=True)["loss"])
        model.train_on_batch(x, x)
        runs[p] = (np.asarray(y), loss0, float(model.evaluate(x, x, verbose=0, return_dict=True)["loss"]))
    (y32, l32, s32), (yl, ll, sl) = runs["float32"], runs[policy]
    np.testing.assert_allclose(yl, y32, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(ll, l32, rtol=rtol)
    np.testing.assert_allclose(sl, s32, rtol=rtol * 2)
    assert np.isfinite(sl)
