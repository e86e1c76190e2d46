"""Operating points through the scripts: runs without finetune.json, detectors that decide on their
image score, the rule recorded in finetune.json, damaged saved state, flag ranges, 16-bit images."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
from helpers import make_mvtec
from PIL import Image

from mvtec_keras.cli import extract, finetune, test, train
from mvtec_keras.operating_point import configure_detector, load_operating_point, operating_point_for_run


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "widget"
    return make_mvtec(str(root), size=32, n_train=12, n_good=6, defects=("scratch",), n_defect=6, channels=1)


@pytest.fixture(scope="module")
def padim_run(category, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "padim")
    assert extract.cli(["-d", category, "-m", "padim", "-b", "efficientnet-b0", "-w", "none", "--size", "64",
                        "--param", "n_features=16", "--out", out, "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def gan_run(category, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "ganomaly")
    assert train.cli(["-d", category, "-a", "ganomaly", "--size", "32", "-b", "4", "--epochs", "1",
                      "--out", out, "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def maha_run(category, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "maha")
    assert extract.cli(["-d", category, "-m", "mahalanobis", "-b", "efficientnet-b0", "-w", "none", "--size", "64",
                        "--param", "levels=[2,3]", "--out", out, "-q"]) == 0
    return out


def _result(run):
    with open(os.path.join(run, "test", "test_result.json")) as f:
        return json.load(f)


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


# -- runs without finetune.json ----------------------------------------------------
@pytest.mark.parametrize("run", ["padim_run", "gan_run"])
def test_test_py_without_finetune_uses_the_normal_only_rule(run, request, capsys):
    run = request.getfixturevalue(run)
    shutil.rmtree(os.path.join(run, "test"), ignore_errors=True)
    if os.path.exists(os.path.join(run, "finetune.json")):
        os.remove(os.path.join(run, "finetune.json"))
    assert test.cli(["-p", run, "--max-overlays", "2"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("no finetune.json")]
    assert len(lines) == 1 and "normal-only rule" in lines[0]
    res = _result(run)
    assert res["rule"] == "fpr" and res["decision"] == "image_score"
    assert res["operating_point_source"] == "validation normals (no finetune.json)"
    for key in ("image_auroc", "image_ap", "f1_max", "tpr", "tnr", "balanced_accuracy", "threshold"):
        assert res[key] is not None, key
    assert res["n_excluded_finetune"] == 0 and res["n_images"] == 12
    with open(os.path.join(run, "test", "predictions.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {r["prediction"] for r in rows} <= {"0", "1"}
    # The same point as the library gives (predict.py will call it): above every validation score.
    from mvtec_keras.detectors import load_detector

    det = load_detector(run)
    op = operating_point_for_run(run, det)
    assert op["threshold"] == pytest.approx(res["threshold"])
    assert not os.path.exists(os.path.join(run, "finetune.json"))  # test.py writes only under test/


# -- detectors whose score is not a summary of their map -----------------------------
def test_gan_decides_on_its_image_score(gan_run):
    from mvtec_keras.detectors import detector_class

    assert not detector_class("ganomaly").score_is_map_summary
    assert not detector_class("efficientgan").score_is_map_summary
    assert not detector_class("anogan").score_is_map_summary
    assert not detector_class("mahalanobis").score_is_map_summary
    assert detector_class("ensemble")(detector="ganomaly").score_is_map_summary is False
    assert detector_class("padim").score_is_map_summary and detector_class("autoencoder").score_is_map_summary
    assert finetune.cli(["-p", gan_run, "-q"]) == 0
    ft = load_operating_point(gan_run)
    assert ft["decision"] == "image_score" and ft["min_area"] is None and ft["rule"] == "balanced"
    assert 0 < ft["tpr"] or ft["tnr"] < 1  # flags something on the finetune split ...
    assert ft["tpr"] < 1 or ft["tnr"] > 0  # ... but not everything
    assert finetune.cli(["-p", gan_run, "--rule", "search"]) == 2  # map regions refused for a GAN
    assert test.cli(["-p", gan_run, "-q", "--max-overlays", "0"]) == 0
    res = _result(gan_run)
    assert res["decision"] == "image_score" and res["rule"] == "balanced"
    assert res["pixel_auroc"] is not None  # the map is still evaluated for localisation


def test_mahalanobis_rules(maha_run, capsys):
    assert finetune.cli(["-p", maha_run]) == 0
    assert "operating point by rule 'balanced'" in capsys.readouterr().out
    ft = load_operating_point(maha_run)
    assert ft["decision"] == "image_score" and ft["rule"] == "balanced" and ft["finetune_files"]
    # Untrained features on two finetune images: the point may be poor, but never flags all or none.
    assert ft["n_finetune"] == 2 and (ft["tpr"] + (1 - ft["tnr"])) == 1.0
    assert ft["chosen_by"] == "auto" and [c["rule"] for c in ft["candidates"]] == ["balanced"]
    assert finetune.cli(["-p", maha_run, "--rule", "chi2", "--target-fpr", "0.05"]) == 0
    assert "operating point by rule 'chi2'" in capsys.readouterr().out
    ft = load_operating_point(maha_run)
    assert ft["rule"] == "chi2" and ft["target_fpr"] == 0.05 and ft["finetune_files"] == []
    assert test.cli(["-p", maha_run, "-q"]) == 0
    assert _result(maha_run)["rule"] == "chi2"
    assert finetune.cli(["-p", maha_run, "--rule", "f1", "-q"]) == 0
    assert load_operating_point(maha_run)["rule"] == "f1"


def test_padim_chi2_and_search(padim_run):
    assert finetune.cli(["-p", padim_run, "--rule", "chi2", "-q"]) == 0
    ft = load_operating_point(padim_run)
    assert ft["rule"] == "chi2" and ft["decision"] == "image_score"
    assert finetune.cli(["-p", padim_run, "--min-area", "5:50:5", "--rule", "search", "-q"]) == 0
    ft = load_operating_point(padim_run)
    assert ft["rule"] == "search" and ft["decision"] == "segmentation" and "candidates" not in ft
    assert 0 < ft["tpr"] + (1 - ft["tnr"])  # flags something on the finetune split
    # auto compares the map regions with the image score on the same split and keeps the better.
    assert finetune.cli(["-p", padim_run, "--min-area", "5:50:5", "-q"]) == 0
    ft = load_operating_point(padim_run)
    cands = {c["rule"]: c["score"] for c in ft["candidates"]}
    assert set(cands) == {"balanced", "search"} and ft["score"] == max(cands.values())
    assert ft["rule"] == ("balanced" if cands["balanced"] >= cands["search"] else "search")


def test_no_defect_images_anywhere_uses_the_normal_only_rule(tmp_path, capsys):
    root = make_mvtec(str(tmp_path / "plain"), size=32, n_train=12, n_good=4, defects=(), channels=1)
    out = str(tmp_path / "padim")
    assert extract.cli(["-d", root, "-m", "padim", "-b", "efficientnet-b0", "-w", "none", "--size", "64",
                        "--param", "n_features=16", "--out", out, "-q"]) == 0
    assert finetune.cli(["-p", out, "--rule", "f1"]) == 0
    printed = capsys.readouterr().out
    assert "operating point by rule 'fpr'" in printed and "asked for 'f1'" in printed
    ft = load_operating_point(out)
    assert ft["rule"] == "fpr" and ft["requested_rule"] == "f1" and "normal-only" in ft["fallback"]


# -- the autoencoder's image-score reduction -----------------------------------------
def test_autoencoder_score_reduction_is_chosen_and_applied(category, tmp_path):
    out = str(tmp_path / "cae")
    assert train.cli(["-d", category, "-a", "mvtecCAE", "--size", "32", "-b", "4", "--epochs", "1",
                      "--out", out, "-q"]) == 0
    assert finetune.cli(["-p", out, "--min-area", "5:30:5", "--map-sigmas", "0,2", "-q"]) == 0
    ft = load_operating_point(out)
    table = ft["score_reduction_search"]
    assert set(table) == {"max", "mean", "topk"} and table[ft["score_reduction"]] == max(table.values())
    assert ft["rule"] in ("search", "balanced") and ft["map_sigma"] in (0, 2)
    assert [c["rule"] for c in ft["candidates"]] == ["balanced", "search"]
    from mvtec_keras.detectors import load_detector

    det = configure_detector(load_detector(out), ft)
    assert det.score_reduction == ft["score_reduction"] and det.map_sigma == ft["map_sigma"]
    # scores_from_maps (how finetune.py compares reductions) equals the detector's own scoring graph.
    x = np.random.default_rng(0).random((3, 32, 32, 1)).astype(np.float32)
    det.map_sigma = 0.0
    s, raw = det.score_batch(x)
    np.testing.assert_allclose(det.scores_from_maps(np.asarray(raw)), np.asarray(s), rtol=1e-4, atol=1e-6)
    assert test.cli(["-p", out, "-q", "--max-overlays", "0"]) == 0
    assert _result(out)["score_reduction"] == ft["score_reduction"]


# -- damaged saved state ----------------------------------------------------------------
def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(max(1, os.path.getsize(path) // 3))


@pytest.mark.parametrize("run,name", [("padim_run", "padim_state.npz"), ("padim_run", "extractor.weights.h5"),
                                      ("gan_run", "model.weights.h5"), ("cae_run", "model.keras")])
def test_damaged_saved_state_names_the_file(run, name, request, tmp_path, capsys, category):
    if run == "cae_run":
        src = str(tmp_path / "cae")
        assert train.cli(["-d", category, "-a", "mvtecCAE", "--size", "32", "-b", "4", "--epochs", "1",
                          "--out", src, "-q"]) == 0
    else:
        src = request.getfixturevalue(run)
    run = str(tmp_path / "copy")
    shutil.copytree(src, run)
    shutil.rmtree(os.path.join(run, "test"), ignore_errors=True)
    assert os.path.isfile(os.path.join(run, name)), os.listdir(run)
    _truncate(os.path.join(run, name))
    before = sorted(os.listdir(run))
    assert test.cli(["-p", run, "-q"]) == 2
    line = _one_line_error(capsys)
    assert name in line and "damaged" in line
    assert finetune.cli(["-p", run, "-q"]) == 2
    assert name in _one_line_error(capsys)
    assert sorted(os.listdir(run)) == before  # nothing written


# -- flag ranges ---------------------------------------------------------------------------
@pytest.mark.parametrize("script,args,flag", [
    ("train", ["--lr", "-1"], "--lr"),
    ("train", ["--lr", "0"], "--lr"),
    ("train", ["--epochs", "0"], "--epochs"),
    ("train", ["-b", "0"], "--batch-size"),
    ("train", ["--size", "4"], "--size"),
    ("train", ["--patience", "-1"], "--patience"),
    ("train", ["--val-fraction", "1.5"], "--val-fraction"),
    ("train", ["--seed", "-3"], "--seed"),
    ("train", ["--rotation", "-1"], "--rotation"),
    ("extract", ["--size", "0"], "--size"),
    ("extract", ["--size", "64", "--crop", "65"], "--crop"),
    ("extract", ["--batch-size", "0"], "--batch-size"),
    ("extract", ["--val-fraction", "-0.1"], "--val-fraction"),
])
def test_numeric_flags_are_range_checked(script, args, flag, category, tmp_path, capsys):
    out = str(tmp_path / "x")
    mod = {"train": train, "extract": extract}[script]
    extra = ["-w", "none"] if script == "extract" else []
    assert mod.cli(["-d", category, *extra, *args, "--out", out, "-q"]) == 2
    assert flag in _one_line_error(capsys)
    assert not os.path.exists(out)


@pytest.mark.parametrize("script,args,flag", [
    ("finetune", ["--target-fpr", "1.5"], "--target-fpr"),
    ("finetune", ["--target-fpr", "-0.1"], "--target-fpr"),
    ("finetune", ["--fpr-min-area", "0"], "--fpr-min-area"),
    ("finetune", ["-b", "0"], "--batch-size"),
    ("finetune", ["--finetune-fraction", "0"], "--finetune-fraction"),
    ("finetune", ["--rule", "magic"], "--rule"),
    ("finetune", ["--score-reductions", "median"], "--score-reductions"),
    ("test", ["--max-overlays", "-1"], "--max-overlays"),
    ("test", ["-b", "0"], "--batch-size"),
])
def test_numeric_flags_of_scoring_scripts(script, args, flag, padim_run, capsys):
    mod = {"finetune": finetune, "test": test}[script]
    assert mod.cli(["-p", padim_run, *args, "-q"]) == 2
    assert flag in _one_line_error(capsys)


def test_main_job_flags(capsys):
    from mvtec_keras.cli.main import main

    assert main(["run", "--epochs", "0"]) == 2
    assert "--epochs" in _one_line_error(capsys)


# -- 16-bit grey images ----------------------------------------------------------------------
def test_16bit_grey_png_and_tiff_are_read_scaled_by_bit_depth(tmp_path):
    from mvtec_keras.data import Preprocessing, discover, make_dataset

    rng = np.random.default_rng(0)
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # up to 65472
    for split, ext in (("train/good", ".png"), ("train/good", ".tif"), ("test/good", ".png"), ("test/good", ".tiff")):
        for i in range(3):
            p = tmp_path / "cat" / split / f"{i}{ext}"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ramp if i == 0 else rng.integers(0, 65536, (32, 32)).astype(np.uint16)).save(p)
    assert Image.open(tmp_path / "cat" / "train" / "good" / "0.tif").mode.startswith("I;16")
    cat = discover(str(tmp_path / "cat"))
    batch = next(iter(make_dataset(sorted(cat.train, key=lambda s: s.path), Preprocessing(size=32), 8)))
    x = batch["image"].numpy()
    paths = [p.decode() for p in batch["path"].numpy()]
    for i, p in enumerate(paths):
        if os.path.basename(p).startswith("0"):
            np.testing.assert_allclose(x[i, ..., 0], ramp / 65535.0, atol=1e-6)  # full 16-bit precision
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.99


def test_16bit_category_trains_tests_and_scores(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cat16"
    for split, n in (("train/good", 10), ("test/good", 3), ("test/spot", 3)):
        for i in range(n):
            img = (rng.normal(20000, 500, (32, 32))).clip(0, 65535).astype(np.uint16)
            if "spot" in split:
                img[10:16, 10:16] = 60000
            p = root / split / f"{i}{'.png' if i % 2 else '.tif'}"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(p)
    out = str(tmp_path / "run")
    assert train.cli(["-d", str(root), "-a", "mvtecCAE", "--size", "32", "-b", "4", "--epochs", "1",
                      "--out", out, "-q"]) == 0
    assert test.cli(["-p", out, "-q", "--max-overlays", "0"]) == 0
    assert _result(out)["n_images"] == 6
