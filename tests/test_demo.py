import json
import os
import pathlib
import time

import numpy as np
import pytest
from PIL import Image

from mvtec_keras.data import demo
from mvtec_keras.data.demo import DEFECT_TYPES, MASK_THRESHOLD, build_demo, demo_sample, describe_demo
from mvtec_keras.errors import InputError

TINY = dict(seed=0, size=64, n_train=8, n_test_good=4, n_per_defect=2)


def _read(path):
    with Image.open(path) as im:
        return im.mode, np.asarray(im)


def _files(root):
    return sorted(str(p.relative_to(root)) for p in pathlib.Path(root).rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo") / "cat", **TINY)


def test_layout_and_counts(tiny):
    expected = ["demo.json"]
    expected += [f"train/good/{i:03d}.png" for i in range(8)]
    expected += [f"test/good/{i:03d}.png" for i in range(4)]
    for t in DEFECT_TYPES:
        expected += [f"test/{t}/{i:03d}.png" for i in range(2)]
        expected += [f"ground_truth/{t}/{i:03d}_mask.png" for i in range(2)]
    assert _files(tiny) == sorted(expected)
    manifest = json.loads((tiny / "demo.json").read_text())
    assert manifest["seed"] == 0 and manifest["size"] == 64
    assert manifest["counts"]["train/good"] == 8 and manifest["counts"]["test/stain"] == 2
    assert manifest["defect_types"] == list(DEFECT_TYPES) and len(DEFECT_TYPES) >= 4


def test_images_rgb_masks_binary_same_size(tiny):
    for path in tiny.rglob("*.png"):
        mode, arr = _read(path)
        if "ground_truth" in path.parts:
            assert mode == "L" and arr.shape == (64, 64)
            assert set(np.unique(arr)) == {0, 255}, path  # binary and non-empty
            image = tiny / "test" / path.parent.name / path.name.replace("_mask", "")
            assert _read(image)[1].shape[:2] == arr.shape
        else:
            assert mode == "RGB" and arr.shape == (64, 64, 3) and arr.dtype == np.uint8


def test_masks_are_exactly_the_changed_pixels(tiny):
    for t in DEFECT_TYPES:
        for i in range(2):
            clean, image, mask = demo_sample(0, "test", i, t, 64)
            np.testing.assert_array_equal(_read(tiny / "test" / t / f"{i:03d}.png")[1], image)
            np.testing.assert_array_equal(_read(tiny / "ground_truth" / t / f"{i:03d}_mask.png")[1], mask)
            change = np.abs(image.astype(int) - clean.astype(int)).max(axis=-1)
            inside = mask == 255
            assert inside.sum() >= 6
            assert change[inside].min() >= MASK_THRESHOLD  # every masked pixel visibly changed
            assert change[~inside].max() == 0  # nothing else touched


@pytest.mark.parametrize("kind, sign", [("crack", -1), ("hole", -1), ("stain", -1), ("scratch", 1)])
def test_defect_kinds_change_brightness_as_described(kind, sign):
    for i in range(3):
        clean, image, mask = demo_sample(5, "test", i, kind, 96)
        inside = mask == 255
        delta = image[inside].astype(float).mean() - clean[inside].astype(float).mean()
        assert sign * delta > 20, (kind, i, delta)


def test_good_test_images_are_clean_and_all_images_distinct(tiny):
    clean, image, mask = demo_sample(0, "test", 1, "good", 64)
    np.testing.assert_array_equal(clean, image)
    assert mask.max() == 0
    np.testing.assert_array_equal(_read(tiny / "test" / "good" / "001.png")[1], image)
    arrays = [_read(p)[1].tobytes() for p in tiny.rglob("*.png") if "ground_truth" not in p.parts]
    assert len(set(arrays)) == len(arrays)


def test_same_seed_is_byte_identical_other_seed_differs(tiny, tmp_path):
    again = build_demo(tmp_path / "again", **TINY)
    assert _files(again) == _files(tiny)
    for rel in _files(tiny):
        assert (again / rel).read_bytes() == (tiny / rel).read_bytes(), rel
    other = build_demo(tmp_path / "other", **{**TINY, "seed": 1})
    assert (other / "train/good/000.png").read_bytes() != (tiny / "train/good/000.png").read_bytes()


def test_cache_is_reused_then_forced_and_mismatch_rebuilds(tmp_path):
    root = build_demo(tmp_path / "c", **TINY)
    stamp = {p: (root / p).stat().st_mtime_ns for p in ("demo.json", "test/hole/000.png")}
    (root / "marker").write_text("x")
    time.sleep(0.01)
    assert build_demo(tmp_path / "c", **TINY) == root
    assert {p: (root / p).stat().st_mtime_ns for p in stamp} == stamp
    assert (root / "marker").exists()

    build_demo(tmp_path / "c", **TINY, force=True)
    assert not (root / "marker").exists()  # a fresh folder replaced the old one
    assert (root / "demo.json").stat().st_mtime_ns > stamp["demo.json"]

    build_demo(tmp_path / "c", **{**TINY, "n_train": 3})
    assert len(list((root / "train" / "good").iterdir())) == 3
    assert sorted(os.listdir(tmp_path)) == ["c"]  # no temp or old folders left behind


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(dst, *args):
        (dst / "train").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_write_category", boom)
    with pytest.raises(KeyboardInterrupt):
        build_demo(tmp_path / "c", **TINY)
    assert os.listdir(tmp_path) == []


def test_default_root_follows_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MVTEC_KERAS_CACHE", str(tmp_path / "cache"))
    root = build_demo(seed=3, size=32, n_train=1, n_test_good=0, n_per_defect=1)
    assert root == tmp_path / "cache" / "demo-v1-seed3-32"
    assert (root / "demo.json").is_file()
    assert list((root / "test" / "good").iterdir()) == []
    assert [len(list((root / "test" / t).iterdir())) for t in DEFECT_TYPES] == [1] * len(DEFECT_TYPES)


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("keep me")
    with pytest.raises(InputError, match="mine"):
        build_demo(tmp_path / "mine", **TINY, force=True)
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "bad", [{"size": 8}, {"size": "64"}, {"n_train": 0}, {"n_per_defect": -1}, {"seed": 1.5}, {"size": True}]
)
def test_bad_arguments(tmp_path, bad):
    with pytest.raises(InputError, match=next(iter(bad))):
        build_demo(tmp_path / "x", **{**TINY, **bad})


def test_describe_demo(tiny, tmp_path):
    text = describe_demo(tiny)
    assert "64x64 RGB" in text and "brick" in text
    assert "train/good        8 images" in text and "test/good         4 images" in text
    cover = [np.mean(_read(tiny / "ground_truth" / "hole" / f"{i:03d}_mask.png")[1] > 0) for i in range(2)]
    hole_line = next(line for line in text.splitlines() if "test/hole" in line)
    assert f"mean {100 * np.mean(cover):.2f}%" in hole_line
    assert "total: 8 train, 12 test (8 defective)" in text
    with pytest.raises(InputError):
        describe_demo(tmp_path)


def test_polyline_distance_matches_hand_computed():
    yy, xx = np.mgrid[0:40, 0:50].astype(np.float32)
    d = demo._polyline_distance(np.array([[10.0, 10.0], [10.0, 30.0], [30.0, 30.0]]), yy, xx)
    # Closed form: distance to the horizontal then the vertical segment.
    horiz = np.hypot(yy - 10, xx - np.clip(xx, 10, 30))
    vert = np.hypot(xx - 30, yy - np.clip(yy, 10, 30))
    np.testing.assert_allclose(d, np.minimum(horiz, vert), atol=1e-4)
    assert d[15, 20] == pytest.approx(5.0) and d[10, 35] == pytest.approx(5.0)


@pytest.mark.slow
def test_full_size_build_under_a_minute(tmp_path):
    t0 = time.perf_counter()
    root = build_demo(tmp_path / "full")
    elapsed = time.perf_counter() - t0
    assert len(list((root / "train" / "good").glob("*.png"))) == 200
    assert sum(1 for _ in (root / "ground_truth").rglob("*_mask.png")) == 80
    assert elapsed < 60, elapsed
