"""The benches answer bad input as the CLI does: one line naming the flag, exit code 2, no traceback."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script, argv, flag", [
    ("ae_throughput.py", ["--data", "/nonexistent"], "--data"),
    ("autoencoders.py", ["--data", "/nonexistent"], "--data"),
    ("ae_map_postprocessing.py", ["-p", "/nonexistent"], "-p/--path"),
    ("mnist_oneclass.py", ["--set", "ganomaly.filters"], "--set"),
    ("cifar10.py", ["--set", "ganomaly.tanh_output"], "--set"),
])
def test_bad_input_is_one_line_and_exit_2(script, argv, flag, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO}
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", script), *argv], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in r.stderr, r.stderr[-2000:]
