"""Run the README's shell commands as written, on a tiny category (a helper other tests can reuse).

:func:`readme_commands` parses every ```bash block of README.md at call time, so commands added to
the README later are covered automatically. Each line is split at ``&&``; the install steps (venv,
activate, pip) are dropped because the test already runs inside the installed environment, and
``python -m pytest`` is dropped because the test suite is what runs this. Everything else runs,
in README order, in one scratch folder, with placeholders (``CATEGORY_DIR``, ``DATA_ROOT``, ...)
mapped to a tiny generated MVTec-layout category.

:func:`run_readme_command` sets the smoke-test knob ``MVTEC_KERAS_SMOKE_TEST`` (see
``mvtec_keras.cli.common.SMOKE_ENV``: train.py / extract.py cap epochs and image size and say so),
so the commands check that they *work*, not what they score.
"""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")

_INSTALL = re.compile(r"^(python3? -m venv\b|\. \S*activate\b|source \S*activate\b|(python3? -m )?pip3? install\b)")
_TEST_SUITE = re.compile(r"^python3? -m pytest\b")


def bash_blocks(path: str = README) -> list:
    """The contents of every ```bash fenced block, in order."""
    with open(path) as f:
        text = f.read()
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def readme_commands(path: str = README) -> list:
    """Commands to run, in README order: ``(command, dropped steps)`` per non-empty README line."""
    out = []
    for block in bash_blocks(path):
        for line in block.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            kept, dropped = [], []
            for step in (s.strip() for s in line.split("&&")):
                (dropped if _INSTALL.match(step) or _TEST_SUITE.match(step) else kept).append(step)
            if kept:
                out.append((" && ".join(kept), dropped))
    return out


def substitute(command: str, placeholders: dict) -> str:
    """Replace whole-word placeholders (``CATEGORY_DIR`` but not ``MY_CATEGORY_DIR_2``)."""
    for name, value in placeholders.items():
        command = re.sub(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", value, command)
    return command


def prepare_workdir(workdir: str) -> str:
    """A scratch folder where ``python train.py`` etc. run the repository's scripts."""
    os.makedirs(workdir, exist_ok=True)
    for name in os.listdir(REPO):
        if name.endswith(".py") and not name.startswith(("setup", "conftest")):
            dst = os.path.join(workdir, name)
            if not os.path.exists(dst):
                os.symlink(os.path.join(REPO, name), dst)
    return workdir


def run_readme_command(command: str, workdir: str, env=None, timeout: int = 600):
    """Run one command with bash in ``workdir`` under the smoke-test knob -> CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    full_env["MVTEC_KERAS_SMOKE_TEST"] = "1"
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, full_env.get("PYTHONPATH")) if p)
    full_env["PATH"] = os.pathsep.join((os.path.dirname(sys.executable), full_env.get("PATH", "")))
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return subprocess.run(["bash", "-c", command], cwd=workdir, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
