"""bench/scale.py --doc: the page is generated from the results and keeps its hand-written notes."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import scale  # noqa: E402


def _row(method, n, fit_s, rss):  # a row as run_one writes it
    return {"method": method, "n_train": n, "fit_s": fit_s, "peak_rss_fit_mb": rss, "peak_rss_total_mb": rss,
            "n_scored": 500, "score_img_per_s": 10.0, "params": scale.METHODS[method], "load_avg_end": 1.0}


def test_doc_is_regenerated_and_keeps_the_notes(tmp_path, monkeypatch):
    doc = tmp_path / "bench_scale.md"
    monkeypatch.setattr(scale, "DOC", str(doc))
    rows = [_row("padim", 1000, 50.0, 1400.0), _row("padim", 5000, 250.0, 1450.0)]
    scale.write_doc(rows)
    first = doc.read_text()
    assert "| padim | 1000 | 50.0 | 1400.0 |" in first and "| padim | peak RSS over sizes 1000, 5000 |" in first
    assert scale.NOTES not in first
    doc.write_text(first.replace("| padim |", "| stale |") + f"\n{scale.NOTES} (2026-12-05)\n\n- ran alongside CI\n")
    scale.write_doc(rows)
    text = doc.read_text()
    assert text.startswith(first)  # the generated part is rewritten from the rows (the stale edit is gone)
    assert text.endswith(f"\n{scale.NOTES} (2026-12-05)\n\n- ran alongside CI\n")  # the notes are kept, once
    assert text.count(scale.NOTES) == 1
