"""`python -m numexp.report`: every promised file, the numbers behind the tables, byte-identical regeneration."""
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from numexp import report, runs, stats
from test_runs import FAILED_ERROR, build_results

PNG = b"\x89PNG\r\n\x1a\n"
FILES = {
    "svm_vs_softmax": {"README.md", "table.csv", "difference.csv", "runs.csv", "curves.png", "confusion.png",
                       "confusion_matrix.csv"},
    "lr_schedule": {"README.md", "table.csv", "difference.csv", "runs.csv", "curves.png", "confusion.png",
                    "confusion_matrix.csv"},
    "reg_sweep": {"README.md", "table.csv", "runs.csv", "curves.png", "accuracy_vs_reg.png", "confusion.png",
                  "confusion_matrix.csv"},
}


@contextmanager
def cwd(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def generate(tree, out, names=None, **kwargs):
    """Reports of ``names`` (None: all, plus the index) from ``tree/results`` into ``out``, run from ``tree``
    as a user would (run paths in the reports are then ``results/...``)."""
    with cwd(tree):
        return report.write_reports(names, ["results"], out, index=names is None, **kwargs)


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return build_results(tmp_path_factory.getbasetemp() / "numexp_runs_tree")


@pytest.fixture(scope="module")
def reports(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    generate(tree, out)
    return out


def summaries_of(tree, sweep):
    out = []
    for path in sorted((tree / "results" / "multirun" / sweep).glob("*/summary.json")):
        s = json.loads(path.read_text())
        s["options"] = dict(o.lstrip("+").split("=", 1) for o in s["overrides"])
        out.append(s)
    return out


# --------------------------------------------------------------------------- files

def test_every_promised_file_is_written_and_linked_from_the_readme(reports):
    assert (reports / "README.md").exists()
    index = (reports / "README.md").read_text()
    for name, files in FILES.items():
        folder = reports / name
        assert {p.name for p in folder.iterdir()} == files | {"runs"}
        readme = (folder / "README.md").read_text()
        for f in files - {"README.md"}:
            assert f"({f})" in readme, f"{name}/README.md does not link {f}"
        assert f"[{name}]({name}/README.md)" in index
        for section in ("## Protocol", "## Results", "## Compared with the seed", "**Verdict.**", "## Curves",
                        "## Confusion matrix", "## Runs"):
            assert section in readme, (name, section)


def test_figures_are_readable_pngs(reports):
    for name, files in FILES.items():
        for f in sorted(x for x in files if x.endswith(".png")):
            path = reports / name / f
            assert path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000
            image = imread(path)
            assert image.shape[0] >= 300 and image.shape[1] >= 400
            # something is drawn: many distinct colours, not a blank canvas
            codes = (image[..., :3] * 255).astype(np.int64) @ np.array([65536, 256, 1])
            assert np.unique(codes).size > 50 and (codes != codes.max()).mean() > 0.02


def test_regeneration_gives_identical_bytes(tree, reports, tmp_path):
    before = snapshot(reports)
    generate(tree, reports)
    assert snapshot(reports) == before
    # and a fresh folder gets the same files: nothing depends on the output location
    generate(tree, tmp_path / "again")
    assert snapshot(tmp_path / "again") == before


def test_a_report_keeps_its_runs_small_files_and_regenerates_from_them_alone(tree, reports, tmp_path):
    kept = reports / "svm_vs_softmax" / "runs"
    files = [p.relative_to(kept).as_posix() for p in sorted(kept.rglob("*")) if p.is_file()]
    runs_kept = {f.rsplit("/", 1)[0].removesuffix("/.hydra") for f in files}
    assert len(runs_kept) == len(pd.read_csv(reports / "svm_vs_softmax" / "runs.csv"))
    assert {f.rsplit("/", 1)[-1] for f in files} <= {"config.yaml", "overrides.yaml", "metrics.csv", "summary.json",
                                                     "confusion.csv", "status.json", "numexp.log"}
    assert not list(kept.rglob("*.npz"))
    # the README names the copies, relative to itself
    readme = (reports / "svm_vs_softmax" / "README.md").read_text()
    assert all(f"`runs/{run}`" in readme for run in runs_kept if "/svm/" not in f"/{run}/") or "runs/svm" in readme
    # the report folders alone (no results/, elsewhere) give the same report again, byte for byte
    moved = tmp_path / "moved"
    shutil.copytree(reports, moved)
    with cwd(tmp_path):
        report.write_reports(None, [moved.name], moved.name, index=True)
    assert snapshot(moved) == snapshot(reports)


# --------------------------------------------------------------------------- numbers

def test_svm_vs_softmax_table_and_paired_difference_are_the_statistics_of_the_runs(tree, reports):
    by_loss = {}
    for s in summaries_of(tree, "svm"):
        by_loss.setdefault(s["options"]["loss"], {})[s["seed"]] = s["test_acc"]
    table = pd.read_csv(reports / "svm_vs_softmax" / "table.csv").set_index("loss.name")
    # the failed seed-7 run and the superseded incomplete copy are not counted
    assert table["n_runs"].to_dict() == {"softmax": 3, "svm_l2": 3}
    for loss, accs in by_loss.items():
        expected = stats.summarize(accs.values())
        row = table.loc[loss]
        for key in ("mean", "std", "ci_low", "ci_high", "min", "max"):
            assert row[f"test_acc_{key}"] == pytest.approx(expected[key], rel=1e-12), key
        assert row["seeds"] == "0 1 2"
    assert table.loc["softmax", "seed_published"] == 0.9855 and table.loc["svm_l2", "seed_published"] == 0.9818

    diff = pd.read_csv(reports / "svm_vs_softmax" / "difference.csv").iloc[0]
    expected = stats.paired_difference(by_loss["softmax"], by_loss["svm_l2"])
    assert (diff["a"], diff["b"], diff["n_pairs"]) == ("softmax", "svm_l2", 3)
    for key in ("mean", "ci_low", "ci_high"):
        assert diff[f"diff_{key}"] == pytest.approx(expected[key], rel=1e-12)
    assert diff["seed_published_diff"] == pytest.approx(0.0037)
    st = pytest.importorskip("scipy.stats")
    seeds = sorted(by_loss["softmax"])
    ref = st.ttest_rel([by_loss["softmax"][s] for s in seeds], [by_loss["svm_l2"][s] for s in seeds])
    assert diff["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert (diff["diff_ci_low"], diff["diff_ci_high"]) == tuple(pytest.approx(v, rel=1e-9)
                                                                for v in ref.confidence_interval(0.95))


def test_svm_vs_softmax_readme_states_seed_numbers_protocol_and_a_computed_verdict(reports):
    readme = (reports / "svm_vs_softmax" / "README.md").read_text()
    diff = pd.read_csv(reports / "svm_vs_softmax" / "difference.csv").iloc[0]
    assert "98.18" in readme and "98.55" in readme and "random 80/20 split" in readme
    assert "`data=digits`, not `gtsrb`" in readme  # our tiny runs are on digits: the report says so
    assert "differs from the seed's in `model.name` mlp (seed: simplenet)" in readme
    assert "`lr` 0.1 (seed: 0.001)" in readme and "`epochs` 4 (seed: 60)" in readme and "`reg`" not in readme
    verdict = re.search(r"\*\*Verdict\.\*\* (.*)", readme).group(1)
    excludes = diff["diff_ci_low"] > 0 or diff["diff_ci_high"] < 0
    assert ("which excludes 0" in verdict) == excludes and ("which includes 0" in verdict) == (not excludes)
    assert f"{100 * diff['diff_mean']:+.2f}" in readme
    for row in ("| dataset | `digits`", "| split sizes | train ", "| epochs | 4 |", "| seeds | 0, 1, 2, 7",
                "| machine |", "| wall time |", "| schedule | dynamic (step_size=2, factor=10) |"):
        assert row in readme, row


def test_failed_runs_are_listed_and_a_repeat_is_superseded(reports):
    readme = (reports / "svm_vs_softmax" / "README.md").read_text()
    runs_section = readme.split("## Runs")[1]
    failed_line = next(line for line in runs_section.splitlines() if "runs/edge/failed" in line)
    assert "| failed |" in failed_line and FAILED_ERROR.splitlines()[0].replace("|", "\\|") in failed_line
    superseded = runs_section.split("Superseded")[1]
    assert "`runs/edge/incomplete` | incomplete" in superseded
    table = pd.read_csv(reports / "svm_vs_softmax" / "runs.csv")
    assert len(table) == 8 and sorted(table["status"].unique()) == ["completed", "failed", "incomplete"]


def test_reg_sweep_table_is_reg_by_loss_with_the_row_best_in_bold(tree, reports):
    readme = (reports / "reg_sweep" / "README.md").read_text()
    lines = [line for line in readme.splitlines() if line.startswith("| ")]
    assert "| reg | L1-SVM | L2-SVM |" in lines
    rows = {line.split(" | ")[0][2:]: line for line in lines if re.match(r"\| (0|0\.001) \|", line)}
    assert set(rows) == {"0", "0.001"}
    accs = {(s["options"]["loss"], float(s["options"]["reg"])): s["test_acc"] for s in summaries_of(tree, "reg")}
    for reg_text, line in rows.items():
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        values = [accs[("svm_l1", float(reg_text))], accs[("svm_l2", float(reg_text))]]
        for cell, value in zip(cells, values):
            assert cell.strip("*") == f"{100 * value:.2f}"
            assert cell.startswith("**") == (value == max(values))
    assert "![Test accuracy against reg](accuracy_vs_reg.png)" in readme
    assert re.search(r"L2-SVM ≥ L1-SVM \(mean over seeds\) at \d of 2 reg values", readme)


def test_lr_schedule_reports_the_epoch_of_the_best_model(tree, reports):
    table = pd.read_csv(reports / "lr_schedule" / "table.csv").set_index("schedule.name")
    best = {}
    for s in summaries_of(tree, "lr"):
        best.setdefault(s["options"]["schedule"], []).append(str(s["best_epoch"]))
    for schedule, epochs in best.items():
        assert table.loc[schedule, "best_epochs"] == " ".join(epochs)
    assert "dynamic − fixed, paired by seed" in (reports / "lr_schedule" / "README.md").read_text()


def test_confusion_matrix_is_the_best_runs_test_accuracy(tree, reports):
    with cwd(tree):
        table = runs.gather(["results"])
    done = table[(table["experiment"] == "svm_vs_softmax") & (table["status"] == "completed")]
    best = done.sort_values("val_acc", ascending=False, kind="stable").iloc[0]
    matrix = pd.read_csv(reports / "svm_vs_softmax" / "confusion_matrix.csv", index_col=0).to_numpy()
    assert matrix.shape == (10, 10) and matrix.sum() == 359  # the digits test split
    assert np.trace(matrix) / matrix.sum() == pytest.approx(best["test_acc"], abs=1e-12)
    archived = "runs/" + "/".join(best["run_dir"].split("/")[-2:])  # the report's copy of the run
    assert f"`{archived}`" in (reports / "svm_vs_softmax" / "README.md").read_text()


def test_confusion_matrix_is_skipped_with_a_note_without_a_checkpoint(tree, tmp_path):
    out = tmp_path / "reports"
    generate(tree, out, ["lr_schedule"])
    assert (out / "lr_schedule" / "confusion.png").exists()
    copy = tmp_path / "copy"
    shutil.copytree(tree / "results" / "multirun" / "lr", copy / "results" / "lr",
                    ignore=shutil.ignore_patterns("checkpoint.npz", "confusion.csv"))
    generate(copy, out, ["lr_schedule"])
    readme = (out / "lr_schedule" / "README.md").read_text()
    assert "Skipped: the run folder has no checkpoint.npz" in readme
    # the stale figure of the earlier report is gone, the other files are rewritten
    assert {p.name for p in (out / "lr_schedule").iterdir()} == FILES["lr_schedule"] - {
        "confusion.png", "confusion_matrix.csv"} | {"runs"}


def test_cli_all_writes_the_index_and_names_missing_experiments(tree, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "numexp.report", *args], cwd=tree, capture_output=True,
                              text=True, timeout=120)

    proc = cli("--all", "--runs", "results", "--out", str(tmp_path / "out"), "--no-confusion")
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"README.md", *FILES}
    assert not (tmp_path / "out" / "reg_sweep" / "confusion.png").exists()
    proc = cli("optimizers", "--runs", "results", "--out", str(tmp_path / "out"))
    assert proc.returncode == 1 and "no runs of experiment optimizers" in proc.stderr
    assert "lr_schedule, reg_sweep, svm_vs_softmax" in proc.stderr and "Traceback" not in proc.stderr
    assert cli().returncode == 2
    proc = cli("results")  # a folder where an experiment name belongs: how to say what was meant
    assert proc.returncode == 1 and "no runs of experiment results" in proc.stderr
    assert "numexp report --all --runs results" in proc.stderr and "numexp runs results" in proc.stderr
    assert "is a folder" not in cli("optimizers", "--runs", "results").stderr
