"""The models, losses, residual maps and feature detectors under the JAX backend.

KERAS_BACKEND is fixed when Keras is imported, so each JAX check runs in a
subprocess (with TensorFlow made unimportable there, as on a machine without
it) and is compared with the TensorFlow backend of this process.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mvtec_keras import residuals
from mvtec_keras.detectors import load_detector
from mvtec_keras.detectors.autoencoder import AutoencoderDetector
from mvtec_keras.detectors.mahalanobis import MahalanobisDetector
from mvtec_keras.detectors.padim import PadimDetector
from test_feature_detectors import defective, normal_images, toy_backbone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")

# Prelude of every JAX subprocess: a finder that refuses TensorFlow, so that any import of it fails
# as on a machine without it (a None entry in sys.modules would not do: Keras tests membership).
NO_TENSORFLOW = """
import sys
class _NoTensorflow:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NoTensorflow())
"""


def run_jax(body: str, workdir) -> dict:
    """Run ``body`` under KERAS_BACKEND=jax without TensorFlow; it saves its results to ``out.npz``."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    code = NO_TENSORFLOW + textwrap.dedent(body)
    r = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(os.path.join(workdir, "out.npz")) as z:
        return {k: z[k] for k in z.files}


def test_autoencoder_trains_and_ssim_map_matches_tensorflow(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(0.2, 0.8, (4, 32, 32, 1)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", x=x, y=y)
    out = run_jax(
        """
        import keras, numpy as np
        from mvtec_keras import residuals
        from mvtec_keras.detectors.autoencoder import AutoencoderDetector
        assert keras.backend.backend() == "jax"
        a = np.load("inputs.npz")
        cfg = dict(architecture="mvtecCAE", input_shape=(32, 32, 1), loss="ssim", epochs=1, batch_size=4,
                   learning_rate=1e-3, score_sigma=1.0)
        before = AutoencoderDetector(**cfg).build_model().get_weights()  # same seed: fit's initial weights
        det = AutoencoderDetector(**cfg).fit(a["x"], verbose=0)
        changed = sum(not np.array_equal(b, w) for b, w in zip(before, det.model_.get_weights()))
        scores, maps = det.score_batch(a["x"])
        det.save("ae")
        np.savez("out.npz", loss=det.history_["loss"][-1], changed=changed, n_weights=len(before),
                 ssim_map=np.asarray(residuals.residual_map(a["x"], a["y"], "ssim")),
                 l2_map=np.asarray(residuals.residual_map(a["x"], a["y"], "l2")),
                 scores=np.asarray(scores), maps=np.asarray(maps), tf_loaded="tensorflow" in sys.modules)
        """,
        tmp_path,
    )
    assert not out["tf_loaded"]
    assert np.isfinite(out["loss"])
    assert out["changed"] == out["n_weights"]  # one Adam step moves every kernel and bias
    # The residual maps of the JAX backend are those of the TF backend (this process).
    np.testing.assert_allclose(out["ssim_map"], np.asarray(residuals.residual_map(x, y, "ssim")), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["l2_map"], np.asarray(residuals.residual_map(x, y, "l2")), rtol=1e-4, atol=1e-7)
    # The model trained under JAX loads and scores the same under TF (reconstruction, SSIM map, blur, max).
    det = load_detector(str(tmp_path / "ae"))
    assert isinstance(det, AutoencoderDetector)
    scores, maps = det.score_batch(x)
    np.testing.assert_allclose(out["scores"], np.asarray(scores), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["maps"], np.asarray(maps), rtol=1e-4, atol=1e-5)


def test_feature_detectors_score_the_same_under_jax(tmp_path):
    train = normal_images(12, 0)
    bad, _ = defective(normal_images(3, 2), 3)
    test = np.concatenate([normal_images(3, 1), bad])
    np.savez(tmp_path / "inputs.npz", train=train, test=test)
    tf_scores = {}
    for name, det in {
        "padim": PadimDetector(backbone=toy_backbone(), n_features=10, sigma=1.0),
        "mahalanobis": MahalanobisDetector(backbone=toy_backbone(), levels=(2, 4, 6)),
    }.items():
        det.fit(train, batch_size=4)
        det.save(str(tmp_path / name))
        r = det.score(test)
        tf_scores[name] = r.scores
        if r.maps is not None:
            tf_scores[name + "_maps"] = r.maps
    out = run_jax(
        """
        import numpy as np
        from mvtec_keras.detectors import load_detector
        a = np.load("inputs.npz")
        res = {}
        for name in ("padim", "mahalanobis"):
            det = load_detector(name)  # fitted under TF
            r = det.score(a["test"])
            res[name] = r.scores
            if r.maps is not None:
                res[name + "_maps"] = r.maps
            # Fitted again under JAX (numpy statistics) on the same backbone.
            twin = type(det)(backbone=det.extractor, **{k: v for k, v in det.get_config().items() if k != "backbone"})
            res[name + "_refit"] = twin.fit(a["train"], batch_size=4).score(a["test"]).scores
        np.savez("out.npz", tf_loaded="tensorflow" in sys.modules, **res)
        """,
        tmp_path,
    )
    assert not out["tf_loaded"]
    for name in ("padim", "mahalanobis"):
        np.testing.assert_allclose(out[name], tf_scores[name], rtol=1e-4, atol=1e-5, err_msg=name)
        # A fit under JAX differs only by float rounding (numpy sums and inverse instead of TF's).
        np.testing.assert_allclose(out[name + "_refit"], tf_scores[name], rtol=1e-3, err_msg=name + " refit")
    np.testing.assert_allclose(out["padim_maps"], tf_scores["padim_maps"], rtol=1e-4, atol=1e-5)
    # The checks can fail: defects score above the normal images under both backends.
    assert out["padim"][3:].min() > out["padim"][:3].max()
