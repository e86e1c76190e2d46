"""The scripts end to end on a tiny category, and their answers to bad input."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import make_mvtec

from mvtec_keras.cli import extract, finetune, test, train
from mvtec_keras.cli.main import main as mvtec_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "widget"
    return make_mvtec(str(root), size=64, n_train=16, n_good=6, defects=("scratch", "hole"), n_defect=5, channels=1)


@pytest.fixture(scope="module")
def trained(category, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "cae")
    rc = train.cli(["-d", category, "-a", "mvtecCAE", "-l", "ssim", "--size", "64", "-b", "4", "--epochs", "2",
                    "--rotation", "180", "--flip", "--out", out, "-i", "-q"])
    assert rc == 0
    return out


def test_train_writes_everything(trained):
    for f in ("model.keras", "info.json", "detector.json", "history.csv", "loss.png"):
        assert os.path.isfile(os.path.join(trained, f)), f
    assert os.path.isdir(os.path.join(trained, "logs"))
    assert os.listdir(os.path.join(trained, "inspection", "validation"))
    info = json.load(open(os.path.join(trained, "info.json")))
    assert info["architecture"] == "mvtecCAE" and info["loss"] == "ssim"
    assert info["preprocessing"] == {"size": 64, "color_mode": "grayscale", "crop": None}
    assert len(info["data"]["validation_files"]) == 2  # 10 % of 16, rounded
    assert info["training"]["epochs_trained"] == 2
    aug = info["augmentation"]
    assert aug["rotation_deg"] == 180 and aug["flip_horizontal"] and aug["flip_vertical"]


def test_finetune_then_test_excludes_finetune_split(trained, category):
    assert finetune.cli(["-p", os.path.join(trained, "model.keras"), "-m", "ssim", "--min-area", "5:50:5", "-q"]) == 0
    ft = json.load(open(os.path.join(trained, "finetune.json")))
    for key in ("min_area", "threshold", "score", "method", "dtype", "finetune_files"):
        assert key in ft
    assert ft["mode"] == "search" and ft["finetune_files"]
    assert os.path.isfile(os.path.join(trained, "finetune.png"))
    search = ft["map_sigma_search"]  # the map blur is chosen on the finetune split, by pixel AUROC
    assert set(search) == {"0", "2", "4", "8"}
    assert search[f"{ft['map_sigma']:g}"] == max(search.values())

    assert test.cli(["-p", os.path.join(trained, "model.keras"), "-s", "-q"]) == 0
    res = json.load(open(os.path.join(trained, "test", "test_result.json")))
    for key in ("image_auroc", "pixel_auroc", "aupro", "tpr", "tnr", "balanced_accuracy", "min_area",
                "threshold", "n_images"):
        assert key in res
    n_test = 6 + 10
    assert res["n_images"] == n_test - len(ft["finetune_files"])
    assert res["map_sigma"] == ft["map_sigma"]
    with open(os.path.join(trained, "test", "predictions.csv")) as f:
        rows = list(csv.DictReader(f))
    tested = {r["file"] for r in rows}
    assert len(rows) == res["n_images"]
    assert not tested & set(ft["finetune_files"])  # the finetune split never reaches the test metrics
    for f in ("roc_curve.png", "score_histogram.png", "per_defect.txt"):
        assert os.path.isfile(os.path.join(trained, "test", f))
    assert os.listdir(os.path.join(trained, "test", "overlays"))
    # -s writes the regions of a map-region decision; an image-score decision (auto may keep one) has none
    segs = os.path.join(trained, "test", "segmentations")
    assert (os.listdir(segs) if ft["decision"] == "segmentation" else not os.path.exists(segs))
    assert res["oracle_balanced_accuracy"] >= 0.5 and res["oracle_gap"] == pytest.approx(
        res["oracle_balanced_accuracy"] - res["balanced_accuracy"])


def test_finetune_prints_a_few_split_files_not_thousands(trained, monkeypatch, capsys):
    monkeypatch.setattr(finetune, "SHOWN_FILES", 1)
    assert finetune.cli(["-p", os.path.join(trained, "model.keras"), "-m", "ssim", "--min-area", "5:50:5"]) == 0
    out = capsys.readouterr().out
    n = len(json.load(open(os.path.join(trained, "finetune.json")))["finetune_files"])
    assert n > 1 and f"{n} finetune images" in out and f"... and {n - 1} more" in out


def test_finetune_fpr_mode_and_uint8(trained):
    assert finetune.cli(["-p", trained, "--mode", "fpr", "-t", "uint8", "-q"]) == 0
    ft = json.load(open(os.path.join(trained, "finetune.json")))
    assert ft["mode"] == "fpr" and ft["finetune_files"] == [] and ft["dtype"] == "uint8"
    assert test.cli(["-p", trained, "-q", "--max-overlays", "0"]) == 0
    res = json.load(open(os.path.join(trained, "test", "test_result.json")))
    assert res["n_images"] == 16


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def test_missing_model(tmp_path, capsys):
    assert test.cli(["-p", str(tmp_path / "nope" / "model.keras")]) == 2
    assert "nope" in _one_line_error(capsys)


def test_info_json_absent(tmp_path, capsys):
    (tmp_path / "model.keras").write_bytes(b"")
    assert finetune.cli(["-p", str(tmp_path / "model.keras")]) == 2
    assert "info.json" in _one_line_error(capsys)


def test_wrong_flag_values(trained, category, tmp_path, capsys):
    assert finetune.cli(["-p", trained, "-m", "l3"]) == 2
    assert "-m/--method" in _one_line_error(capsys)
    assert finetune.cli(["-p", trained, "-t", "int4"]) == 2
    assert "--dtype" in _one_line_error(capsys)
    assert finetune.cli(["-p", trained, "--map-sigmas", "2,-1"]) == 2
    assert "--map-sigmas" in _one_line_error(capsys)
    out = str(tmp_path / "x")
    assert train.cli(["-d", category, "-a", "nosuchCAE", "--out", out]) == 2
    assert "--architecture" in _one_line_error(capsys)
    assert train.cli(["-d", category, "-c", "cmyk", "--out", out]) == 2
    assert "--color" in _one_line_error(capsys)
    assert train.cli(["-d", category, "-l", "l1", "--out", out]) == 2
    assert "--loss" in _one_line_error(capsys)
    assert train.cli(["-d", category, "--rotation", "270", "--out", out]) == 2
    assert "--rotation" in _one_line_error(capsys)
    assert not os.path.exists(out)  # nothing half-written


def test_missing_data_folder(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.cli(["-d", str(tmp_path / "missing"), "--out", out, "--epochs", "1"]) == 2
    assert "missing" in _one_line_error(capsys)
    assert not os.path.exists(out)


def test_corrupt_training_image_leaves_nothing(tmp_path, capsys):
    root = make_mvtec(str(tmp_path / "c"), size=32, n_train=4, n_good=1, defects=("d",), n_defect=1, channels=1)
    open(os.path.join(root, "train", "good", "002.png"), "wb").write(b"\x89PNG broken")
    out = str(tmp_path / "run")
    assert train.cli(["-d", root, "--size", "32", "--out", out, "--epochs", "1"]) == 2
    assert "002.png" in _one_line_error(capsys)
    assert not os.path.exists(out)


def test_extract_rejects_unknown_method(category, capsys):
    assert extract.cli(["-d", category, "-m", "knn"]) == 2
    assert "--method" in _one_line_error(capsys)


def test_main_job_runs_padim_then_the_autoencoder_into_one_report(category, tmp_path, capsys):
    out = str(tmp_path / "main-job")
    assert mvtec_main(["run", "-d", category, "--size", "64", "--epochs", "1", "--precision", "float32",
                       "--out", out]) == 0
    printed = capsys.readouterr().out
    report = os.path.join(out, "report.html")
    assert f"report: {os.path.abspath(report)}" in printed and os.path.isfile(report)
    with open(os.path.join(out, "results.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["status"]) for r in rows] == [("padim", "ok"), ("mvtecCAE", "ok")]  # PaDiM first
    for method in ("padim", "mvtecCAE"):
        run = os.path.join(out, "cells", "widget", method, "run")
        res = json.load(open(os.path.join(run, "test", "test_result.json")))
        ft = json.load(open(os.path.join(run, "finetune.json")))
        assert ft["mode"] == "search" and res["n_excluded_finetune"] > 0
        assert os.path.isfile(os.path.join(run, "test", "report.html"))
    assert res["map_sigma"] == ft["map_sigma"]
    assert "padim" in open(report).read() and "mvtecCAE" in open(report).read()


def test_unknown_subcommand(capsys):
    assert mvtec_main(["frobnicate"]) == 2


def test_script_wrapper_exit_code(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(REPO, "test.py"), "-p", str(tmp_path / "none")],
                       capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error:")


def test_tensorflow_log_lines_stay_out_unless_asked_for(trained):
    """A command's output holds no TensorFlow C++ log line (``I0000 ...``, ``E0000 ... remapper failed``,
    oneDNN notices) by default; ``--verbose`` or a user's TF_CPP_MIN_LOG_LEVEL lets them through."""
    import re

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    tf_line = re.compile(r"^[IWEF]\d{4} |oneDNN|absl::InitializeLog|cpu_feature_guard", re.M)

    def run(*extra, **env_extra):
        r = subprocess.run([sys.executable, os.path.join(REPO, "test.py"), "-p", trained, "-q", "--max-overlays", "0",
                            *extra], capture_output=True, text=True, cwd=REPO, env={**env, **env_extra})
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout + r.stderr

    assert not tf_line.search(run()), "TensorFlow log lines in a default command's output"
    assert tf_line.search(run("--verbose"))  # the CPU-feature notice TF logs at import, at level 0
    assert tf_line.search(run(TF_CPP_MIN_LOG_LEVEL="0"))


@pytest.mark.parametrize("method,param", [("padim", "n_features=20"), ("mahalanobis", "levels=[7,8,9]")])
def test_extract_then_finetune_and_test(category, tmp_path, method, param):
    """Feature detectors go through the same finetune.py / test.py as the autoencoders."""
    out = str(tmp_path / method)
    assert extract.cli(["-d", category, "-m", method, "-b", "efficientnet-b0", "-w", "none", "--size", "64",
                        "--param", param, "--out", out, "-q"]) == 0
    for f in ("info.json", "detector.json"):
        assert os.path.isfile(os.path.join(out, f))
    assert finetune.cli(["-p", out, "--min-area", "5:50:5", "-q"]) == 0
    ft = json.load(open(os.path.join(out, "finetune.json")))
    # auto: PaDiM's map regions compete with its image score, Mahalanobis has the image score alone
    assert [c["rule"] for c in ft["candidates"]] == (["balanced", "search"] if method == "padim" else ["balanced"])
    assert ft["decision"] == ("segmentation" if ft["rule"] == "search" else "image_score")
    assert test.cli(["-p", out, "-q"]) == 0
    res = json.load(open(os.path.join(out, "test", "test_result.json")))
    assert res["n_images"] == 16 - len(ft["finetune_files"])
    assert 0.0 <= res["image_auroc"] <= 1.0
    assert (res["pixel_auroc"] is not None) == (method == "padim")


def test_extract_bad_param(category, tmp_path, capsys):
    assert extract.cli(["-d", category, "-m", "padim", "-b", "efficientnet-b0", "-w", "none",
                        "--param", "bogus=1", "--out", str(tmp_path / "x")]) == 2
    assert "--param" in _one_line_error(capsys)
    assert not os.path.exists(tmp_path / "x")


def test_key_value_options_are_json_where_they_parse_else_text():
    from mvtec_keras.cli.common import parse_key_values, parse_scoped_options
    from mvtec_keras.errors import InputError

    assert parse_key_values(["k=50", "eps=1e-3", "mode=tanh", "levels=[1, 2]", "w=null", "on=true", "p=a=b"],
                            "--param") == {"k": 50, "eps": 1e-3, "mode": "tanh", "levels": [1, 2], "w": None,
                                           "on": True, "p": "a=b"}
    for bad in ("k", "=3"):
        with pytest.raises(InputError, match="--param expects KEY=VALUE"):
            parse_key_values([bad], "--param")
    # a text value that starts like JSON ("true"-ish, "tanh") is text, not a JSON error
    assert parse_scoped_options(["gan.act=tanh", "gan.filters=64", "ae.x=t"], ("gan", "ae")) == {
        "gan": {"act": "tanh", "filters": 64}, "ae": {"x": "t"}}
    for bad in ("vae.x=1", "gan.x=", "gan=1"):
        with pytest.raises(InputError, match="--set .*NAME.OPTION=VALUE with NAME in gan, ae"):
            parse_scoped_options([bad], ("gan", "ae"))


def test_anogan_trains_through_train_py_with_validation_images(category, tmp_path):
    """Regression: AnoGAN's evaluation returned no log, so train.py (which validates by default) crashed."""
    out = str(tmp_path / "anogan")
    assert train.cli(["-d", category, "-a", "anogan", "--size", "32", "-b", "4", "--epochs", "1",
                      "--out", out, "-q"]) == 0
    with open(os.path.join(out, "history.csv")) as f:
        assert "val_d_loss" in f.readline()


def test_gan_through_train_finetune_test(category, tmp_path):
    """A GAN detector trains through train.py and is evaluated by the same finetune.py / test.py."""
    out = str(tmp_path / "ganomaly")
    assert train.cli(["-d", category, "-a", "ganomaly", "--size", "32", "-b", "4", "--epochs", "2",
                      "--out", out, "-q"]) == 0
    info = json.load(open(os.path.join(out, "info.json")))
    assert info["detector"] == "ganomaly" and info["training"]["epochs_trained"] == 2
    assert os.path.isfile(os.path.join(out, "history.csv"))
    assert os.path.isfile(os.path.join(out, "checkpoint.last.weights.h5"))
    assert finetune.cli(["-p", out, "--min-area", "5:20:5", "-q"]) == 0
    assert test.cli(["-p", out, "-q"]) == 0
    res = json.load(open(os.path.join(out, "test", "test_result.json")))
    assert res["detector"] == "ganomaly" and res["pixel_auroc"] is not None


def test_gan_options_through_train_py_param(category, tmp_path):
    """--param passes GAN options (reference-fidelity switches, epoch selection) and info.json says which
    epoch was kept; with best_val it is the epoch of the lowest validation reconstruction loss."""
    out = str(tmp_path / "g")
    assert train.cli(["-d", category, "-a", "ganomaly", "--size", "32", "-b", "4", "--epochs", "3",
                      "--param", "selection=best_val", "--param", "adversarial=bce", "--param", "filters=8",
                      "--out", out, "-q"]) == 0
    config = json.load(open(os.path.join(out, "detector.json")))["config"]
    assert (config["selection"], config["adversarial"], config["filters"]) == ("best_val", "bce", 8)
    val_con = [float(row["val_con"]) for row in csv.DictReader(open(os.path.join(out, "history.csv")))]
    info = json.load(open(os.path.join(out, "info.json")))
    assert info["training"]["selected_epoch"] == int(np.argmin(val_con)) + 1
    last = str(tmp_path / "last")  # the default keeps the last epoch
    assert train.cli(["-d", category, "-a", "dense_ae", "--size", "32", "-b", "4", "--epochs", "2",
                      "--out", last, "-q"]) == 0
    assert json.load(open(os.path.join(last, "info.json")))["training"]["selected_epoch"] == 2


@pytest.mark.parametrize("args, says", [
    (["-a", "ganomaly", "--param", "adversarial=hinge"], "--param: ganomaly: adversarial='hinge'"),
    (["-a", "ganomaly", "--param", "selection=best"], "--param: selection='best'"),
    (["-a", "ganomaly", "--param", "nonsense=1"], "--param: "),
    (["-a", "ganomaly", "--param", "seed=3"], "--param seed: set by its own flag (--seed)"),
    (["-a", "anogan", "--param", "selection=best_val"], "--param: selection='best_val' needs a detector"),
    (["-a", "mvtecCAE", "--param", "filters=8"], "--param is for GANs"),
])
def test_a_bad_param_is_one_line_before_anything_is_written(category, tmp_path, capsys, args, says):
    assert train.cli(["-d", category, *args, "--size", "32", "--out", str(tmp_path / "p")]) == 2
    assert _one_line_error(capsys).startswith(f"error: {says}")
    assert not os.path.exists(tmp_path / "p")


def test_gan_seed_ensemble_through_train_finetune_test(category, tmp_path):
    """--members K trains K GANs (seeds SEED ... SEED+K-1) saved as one ensemble detector."""
    out = str(tmp_path / "ens")
    assert train.cli(["-d", category, "-a", "ganomaly", "--size", "32", "-b", "4", "--epochs", "1",
                      "--members", "2", "--seed", "3", "--out", out, "-q"]) == 0
    info = json.load(open(os.path.join(out, "info.json")))
    assert info["detector"] == "ensemble" and info["training"]["epochs_trained"] == 2
    meta = json.load(open(os.path.join(out, "detector.json")))
    assert meta["config"]["detector"] == "ganomaly" and meta["config"]["members"] == 2
    seeds = [json.load(open(os.path.join(out, f"member_{i}", "detector.json")))["config"]["seed"] for i in (0, 1)]
    assert seeds == [3, 4]
    assert finetune.cli(["-p", out, "--min-area", "5:20:5", "-q"]) == 0
    assert test.cli(["-p", out, "-q"]) == 0
    res = json.load(open(os.path.join(out, "test", "test_result.json")))
    assert res["detector"] == "ensemble" and res["pixel_auroc"] is not None


@pytest.mark.parametrize("args", [["-a", "mvtecCAE", "--members", "2"], ["-a", "ganomaly", "--members", "0"]])
def test_members_flag_is_checked(category, tmp_path, capsys, args):
    assert train.cli(["-d", category, *args, "--out", str(tmp_path / "m")]) == 2
    assert "--members" in _one_line_error(capsys)
    assert not os.path.exists(tmp_path / "m")


def test_gan_rejects_unsupported_size(category, tmp_path, capsys):
    assert train.cli(["-d", category, "-a", "ganomaly", "--size", "48", "--out", str(tmp_path / "g")]) == 2
    assert "--size" in _one_line_error(capsys)


def test_a_fit_prints_its_data_job_devices_and_strategy(category, tmp_path, capsys):
    out = str(tmp_path / "maha")
    assert extract.cli(["-d", category, "-m", "mahalanobis", "-b", "efficientnet-b0", "-w", "none", "--size", "64",
                        "--param", "levels=[7,8,9]", "--out", out]) == 0
    lines = capsys.readouterr().out.splitlines()
    job = next(i for i, line in enumerate(lines) if line.startswith("fitting mahalanobis on "))
    assert lines[job + 2] == "strategy: none, 1 replica"  # after the devices line
    assert job >= 1 and "widget" in "\n".join(lines[:job])  # the category's summary comes first
