import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def bottle_dir():
    d = SHARED_DATA / "mvtec_ad" / "bottle"
    if not d.is_dir():
        pytest.skip(f"real data absent: {d}")
    return d
