"""The MNIST one-class benchmark script on a tiny fake MNIST (plumbing only, not figures)."""

import importlib.util
import json

import numpy as np
import pytest
from test_mnist import write_idx

from mvtec_keras.data.mnist import FILES

REPO_BENCH = __import__("pathlib").Path(__file__).resolve().parents[1] / "bench" / "mnist_oneclass.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("mnist_oneclass", REPO_BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def mnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (150, 28, 28)), "y_train": np.arange(150) % 10,
              "x_test": rng.integers(0, 256, (40, 28, 28)), "y_test": np.arange(40) % 10}
    for key, name in FILES.items():
        write_idx(tmp_path / name, arrays[key])
    return tmp_path


def test_seed_ensemble_runs_resume_and_report(bench, mnist_dir, tmp_path, capsys):
    out = str(tmp_path / "res.json")

    def run(members, *extra):
        return bench.main(["--data", str(mnist_dir), "--protocols", "a", "--digits", "9", "--models", "ganomaly",
                           "--seeds", "1", "--steps", "2", "--members", str(members), "--out", out, *extra])

    assert run(2) == 0
    runs = json.load(open(out))["runs"]
    assert len(runs) == 1 and runs[0]["members"] == 2 and len(runs[0]["member_aurocs"]) == 2
    config = runs[0]["config"]
    assert config["members"] == 2 and config["config"]["seed"] == 2  # run seed 1 -> members 2, 3
    assert run(2, "--resume") == 0  # nothing left to run
    assert len(json.load(open(out))["runs"]) == 1
    # A single-model run of the same case is a different run and goes to its own column.
    assert run(1, "--resume") == 0
    assert len(json.load(open(out))["runs"]) == 2
    capsys.readouterr()
    assert bench.main(["--report", out]) == 0
    table = capsys.readouterr().out
    assert "| case | ganomaly | ganomaly × 2 |" in table
    assert "### Seed ensembles against their own members" in table


def test_bad_members_flag(bench, mnist_dir, capsys):
    assert bench.main(["--data", str(mnist_dir), "--members", "0"]) == 2
    assert "--members" in capsys.readouterr().err
