"""MNIST idx reader and one-class splits."""

import gzip

import numpy as np
import pytest

from conftest import SHARED_DATA
from mvtec_keras.data.mnist import FILES, load_mnist, one_class_split, read_idx
from mvtec_keras.errors import InputError


def write_idx(path, arr, magic=None, gz=True):
    arr = np.asarray(arr, np.uint8)
    magic = magic if magic is not None else 0x800 + arr.ndim
    header = np.array([magic, *arr.shape], ">u4").tobytes()
    data = header + arr.tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def fake_mnist(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (12, 28, 28)),
        "y_train": np.arange(12) % 10,
        "x_test": rng.integers(0, 256, (7, 28, 28)),
        "y_test": np.array([0, 1, 2, 7, 8, 2, 9]),
    }
    for key, name in FILES.items():
        write_idx(tmp_path / name, arrays[key])
    return tmp_path, arrays


def test_reads_small_idx_files(fake_mnist):
    root, arrays = fake_mnist
    out = load_mnist(str(root))
    for got, key in zip(out, ["x_train", "y_train", "x_test", "y_test"]):
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, arrays[key])


def test_bad_magic_is_an_input_error(tmp_path):
    path = tmp_path / "a.gz"
    write_idx(path, np.zeros((2, 3, 3)), magic=0x0801)  # labels magic on a 3-d file
    with pytest.raises(InputError, match="magic"):
        read_idx(str(path), 3)


def test_truncated_and_corrupt_files(tmp_path):
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(np.array([0x803, 5, 28, 28], ">u4").tobytes() + bytes(100))
    with pytest.raises(InputError, match="short.gz"):
        read_idx(str(short), 3)
    plain = tmp_path / "plain.gz"
    write_idx(plain, np.zeros(4), gz=False)
    with pytest.raises(InputError, match="gzip"):
        read_idx(str(plain), 1)
    with pytest.raises(InputError, match="not found"):
        read_idx(str(tmp_path / "missing.gz"), 1)
    with pytest.raises(InputError, match="not found"):
        load_mnist(str(tmp_path / "nowhere"))


def test_one_class_split(fake_mnist):
    root, arrays = fake_mnist
    data = load_mnist(str(root))
    # Protocol (c): 7 and 8 normal, 2 anomalous; the other test digits are dropped.
    train, test, labels = one_class_split(*data, normal_digits=[7, 8], anomaly_digits=[2])
    assert train.shape == (2, 28, 28, 1) and train.dtype == np.float32
    np.testing.assert_allclose(train[0, ..., 0], arrays["x_train"][7] / 255.0)
    np.testing.assert_array_equal(labels, [1, 0, 0, 1])  # test digits 2, 7, 8, 2
    assert test.shape == (4, 28, 28, 1) and 0 <= test.min() and test.max() <= 1
    # Protocol (b): digit 2 normal, the rest anomalous.
    train, test, labels = one_class_split(*data, normal_digits=2)
    assert len(train) == 1 and len(test) == 7
    np.testing.assert_array_equal(labels, [1, 1, 0, 1, 1, 0, 1])
    with pytest.raises(InputError):
        one_class_split(*data, normal_digits=[1, 2], anomaly_digits=[2])
    # 32 px: zero-padded by 2 on every side, the digit itself unchanged.
    train32, test32, labels32 = one_class_split(*data, normal_digits=2, image_size=32)
    assert train32.shape == (1, 32, 32, 1) and test32.shape == (7, 32, 32, 1)
    np.testing.assert_array_equal(train32[:, 2:30, 2:30], train)
    assert not train32[:, :2].any() and not train32[:, :, 30:].any()
    np.testing.assert_array_equal(labels32, labels)
    for bad in (27, 31):
        with pytest.raises(InputError, match="image_size"):
            one_class_split(*data, normal_digits=2, image_size=bad)


@pytest.mark.slow
def test_real_mnist():
    root = SHARED_DATA / "mnist"
    if not root.is_dir():
        pytest.skip(f"real data absent: {root}")
    x_train, y_train, x_test, y_test = load_mnist(str(root))
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert np.bincount(y_train).tolist()[:2] == [5923, 6742]
    assert np.bincount(y_test, minlength=10).sum() == 10000 and y_test.max() == 9


def test_stage_one_class_writes_the_mvtec_layout(fake_mnist, tmp_path):
    from PIL import Image

    from mvtec_keras.data.discovery import discover_mvtec
    from mvtec_keras.data.mnist import main, stage_one_class

    root, arrays = fake_mnist
    out = tmp_path / "mnist-2"
    counts = stage_one_class(2, str(out), str(root), log=lambda *a: None)
    assert counts["train/good"] == 1 and counts["test/good"] == 2 and counts["test/digit_7"] == 1
    assert "test/digit_2" not in counts and "test/digit_3" not in counts  # digits absent from the test set
    i = int(np.flatnonzero(arrays["y_test"] == 9)[0])
    np.testing.assert_array_equal(np.asarray(Image.open(out / "test" / "digit_9" / f"{i:05d}.png")), arrays["x_test"][i])
    cat = discover_mvtec(str(out))
    assert len(cat.train) == 1 and sum(s.label for s in cat.test) == 5
    # Again: nothing to do; another digit into the same folder, or a bad digit: one line, exit 2.
    assert stage_one_class(2, str(out), str(root), log=lambda *a: None) == counts
    assert main(["--normal", "7", "--out", str(out), "--root", str(root)]) == 2
    assert main(["--normal", "12", "--out", str(tmp_path / "x"), "--root", str(root)]) == 2
    assert not (tmp_path / "x").exists()
