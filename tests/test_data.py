import os

import numpy as np
import tensorflow as tf
import pytest
from helpers import make_mvtec, smooth_image, write_image
from PIL import Image

from mvtec_keras.data import (
    Augmentation,
    Preprocessing,
    discover,
    discover_folder,
    discover_mvtec,
    load_arrays,
    make_dataset,
    split_validation,
    stratified_split,
)
from mvtec_keras.errors import InputError


def test_discover_mvtec_layout(tmp_path):
    root = make_mvtec(str(tmp_path / "cat"), missing_mask_for=("hole", 1))
    cat = discover_mvtec(root)
    assert cat.name == "cat" and cat.mode == "mvtec"
    assert len(cat.train) == 12 and len(cat.test) == 4 + 6
    assert cat.defect_types == ["hole", "scratch"]
    good = [s for s in cat.test if s.defect_type == "good"]
    assert all(s.label == 0 and s.mask_path is None for s in good)
    defects = [s for s in cat.test if s.label == 1]
    assert sum(s.mask_path is None for s in defects) == 1
    assert [s.path for s in cat.defects_without_mask] == [os.path.join(root, "test", "hole", "001.png")]
    assert "without a mask" in cat.summary()


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif"])
@pytest.mark.parametrize("channels", [1, 3])
def test_formats_and_colour_conversion(tmp_path, ext, channels):
    root = make_mvtec(str(tmp_path / "c"), size=24, n_train=2, n_good=1, defects=("d",), n_defect=1,
                      channels=channels, ext=ext)
    cat = discover_mvtec(root)
    for mode, c in (("grayscale", 1), ("rgb", 3)):
        arr = load_arrays(cat.test, Preprocessing(size=16, color_mode=mode))
        assert arr["image"].shape == (2, 16, 16, c)
        assert arr["image"].dtype == np.float32
        assert 0.0 <= arr["image"].min() and arr["image"].max() <= 1.0
        assert arr["mask"].shape == (2, 16, 16, 1)
        assert set(np.unique(arr["mask"])) <= {0.0, 1.0}


def test_grayscale_from_rgb_is_bt601_luminance(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    p = write_image(str(tmp_path / "n" / "a.png"), rgb)
    cat = discover_folder(os.path.dirname(p))
    img = load_arrays(cat.train, Preprocessing(size=8, color_mode="grayscale"))["image"]
    expected = (0.2989 * 200 + 0.5870 * 100 + 0.1140 * 50) / 255
    np.testing.assert_allclose(img, expected, atol=2e-3)


def test_masks_stay_aligned_with_images(tmp_path):
    # The defect is a white square; after resize + crop the mask must cover exactly the white pixels.
    root = make_mvtec(str(tmp_path / "c"), size=64, n_train=2, n_good=1, defects=("d",), n_defect=2)
    cat = discover_mvtec(root)
    arr = load_arrays([s for s in cat.test if s.label == 1], Preprocessing(size=32, crop=24, color_mode="grayscale"))
    for img, mask in zip(arr["image"], arr["mask"]):
        m = mask[..., 0] > 0
        assert m.sum() > 0 and arr["has_mask"].all()
        bright = img[..., 0] > 0.97
        assert m[bright].all()  # every fully white pixel is under the mask
        assert img[m].mean() > 0.85  # and the mask sits on the white square (edges are antialiased)
        cy, cx = np.argwhere(m).mean(0)
        by, bx = np.argwhere(bright).mean(0)
        assert abs(cy - by) <= 1 and abs(cx - bx) <= 1


def test_element_carries_label_type_path(tmp_path):
    root = make_mvtec(str(tmp_path / "c"), size=16, n_train=2, n_good=2, defects=("d",), n_defect=2)
    cat = discover_mvtec(root)
    arr = load_arrays(cat.test, Preprocessing(size=16))
    assert arr["path"] == [s.path for s in cat.test]
    assert arr["defect_type"] == [s.defect_type for s in cat.test]
    np.testing.assert_array_equal(arr["label"], [s.label for s in cat.test])


def test_folder_mode_variants(tmp_path):
    rng = np.random.RandomState(0)
    for i in range(10):
        write_image(str(tmp_path / "normal" / f"n{i}.png"), smooth_image(rng, 16, 1))
    for i in range(3):
        write_image(str(tmp_path / "abnormal" / f"a{i}.png"), smooth_image(rng, 16, 1))
    write_image(str(tmp_path / "masks" / "a0_mask.png"), np.full((16, 16), 255, np.uint8))
    only_normal = discover_folder(str(tmp_path / "normal"))
    assert len(only_normal.train) == 10 and only_normal.test == []
    no_masks = discover_folder(str(tmp_path / "normal"), str(tmp_path / "abnormal"))
    assert len(no_masks.test) == 2 + 3 and len(no_masks.train) == 8
    assert all(s.mask_path is None for s in no_masks.test)
    with_masks = discover_folder(str(tmp_path / "normal"), str(tmp_path / "abnormal"), str(tmp_path / "masks"))
    assert sum(s.mask_path is not None for s in with_masks.test) == 1
    # no train/good inside: discover() falls back to folder mode
    assert discover(str(tmp_path / "normal")).mode == "folder"


def test_validation_split_is_seeded_and_disjoint(tmp_path):
    root = make_mvtec(str(tmp_path / "c"), size=16, n_train=20)
    cat = discover_mvtec(root)
    a_train, a_val = split_validation(cat.train, 0.1, seed=1)
    b_train, b_val = split_validation(cat.train, 0.1, seed=1)
    c_train, c_val = split_validation(cat.train, 0.1, seed=2)
    assert [s.path for s in a_val] == [s.path for s in b_val]
    assert len(a_val) == 2 and len(a_train) == 18
    assert not {s.path for s in a_val} & {s.path for s in a_train}
    assert [s.path for s in a_val] != [s.path for s in c_val]


def test_stratified_split_takes_every_type(tmp_path):
    root = make_mvtec(str(tmp_path / "c"), size=16, n_good=5, defects=("a", "b", "c"), n_defect=5)
    cat = discover_mvtec(root)
    part, rest = stratified_split(cat.test, 0.2, seed=0)
    assert {s.defect_type for s in part} == {"good", "a", "b", "c"}
    assert len(part) + len(rest) == len(cat.test)
    assert not {s.path for s in part} & {s.path for s in rest}


def test_shuffle_and_augment_are_seeded(tmp_path):
    root = make_mvtec(str(tmp_path / "c"), size=16, n_train=8)
    cat = discover_mvtec(root)
    prep = Preprocessing(size=16)

    def first_epoch():
        ds = make_dataset(cat.train, prep, batch_size=4, shuffle=True, seed=3, augment=Augmentation())
        return np.concatenate([b["image"].numpy() for b in ds])

    a, b = first_epoch(), first_epoch()
    np.testing.assert_allclose(a, b)
    plain = np.concatenate([b["image"].numpy() for b in make_dataset(cat.train, prep, batch_size=4)])
    assert a.shape == plain.shape and not np.allclose(np.sort(a.ravel()), np.sort(plain.ravel()))


# -- bad input ---------------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(InputError, match="not found"):
        discover_mvtec(str(tmp_path / "nope"))


def test_empty_train_split(tmp_path):
    os.makedirs(tmp_path / "c" / "train" / "good")
    with pytest.raises(InputError, match="empty split"):
        discover_mvtec(str(tmp_path / "c"))
    with pytest.raises(InputError, match="empty split"):
        make_dataset([], Preprocessing(size=8))


def test_corrupt_image_is_named(tmp_path):
    root = make_mvtec(str(tmp_path / "c"), size=16, n_train=3)
    bad = os.path.join(root, "train", "good", "001.png")
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 2])
    with pytest.raises(InputError, match="001.png"):
        make_dataset(discover_mvtec(root).train, Preprocessing(size=16))
    open(bad, "wb").write(b"not an image at all")
    with pytest.raises(InputError, match="corrupt"):
        make_dataset(discover_mvtec(root).train, Preprocessing(size=16))


def test_mask_of_wrong_size_is_named(tmp_path):
    root = make_mvtec(str(tmp_path / "c"), size=16, defects=("d",), n_defect=1)
    mask = os.path.join(root, "ground_truth", "d", "000_mask.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(mask)
    with pytest.raises(InputError, match="000_mask.png"):
        make_dataset(discover_mvtec(root).test, Preprocessing(size=16))


def test_unsupported_pixel_format(tmp_path):
    p = tmp_path / "n" / "a.tif"
    os.makedirs(p.parent)
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(p)  # 32-bit float grey (16-bit grey is read)
    with pytest.raises(InputError, match="pixel format"):
        make_dataset(discover_folder(str(p.parent)).train, Preprocessing(size=8))


def test_unknown_colour_mode():
    with pytest.raises(InputError, match="--color"):
        Preprocessing(color_mode="cmyk")


@pytest.mark.slow
def test_real_bottle_layout(bottle_dir):
    cat = discover_mvtec(str(bottle_dir))
    assert len(cat.train) == 209
    counts = {t: sum(s.defect_type == t for s in cat.test) for t in ("good", "broken_large", "broken_small", "contamination")}
    assert counts == {"good": 20, "broken_large": 20, "broken_small": 22, "contamination": 21}
    assert not cat.defects_without_mask
    sub = [s for s in cat.test if s.label == 1][:4] + [s for s in cat.test if s.label == 0][:2]
    arr = load_arrays(sub, Preprocessing(size=256, crop=224, color_mode="rgb"))
    assert arr["image"].shape == (6, 224, 224, 3)
    assert (arr["mask"][:4].reshape(4, -1).sum(1) > 0).all() and arr["mask"][4:].sum() == 0


def test_rotation_range_is_honoured():
    from mvtec_keras.data.pipeline import _augment_batch

    x = np.zeros((64, 32, 32, 1), np.float32)
    x[:, 4:12, 12:20] = 1.0  # a bright block in the top half
    batch = {"image": tf.constant(x)}
    seeds = tf.constant(np.arange(12).reshape(6, 2), tf.int64)

    def bottom_heavy(deg):
        out = _augment_batch(batch, seeds, Augmentation(rotation_deg=deg, shift_fraction=0.0, brightness=0.0))
        img = out["image"].numpy()[..., 0]
        return np.mean(img[:, 16:].sum(axis=(1, 2)) > img[:, :16].sum(axis=(1, 2)))

    assert bottom_heavy(5.0) == 0.0  # small rotations keep the block on top
    assert 0.2 < bottom_heavy(180.0) < 0.8  # full rotations put it anywhere (half below the centre)
