"""bench/operating_points.py: the figures of one row, and the page built from rows."""

import csv
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import operating_points as bench  # noqa: E402


def _write_predictions(path, scores, truth, pred):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "defect_type", "score", "prediction", "truth"])
        for i, (s, y, p) in enumerate(zip(scores, truth, pred)):
            w.writerow([f"{i}.png", "good" if y == 0 else "crack", repr(float(s)), int(p), int(y)])


def test_decision_figures_from_predictions_csv(tmp_path):
    path = str(tmp_path / "predictions.csv")
    scores = [0.1, 0.2, 0.3, 0.9, 0.8, 0.25]
    truth = [0, 0, 0, 1, 1, 1]
    pred = [0, 0, 1, 1, 0, 0]  # a poor chosen point: TPR 1/3, TNR 2/3
    _write_predictions(path, scores, truth, pred)
    f = bench.decision_figures(*bench.read_predictions(path))
    assert f["n_eval"] == 6 and f["n_defective"] == 3
    # The oracle: threshold 0.8 flags both high defects and no normal -> (2/3 + 1) / 2.
    assert f["oracle_balanced_accuracy"] == pytest.approx(5 / 6)
    assert f["balanced_accuracy"] == pytest.approx(0.5) and f["gap"] == pytest.approx(1 / 3)
    assert f["good_fpr"] == pytest.approx(1 / 3) and (f["fp"], f["tn"]) == (1, 2)


def _row(dataset, method, label, rule, chosen, oracle=1.0, fpr=0.0, target=0.05, decision="image_score"):
    op = {"rule": "balanced" if rule == "auto" else "fpr", "decision": decision, "target_fpr": target,
          "n_validation": 21, "conformal": {"guaranteed": True}}
    return {"dataset": dataset, "method": method, "label": label, "rule": rule, "operating_point": op,
            "image_auroc": 0.99, "oracle_balanced_accuracy": oracle, "balanced_accuracy": chosen,
            "gap": oracle - chosen, "good_fpr": fpr, "fp": int(round(fpr * 20)), "tn": 20 - int(round(fpr * 20)),
            "host": "ci (2 cores)"}


def test_page_states_before_after_and_the_targets():
    rows = [_row("bottle", "padim", "before", "auto", 0.93, decision="segmentation"),
            _row("bottle", "padim", "after", "auto", 0.99),
            _row("bottle", "padim", "before", "fpr", 0.9, fpr=0.15),
            _row("bottle", "padim", "after", "fpr", 0.9, fpr=0.05),
            _row("bottle", "mvtecCAE", "after", "auto", 0.80, oracle=0.9),
            _row("demo", "padim", "after", "auto", 0.97),
            _row("demo", "padim", "after", "fpr", 0.9, fpr=0.15)]
    text = bench.markdown(rows)
    assert "| bottle | padim | 0.990 | 1.000 | 0.930 | 0.070 | balanced (map regions) | 0.990 | 0.010 |" in text
    assert "| bottle | padim | 21 | 0.05 | yes | 20 | 0.150 | 0.050 | yes |" in text
    assert "| demo | padim | 21 | 0.05 | yes | 20 | - | 0.150 | **no** |" in text
    small = _row("mnist-3", "padim", "after", "fpr", 0.9, fpr=0.15, target=0.01)
    small["operating_point"]["conformal"]["guaranteed"] = False
    assert "| mnist-3 | padim | 21 | 0.01 | no | 20 | - | 0.150 | (n too small) **no** |" in bench.markdown([small])
    assert "- gap <= 0.02 for padim on bottle: met (0.010)" in text
    assert "- gap <= 0.05 for mvtecCAE on bottle: **not met** (0.100)" in text
    assert "- gap <= 0.02 for patchcore on bottle: not run" in text
    assert "PaDiM's balanced accuracy on the demo >= 0.98" in text and "**not met** (0.970)" in text


def test_bad_arguments_are_one_line(capsys, tmp_path):
    assert bench.main(["--label", "later"]) == 2
    assert "--label" in capsys.readouterr().err
    assert bench.main(["--label", "after", "--datasets", "bottle,zebra"]) == 2
    assert "zebra" in capsys.readouterr().err
    assert bench.main(["--label", "after", "--code", str(tmp_path)]) == 2
    assert "--code" in capsys.readouterr().err


def test_method_specs_per_dataset():
    assert [s.name for s in bench.method_specs("bottle")] == ["padim", "patchcore", "mahalanobis", "spade", "mvtecCAE"]
    mnist = bench.method_specs("mnist-3")
    assert [s.name for s in mnist] == ["padim", "mahalanobis"] and all(s.size == 64 and s.crop is None for s in mnist)
    assert [(s.name, s.size) for s in bench.method_specs("cifar10-dog")] == [("mahalanobis", 64)]
