"""Deployment: every family exported to LiteRT (no Flex ops, float parity), SavedModel, ONNX;
predict.py on run folders and exported files; the TF-free runtime; preprocessing parity."""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import make_mvtec
from test_feature_detectors import toy_backbone

from mvtec_keras.cli.export import cli as export_cli
from mvtec_keras.cli.predict import cli as predict_cli
from mvtec_keras.data import Preprocessing, discover, split_validation
from mvtec_keras.detectors import detector_class
from mvtec_keras.export import converters
from mvtec_keras.fileio import write_json
from mvtec_keras.runtime.images import read_image, to_model_input, to_uint8
from mvtec_keras.runtime.model import ExportedModel, read_metadata

SIZE = 32
GAN = {"image_size": SIZE, "channels": 3, "latent_dim": 8, "filters": 8, "epochs": 1, "batch_size": 8}
DENSE = {k: v for k, v in GAN.items() if k != "filters"} | {"hidden": (16,)}
FAMILIES = {
    "autoencoder": lambda: detector_class("autoencoder")("mvtecCAE", (SIZE, SIZE, 3), epochs=1, batch_size=4),
    "ganomaly": lambda: detector_class("ganomaly")(**GAN),
    "efficientgan": lambda: detector_class("efficientgan")(**GAN),
    "dense_ae": lambda: detector_class("dense_ae")(**DENSE),
    "ensemble": lambda: detector_class("ensemble")(detector="dense_ae", config=DENSE, members=2),
    "mahalanobis": lambda: detector_class("mahalanobis")(backbone=toy_backbone()),
    "padim": lambda: detector_class("padim")(backbone=toy_backbone(), n_features=10, sigma=1.0),
    "patchcore": lambda: detector_class("patchcore")(backbone=toy_backbone(), coreset_ratio=0.25, sigma=1.0,
                                                     levels=(3, 4)),
    "spade": lambda: detector_class("spade")(backbone=toy_backbone(), k=3, sigma=1.0),
}


def _write_run(out, det, cat, prep, validation):
    det.save(out)
    write_json(os.path.join(out, "info.json"), {
        "version": 1, "detector": det.name, "architecture": det.name,
        "data": {"root": cat.root, "name": cat.name, "mode": cat.mode, "val_fraction": 0.25, "seed": 0,
                 "validation_files": [s.path for s in validation]},
        "preprocessing": prep.to_dict()})
    return out


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    root = make_mvtec(str(tmp_path_factory.mktemp("data") / "cat"), size=SIZE, n_train=12, channels=3)
    cat = discover(root)
    train, val = split_validation(cat.train, 0.25, 0)
    return cat, train, val


@pytest.fixture(scope="module")
def runs(category, tmp_path_factory):
    """One fitted run folder per family, and one LiteRT float32 export of each."""
    from mvtec_keras.data import load_arrays

    cat, train, val = category
    prep = Preprocessing(size=SIZE, color_mode="rgb")
    x = load_arrays(train, prep)["image"]
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for name, make in FAMILIES.items():
        det = make()
        det.fit(x) if "backbone" in det.get_config() else det.fit(x, verbose=0)
        out[name] = _write_run(str(base / name), det, cat, prep, val)
    for name, d in out.items():
        assert export_cli(["-p", d, "-q"]) == 0, name
    return out


def _keras_scores(run_dir, images_u8):
    from mvtec_keras.detectors import load_detector

    det = load_detector(run_dir)
    s, m = det.score_batch(images_u8.astype(np.float32) / 255.0)
    return np.asarray(s).reshape(-1), None if m is None else np.asarray(m)


def _val_u8(category):
    _, _, val = category
    return np.stack([to_uint8(to_model_input(read_image(s.path), {"size": SIZE, "color_mode": "rgb"})) for s in val])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_exports_to_litert_without_flex_with_float_parity(runs, category, family):
    path = os.path.join(runs[family], "export", f"{family}_float32.tflite")
    with open(path, "rb") as f:
        flat = f.read()
    assert converters.flex_ops(flat) == []
    model = ExportedModel(path)  # ai-edge-litert loads it: it would fail on a Flex op
    x = _val_u8(category)
    scores, maps = model.score(x)
    ref_s, ref_m = _keras_scores(runs[family], x)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-4, atol=1e-6)
    assert (maps is None) == (ref_m is None)
    if maps is not None:
        assert maps.shape == (len(x), SIZE, SIZE)
        np.testing.assert_allclose(maps, ref_m, atol=1e-3)
    meta = read_metadata(path)
    assert meta["input"] == {**meta["input"], "dtype": "uint8", "shape": [1, SIZE, SIZE, 3]}
    assert meta["detector"]["name"] == family and meta["preprocessing"]["color_mode"] == "rgb"
    assert meta["parity"]["max_score_rel_diff"] < 1e-3 and meta["size_bytes"] == os.path.getsize(path)
    assert len(meta["validation_scores"]) == len(x) and meta["operating_point"] is None


#: feature detectors: their head is refitted on the int8 backbone's features (export/quantize.py)
INT8_REFIT = ("mahalanobis", "padim", "patchcore", "spade")


@pytest.mark.parametrize("family,precision", [("autoencoder", "float16"), ("ganomaly", "dynamic")])
def test_float16_and_dynamic_exports_load_and_stay_builtin(runs, category, family, precision, tmp_path):
    out = str(tmp_path / f"{family}.tflite")
    assert export_cli(["-p", runs[family], "--precision", precision, "--out", out, "-q"]) == 0
    with open(out, "rb") as f:
        assert converters.flex_ops(f.read()) == []
    assert read_metadata(out)["precision"] == precision
    scores, _ = ExportedModel(out).score(_val_u8(category))
    ref, _ = _keras_scores(runs[family], _val_u8(category))
    np.testing.assert_allclose(scores, ref, rtol=0.05)  # float16 / int8 weights, float activations
    assert os.path.getsize(out) < os.path.getsize(os.path.join(runs[family], "export", f"{family}_float32.tflite"))




@pytest.mark.parametrize("precision", ["float16", "dynamic"])
@pytest.mark.parametrize("family", INT8_REFIT)
def test_float16_and_dynamic_refused_where_they_would_quantise_a_fitted_head(runs, family, precision, tmp_path,
                                                                            capsys):
    # float16 moved bottle's PaDiM scores by 0.7 % and Mahalanobis' by 1.8 %, dynamic both by ~50 %
    capsys.readouterr()
    out = str(tmp_path / "m.tflite")
    assert export_cli(["-p", runs[family], "--precision", precision, "--out", out, "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--precision {precision}" in err[0] and family in err[0] and "int8" in err[0]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_int8_quantises_the_network_and_keeps_the_head_float(runs, category, family, tmp_path):
    out = str(tmp_path / f"{family}.tflite")
    assert export_cli(["-p", runs[family], "--precision", "int8", "--calibration", "5", "--out", out, "-q"]) == 0
    with open(out, "rb") as f:
        flat = f.read()
    assert converters.flex_ops(flat) == []
    meta = read_metadata(out)
    assert meta["precision"] == "int8" and meta["calibration_images"] == 5
    # int8 network between a QUANTIZE and the DEQUANTIZEs into the float head
    assert {"QUANTIZE", "DEQUANTIZE"} <= set(meta["litert_ops"])
    assert meta["int8"]["head_refitted_on_int8_features"] == (family in INT8_REFIT)
    x = _val_u8(category)
    scores, maps = ExportedModel(out).score(x)
    assert np.all(np.isfinite(scores))
    if family in INT8_REFIT:
        # the file equals the refitted float head on the int8 backbone's features (SPADE's toy distances
        # are ~1e-2 on features in [-1, 1], where the |q|^2 + |b|^2 - 2 q.b expansion keeps few relative digits)
        par = meta["parity"]
        assert par["max_score_rel_diff"] < 1e-4 or par["max_score_abs_diff"] < 1e-3, par
        if maps is not None:
            assert meta["parity"]["max_map_abs_diff"] < 1e-3
        np.testing.assert_allclose(scores, meta["validation_scores"][: len(scores)], rtol=1e-5)
    else:
        ref, _ = _keras_scores(runs[family], x)
        np.testing.assert_allclose(scores, ref, rtol=0.5)  # int8 network: same scale, not the same digits
        guard = meta["int8"]["float_layers_guard"]  # the drift is measured for every network scored as it is
        assert guard["score_drift_all_int8"] >= 0 and guard["network_layers"] >= 1
        if family in ("ganomaly", "efficientgan"):  # recorded, not enforced: no layer kept float
            assert guard["limit"] is None and guard["float_layers"] == []
        else:
            assert guard["score_drift"] <= guard["limit"]
    assert os.path.getsize(out) < os.path.getsize(os.path.join(runs[family], "export", f"{family}_float32.tflite"))


@pytest.mark.parametrize("family", ["padim", "ganomaly"])
def test_int8_chooses_the_operating_point_again_on_its_own_scores(runs, category, family, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    from mvtec_keras.cli.finetune import cli as finetune_cli

    run = runs[family]
    assert finetune_cli(["-p", run, "-q"]) == 0
    try:
        with open(os.path.join(run, "finetune.json")) as f:
            float_op = json.load(f)
        out = str(tmp_path / f"{family}.tflite")
        assert export_cli(["-p", run, "--precision", "int8", "--calibration", "5", "--out", out, "-q"]) == 0
    finally:
        os.remove(os.path.join(run, "finetune.json"))
    op = read_metadata(out)["operating_point"]
    assert op["float_threshold"] == float_op["threshold"] and "int8 scores" in op["chosen_on"]
    assert op["rule"] == float_op["rule"] and op["decision"] == float_op["decision"]
    if op["decision"] == "image_score":  # the graph's own decision uses the new threshold
        runner = Interpreter(model_path=out).get_signature_runner("serve")
        for img in _val_u8(category):
            res = runner(image=img[None])
            assert int(res["decision"][0]) == int(float(res["score"][0]) >= op["threshold"])


def _onnx_installed() -> bool:
    """The optional ONNX extra (requirements-onnx.txt; CI installs it, the README's test command too)."""
    return all(importlib.util.find_spec(m) is not None for m in ("tf2onnx", "onnxruntime"))


def test_saved_model_serving_signature(runs, category, tmp_path):
    import tensorflow as tf

    x = _val_u8(category)
    ref_s, ref_m = _keras_scores(runs["padim"], x)
    sm = str(tmp_path / "sm")
    assert export_cli(["-p", runs["padim"], "--format", "saved_model", "--out", sm, "-q"]) == 0
    serve = tf.saved_model.load(sm).signatures["serve"]
    out = serve(image=tf.constant(x))  # any batch size
    np.testing.assert_allclose(out["score"].numpy(), ref_s, rtol=1e-4)
    np.testing.assert_allclose(out["map"].numpy(), ref_m, atol=1e-3)


def test_onnx_export_matches_keras_or_names_the_missing_extra(runs, category, tmp_path, capsys):
    x = _val_u8(category)
    onnx_path = str(tmp_path / "padim.onnx")
    rc = export_cli(["-p", runs["padim"], "--format", "onnx", "--out", onnx_path, "-q"])
    if not _onnx_installed():  # a user who skipped the extra gets one line saying how to install it
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "pip install '.[onnx]'" in err[0]
        assert os.listdir(tmp_path) == []
        return
    assert rc == 0
    ref_s, ref_m = _keras_scores(runs["padim"], x)
    scores, maps = ExportedModel(onnx_path).score(x)  # onnxruntime
    np.testing.assert_allclose(scores, ref_s, rtol=1e-4)
    np.testing.assert_allclose(maps, ref_m, atol=1e-3)


def test_unsupported_requests_one_line_exit_2(runs, tmp_path, capsys):
    assert export_cli(["-p", runs["padim"], "--format", "onnx", "--precision", "int8"]) == 2
    assert export_cli(["-p", runs["padim"], "--format", "tflite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "only LiteRT files are quantised" in err[0] and "--format" in err[1]


def test_anogan_says_why_it_cannot_be_exported(category, tmp_path, capsys):
    cat, train, val = category
    det = detector_class("anogan")(**{**GAN, "search_steps": 2})
    from mvtec_keras.data import load_arrays

    det.fit(load_arrays(train, Preprocessing(size=SIZE, color_mode="rgb"))["image"], verbose=0)
    run = _write_run(str(tmp_path / "anogan"), det, cat, Preprocessing(size=SIZE, color_mode="rgb"), val)
    assert export_cli(["-p", run]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "anogan cannot be exported" in err[0]
    assert not os.path.exists(os.path.join(run, "export"))


def test_missing_or_unfitted_run_one_line_exit_2_writes_nothing(tmp_path, capsys):
    assert export_cli(["-p", str(tmp_path / "nope")]) == 2
    unfitted = tmp_path / "unfitted"
    unfitted.mkdir()
    (unfitted / "info.json").write_text(json.dumps({"preprocessing": {"size": 32}}))
    assert export_cli(["-p", str(unfitted)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert sorted(os.listdir(unfitted)) == ["info.json"]
    assert sorted(os.listdir(tmp_path)) == ["unfitted"]


@pytest.fixture()
def folder(category, tmp_path):
    """A good image, an unreadable file and a wrong-mode (32-bit integer) image."""
    from PIL import Image

    cat, _, _ = category
    d = tmp_path / "line"
    d.mkdir()
    good = next(s.path for s in cat.test if s.label == 1)
    Image.open(good).resize((45, 40)).save(d / "a_good.png")  # camera size differs: resized outside the graph
    (d / "b_broken.png").write_bytes(b"not an image")
    Image.fromarray(np.zeros((SIZE, SIZE), np.int32)).save(d / "c_mode.tif")
    return d


def _rows(out):
    with open(os.path.join(out, "predictions.csv")) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("source", ["run", "tflite"])
def test_predict_folder_with_bad_files(runs, folder, tmp_path, capsys, source):
    path = runs["padim"] if source == "run" else os.path.join(runs["padim"], "export", "padim_float32.tflite")
    out = str(tmp_path / "pred")
    assert predict_cli(["-p", path, str(folder), "--out", out, "-q"]) == 2
    rows = _rows(out)
    assert [os.path.basename(r["file"]) for r in rows] == ["a_good.png", "b_broken.png", "c_mode.tif"]
    assert rows[0]["error"] == "" and float(rows[0]["score"]) > 0 and rows[0]["decision"] in ("0", "1")
    assert "unreadable or corrupt image" in rows[1]["error"] and rows[1]["score"] == ""
    assert "unsupported pixel format 'I'" in rows[2]["error"]
    captured = capsys.readouterr()
    assert "1 scored" in captured.out and "2 unreadable" in captured.out
    assert len([ln for ln in captured.err.splitlines() if ln.startswith("error: ")]) == 2
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["threshold_from_validation_fpr"] and summary["operating_point"]["decision"] == "image_score"
    assert summary["n_anomalous"] == len(os.listdir(os.path.join(out, "overlays"))) if summary["n_anomalous"] \
        else not os.path.exists(os.path.join(out, "overlays"))


def test_predict_searches_folders_of_folders_and_recursive_globs(runs, category, tmp_path):
    from PIL import Image

    from mvtec_keras.runtime.images import list_images

    cat, _, _ = category
    src = [s.path for s in cat.test[:2]]
    test = tmp_path / "test"
    for sub in ("good", "crack"):  # the same file names in two subfolders, as in an MVTec test set
        (test / sub).mkdir(parents=True)
        for i, p in enumerate(src):
            Image.open(p).save(test / sub / f"{i:03d}.png")
    (test / "crack" / "notes.txt").write_text("not an image")
    want = [str(test / sub / f"{i:03d}.png") for sub in ("crack", "good") for i in range(2)]
    assert list_images([str(test)]) == want
    assert list_images([str(tmp_path / "**" / "*.png")]) == want
    assert list_images([str(test / "*")]) == want  # a glob that matches folders searches them
    out = str(tmp_path / "pred")
    assert predict_cli(["-p", runs["padim"], str(test), "--out", out, "-q"]) == 0
    assert [r["file"] for r in _rows(out)] == want  # same-named files of different folders kept apart
    assert all(r["error"] == "" for r in _rows(out))


def test_predict_uses_finetune_operating_point_and_draws_overlays(runs, folder, tmp_path):
    run = runs["autoencoder"]
    op = {"decision": "segmentation", "threshold": -1.0, "min_area": 1, "method": "ssim", "map_sigma": 0.0,
          "mode": "fpr"}  # a threshold below every value: one region... touching the border, so not counted
    write_json(os.path.join(run, "finetune.json"), op)
    try:
        out = str(tmp_path / "p")
        assert predict_cli(["-p", run, str(folder / "a_good.png"), "--out", out, "-q"]) == 0
        row = _rows(out)[0]
        assert row["decision"] == "0" and row["anomalous_area_px"] == "0" and float(row["threshold"]) == -1.0
        summary = json.load(open(os.path.join(out, "summary.json")))
        assert not summary["threshold_from_validation_fpr"] and summary["operating_point"]["min_area"] == 1
        op["threshold"], op["decision"] = 0.0, "image_score"  # every image flagged: an overlay is drawn
        write_json(os.path.join(run, "finetune.json"), op)
        out2 = str(tmp_path / "p2")
        assert predict_cli(["-p", run, str(folder / "a_good.png"), "--out", out2, "-q"]) == 0
        assert _rows(out2)[0]["decision"] == "1" and os.listdir(os.path.join(out2, "overlays")) == ["a_good.png"]
    finally:
        os.remove(os.path.join(run, "finetune.json"))


def test_runtime_preprocessing_matches_training(tmp_path):
    """The numpy resize / colour path equals the tf.data pipeline (camera sizes, both colour modes, crop)."""
    from PIL import Image

    from mvtec_keras.data.pipeline import load_image

    rng = np.random.default_rng(0)
    cases = [((53, 61, 3), "RGB"), ((20, 17), "L"), ((64, 64, 4), "RGBA"), ((32, 32, 3), "RGB")]
    for i, (shape, mode) in enumerate(cases):
        p = str(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(p)
        for prep in (Preprocessing(32, "rgb"), Preprocessing(32, "grayscale"), Preprocessing(40, "rgb", crop=32)):
            ours = to_model_input(read_image(p), prep.to_dict())
            np.testing.assert_allclose(ours, load_image(p, prep), atol=2e-6, err_msg=f"{shape} {prep}")
    # 16-bit grey (PNG and TIFF), scaled by bit depth as training reads it
    for ext in (".png", ".tif"):
        p = str(tmp_path / f"grey16{ext}")
        Image.fromarray(rng.integers(0, 65536, (37, 29)).astype(np.uint16)).save(p)
        assert Image.open(p).mode.startswith("I;16") and read_image(p).dtype == np.uint16
        for prep in (Preprocessing(32, "grayscale"), Preprocessing(32, "rgb")):
            ours = to_model_input(read_image(p), prep.to_dict())
            np.testing.assert_allclose(ours, load_image(p, prep), atol=2e-6, err_msg=f"{ext} {prep}")
    # at input size and colour mode the uint8 graph input is exact
    same = str(tmp_path / "3.png")
    np.testing.assert_array_equal(to_uint8(to_model_input(read_image(same), {"size": 32, "color_mode": "rgb"})),
                                  np.asarray(Image.open(same)))


_NO_TF = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from mvtec_keras.cli.predict import cli
code = cli(sys.argv[1:])
assert not any(m.split('.')[0] in ('tensorflow', 'keras') for m in sys.modules)
sys.exit(code)
"""


def test_tflite_predict_runs_without_tensorflow(runs, category, tmp_path):
    _, _, val = category
    path = os.path.join(runs["patchcore"], "export", "patchcore_float32.tflite")
    out = str(tmp_path / "p")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), *sys.path]))
    proc = subprocess.run([sys.executable, "-c", _NO_TF, "-p", path, *[s.path for s in val], "--out", out, "-q"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scores = np.array([float(r["score"]) for r in _rows(out)])
    ref, _ = _keras_scores(runs["patchcore"], _val_u8(category))
    np.testing.assert_allclose(scores, ref, rtol=1e-4, atol=1e-6)


def test_python_m_entry_points(runs, folder, tmp_path):
    from mvtec_keras.cli.main import COMMANDS, main

    assert {"predict", "export"} <= set(COMMANDS)
    out = str(tmp_path / "p")
    tfl = os.path.join(runs["mahalanobis"], "export", "mahalanobis_float32.tflite")
    assert main(["predict", "-p", tfl, str(folder / "a_good.png"), "--out", out, "-q"]) == 0
    assert main(["export", "-p", str(tmp_path / "missing")]) == 2


def test_graph_decision_threshold_decides_like_thresholds_decide():
    from mvtec_keras.export.graph import _float32_at_or_above

    rng = np.random.default_rng(0)
    for v in np.concatenate([rng.normal(0, 100, 2000), [0.1, 1 / 3, 2.0, -0.0]]):
        t = _float32_at_or_above(v)
        s = np.float32(v)
        for c in (np.nextafter(s, np.float32(-np.inf)), s, np.nextafter(s, np.float32(np.inf))):
            assert (float(c) >= v) == bool(c >= t), (v, c, t)  # float32 compare == float64 compare


def test_pooled_features_survive_litert_mean_over_a_large_map(tmp_path):
    """LiteRT's MEAN sums sequentially in float32: one mean over 112 x 112 positions drifted ~1e-5 relative,
    which Mahalanobis' distances on bottle turned into 4e-4. ``pooled`` (rows, then columns) stays close."""
    import keras
    from ai_edge_litert.interpreter import Interpreter

    from mvtec_keras.detectors.components.feature_maps import pooled

    rng = np.random.default_rng(0)
    x = (3.0 + rng.random((1, 112, 112, 16))).astype(np.float32)  # ReLU6-like, large mean: the hard case
    truth = x.astype(np.float64).mean(axis=(1, 2))
    inp = keras.Input((112, 112, 16), batch_size=1)
    errors = {}
    for name, fn in {"pooled": pooled, "one_mean": lambda t: keras.ops.mean(t, axis=(1, 2))}.items():
        path = str(tmp_path / f"{name}.tflite")
        keras.Model(inp, fn(inp)).export(path, format="litert", verbose=False)
        it = Interpreter(model_path=path)
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], x)
        it.invoke()
        errors[name] = float(np.max(np.abs(it.get_tensor(it.get_output_details()[0]["index"]) - truth) / truth))
    assert errors["pooled"] < 1e-6 and errors["pooled"] < errors["one_mean"] / 5, errors


# -- every family in every format and precision (slow: ~90 exports; the fast tests above cover one of each) --
#: the other four CAEs; their pooling depths need 64-128 px, so they get their own grayscale category
OTHER_CAES = ("baselineCAE", "inceptionCAE", "resnetCAE", "skipCAE")
CAE_SIZE = 128
FORMATS = [("litert", "float16"), ("litert", "dynamic"), ("saved_model", "float32"), ("onnx", "float32")]


@pytest.fixture(scope="module")
def cae_runs(tmp_path_factory):
    from mvtec_keras.data import load_arrays

    root = make_mvtec(str(tmp_path_factory.mktemp("data") / "grey"), size=CAE_SIZE, n_train=8, n_good=2,
                      defects=("hole",), n_defect=2, channels=1)
    cat = discover(root)
    train, val = split_validation(cat.train, 0.25, 0)
    prep = Preprocessing(size=CAE_SIZE, color_mode="grayscale")
    x = load_arrays(train, prep)["image"]
    base = tmp_path_factory.mktemp("cae_runs")
    runs = {}
    for name in OTHER_CAES:
        det = detector_class("autoencoder")(name, (CAE_SIZE, CAE_SIZE, 1), epochs=1, batch_size=4)
        det.fit(x, verbose=0)
        runs[name] = _write_run(str(base / name), det, cat, prep, val)
    u8 = np.stack([to_uint8(to_model_input(read_image(s.path), {"size": CAE_SIZE, "color_mode": "grayscale"}))
                   for s in val])
    return runs, u8


def _check_export(run, fmt, precision, x, out):
    """Export ``run`` as asked and score ``x`` (uint8) with the file; returns (scores, maps, Keras')."""
    if fmt == "onnx" and not _onnx_installed():
        pytest.skip("the ONNX extra is not installed (requirements-onnx.txt)")
    assert export_cli(["-p", run, "--format", fmt, "--precision", precision, "--calibration", "4",
                       "--out", out, "-q"]) == 0
    meta = read_metadata(out) if fmt != "saved_model" else None
    if fmt == "litert":
        with open(out, "rb") as f:
            assert converters.flex_ops(f.read()) == []
        assert meta["precision"] == precision
    if fmt == "saved_model":
        import tensorflow as tf

        serve = tf.saved_model.load(out).signatures["serve"]  # TF Serving's signature
        res = [serve(image=tf.constant(img[None])) for img in x]
        scores = np.concatenate([r["score"].numpy().reshape(-1) for r in res])
        maps = np.concatenate([r["map"].numpy() for r in res]) if "map" in res[0] else None
    else:
        scores, maps = ExportedModel(out).score(x)  # ai-edge-litert / onnxruntime
    ref_s, ref_m = _keras_scores(run, x)
    assert np.all(np.isfinite(scores)) and (maps is None) == (ref_m is None)
    return scores, maps, ref_s, ref_m


def _assert_parity(fmt, precision, scores, maps, ref_s, ref_m):
    if precision == "float32":  # SavedModel and ONNX: the same float graph
        np.testing.assert_allclose(scores, ref_s, rtol=1e-4, atol=1e-6)
        if maps is not None:
            np.testing.assert_allclose(maps, ref_m, atol=1e-3)
    elif precision == "float16":  # float16 weights, float32 activations
        np.testing.assert_allclose(scores, ref_s, rtol=0.05, atol=1e-3)
    else:  # dynamic: int8 weights and int8 activations inside each op: same scale, not the same digits
        np.testing.assert_allclose(scores, ref_s, rtol=0.5, atol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("family,fmt,precision", [  # float16 / dynamic of a fitted head: refused (tested above)
    (f, fmt, p) for f in sorted(FAMILIES) for fmt, p in FORMATS if not (f in INT8_REFIT and p != "float32")])
def test_every_family_in_every_format(runs, category, family, fmt, precision, tmp_path):
    out = str(tmp_path / {"litert": "m.tflite", "onnx": "m.onnx", "saved_model": "sm"}[fmt])
    res = _check_export(runs[family], fmt, precision, _val_u8(category), out)
    _assert_parity(fmt, precision, *res)


@pytest.mark.slow
@pytest.mark.parametrize("fmt,precision", [("litert", "float32"), ("litert", "int8"), *FORMATS])
@pytest.mark.parametrize("name", OTHER_CAES)
def test_every_autoencoder_in_every_format(cae_runs, name, fmt, precision, tmp_path):
    runs, x = cae_runs
    out = str(tmp_path / {"litert": "m.tflite", "onnx": "m.onnx", "saved_model": "sm"}[fmt])
    scores, maps, ref_s, ref_m = _check_export(runs[name], fmt, precision, x, out)
    assert maps.shape == (len(x), CAE_SIZE, CAE_SIZE)
    if precision == "int8":  # int8 network, float SSIM head
        assert {"QUANTIZE", "DEQUANTIZE"} <= set(read_metadata(out)["litert_ops"])
        np.testing.assert_allclose(scores, ref_s, rtol=0.5)
    else:
        _assert_parity(fmt, precision, scores, maps, ref_s, ref_m)


@pytest.mark.parametrize("kernel,block", [(8, 4), (8, 2), (7, 4), (3, 2)])
def test_space_to_depth_rewrite_computes_the_same_conv(kernel, block):
    import keras
    import tensorflow as tf

    from mvtec_keras.export.rewrite import SpaceToDepthConv2D

    rng = np.random.default_rng(kernel + block)
    x = rng.normal(size=(2, 16, 24, 5)).astype(np.float32)
    conv = keras.layers.Conv2D(3, kernel, padding="same", activation="sigmoid")
    conv.build(x.shape)
    conv.kernel.assign(rng.normal(size=conv.kernel.shape).astype(np.float32))
    conv.bias.assign(rng.normal(size=3).astype(np.float32))
    truth = tf.sigmoid(tf.nn.conv2d(tf.constant(x, tf.float64), tf.constant(conv.kernel.numpy(), tf.float64), 1,
                                    "SAME") + conv.bias.numpy()).numpy()
    np.testing.assert_allclose(SpaceToDepthConv2D(conv, block)(x).numpy(), truth, atol=1e-5)


@pytest.mark.parametrize("kernel,stride", [(4, 2), (3, 2), (2, 2), (6, 3), (5, 2)])
def test_phase_rewrite_computes_the_same_transposed_conv(kernel, stride):
    import keras
    import tensorflow as tf

    from mvtec_keras.export.rewrite import PhaseConv2DTranspose

    rng = np.random.default_rng(kernel + stride)
    x = rng.normal(size=(2, 5, 7, 4)).astype(np.float32)
    layer = keras.layers.Conv2DTranspose(3, kernel, strides=stride, padding="same", activation="sigmoid")
    layer.build(x.shape)
    layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype(np.float32))
    layer.bias.assign(rng.normal(size=3).astype(np.float32))
    out_shape = (2, 5 * stride, 7 * stride, 3)
    truth = tf.sigmoid(tf.nn.conv2d_transpose(tf.constant(x, tf.float64), tf.constant(layer.kernel.numpy(), tf.float64),
                                              out_shape, stride, "SAME") + layer.bias.numpy()).numpy()
    np.testing.assert_allclose(layer(x).numpy(), truth, atol=1e-5)  # the Keras layer is that op
    np.testing.assert_allclose(PhaseConv2DTranspose(layer)(x).numpy(), truth, atol=1e-5)


def test_autoencoder_export_runs_its_reconstruction_conv_in_space_to_depth_form(runs):
    # mvtecCAE's last layer (8 x 8 kernel, 3 channels at full size) is rewritten; parity is checked above
    ops = read_metadata(os.path.join(runs["autoencoder"], "export", "autoencoder_float32.tflite"))["litert_ops"]
    assert {"SPACE_TO_DEPTH", "DEPTH_TO_SPACE"} <= set(ops)
    assert "TRANSPOSE_CONV" in ops  # float graphs keep them: the phase form holds zero taps


def test_int8_autoencoder_runs_its_transposed_convs_in_phase_form(runs, tmp_path):
    out = str(tmp_path / "ae.tflite")
    assert export_cli(["-p", runs["autoencoder"], "--precision", "int8", "--calibration", "5", "--out", out, "-q"]) == 0
    ops = read_metadata(out)["litert_ops"]
    assert "TRANSPOSE_CONV" not in ops and "DEPTH_TO_SPACE" in ops  # convs + depth-to-space, same sums
    plain = read_metadata(os.path.join(runs["dense_ae"], "export", "dense_ae_float32.tflite"))["litert_ops"]
    assert "SPACE_TO_DEPTH" not in plain


def test_a_run_trained_in_bfloat16_exports_in_float32(category, tmp_path):
    """train.py --precision auto picks mixed_bfloat16 on CPUs with AVX512-BF16/AMX: LiteRT has no bfloat16
    convolutions, so the export computes in float32 (same weights) and chooses the operating point again."""
    from mvtec_keras.cli.finetune import cli as finetune_cli
    from mvtec_keras.data import load_arrays
    from mvtec_keras.detectors import load_detector
    from mvtec_keras.export.graph import float32_networks
    from mvtec_keras.operating_point import configure_detector, load_operating_point

    cat, train, val = category
    prep = Preprocessing(size=SIZE, color_mode="rgb")
    det = detector_class("autoencoder")("mvtecCAE", (SIZE, SIZE, 3), epochs=1, batch_size=4,
                                        precision="mixed_bfloat16")
    det.fit(load_arrays(train, prep)["image"], verbose=0)
    run = _write_run(str(tmp_path / "bf16"), det, cat, prep, val)
    assert finetune_cli(["-p", run, "-q"]) == 0
    trained_op = json.load(open(os.path.join(run, "finetune.json")))
    for precision in ("float32", "int8"):
        out = str(tmp_path / f"bf16_{precision}.tflite")
        assert export_cli(["-p", run, "--precision", precision, "--calibration", "5", "--out", out, "-q"]) == 0
        assert converters.flex_ops(open(out, "rb").read()) == []
        meta = read_metadata(out)
        assert "mixed_bfloat16" in meta["mixed_precision_training"]
        assert meta["operating_point"]["finetune_threshold"] == trained_op["threshold"]
        assert f"{precision} scores" in meta["operating_point"]["chosen_on"]
    x = _val_u8(category)
    scores, maps = ExportedModel(str(tmp_path / "bf16_float32.tflite")).score(x)
    reference = load_detector(run)
    configure_detector(reference, load_operating_point(run))  # finetune.json's map blur, as the export has it
    assert float32_networks(reference) == ["autoencoder"]
    ref_s, ref_m = reference.score_batch(x.astype(np.float32) / 255.0)
    np.testing.assert_allclose(scores, np.asarray(ref_s).reshape(-1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(maps, np.asarray(ref_m), atol=1e-3)


@pytest.mark.parametrize("needed", [0, 1, 7, 19])
def test_int8_guard_keeps_the_fewest_last_layers_float_that_meet_the_limit(monkeypatch, tmp_path, needed):
    """The bisection, on a stand-in network of 20 layers whose drift falls below the limit once its last
    ``needed`` layers are float (int8 conversion and scoring are faked; the real ones are in bench/export.py)."""
    from types import SimpleNamespace

    from mvtec_keras.export import exporter

    scopes = [f"net/layer_{i}" for i in range(20)]
    ref = np.linspace(1.0, 2.0, 9)
    converted = []

    def to_lite(float_scopes):
        assert list(float_scopes) == scopes[len(scopes) - len(float_scopes):]  # always a tail
        converted.append(len(float_scopes))
        return str(len(float_scopes)).encode()

    def run_exported(path, fmt, images, has_maps, shape):
        n = int(open(path, "rb").read())
        return ref * (1 + (0.005 if n >= needed else 0.3 - 0.01 * n)), None

    monkeypatch.setattr(exporter, "_keras_scorer", lambda det: lambda u8: (ref, None))
    monkeypatch.setattr(exporter, "_run_exported", run_exported)
    monkeypatch.setattr(exporter, "network_prefixes", lambda det: ["net"])
    monkeypatch.setattr("mvtec_keras.export.quantize.network_scopes", lambda flat, prefixes: scopes)
    det = SimpleNamespace(name="stand-in", has_maps=False)
    flat, record = exporter._int8_guard(b"0", to_lite, det, np.zeros((9, 4, 4, 1), np.uint8), (4, 4, 1),
                                        str(tmp_path))
    assert flat == str(needed).encode() and len(record["float_scopes"]) == needed
    assert record["float_scopes"] == tuple(scopes[20 - needed:])
    assert record["score_drift"] == pytest.approx(0.005) and record["network_layers"] == 20
    assert record["score_drift_all_int8"] == pytest.approx(0.005 if needed == 0 else 0.3)
    assert len(converted) <= 6  # bisection: about log2(20) conversions, not 20


def test_int8_guard_refuses_a_network_that_misses_the_limit_with_only_its_first_layer_int8(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from mvtec_keras.export import exporter

    monkeypatch.setattr(exporter, "_keras_scorer", lambda det: lambda u8: (np.ones(3), None))
    monkeypatch.setattr(exporter, "_run_exported", lambda *a: (np.full(3, 1.5), None))
    monkeypatch.setattr(exporter, "network_prefixes", lambda det: ["net"])
    monkeypatch.setattr("mvtec_keras.export.quantize.network_scopes", lambda flat, prefixes: ["net/a", "net/b"])
    with pytest.raises(exporter.NotExportable, match="drift by 50.00%.*first layer int8.*export float32"):
        exporter._int8_guard(b"0", lambda s: b"1", SimpleNamespace(name="x", has_maps=False),
                             np.zeros((3, 4, 4, 1), np.uint8), (4, 4, 1), str(tmp_path))


def test_int8_autoencoder_records_its_score_drift_and_refuses_past_the_limit(runs, category, tmp_path,
                                                                           monkeypatch, capsys):
    from mvtec_keras.export import exporter

    run = runs["autoencoder"]
    first = str(tmp_path / "a.tflite")
    assert export_cli(["-p", run, "--precision", "int8", "--calibration", "5", "--out", first, "-q"]) == 0
    guard = read_metadata(first)["int8"]["float_layers_guard"]
    x = _val_u8(category)
    ref, _ = _keras_scores(run, x)

    def drift(path):
        s, _ = ExportedModel(path).score(x)
        return float(np.median(np.abs(s - ref)) / np.median(np.abs(ref)))

    assert guard["score_drift"] <= guard["limit"] == exporter.INT8_MAX_SCORE_DRIFT
    assert drift(first) == pytest.approx(guard["score_drift"], rel=1e-3, abs=1e-7)  # measured on these images
    assert guard["float_layers"] == [] and guard["score_drift_all_int8"] == guard["score_drift"] > 0
    # no number of float layers can meet a zero limit: one line, exit 2, nothing written
    monkeypatch.setattr(exporter, "INT8_MAX_SCORE_DRIFT", 0.0)
    third = str(tmp_path / "c.tflite")
    capsys.readouterr()
    assert export_cli(["-p", run, "--precision", "int8", "--calibration", "5", "--out", third, "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "drift" in err[0] and "float32" in err[0]
    assert not os.path.exists(third) and not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-export")]
