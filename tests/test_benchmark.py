"""The benchmark runner and its HTML report on a tiny category (EfficientNet-B0 without weights at 32 px)."""

import csv
import html.parser
import os
import shutil
import subprocess

import pytest
from helpers import make_mvtec

from mvtec_keras.benchmark import MethodSpec, run_benchmark
from mvtec_keras.cli.main import main as mvtec_main

TINY = dict(backbone="efficientnet-b0", weights="none", size=32)


def specs():
    return [
        MethodSpec("padim-tiny", "features", "padim", params={"n_features": 10, "sigma": 1.0}, **TINY),
        # fails in extract.py (unknown detector option): reported, the others go on
        MethodSpec("broken", "features", "padim", params={"bogus": 1}, **TINY),
        MethodSpec("mahalanobis-tiny", "features", "mahalanobis", params={"levels": [7, 8, 9]}, **TINY),
    ]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_mvtec(str(root / "widget"), size=32, n_train=12, n_good=4, defects=("scratch", "hole"), n_defect=3)
    out = str(tmp_path_factory.mktemp("bench") / "out")
    rows = run_benchmark(str(root), specs(), out, progress=False)
    return str(root), out, rows


def _csv(out):
    with open(os.path.join(out, "results.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_writes_every_file_and_isolates_the_failing_cell(bench):
    _, out, rows = bench
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    table = _csv(out)
    assert [(r["category"], r["method"], r["status"]) for r in table] == [
        ("widget", "padim-tiny", "ok"), ("widget", "broken", "failed"), ("widget", "mahalanobis-tiny", "ok")]
    assert "bogus" in table[1]["error"] and table[1]["image_auroc"] == ""
    for r in (table[0], table[2]):
        assert 0 <= float(r["image_auroc"]) <= 1 and float(r["fit_s"]) > 0 and float(r["scoring_img_per_s"]) > 0
        assert float(r["peak_memory_mb"]) > 0 and float(r["model_size_mb"]) > 0 and r["backbone"] == "efficientnet-b0"
    assert table[0]["pixel_auroc"] != "" and table[2]["pixel_auroc"] == ""  # Mahalanobis has no maps
    summary = open(os.path.join(out, "summary.md")).read()
    assert "| padim-tiny | 1 |" in summary and "| broken | 0 |" in summary and "failed: " in summary
    page = open(os.path.join(out, "report.html")).read()
    assert "roc_widget.png" in page and "AUROC per EfficientNet level" in page and "failed: " in page
    for kind in ("best-scored defects", "worst-scored defects", "highest-scored good images"):
        assert kind in page


def test_resume_skips_finished_cells_and_retries_failed_ones(bench, capsys):
    root, out, _ = bench
    cells = os.path.join(out, "cells", "widget")
    stamp = {m: os.path.getmtime(os.path.join(cells, m, "cell.json")) for m in ("padim-tiny", "broken")}
    fixed = specs()
    fixed[1] = MethodSpec("broken", "features", "padim", params={"n_features": 5, "sigma": 1.0}, **TINY)
    rows = run_benchmark(root, fixed, out, progress=True)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]
    assert os.path.getmtime(os.path.join(cells, "padim-tiny", "cell.json")) == stamp["padim-tiny"]  # not re-run
    assert os.path.getmtime(os.path.join(cells, "broken", "cell.json")) > stamp["broken"]
    assert "padim-tiny: finished earlier, skipped" in capsys.readouterr().out
    assert [r["status"] for r in _csv(out)] == ["ok", "ok", "ok"]


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key):
                self.refs.append((tag, a[key]))


def _local_refs(page):
    p = _Links()
    p.feed(open(page).read())
    return p.refs


def test_report_folder_is_self_contained(bench):
    _, out, _ = bench
    refs = _local_refs(os.path.join(out, "report.html"))
    assert sum(t == "img" for t, _ in refs) >= 8
    for _, ref in refs:
        assert "://" not in ref and not ref.startswith("/"), ref  # no network, no absolute path
        assert os.path.isfile(os.path.join(out, ref)), ref


BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")
_CHECK = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const bad = imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src'));
  document.body.setAttribute('data-images', imgs.length);
  document.body.setAttribute('data-broken', JSON.stringify(bad));
});</script>"""


def _browser():
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def test_report_renders_in_headless_chromium(bench):
    browser = _browser()
    if browser is None:
        pytest.skip("no headless Chromium (apt-get install chromium-headless-shell) on this machine")
    _, out, _ = bench
    page = open(os.path.join(out, "report.html")).read()
    probe = os.path.join(out, "report_probe.html")  # beside the report, so relative paths resolve the same
    with open(probe, "w") as f:
        f.write(page.replace("</body>", _CHECK + "</body>"))
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                        "--dump-dom", "file://" + probe], capture_output=True, text=True, timeout=120)
    dom = r.stdout
    assert 'data-broken="[]"' in dom, dom[:500]
    n = int(dom.split('data-images="')[1].split('"')[0])
    assert n == sum(t == "img" for t, _ in _local_refs(os.path.join(out, "report.html"))) and n >= 8


def test_benchmark_cli_bad_input(tmp_path, capsys):
    assert mvtec_main(["benchmark", "--root", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "--root" in capsys.readouterr().err
    assert mvtec_main(["benchmark", "--methods", "padim,nope", "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    assert mvtec_main(["benchmark", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no MVTec-layout category" in capsys.readouterr().err
