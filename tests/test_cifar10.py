"""CIFAR-10 leave-one-class-out: reading the JPEG zip, the split, the MVTec-layout stager (tiny fake zip)."""

import io
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from mvtec_keras.data import cifar10
from mvtec_keras.data.cifar10 import CLASSES, MANIFEST, leave_one_out, load_cifar10, stage
from mvtec_keras.errors import InputError

N_TRAIN, N_TEST = 3, 2


def _jpeg(value):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def fake_zip(tmp_path):
    """10 classes x (3 train + 2 test) flat 8 px JPEGs; class k has grey level 20 k."""
    path = tmp_path / "cifar.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("train/", b"")
        for split, n in (("train", N_TRAIN), ("test", N_TEST)):
            for k, cls in enumerate(CLASSES):
                for i in range(n):
                    z.writestr(f"{split}/{cls}/{i:04d}.jpg", _jpeg(20 * k))
    return str(path)


def test_load_and_leave_one_out(fake_zip):
    data = load_cifar10(fake_zip)
    x, y = data["train"]
    assert x.shape == (10 * N_TRAIN, 8, 8, 3) and x.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(y), [N_TRAIN] * 10)
    assert abs(int(x[y == 5].mean()) - 100) <= 2  # JPEG keeps a flat grey level
    train, test, labels = leave_one_out(data, "dog")
    assert len(train) == 9 * N_TRAIN and len(test) == 9 * N_TEST + N_TRAIN + N_TEST
    assert not np.any(np.abs(train.astype(int).mean(axis=(1, 2, 3)) - 100) <= 2)  # no dog in train
    # The reference's order: every normal first, then the abnormal class (its train, then its test images).
    np.testing.assert_array_equal(labels, [0] * (9 * N_TEST) + [1] * (N_TRAIN + N_TEST))
    assert np.all(np.abs(test[labels == 1].astype(int).mean(axis=(1, 2, 3)) - 100) <= 2)
    with pytest.raises(InputError, match="unknown CIFAR-10 class 'wolf'"):
        leave_one_out(data, "wolf")


def test_stage_writes_mvtec_layout_once(fake_zip, tmp_path):
    from mvtec_keras.data import discover

    out = str(tmp_path / "cifar-dog")
    lines = []
    counts = stage("dog", out, fake_zip, log=lines.append)
    assert counts == {"train/good": 9 * N_TRAIN, "test/good": 9 * N_TEST, "test/dog": N_TRAIN + N_TEST}
    for folder, n in counts.items():
        assert len(os.listdir(os.path.join(out, folder))) == n
    assert "cat_0000.jpg" in os.listdir(os.path.join(out, "train/good"))
    assert {"train_0000.jpg", "test_0000.jpg"} <= set(os.listdir(os.path.join(out, "test/dog")))
    assert "staged" in lines[-1] and "test/dog 5" in lines[-1]
    cat = discover(out)  # train.py / extract.py / test.py read it as any MVTec category
    assert len(cat.train) == 9 * N_TRAIN and len(cat.test) == 9 * N_TEST + N_TRAIN + N_TEST
    before = os.path.getmtime(os.path.join(out, MANIFEST))
    stage("dog", out, fake_zip, log=lines.append)
    assert "already staged" in lines[-1] and "nothing to do" in lines[-1]
    assert os.path.getmtime(os.path.join(out, MANIFEST)) == before
    with pytest.raises(InputError, match="another staging"):
        stage("cat", out, fake_zip, log=lines.append)


def test_stage_is_atomic(fake_zip, tmp_path, monkeypatch):
    out = tmp_path / "half"
    real_read = zipfile.ZipFile.read
    calls = []

    def failing_read(self, name, *a, **k):
        calls.append(name)
        if len(calls) > 7:
            raise OSError("disk full")
        return real_read(self, name, *a, **k)

    monkeypatch.setattr(zipfile.ZipFile, "read", failing_read)
    with pytest.raises(OSError, match="disk full"):
        stage("dog", str(out), fake_zip, log=lambda s: None)
    assert not out.exists() and os.listdir(tmp_path) == ["cifar.zip"]  # nothing half-written left


def test_stage_refuses_a_non_empty_folder(fake_zip, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("mine")
    with pytest.raises(InputError, match="not an empty folder"):
        stage("dog", str(tmp_path / "full"), fake_zip, log=lambda s: None)


def test_bad_zip_contents(tmp_path):
    path = tmp_path / "partial.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("train/cat/0000.jpg", _jpeg(1))
    with pytest.raises(InputError, match="no images under"):
        load_cifar10(str(path))
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable zip"):
        load_cifar10(str(tmp_path / "junk.zip"))


@pytest.mark.parametrize("args, message", [
    (["--abnormal", "dog", "--zip", "nowhere.zip"], "nowhere.zip: CIFAR-10 zip not found"),
    (["--abnormal", "wolf"], "unknown CIFAR-10 class 'wolf'"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, fake_zip, args, message):
    if "--zip" not in args:
        args = args + ["--zip", fake_zip]
    proc = subprocess.run([sys.executable, "-m", "mvtec_keras.data.cifar10", *args, "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr
    assert not (tmp_path / "o").exists()


def test_cli_stages_and_prints_counts(tmp_path, fake_zip):
    assert cifar10.main(["--abnormal", "ship", "--out", str(tmp_path / "s"), "--zip", fake_zip]) == 0
    assert len(os.listdir(tmp_path / "s" / "test" / "ship")) == N_TRAIN + N_TEST
